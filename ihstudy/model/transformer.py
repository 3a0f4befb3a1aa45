"""The attention-only transformer of docs/science.md §2, as R stacked copies ("runs") with named sites.

Every parameter carries a leading run axis, so a batched sweep trains R independent models with
the same few large ops a single model needs (R=1 for a single run). All parameters of all runs
live in one flat buffer `flat` [R, P] (and their gradients in `flat_grad`), which makes the
optimizer, gradient norms and checkpoints one tensor operation each.

Named activation sites (TransformerLens names; every tensor has the run axis R first):

  hook_embed                      [R, B, T, D]  token embeddings (exemplar and label tokens)
  hook_pos_embed                  [R|1, 1, T, D] learned or sinusoidal positions (absent for rotary)
  blocks.{l}.hook_resid_pre       [R, B, T, D]
  blocks.{l}.hook_qk_input        [R, B, T, D]  residual read by Q and K   (opt-in, see below)
  blocks.{l}.hook_v_input         [R, B, T, D]  residual read by V         (opt-in)
  blocks.{l}.ln1.hook_normalized  [R, B, T, D]
  blocks.{l}.attn.hook_q/k/v      [R, B, T, H, d_head]
  blocks.{l}.attn.hook_rot_q/k    [R, B, T, H, d_head]  after rotary embedding
  blocks.{l}.attn.hook_attn_scores [R, B, H, Tq, Tk]  pre-softmax, scaled and causally masked
  blocks.{l}.attn.hook_pattern    [R, B, H, Tq, Tk]
  blocks.{l}.attn.hook_z          [R, B, T, H, d_head]  pattern-weighted values
  blocks.{l}.attn.hook_result     [R, B, T, H, D]  per-head output after W_O (opt-in)
  blocks.{l}.hook_attn_out        [R, B, T, D]
  blocks.{l}.hook_resid_mid, blocks.{l}.mlp.hook_pre/hook_post, blocks.{l}.hook_mlp_out  (with an MLP)
  blocks.{l}.hook_resid_post      [R, B, T, D]
  ln_final.hook_normalized        [R, B, T, D]
  hook_logits                     [R, B, T, n_labels]

In a query-only pass (`model(batch, query_only=True)`, what training and evaluation run) the last
block computes its query row alone: its query-side sites (q, rot_q, attn_scores, pattern, z, result,
attn_out, resid_mid, MLP sites, resid_post), ln_final and the logits then have Tq = 1 row where the
table says T.

A hook is `fn(tensor, hook) -> tensor | None` (hook.name is the site name); returning a tensor
replaces the activation. Opt-in sites change how the layer is computed (per-head results summed,
Q/K and V read from separate inputs), so they run only when hooked or named in a cache filter.
The list of sites is not kept by hand: a dry pass at construction notes every `_site` call the
forward code makes (`site_names`), so a new site is one `_site(...)` line.
Token positions: exemplar i at 2i, its label at 2i+1, the query at T-1 = 2N.

The wiring of the model is written once, in `Transformer.forward`: every pass runs it with the
hooks installed (clamps, analyses; with none, every site is a no-op), and the fast path
(fast_path.py) differentiates it as a pure function of the parameters.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ihstudy.errors import ConfigError
from ihstudy.tasks.base import TokenBatch, task_family
from ihstudy.tasks.fsl import Batch

# Parameters are views into one flat buffer; autograd notes that their strides skip the other runs.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

OPT_IN_SITES = ("hook_qk_input", "hook_v_input", "attn.hook_result")


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    d_model: int
    n_features: int
    n_labels: int
    context_len: int
    positional: str = "rotary"  # one of POSITIONALS
    rotary_base: float = 10000.0
    mlp_ratio: float = 0.0  # 0: attention-only
    input: str = "exemplar_label"  # exemplar_label (fsl) | tokens: the task family's model_input

    @classmethod
    def of_config(cls, cfg, n_features: int) -> ModelShape:
        """The shape a run config (a DictConfig, or a checkpoint's saved dict) gives `n_features`-dim exemplars.
        For a token family, n_labels is the vocabulary and context_len the sequence length."""
        m, family = cfg["model"], task_family(cfg["task"])
        outputs, positions = family.model_dims(cfg["task"])
        return cls(n_layers=m["n_layers"], n_heads=m["n_heads"], d_model=m["d_model"], n_features=n_features,
                   n_labels=outputs, context_len=positions, positional=m["positional"],
                   rotary_base=float(m["rotary_base"]), mlp_ratio=float(m["mlp_ratio"]), input=family.model_input)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_tokens(self) -> int:
        return self.context_len if self.input == "tokens" else 2 * self.context_len + 1

    @property
    def query_rows(self) -> int:
        """Positions a sequence computes, summed over the layers: all T in every layer but the last,
        which computes the query alone; all T in every layer for a token family's model (next-token
        loss at every position)."""
        if self.input == "tokens":
            return self.n_layers * self.n_tokens
        return (self.n_layers - 1) * self.n_tokens + 1

    @property
    def d_mlp(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of one run, in a fixed order (the order of the flat buffer and of init)."""
        D, L = self.d_model, self.n_labels
        if self.input == "tokens":
            shapes = {"embed.W_E": (L, D)}
        else:
            shapes = {"embed.W_x": (self.n_features, D), "embed.b_x": (D,), "embed.W_y": (L, D)}
        if self.positional == "learned":
            shapes["pos_embed.W_pos"] = (self.n_tokens, D)
        for layer in range(self.n_layers):
            b = f"blocks.{layer}."
            shapes |= {b + "ln1.w": (D,), b + "ln1.b": (D,),
                       b + "attn.W_QKV": (D, 3 * D), b + "attn.W_O": (D, D)}
            if self.d_mlp:
                shapes |= {b + "ln2.w": (D,), b + "ln2.b": (D,), b + "mlp.W_in": (D, self.d_mlp),
                           b + "mlp.b_in": (self.d_mlp,), b + "mlp.W_out": (self.d_mlp, D), b + "mlp.b_out": (D,)}
        return shapes | {"ln_final.w": (D,), "ln_final.b": (D,), "unembed.W_U": (D, L), "unembed.b_U": (L,)}


def check_checkpoint_model(state: dict, shape: ModelShape, source: str) -> None:
    """Refuse (ConfigError, one line) a checkpoint whose model is not one of `shape`: other tensor
    shapes, or equal tensor shapes that mean something else (8 heads of width 8 or 4 of width 16,
    other positions), as the run config saved in it tells."""
    try:
        exemplars = state["model"].get("embed.W_x")
        saved = ModelShape.of_config(state["config"], 0 if exemplars is None else exemplars.shape[0])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ConfigError):
        raise ConfigError(f"{source} holds no model and config of an ihstudy run") from None
    differ = [f"{f.name} {getattr(saved, f.name)} vs {getattr(shape, f.name)}" for f in fields(ModelShape)
              if getattr(saved, f.name) != getattr(shape, f.name)]
    if differ:
        raise ConfigError(f"{source} holds a model of another shape ({', '.join(differ)}: saved vs wanted)")


INIT_SCHEMES = ("lecun_normal", "uniform", "small_normal")
POSITIONALS = ("rotary", "learned", "sinusoidal")  # model.positional: rotary embedding, or absolute positions added
# A standard normal truncated at +-2 has std 0.8796: dividing by it restores the intended std
# (JAX's variance_scaling(1, "fan_in", "truncated_normal"), the authors' lecun_normal).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def init_param(name: str, shape: tuple[int, ...], g: torch.Generator, scheme: str = "lecun_normal") -> torch.Tensor:
    """One parameter's initial value (docs/science.md, "Model").

    Both schemes: label (or token) embedding and learned positions: truncated normal with std 0.02 cut at
    +-2 std, zero biases, unit LayerNorm gains. Weight matrices:
      lecun_normal (default, the authors'): normal truncated at +-2 std, variance 1/fan_in.
      uniform (ihstudy's earlier default): uniform(+-1/sqrt(fan_in)) (variance 1/(3 fan_in)), and an
        untruncated normal of variance 1/fan_in for the exemplar embedding.
      small_normal (minGPT's, which Edelman et al. use for Markov chains): normal with std 0.02, W_O 0.01.
    """
    leaf = name.rsplit(".", 1)[1]
    if name in ("embed.W_y", "embed.W_E", "pos_embed.W_pos"):
        return torch.nn.init.trunc_normal_(torch.empty(shape), std=0.02, a=-0.04, b=0.04, generator=g)
    if leaf == "w":
        return torch.ones(shape)
    if leaf.startswith("b"):
        return torch.zeros(shape)
    if scheme == "small_normal":
        return torch.randn(shape, generator=g) * (0.01 if leaf == "W_O" else 0.02)
    fan_in = shape[0]
    if scheme == "lecun_normal":
        std = 1 / math.sqrt(fan_in) / TRUNCATED_NORMAL_STD
        return torch.nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std, generator=g)
    if name == "embed.W_x":
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return (torch.rand(shape, generator=g) * 2 - 1) * (1 / math.sqrt(fan_in))


@dataclass(frozen=True)
class HookPoint:
    name: str


class SiteTrace(dict):
    """Stands in for the hook table during site_names' dry pass: notes every site reached and, with
    opt_in, makes the forward code take the opt-in sites' branches."""

    def __init__(self, opt_in: bool):
        super().__init__()
        self.names: list[str] = []
        self.opt_in = opt_in

    def __bool__(self) -> bool:
        return True

    def __contains__(self, name) -> bool:
        return self.opt_in or not name.endswith(OPT_IN_SITES)

    def get(self, name, default=None):
        self.names.append(name)
        return default


class Transformer:
    def __init__(self, shape: ModelShape, n_runs: int = 1, device: str | torch.device = "cpu"):
        self.shape, self.n_runs, self.device = shape, n_runs, torch.device(device)
        shapes = shape.param_shapes()
        sizes = [math.prod(s) for s in shapes.values()]
        self.flat = torch.zeros(n_runs, sum(sizes), device=self.device)
        self.flat_grad = torch.zeros_like(self.flat)
        self.params: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for (name, s), size in zip(shapes.items(), sizes):
            param = self.flat[:, offset:offset + size].view(n_runs, *s).requires_grad_()
            param.grad = self.flat_grad[:, offset:offset + size].view(n_runs, *s)
            self.params[name], self._offsets[name], offset = param, (offset, offset + size), offset + size
        self._setup_positions()
        self._site_names = self._trace_sites()
        self._known_sites = frozenset(self._site_names)  # checked on every hooked (clamped) pass

    # --- parameters ---------------------------------------------------------------------------

    def init_(self, seeds: list[int], scheme: str = "lecun_normal") -> Transformer:
        """Initialise run r from its own generator seeded with seeds[r] (schemes: init_param)."""
        with torch.no_grad():
            for run, seed in enumerate(seeds):
                g = torch.Generator().manual_seed(seed)
                for name, param in self.params.items():
                    param[run] = init_param(name, tuple(param.shape[1:]), g, scheme)
        return self

    def state_dict(self, run: int) -> dict[str, torch.Tensor]:
        return {name: p[run].detach().clone().cpu() for name, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], run: int) -> None:
        expected = {name: tuple(p.shape[1:]) for name, p in self.params.items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        if expected != found:
            raise ValueError("checkpoint does not match the model shape")
        with torch.no_grad():
            for name, p in self.params.items():
                p[run] = state[name]

    @property
    def n_params(self) -> int:
        return self.flat.shape[1]

    # --- sites ----------------------------------------------------------------------------------

    def site_names(self) -> list[str]:
        return list(self._site_names)

    def _trace_sites(self) -> list[str]:
        """Every site the forward code reaches, in order: a dry pass without, then with the opt-in
        sites' branches (which replace ln1.hook_normalized), merged."""
        s, R = self.shape, self.n_runs
        if s.input == "tokens":
            batch = TokenBatch(*[torch.zeros(R, 1, s.n_tokens, dtype=torch.long, device=self.device)] * 2)
        else:
            batch = Batch(torch.zeros(R, 1, s.context_len + 1, s.n_features, device=self.device),
                          torch.zeros(R, 1, s.context_len, dtype=torch.long, device=self.device),
                          torch.zeros(R, 1, dtype=torch.long, device=self.device))
        plain, opt_in = SiteTrace(opt_in=False), SiteTrace(opt_in=True)
        with torch.no_grad():
            for trace in (plain, opt_in):
                self._hooks = trace
                self(batch)
        self._hooks = {}
        names = list(plain.names)
        for before, name in zip(opt_in.names, opt_in.names[1:]):
            if name not in names:
                names.insert(names.index(before) + 1, name)
        return names

    @contextmanager
    def hooks(self, fwd_hooks):
        """Install (site name, fn) hooks for the duration of the block (nesting adds to outer hooks)."""
        previous = self._hooks
        merged = {name: list(fns) for name, fns in previous.items()}
        for name, fn in fwd_hooks:
            if name not in self._known_sites:
                raise KeyError(f"unknown activation site '{name}'")
            merged.setdefault(name, []).append(fn)
        self._hooks = merged
        try:
            yield self
        finally:
            self._hooks = previous

    def run_with_hooks(self, batch: Batch, fwd_hooks, query_only: bool = False) -> torch.Tensor:
        with self.hooks(fwd_hooks):
            return self(batch, query_only)

    def run_with_cache(self, batch: Batch, names_filter=None, fwd_hooks=(), query_only: bool = False):
        """Logits and a dict of recorded activations (all always-on sites, or those in names_filter).

        Recorded tensors keep their autograd history, so a later pass may train through them.
        """
        if names_filter is None:
            names = [n for n in self.site_names() if not n.endswith(OPT_IN_SITES)]
        elif callable(names_filter):
            names = [n for n in self.site_names() if names_filter(n)]
        else:
            names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        cache: dict[str, torch.Tensor] = {}

        def record(tensor, hook):
            cache[hook.name] = tensor

        with self.hooks(list(fwd_hooks) + [(name, record) for name in names]):
            logits = self(batch, query_only)
        return logits, cache

    def _site(self, name: str, x: torch.Tensor) -> torch.Tensor:
        fns = self._hooks.get(name) if self._hooks else None
        if fns:
            hook = HookPoint(name)
            for fn in fns:
                out = fn(x, hook)
                if out is not None:
                    x = out
        return x

    def _hooked(self, name: str) -> bool:
        return name in self._hooks

    # --- the forward pass -----------------------------------------------------------------------

    def __call__(self, batch: Batch, query_only: bool = False) -> torch.Tensor:
        """Logits [R, B, T, n_labels] for sequences with run axis: exemplars [R, B, N+1, F].

        query_only: the last block computes its query row alone, which is all the loss and the
        evaluation read (a cheaper pass); its query-side sites (hook_q, hook_rot_q, hook_attn_scores,
        hook_pattern, hook_z, hook_result, hook_attn_out, hook_resid_post, ...) then hold that row
        only ([..., 1, ...] where the full pass has T), as do the final LayerNorm and the logits."""
        return self.forward(self.params, self.embedding_inputs(batch), query_only)

    def forward(self, params: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...], query_only: bool = False,
                ) -> torch.Tensor:
        """The one wiring of the model: logits of the embedding inputs (`embedding_inputs`) under `params`
        (self.params, or any tensors of their shapes: the fast path differentiates it as a pure
        function of them, fast_path.py). Every site runs the installed hooks; with none installed
        (the fast path) each site is a no-op."""
        s = self.shape
        resid = self._site("hook_embed", embed(inputs, params))
        if s.positional != "rotary":
            resid = resid + self._site("hook_pos_embed", self.absolute_positions(params))
        for layer in range(s.n_layers):
            resid = self._block(params, layer, resid, query_only and layer == s.n_layers - 1)
        final = self._site("ln_final.hook_normalized", layer_norm(resid, params["ln_final.w"], params["ln_final.b"]))
        return self._site("hook_logits", unembed(final, params))

    def embedding_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """What `forward` embeds: the batch's exemplars [..., N+1, F] and labels [..., N] (few-shot), or
        its tokens [..., T] (a token family's model)."""
        if self.shape.input == "tokens":
            return (batch.tokens,)
        return batch.exemplars, batch.labels

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter as a view into `buffer` [R, P], laid out like flat."""
        spans = zip(self.params.items(), self._offsets.values())
        return {name: buffer[:, start:end].view(p.shape) for (name, p), (start, end) in spans}

    def _block(self, params: dict[str, torch.Tensor], layer: int, resid: torch.Tensor, query_only: bool = False) -> torch.Tensor:
        b = f"blocks.{layer}."
        resid = self._site(b + "hook_resid_pre", resid)
        attn_out = self._site(b + "hook_attn_out", self._attention(params, layer, resid, query_only))
        resid = (resid[:, :, -1:] if query_only else resid) + attn_out
        if self.shape.d_mlp:
            resid = self._site(b + "hook_resid_mid", resid)
            resid = resid + self._site(b + "hook_mlp_out", self._mlp(params, layer, resid))
        return self._site(b + "hook_resid_post", resid)

    def _mlp(self, p: dict[str, torch.Tensor], layer: int, resid: torch.Tensor) -> torch.Tensor:
        b = f"blocks.{layer}."
        return mlp(layer_norm(resid, p[b + "ln2.w"], p[b + "ln2.b"]), p, b, self._site)

    def _attention(self, p: dict[str, torch.Tensor], layer: int, resid: torch.Tensor, query_only: bool = False) -> torch.Tensor:
        s, b = self.shape, f"blocks.{layer}."
        H, dh, D = s.n_heads, s.d_head, s.d_model
        qkv = self._qkv(p, layer, resid)  # [3, R, B, H, T, d_head]: head-major, as the matmuls want it
        queries = slice(-1, None) if query_only else slice(None)  # the rows this pass computes
        q, k, v = (self._head_major_site(b + "attn.hook_" + n, t)
                   for n, t in zip("qkv", (qkv[0][..., queries, :], qkv[1], qkv[2])))
        if s.positional == "rotary":  # q and k in one go; qkv[:2] saves a copy unless a hook replaced them
            if query_only:
                q, k = self.rotate(q, rows=queries), self.rotate(k)
            else:
                q, k = self.rotate(qkv[:2] if q is qkv[0] and k is qkv[1] else torch.stack([q, k]))
            q, k = self._head_major_site(b + "attn.hook_rot_q", q), self._head_major_site(b + "attn.hook_rot_k", k)
        scores = self._site(b + "attn.hook_attn_scores", attention_scores(q, k, self.causal_mask))
        pattern = self._site(b + "attn.hook_pattern", softmax(scores))
        z = self._site(b + "attn.hook_z", attention_z(pattern, v))  # [R, B, Tq, H, d_head]
        W_O = p[b + "attn.W_O"]
        if self._hooked(b + "attn.hook_result"):
            per_head = W_O.view(W_O.shape[0], 1, 1, H, dh, D)
            result = self._site(b + "attn.hook_result", (z.unsqueeze(-2) @ per_head).squeeze(-2))
            return result.sum(3)
        return project_out(z, W_O)

    def _qkv(self, p: dict[str, torch.Tensor], layer: int, resid: torch.Tensor) -> torch.Tensor:
        """q, k, v [3, R, B, H, T, d_head], each contiguous; Q/K and V read separate inputs if hooked."""
        b = f"blocks.{layer}."
        w, bias, W_QKV = p[b + "ln1.w"], p[b + "ln1.b"], p[b + "attn.W_QKV"]
        if self._hooked(b + "hook_qk_input") or self._hooked(b + "hook_v_input"):
            D = self.shape.d_model
            qk = linear(layer_norm(self._site(b + "hook_qk_input", resid), w, bias), W_QKV[..., :2 * D])
            v = linear(layer_norm(self._site(b + "hook_v_input", resid), w, bias), W_QKV[..., 2 * D:])
            qkv = split_qkv(torch.cat([qk, v], -1), self.shape.n_heads)
        else:
            qkv = project_qkv(self._site(b + "ln1.hook_normalized", layer_norm(resid, w, bias)), W_QKV, self.shape.n_heads)
        return qkv.permute(3, 0, 1, 4, 2, 5).contiguous()

    def _head_major_site(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run site `name` ([R, B, T, H, d_head], as TransformerLens shows q, k, v) on x [R, B, H, T, d_head]."""
        if not self._hooks or name not in self._hooks:
            return x
        token_major = x.transpose(2, 3)
        out = self._site(name, token_major)
        return x if out is token_major else out.transpose(2, 3)

    # --- positions ----------------------------------------------------------------------------

    def _setup_positions(self) -> None:
        s, dev = self.shape, self.device
        T = s.n_tokens
        future = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)
        self.causal_mask = torch.zeros(T, T, device=dev).masked_fill(future, -math.inf)
        positions = torch.arange(T, dtype=torch.float32, device=dev)[:, None]
        if s.positional == "rotary":
            half = s.d_head // 2
            freqs = s.rotary_base ** (-torch.arange(half, dtype=torch.float32, device=dev) / half)
            angles = positions * freqs  # [T, half], both halves of a head share frequencies
            # rotated = x * cos + swap_halves(x) * (-sin, +sin) = (x1 cos - x2 sin, x2 cos + x1 sin)
            self._cos = angles.cos().repeat(1, 2)  # [T, d_head]
            self._signed_sin = torch.cat([-angles.sin(), angles.sin()], 1)
        elif s.positional == "sinusoidal":
            div = torch.exp(torch.arange(0, s.d_model, 2, dtype=torch.float32, device=dev) * (-math.log(10000.0) / s.d_model))
            table = torch.zeros(T, s.d_model, device=dev)
            table[:, 0::2], table[:, 1::2] = torch.sin(positions * div), torch.cos(positions * div)
            self._sinusoid = table

    def rotate(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Rotary embedding (GPT-NeoX halves convention) of x [..., T, d_head] holding the positions `rows`."""
        return torch.addcmul(x * self._cos[rows], x.roll(self.shape.d_head // 2, -1), self._signed_sin[rows])

    def absolute_positions(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.shape.positional == "learned":
            return params["pos_embed.W_pos"][:, None]
        return self._sinusoid[None, None]


def rows(x: torch.Tensor) -> torch.Tensor:
    """[R, ..., features] -> [R, rows, features]: the shape of one batched matmul per run."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, ..., in] @ weight [R|1, in, out] (+ bias [R|1, out]) as one batched matmul per run."""
    out = (rows(x) @ weight).view(*x.shape[:-1], weight.shape[-1])
    return out if bias is None else out + per_run(bias, x.dim())


def per_run(param: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-run vector [R, n] viewed to broadcast over an activation [R, ..., n] with ndim dimensions."""
    return param.view(param.shape[0], *[1] * (ndim - 2), -1)


def affine(normalized: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm's per-run gain and bias applied to a normalised activation."""
    return torch.addcmul(per_run(bias, normalized.dim()), normalized, per_run(weight, normalized.dim()))


LAYER_NORM_EPS = 1e-5  # F.layer_norm's default


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis with per-run gain and bias [R, D]: normalise, then scale and shift."""
    return affine(F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS), weight, bias)


# --- the building blocks of the forward pass ------------------------------------------------------


def embed(inputs: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token embeddings [R, B, T, D] of Transformer.embedding_inputs: W_E's rows for tokens; for the
    few-shot layout x1 y1 ... xN yN xq, each exemplar through W_x + b_x and each label W_y's row (the
    exemplars alone go through the exemplar projection, the costliest matmul with 512-d features)."""
    if "embed.W_E" in params:
        (tokens,) = inputs
        return linear(one_hot(tokens, params["embed.W_E"]), params["embed.W_E"])
    exemplars, labels = inputs
    x = linear(exemplars, params["embed.W_x"], params["embed.b_x"])  # [R, B, N+1, D]
    y = linear(one_hot(labels, params["embed.W_y"]), params["embed.W_y"])  # [R, B, N, D]
    pairs = torch.stack([x[..., :-1, :], y], -2).flatten(-3, -2)  # x1 y1 ... xN yN
    return torch.cat([pairs, x[..., -1:, :]], -2)


def one_hot(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [...] as one-hot rows over the rows of an embedding table [R, n, D] (a matmul picks them)."""
    return F.one_hot(ids, table.shape[1]).to(table.dtype)


def split_qkv(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[R, B, T, 3*D] -> q, k, v as one view [R, B, T, 3, H, d_head] (token-major, no copy)."""
    R, B, T, _ = qkv.shape
    return qkv.view(R, B, T, 3, n_heads, -1)


def project_qkv(normalized: torch.Tensor, W_QKV: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q, k, v [R, B, T, 3, H, d_head] of the layer-normed residual, in one matmul."""
    return split_qkv(linear(normalized, W_QKV), n_heads)


def attention_scores(q: torch.Tensor, k: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
    """Scaled, causally masked scores q.k / sqrt(d_head) [R, B, H, Tq, T] from q [R, B, H, Tq, dh] and k [R, B, H, T, dh]."""
    return torch.add(causal_mask[-q.shape[-2]:], head_matmul(q, k.transpose(-1, -2)), alpha=q.shape[-1] ** -0.5)


def attention_z(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pattern-weighted values z [R, B, Tq, H, dh] from pattern [R, B, H, Tq, T] and v [R, B, H, T, dh]."""
    return head_matmul(pattern, v).transpose(2, 3)


# ATen's CPU batched matmul multiplies an m x k by k x n pair with m*k*n below this in a plain loop
# (aten/src/ATen/native/LinearAlgebra.cpp, baddbmm_cpu_kernel): per output element a sum over k in
# order, one multiply and one add at a time. A few-shot sequence's per-head products (5 x 8 by 8 x 5)
# are that small, and there the loop runs at under 1 GFLOP/s.
ATEN_PLAIN_LOOP_MAX = 400


def head_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over the last two dimensions. Inside a compiled graph, the products ATen would run in
    its plain loop are that same loop written as tensor operations (PlainLoopMatmul), which Inductor
    fuses with its neighbours: the same sums in the same order, so bit-identical values and
    gradients, for faster evals and steps (docs/performance.md). Eager PyTorch keeps `@`: there the
    written-out loop would be one kernel per term."""
    if torch.compiler.is_compiling() and runs_plain_loop(a, b):
        return PlainLoopMatmul.apply(a, b)
    return a @ b


def runs_plain_loop(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a compiled graph's a @ b is ATen's plain loop: on the CPU, small enough, and not a
    single row or column, which Inductor itself turns into a multiply and a sum
    (torch/_inductor/kernel/bmm.py). GPUs keep their own matmul kernels."""
    rows, inner, columns = a.shape[-2], a.shape[-1], b.shape[-1]
    return a.device.type == "cpu" and rows > 1 and columns > 1 and rows * inner * columns < ATEN_PLAIN_LOOP_MAX


def compiled_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as a compiled graph computes it: ATen's plain loop written out where ATen runs it."""
    if not runs_plain_loop(a, b):
        return a @ b
    out = a[..., :, :1] * b[..., :1, :]
    for k in range(1, a.shape[-1]):  # no fused multiply-add: Inductor compiles with -ffp-contract=off
        out = out + a[..., :, k:k + 1] * b[..., k:k + 1, :]
    return out


# Whether PlainLoopMatmul's backward writes out its products too. A step differentiated inside its
# graph (the fast path's torch.func.grad) is faster with them written out; autograd's separately
# compiled backward graph (the hooked path: next-token tasks, preserving ablations) is not, and on
# some packs slower than with ATen's loop
# (benchmarks/bench_plain_loop.py, docs/performance.md). Read while a graph is traced: Dynamo guards on it.
WRITTEN_OUT_BACKWARD = True


@contextmanager
def aten_backward_products():
    """Compiled graphs traced (and, as Dynamo guards on the setting, called) within keep ATen's
    loop for PlainLoopMatmul's backward: the same sums, so the same bits."""
    global WRITTEN_OUT_BACKWARD
    previous, WRITTEN_OUT_BACKWARD = WRITTEN_OUT_BACKWARD, False
    try:
        yield
    finally:
        WRITTEN_OUT_BACKWARD = previous


class PlainLoopMatmul(torch.autograd.Function):
    """compiled_matmul with the backward ATen's matmul has: grad @ b^T and a^T @ grad, products of
    the same three sizes, written out too unless aten_backward_products says otherwise."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return compiled_matmul(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        matmul = compiled_matmul if WRITTEN_OUT_BACKWARD else torch.matmul
        return matmul(grad, b.transpose(-1, -2)), matmul(a.transpose(-1, -2), grad)


def project_out(z: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """The heads' summed output z [R, B, Tq, H, dh] @ W_O -> [R, B, Tq, D]."""
    R, B, Tq, H, dh = z.shape
    return linear(z.reshape(R, B, Tq, H * dh), W_O)


def mlp(normalized: torch.Tensor, params: dict[str, torch.Tensor], block: str, site) -> torch.Tensor:
    """Block `block`'s MLP on its layer-normed input; `site(name, tensor)` sees (and may replace)
    mlp.hook_pre and mlp.hook_post."""
    pre = site(block + "mlp.hook_pre", linear(normalized, params[block + "mlp.W_in"], params[block + "mlp.b_in"]))
    post = site(block + "mlp.hook_post", F.gelu(pre))
    return linear(post, params[block + "mlp.W_out"], params[block + "mlp.b_out"])


def unembed(final: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return linear(final, params["unembed.W_U"], params["unembed.b_U"])


# PyTorch's CPU (log-)softmax kernels are slow for rows as short as 5 tokens or labels; these few
# elementwise ops are faster forward and backward. The max is a constant for autograd.
def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    e = (x - x.detach().amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.detach().amax(-1, keepdim=True)
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def query_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query token, per run and sequence: [R, B]."""
    return cross_entropy(logits[..., -1, :], target)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [..., n_labels] against target [...] (no reduction)."""
    return -log_softmax(logits).gather(-1, target.unsqueeze(-1)).squeeze(-1)
