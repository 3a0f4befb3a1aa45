"""The unclamped forward pass and training step, with the backward pass written out by hand.

Without hooks a training step needs only the query logits and every parameter's gradient. For
this tiny model each tensor op costs far more in overhead than in arithmetic, so the step is
written here with as few ops as possible, on all stacked runs at once: the same maths as
`Transformer.__call__` (model.py) up to float rounding. `tests/test_fast_path.py` checks logits,
patterns and gradients against autograd through the model. Clamped runs train and evaluate
through the model's sites with autograd instead (ClampSet).

Shapes: R runs, B sequences, T tokens, D width, H heads of width dh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ihstudy.data import Batch
from ihstudy.model import Transformer, linear, rows

EPS = 1e-5  # F.layer_norm's default, as the model uses
LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default
NO_SCALE = torch.zeros(())  # `input` of baddbmm calls that only scale a product (beta=0 ignores it)


class Tape:
    """One forward pass of every run on a batch, keeping what the backward pass needs.

    query_only (training): the last block computes the query row alone, the only row the loss reads.
    Otherwise (evaluation) every row; `patterns()` then gives each layer's attention pattern.
    """

    @torch.no_grad()
    def __init__(self, model: Transformer, batch: Batch, inputs: torch.Tensor | None = None, query_only: bool = True):
        """inputs: model.embedding_inputs(batch), if already at hand."""
        self.model, self.p, self.s = model, model.params, model.shape
        self.inputs = model.embedding_inputs(batch) if inputs is None else inputs  # [R, B, T, F+1+L]
        x = linear(self.inputs, model.embedding_weight(model.flat))
        if self.s.positional != "rotary":
            x = x + model.absolute_positions()
        self.blocks = [Block(self, layer, query_only and layer == self.s.n_layers - 1) for layer in range(self.s.n_layers)]
        for block in self.blocks:
            x = block.forward(x)
        self.final_norm = LayerNorm(self, "ln_final", x[:, :, -1:])  # at the query only
        self.logits = linear(self.final_norm.out, self.p["unembed.W_U"], self.p["unembed.b_U"])[:, :, 0]  # [R, B, L]

    def patterns(self) -> list[torch.Tensor]:
        """Every layer's attention pattern [R, B, H, T, T] (a pass with query_only=False)."""
        return [block.pattern for block in self.blocks]

    @torch.no_grad()
    def backward(self, d_logits: torch.Tensor) -> None:
        """Write d(loss)/d(parameter) into model.flat_grad, given d(loss)/d(logits) [R, B, L]."""
        self.grads, d_logits = self.model.param_grads(), d_logits.unsqueeze(2)  # [R, B, 1, L]
        torch.sum(d_logits, (1, 2), out=self.grads["unembed.b_U"])
        torch.bmm(rows(self.final_norm.out).transpose(1, 2), rows(d_logits), out=self.grads["unembed.W_U"])
        d_final = linear(d_logits, self.p["unembed.W_U"].transpose(1, 2))
        d_x = F.pad(self.final_norm.backward(d_final), (0, 0, self.s.n_tokens - 1, 0))
        for block in reversed(self.blocks):
            d_x = block.backward(d_x)
        if self.s.positional == "learned":
            torch.sum(d_x, 1, out=self.grads["pos_embed.W_pos"])
        torch.bmm(rows(self.inputs).transpose(1, 2), rows(d_x), out=self.model.embedding_weight(self.model.flat_grad))


class LayerNorm:
    """LayerNorm `name` applied to x [R, ..., D]: PyTorch's fused kernels, one call per run (each run
    has its own gain and bias)."""

    def __init__(self, tape: Tape, name: str, x: torch.Tensor):
        self.tape, self.name, self.x = tape, name, x
        self.w, self.b = tape.p[name + ".w"], tape.p[name + ".b"]
        per_run = [torch.native_layer_norm(x[r], x.shape[-1:], self.w[r], self.b[r], EPS) for r in range(x.shape[0])]
        self.out, self.mean, self.rstd = (_stack_runs(list(t)) for t in zip(*per_run))

    def backward(self, d_out: torch.Tensor) -> torch.Tensor:
        """Gradient into x; writes the gradients of the gain and bias."""
        grads, d_x = self.tape.grads, []
        for r in range(self.x.shape[0]):
            d_x_r, d_w, d_b = LAYER_NORM_BACKWARD(d_out[r], self.x[r], self.x.shape[-1:], self.mean[r], self.rstd[r],
                                                   self.w[r], self.b[r], [True] * 3)
            grads[self.name + ".w"][r].copy_(d_w)
            grads[self.name + ".b"][r].copy_(d_b)
            d_x.append(d_x_r)
        return _stack_runs(d_x)


class Block:
    """Block `layer`: x + attention(LN(x)) [+ MLP(LN(.))]; its query row alone if `query_only`."""

    def __init__(self, tape: Tape, layer: int, query_only: bool):
        self.tape, self.query_only, self.name = tape, query_only, f"blocks.{layer}."
        self.p = {k[len(self.name):]: v for k, v in tape.p.items() if k.startswith(self.name)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, B, T, D] -> the block's output: [R, B, T, D], or [R, B, 1, D] if query_only."""
        model, s = self.tape.model, self.tape.s
        R, B, T, D = x.shape
        self.x, self.norm = x, LayerNorm(self.tape, self.name + "ln1", x)
        qkv = model.split_heads(linear(self.norm.out, self.p["attn.W_QKV"]))  # [3, R, B, H, T, dh]
        q, k = model.rotate(qkv[:2]) if s.positional == "rotary" else qkv[:2]
        q, mask = (q[..., -1:, :], model.causal_mask[-1:]) if self.query_only else (q, model.causal_mask)
        self.q, self.k, self.v = _batched(q), _batched(k), _batched(qkv[2])  # [R*B*H, T or 1, dh]
        self.pattern = softmax_(torch.baddbmm(mask, self.q, self.k.transpose(1, 2), alpha=s.d_head ** -0.5))
        z = torch.bmm(self.pattern, self.v).view(R, B, s.n_heads, -1, s.d_head)
        self.pattern = self.pattern.view(R, B, s.n_heads, -1, T)
        self.z = z.transpose(2, 3).reshape(R, -1, D)  # [R, B*Tq, D]
        residual = rows(x[:, :, -1:] if self.query_only else x)
        x = torch.baddbmm(residual, self.z, self.p["attn.W_O"]).view(R, B, -1, D)
        return x + self.mlp_forward(x) if s.d_mlp else x

    def backward(self, d_out: torch.Tensor) -> torch.Tensor:
        """Gradient into the block's input x [R, B, T, D], given the gradient of its output [R, B, T, D]
        (rows other than the query's are zero and unused if query_only)."""
        s, grads, model = self.tape.s, self.tape.grads, self.tape.model
        R, B, T, D = self.x.shape
        if s.d_mlp:
            d_out = d_out + self.mlp_backward(d_out)
        d_attn = rows(d_out[:, :, -1:] if self.query_only else d_out)  # [R, B*Tq, D]
        torch.bmm(self.z.transpose(1, 2), d_attn, out=grads[self.name + "attn.W_O"])
        d_z = _batched(torch.bmm(d_attn, self.p["attn.W_O"].transpose(1, 2)).view(R, B, -1, s.n_heads, s.d_head).transpose(2, 3))
        pattern = self.pattern.view(-1, *self.pattern.shape[-2:])
        d_pattern = torch.bmm(d_z, self.v.transpose(1, 2))
        d_v = torch.bmm(pattern.transpose(1, 2), d_z)
        d_scores = pattern * (d_pattern - (d_pattern * pattern).sum(-1, keepdim=True))
        scale = s.d_head ** -0.5
        d_q = torch.baddbmm(NO_SCALE, d_scores, self.k, beta=0, alpha=scale)
        d_k = torch.baddbmm(NO_SCALE, d_scores.transpose(1, 2), self.q, beta=0, alpha=scale)
        if self.query_only:
            d_q = F.pad(d_q, (0, 0, T - 1, 0))
        d_q, d_k, d_v = (d.view(R, B, s.n_heads, T, s.d_head) for d in (d_q, d_k, d_v))
        if s.positional == "rotary":
            d_q, d_k = model.rotate(torch.stack([d_q, d_k]), inverse=True)
        d_qkv = torch.stack([d.transpose(2, 3) for d in (d_q, d_k, d_v)], 3).view(R, B * T, 3 * D)  # [R, B, T, 3, H, dh]
        torch.bmm(rows(self.norm.out).transpose(1, 2), d_qkv, out=grads[self.name + "attn.W_QKV"])
        d_h = torch.bmm(d_qkv, self.p["attn.W_QKV"].transpose(1, 2)).view(R, B, T, D)
        return self.norm.backward(d_h) + d_out

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mlp_norm = LayerNorm(self.tape, self.name + "ln2", x)
        self.mlp_pre = linear(self.mlp_norm.out, self.p["mlp.W_in"], self.p["mlp.b_in"])
        self.mlp_post = F.gelu(self.mlp_pre)
        return linear(self.mlp_post, self.p["mlp.W_out"], self.p["mlp.b_out"])

    def mlp_backward(self, d_out: torch.Tensor) -> torch.Tensor:
        """Gradient into the MLP's input through the MLP alone (the residual path adds d_out)."""
        grads, n = self.tape.grads, self.name
        if self.query_only:
            d_out = d_out[:, :, -1:]
        torch.sum(d_out, (1, 2), out=grads[n + "mlp.b_out"])
        torch.bmm(rows(self.mlp_post).transpose(1, 2), rows(d_out), out=grads[n + "mlp.W_out"])
        d_pre = torch.ops.aten.gelu_backward(linear(d_out, self.p["mlp.W_out"].transpose(1, 2)), self.mlp_pre)
        torch.sum(d_pre, (1, 2), out=grads[n + "mlp.b_in"])
        torch.bmm(rows(self.mlp_norm.out).transpose(1, 2), rows(d_pre), out=grads[n + "mlp.W_in"])
        d_x = self.mlp_norm.backward(linear(d_pre, self.p["mlp.W_in"].transpose(1, 2)))
        return F.pad(d_x, (0, 0, self.x.shape[2] - 1, 0)) if self.query_only else d_x


def _stack_runs(per_run: list[torch.Tensor]) -> torch.Tensor:
    return per_run[0].unsqueeze(0) if len(per_run) == 1 else torch.stack(per_run)


def _batched(x: torch.Tensor) -> torch.Tensor:
    """[R, B, H, T, dh] -> [R*B*H, T, dh]: one small matrix per run, sequence and head."""
    return x.reshape(-1, *x.shape[-2:])


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, in place (PyTorch's kernel is slow for rows of a few tokens)."""
    e = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))
