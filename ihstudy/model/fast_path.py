"""The unclamped training step and forward pass, with the backward pass written out by hand.

Without hooks a training step needs only the query logits and every parameter's gradient. For
this tiny model each tensor op costs far more in overhead than in arithmetic, so the step is
written here as a pure function of tensors with as few ops as possible, on all stacked runs at
once. Its forward pass calls the model's own building blocks (model.py: embed, layer_norm,
project_qkv, rotate, attention_scores, attention_z, project_out, mlp, unembed), so only the
backward pass is written here. Being pure, the step can also be compiled (`train.compile`,
ihstudy/training/compiled.py). `tests/test_fast_path.py` checks losses, patterns and gradients against
autograd through the model for every combination of model options. Clamped runs, and models with
an option the backward below does not handle (`unsupported`), train and evaluate through the
model's sites with autograd instead (ihstudy/training/steps.py).

Shapes: R runs, B sequences, T tokens, D width, H heads of width dh, L labels.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ihstudy.model.transformer import (
    ModelShape,
    Transformer,
    attention_scores,
    attention_z,
    embed,
    layer_norm,
    linear,
    log_softmax,
    mlp,
    project_out,
    project_qkv,
    rows,
    softmax,
    stack_runs,
    unembed,
)

LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default

# Every ModelShape field the backward below handles, with the values it handles (None: any value).
# A new model option is therefore trained through autograd until it is added here (with its backward).
SUPPORTED_OPTIONS = {"n_layers": None, "n_heads": None, "d_model": None, "n_features": None, "n_labels": None,
                     "context_len": None, "positional": ("rotary", "learned", "sinusoidal"), "rotary_base": None,
                     "mlp_ratio": None, "input": ("exemplar_label",)}


def unsupported(shape: ModelShape) -> str | None:
    """Why the fast path cannot train a model of this shape, or None if it can."""
    for option in dataclasses.fields(shape):
        value = getattr(shape, option.name)
        if option.name not in SUPPORTED_OPTIONS:
            return f"it does not know the model option {option.name}"
        if SUPPORTED_OPTIONS[option.name] is not None and value not in SUPPORTED_OPTIONS[option.name]:
            return f"it does not handle {option.name}={value}"
    return None


def train_step(model: Transformer, flat: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor,
               weight: torch.Tensor, lr: torch.Tensor, grad_out: torch.Tensor, log_out: torch.Tensor) -> torch.Tensor:
    """Loss and gradient of every run with parameters `flat` [R, P] on embedding inputs [R, B, T, F+1+L]
    and query labels [R, B]; the loss being each run's mean cross-entropy times weight [R, 1, 1].

    Writes the gradient into grad_out [R, P] and the step's log row (loss, gradient norm, batch
    spread of the logit gradients, lr [R]) into log_out [R, 4]; returns whether every loss is
    finite. A run whose loss is not finite gets a zero gradient at the logits (its parameters'
    gradients may still be NaN); no run's numbers affect another's.
    """
    tape = Tape(model, model.views(flat), inputs)
    loss, logit_grads = query_loss_and_gradients(tape.logits, target)
    finite = torch.isfinite(loss)
    grad_out.copy_(model.flatten(tape.backward(torch.where(finite[:, None, None], logit_grads * weight, 0.0))))
    log_out.copy_(torch.stack([loss, grad_out.norm(dim=1), batch_spread(logit_grads), lr], 1))
    return finite.all()


def query_loss_and_gradients(query_logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run's mean cross-entropy [R], and each sequence's gradient of its own cross-entropy
    with respect to the query logits [R, B, L] (softmax - one-hot)."""
    log_probs = log_softmax(query_logits)
    target = target.unsqueeze(-1)
    loss = -log_probs.gather(-1, target).mean((1, 2))
    return loss, log_probs.exp().scatter_add(-1, target, torch.full_like(target, -1, dtype=log_probs.dtype))


def batch_spread(per_sequence: torch.Tensor) -> torch.Tensor:
    """Per run [R]: root-mean-square deviation, across the batch, of each sequence's gradient
    [R, B, L] from the batch mean: the gradient noise of the step (grad_batch_stddev)."""
    return per_sequence.var(1, correction=0).sum(-1).sqrt()


class Tape:
    """One forward pass of every run, keeping what the backward pass needs.

    params: every parameter [R, ...] by name, as views of a buffer that autograd does not track
    (model.views(model.flat)): the backward pass is the one below.
    query_only (training): the last block computes the query row alone, the only row the loss
    reads; otherwise every row. `patterns()` gives each layer's attention pattern.
    """

    def __init__(self, model: Transformer, params: dict[str, torch.Tensor], inputs: torch.Tensor, query_only: bool = True):
        self.model, self.p, self.s, self.inputs = model, params, model.shape, inputs
        x = embed(inputs, params)
        if self.s.positional != "rotary":
            x = x + model.absolute_positions(params)
        self.blocks = [Block(self, layer, query_only and layer == self.s.n_layers - 1) for layer in range(self.s.n_layers)]
        for block in self.blocks:
            x = block.forward(x)
        self.final_norm = LayerNorm(self, "ln_final", x[:, :, -1:])  # at the query only
        self.logits = unembed(self.final_norm.out, params)[:, :, 0]  # [R, B, L]

    def patterns(self) -> list[torch.Tensor]:
        """Every layer's attention pattern [R, B, H, T, T] (the last layer's [R, B, H, 1, T] if query_only)."""
        return [block.pattern.permute(0, 1, 4, 2, 3) for block in self.blocks]

    def backward(self, d_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """d(loss)/d(parameter) for every parameter, given d(loss)/d(logits) [R, B, L]."""
        self.grads: dict[str, torch.Tensor] = {}
        d_logits = d_logits.unsqueeze(2)  # [R, B, 1, L]
        self.grads["unembed.b_U"] = d_logits.sum((1, 2))
        self.grads["unembed.W_U"] = torch.bmm(rows(self.final_norm.out).transpose(1, 2), rows(d_logits))
        d_final = linear(d_logits, self.p["unembed.W_U"].transpose(1, 2))
        d_x = F.pad(self.final_norm.backward(d_final), (0, 0, self.s.n_tokens - 1, 0))
        for block in reversed(self.blocks):
            d_x = block.backward(d_x)
        if self.s.positional == "learned":
            self.grads["pos_embed.W_pos"] = d_x.sum(1)
        d_embed = torch.bmm(rows(self.inputs).transpose(1, 2), rows(d_x))  # [R, F+1+L, D]
        n_features = self.s.n_features
        self.grads |= {"embed.W_x": d_embed[:, :n_features], "embed.b_x": d_embed[:, n_features],
                       "embed.W_y": d_embed[:, n_features + 1:]}
        return self.grads


class LayerNorm:
    """LayerNorm `name` applied to x [R, ..., D], keeping the row statistics its backward reads."""

    def __init__(self, tape: Tape, name: str, x: torch.Tensor):
        self.tape, self.name, self.x = tape, name, x
        self.w, self.b = tape.p[name + ".w"], tape.p[name + ".b"]
        self.out, self.mean, self.rstd = layer_norm(x, self.w, self.b, stats=True)

    def backward(self, d_out: torch.Tensor) -> torch.Tensor:
        """Gradient into x; records the gradients of the gain and bias. PyTorch's fused kernel, one
        call per run (each run has its own gain)."""
        per_run = [LAYER_NORM_BACKWARD(d_out[r], self.x[r], self.x.shape[-1:], self.mean[r], self.rstd[r],
                                       self.w[r], self.b[r], [True] * 3) for r in range(self.x.shape[0])]
        d_x, self.tape.grads[self.name + ".w"], self.tape.grads[self.name + ".b"] = (stack_runs(list(t)) for t in zip(*per_run))
        return d_x


class Block:
    """Block `layer`: x + attention(LN(x)) [+ MLP(LN(.))]; its query row alone if `query_only`."""

    def __init__(self, tape: Tape, layer: int, query_only: bool):
        self.tape, self.query_only, self.name = tape, query_only, f"blocks.{layer}."
        self.p = {k[len(self.name):]: v for k, v in tape.p.items() if k.startswith(self.name)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, B, T, D] -> the block's output: [R, B, T, D], or [R, B, 1, D] if query_only.
        Attention token-major ([R, B, T, H, dh], see model.attention_scores)."""
        model, s = self.tape.model, self.tape.s
        R = x.shape[0]
        self.x, self.norm = x, LayerNorm(self.tape, self.name + "ln1", x)
        qkv = project_qkv(self.norm.out, self.p["attn.W_QKV"], s.n_heads)  # [R, B, T, 3, H, dh]
        qk = model.rotate(qkv[:, :, :, :2], token_dim=-4) if s.positional == "rotary" else qkv[:, :, :, :2]
        q, self.k = qk.unbind(3)
        self.q, self.v = (q[:, :, -1:] if self.query_only else q), qkv[:, :, :, 2]  # [R, B, Tq or T, H, dh]
        self.pattern = softmax(attention_scores(self.q, self.k, model.causal_mask, token_major=True), dim=3)  # [R, B, Tq, T, H]
        z = attention_z(self.pattern, self.v, token_major=True)
        self.z = z.view(R, -1, s.d_model)  # [R, B*Tq, D], as the backward multiplies it
        x = project_out(z, self.p["attn.W_O"], residual=x[:, :, -1:] if self.query_only else x)
        return x + self.mlp_forward(x) if s.d_mlp else x

    def backward(self, d_out: torch.Tensor) -> torch.Tensor:
        """Gradient into the block's input x [R, B, T, D], given the gradient of its output [R, B, T, D]
        (rows other than the query's are zero and unused if query_only)."""
        s, grads, model = self.tape.s, self.tape.grads, self.tape.model
        R, B, T, D = self.x.shape
        if s.d_mlp:
            d_out = d_out + self.mlp_backward(d_out)
        d_attn = rows(d_out[:, :, -1:] if self.query_only else d_out)  # [R, B*Tq, D]
        grads[self.name + "attn.W_O"] = torch.bmm(self.z.transpose(1, 2), d_attn)
        d_z = torch.bmm(d_attn, self.p["attn.W_O"].transpose(1, 2)).view(self.q.shape)  # [R, B, Tq, H, dh]
        d_pattern = (d_z.unsqueeze(3) * self.v.unsqueeze(2)).sum(-1)  # [R, B, Tq, T, H]
        d_v = (self.pattern.unsqueeze(-1) * d_z.unsqueeze(3)).sum(2)  # [R, B, T, H, dh]
        d_scores = self.pattern * (d_pattern - (d_pattern * self.pattern).sum(3, keepdim=True)) * s.d_head ** -0.5
        d_q = (d_scores.unsqueeze(-1) * self.k.unsqueeze(2)).sum(3)
        d_k = (d_scores.unsqueeze(-1) * self.q.unsqueeze(3)).sum(2)
        if self.query_only:
            d_q = F.pad(d_q, (0, 0, 0, 0, T - 1, 0))
        d_qk = torch.stack([d_q, d_k], 3)  # [R, B, T, 2, H, dh]
        if s.positional == "rotary":
            d_qk = model.rotate(d_qk, inverse=True, token_dim=-4)
        d_qkv = torch.cat([d_qk, d_v.unsqueeze(3)], 3).view(R, B * T, 3 * D)
        grads[self.name + "attn.W_QKV"] = torch.bmm(rows(self.norm.out).transpose(1, 2), d_qkv)
        d_h = torch.bmm(d_qkv, self.p["attn.W_QKV"].transpose(1, 2)).view(R, B, T, D)
        return self.norm.backward(d_h) + d_out

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mlp_norm = LayerNorm(self.tape, self.name + "ln2", x)
        self.mlp_sites: dict[str, torch.Tensor] = {}
        return mlp(self.mlp_norm.out, self.tape.p, self.name, self.keep)

    def keep(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """mlp()'s site function here: keeps mlp.hook_pre and mlp.hook_post for the backward pass."""
        self.mlp_sites[site[len(self.name):]] = x
        return x

    def mlp_backward(self, d_out: torch.Tensor) -> torch.Tensor:
        """Gradient into the MLP's input through the MLP alone (the residual path adds d_out)."""
        grads, n = self.tape.grads, self.name
        if self.query_only:
            d_out = d_out[:, :, -1:]
        grads[n + "mlp.b_out"] = d_out.sum((1, 2))
        pre, post = self.mlp_sites["mlp.hook_pre"], self.mlp_sites["mlp.hook_post"]
        grads[n + "mlp.W_out"] = torch.bmm(rows(post).transpose(1, 2), rows(d_out))
        d_pre = torch.ops.aten.gelu_backward(linear(d_out, self.p["mlp.W_out"].transpose(1, 2)), pre)
        grads[n + "mlp.b_in"] = d_pre.sum((1, 2))
        grads[n + "mlp.W_in"] = torch.bmm(rows(self.mlp_norm.out).transpose(1, 2), rows(d_pre))
        d_x = self.mlp_norm.backward(linear(d_pre, self.p["mlp.W_in"].transpose(1, 2)))
        return F.pad(d_x, (0, 0, self.x.shape[2] - 1, 0)) if self.query_only else d_x

