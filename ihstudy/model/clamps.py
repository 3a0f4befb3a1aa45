"""Clamps ("artificial optogenetics", docs/science.md §4): named overrides of activation sites.

A clamp writes a value into a named activation site (see ihstudy/model/transformer.py) wherever a boolean mask
is true: `torch.where(mask, value, activation)`. Where a value is written, nothing upstream gets
gradient through that site. Every mask includes the run axis, so the runs of one pack may carry
different clamps. `ClampSet` applies them in every training step, every evaluation and every
post-hoc analysis (one code path).

Config: the `clamp` node maps a name to a spec with a `kind` and that kind's fields; all entries
apply together (`clamp=[pt_attention,copy]` merges presets, `+clamp.mine={kind: ablate, heads: ["0:1"]}`
adds one, `clamp.keep=null` drops one). Heads are "layer:head" strings, 0-based (the paper's layer 1
is our layer 0), or mappings `{layer: 1, head: 3}`; a single head may stand without a list. Quote
"layer:head" in YAML files: YAML reads an unquoted 1:3 as the number 63.

Kinds and their fields (see each class for the exact semantics and gradient behaviour):
  ablate              heads, preserve=[]   (preserve: any of patterns, values, queries, keys)
  keep_only           heads, preserve=[]   (ablate every other head of the kept heads' layers)
  prev_token_pattern  heads, strength=1.0, label_rows_only=false
  no_prev_token       heads, label_rows_only=false
  induction_pattern   heads, strength=1.0
  match_pattern       heads, temperature=0.0
  perfect_copy        head
  layer1_input        (no fields)
  head_temperature    heads, temperature
  silence_non_label   heads
  ablate_embedding    (no fields)
  graft_in            layer, checkpoint
  graft_out           layer, checkpoint

Generalisations beyond the paper's two context pairs (any context length and burstiness):
  - induction: strength s is split equally among the label tokens carrying the query's true label
    and 1-s equally among the other label tokens (with 2 pairs: s and 1-s, strength 2s-1).
  - match: weights softmax(cos(query exemplar, context exemplar i) / T) sit on label token 2i+1;
    T=0 is a hardmax that splits ties (cosines within 1e-6 of the best) equally. The cosine is taken
    on the raw exemplar features, so it is independent of the model.
  - perfect copy: label l's logit is the logsumexp of the head's scores over the label tokens that
    carry l (exactly the score itself when l appears once); labels absent from the context get -1e9.
  - layer-1 input: the Q/K residual of block 1 holds, at every position t>0 except the query, the
    embedding of token t-1; token 0 and the query hold their own.

On a token family's model (docs/tasks.md, "Clamps on every family") induction_pattern, perfect_copy
and layer1_input read the family's pieces (TaskFamily.induction_target, copy_token,
previous_position; a family without the piece is refused in one line); match_pattern,
silence_non_label and the label_rows_only variants are few-shot notions, refused on token models.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import ConfigError, UserError
from ihstudy.model.transformer import ModelShape, Transformer, check_checkpoint_model
from ihstudy.run_files import load_checkpoint_file
from ihstudy.schema import within
from ihstudy.tasks.base import TaskFamily, TensorBatch
from ihstudy.tasks.fsl import Batch

NEG = -1e9  # "never attend / never predict" without the NaN gradients of -inf
# what each TaskFamily piece a clamp reads on a token family says (the refusal's words)
TOKEN_PIECES = {"previous_position": "the position a previous-token head reads",
                "induction_target": "where an induction head attends",
                "copy_token": "the token a copy writes"}
PRESERVE_SITES = {"patterns": "attn.hook_pattern", "values": "attn.hook_v",
                  "queries": "attn.hook_q", "keys": "attn.hook_k"}
Head = tuple[int, int]


# --- the clamps -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Clamp:
    """Base: `hooks(model, batch, runs)` returns the (site, fn) hooks for one forward pass;
    `runs` [R] bool says which runs of the pack the clamp acts on."""

    kind: ClassVar[str]
    few_shot_only: ClassVar[bool] = False  # reads the few-shot layout (label tokens, the query): fsl's models only
    token_pieces: ClassVar[tuple[str, ...]] = ()  # the TaskFamily pieces (TOKEN_PIECES) it reads on a token model
    name: str = field(default="", compare=False)
    # the run's task family, whose pieces the clamp reads on a token model. Identical clamps of a pack's runs
    # act once, so a family's pieces may read only the batch and the task settings a pack shares (pack_settings)
    task: TaskFamily | None = field(default=None, compare=False, repr=False)

    def check_layout(self, shape: ModelShape, family: type[TaskFamily] | None) -> None:
        """Refuse (ConfigError) a clamp that reads the few-shot layout on a model of another task family,
        or a piece that the token family does not define."""
        if shape.input == "exemplar_label":
            return
        if self.layout_specific:
            raise ConfigError("needs the few-shot task's exemplar-label layout (label tokens, a query); "
                              "this task family's model reads tokens")
        for piece in self.token_pieces:
            if family is None or not family.defines(piece):
                owner = "no task family was given" if family is None else f"task family {family.__name__} does not define it"
                raise ConfigError(f"needs {piece} ({TOKEN_PIECES[piece]}); {owner}")

    @property
    def layout_specific(self) -> bool:
        """Whether this clamp, with its fields, reads the few-shot layout."""
        return self.few_shot_only

    def check(self, shape: ModelShape) -> None:
        """Raise ConfigError (without the clamp's name) if the model cannot take this clamp."""
        _check_heads(getattr(self, "heads", ()), shape)

    def hooks(self, model: Transformer, batch: Batch, runs: torch.Tensor) -> list:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class AblateHeads(Clamp):
    """Zero the heads' value vectors (`hook_v`), so they write nothing. Carries no gradient: the
    heads' V weights get none, their Q/K weights none either (a pattern over zeros does nothing).

    preserve (patterns, values, queries, keys): a first clean pass (every other clamp, no ablation)
    records those sites in every layer; the ablated pass then reads them from the clean pass. The
    preserved tensors keep their autograd history, so gradient flows through the clean pass."""

    kind = "ablate"
    heads: tuple[Head, ...]
    preserve: tuple[str, ...] = ()

    def hooks(self, model, batch, runs):
        H = model.shape.n_heads
        return [(f"blocks.{layer}.attn.hook_v", _zero_heads(_expand(runs, 5) & _head_mask(heads, H, runs.device, dim=3)))
                for layer, heads in _by_layer(self.heads).items()]


@dataclass(frozen=True, kw_only=True)
class PatternClamp(Clamp):
    """Base of clamps that write fixed attention weights into `hook_pattern` of the given heads.
    The weights carry no gradient: the heads' Q/K weights get none from the clamped rows."""

    heads: tuple[Head, ...]

    def hooks(self, model, batch, runs):
        def hook(heads):
            def fn(pattern, _):
                mask = _expand(runs, 5) & _head_mask(heads, pattern.shape[2], runs.device, dim=2) & self.rows(pattern, batch)
                return torch.where(mask, self.weights(pattern, batch), pattern)
            return fn
        return [(f"blocks.{layer}.attn.hook_pattern", hook(heads)) for layer, heads in _by_layer(self.heads).items()]

    def rows(self, pattern: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Which query rows are overwritten: bool broadcastable to [T, 1] (or [R, B, 1, T, 1]). Default: the query row."""
        return _positions(pattern)[0] == pattern.shape[-1] - 1

    def weights(self, pattern: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PrevTokenPattern(PatternClamp):
    """Row t puts `strength` on token t-1 and 1-strength on itself; token 0 attends to itself.
    label_rows_only: only the label-token rows (odd positions) are clamped."""

    kind = "prev_token_pattern"
    strength: float = within(0, 1, default=1.0)
    label_rows_only: bool = False

    @property
    def layout_specific(self) -> bool:
        return self.label_rows_only

    def rows(self, pattern, batch):
        row, _ = _positions(pattern)
        return row % 2 == 1 if self.label_rows_only else torch.ones_like(row, dtype=torch.bool)

    def weights(self, pattern, batch):
        row, col = _positions(pattern)
        previous = (col == row - 1).to(pattern.dtype)
        return self.strength * previous + (1 - self.strength * (row > 0)) * (col == row)


@dataclass(frozen=True, kw_only=True)
class InductionPattern(PatternClamp):
    """Few-shot layout: the query row puts `strength` on the label tokens carrying the query's true
    label (split equally) and 1-strength on the other label tokens (split equally).

    Token family: every row that has an induction target (the family's `induction_rows`) puts
    `strength` on its `induction_target` (the positions after earlier occurrences of the current
    token, as the family weighs them) and 1-strength equally on the other positions it can see; rows
    without a target keep the head's own pattern (and train its Q/K)."""

    kind = "induction_pattern"
    token_pieces = ("induction_target",)
    strength: float = within(0, 1, default=1.0)

    def rows(self, pattern, batch):
        if _few_shot(batch):
            return super().rows(pattern, batch)
        return self.task.induction_rows(batch)[..., -pattern.shape[-2]:].to(pattern.device)[:, :, None, :, None]

    def weights(self, pattern, batch):
        share = lambda m: m / m.sum(-1, keepdim=True).clamp(min=1)  # noqa: E731
        if not _few_shot(batch):
            target = self.task.induction_target(batch)[..., -pattern.shape[-2]:, :].to(pattern)  # [R, B, Tq, T]
            row, col = _positions(pattern)
            others = ((col <= row) & (target == 0)).to(pattern.dtype)
            return (self.strength * target + (1 - self.strength) * share(others)).unsqueeze(2)
        true = (batch.labels == batch.target.unsqueeze(-1)).to(pattern.dtype)  # [R, B, N]
        return _on_label_tokens(self.strength * share(true) + (1 - self.strength) * share(1 - true), pattern)


@dataclass(frozen=True, kw_only=True)
class MatchPattern(PatternClamp):
    """The query row attends to label token 2i+1 with weight softmax(cos(query exemplar, exemplar i) / T)
    over the context; T=0 is a hardmax splitting ties equally."""

    kind = "match_pattern"
    few_shot_only = True
    temperature: float = within(0, math.inf, default=0.0)

    def weights(self, pattern, batch):
        x = batch.exemplars
        similarity = F.cosine_similarity(x[..., -1:, :], x[..., :-1, :], dim=-1)  # [R, B, N]
        if self.temperature == 0:
            best = (similarity >= similarity.amax(-1, keepdim=True) - 1e-6).to(pattern.dtype)
            match = best / best.sum(-1, keepdim=True)
        else:
            match = torch.softmax(similarity / self.temperature, -1).to(pattern.dtype)
        return _on_label_tokens(match, pattern)


@dataclass(frozen=True, kw_only=True)
class ScoreClamp(Clamp):
    """Base of clamps that rewrite pre-softmax scores (`hook_attn_scores`) of the given heads at
    the (query, key) cells of `cells`."""

    heads: tuple[Head, ...]

    def hooks(self, model, batch, runs):
        def hook(heads):
            def fn(scores, _):
                mask = _expand(runs, 5) & _head_mask(heads, scores.shape[2], runs.device, dim=2) & self.cells(scores)
                return torch.where(mask, self.value(scores), scores)
            return fn
        return [(f"blocks.{layer}.attn.hook_attn_scores", hook(heads)) for layer, heads in _by_layer(self.heads).items()]

    def cells(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=torch.bool, device=scores.device)

    def value(self, scores: torch.Tensor) -> torch.Tensor | float:
        return NEG


@dataclass(frozen=True, kw_only=True)
class NoPrevToken(ScoreClamp):
    """Score (t, t-1) := -1e9, so the heads cannot attend to the previous token (no gradient there).
    label_rows_only: only label-token rows (odd t)."""

    kind = "no_prev_token"
    label_rows_only: bool = False

    @property
    def layout_specific(self) -> bool:
        return self.label_rows_only

    def cells(self, scores):
        row, col = _positions(scores)
        previous = col == row - 1
        return previous & (row % 2 == 1) if self.label_rows_only else previous


@dataclass(frozen=True, kw_only=True)
class SilenceNonLabel(ScoreClamp):
    """Scores toward every non-label key (exemplars and the query) := -1e9 in every row that can see
    a label token, so the heads attend to label tokens only. Carries no gradient at those cells."""

    kind = "silence_non_label"
    few_shot_only = True

    def cells(self, scores):
        row, col = _positions(scores)
        return (col % 2 == 0) & (col <= row) & (row > 0)


@dataclass(frozen=True, kw_only=True)
class HeadTemperature(ScoreClamp):
    """Scores / temperature. Carries gradient (into the heads' Q/K, scaled by 1/temperature)."""

    kind = "head_temperature"
    temperature: float = within(0, math.inf, low_open=True)

    def value(self, scores):
        return scores / self.temperature


@dataclass(frozen=True, kw_only=True)
class PerfectCopy(Clamp):
    """Few-shot layout: query logits := the head's pre-softmax scores toward the label tokens, at the
    labels those tokens carry (logsumexp over tokens sharing a label); every other label -1e9. The
    logits carry gradient into the head's Q/K (and everything upstream of them); the unembedding, the
    final LayerNorm and every head's output path get none.

    Token family (every position predicts the next token, over the vocabulary): the head's value
    vectors are zeroed and its output is instead written straight into the logits. Its copy logit
    for token v at position t is the logsumexp of its scores from t over the positions s <= t whose
    `copy_token` is v (-1e9 if none), so softmax(copy logits) is exactly the head's attention mass per
    copied token; it joins the rest of the model's logits as one more set of alternatives in the
    same softmax: logits := logaddexp(logits, copy logits) (were the other logits -1e9, this would be
    the few-shot definition). The copy part carries gradient into the head's Q/K and upstream; the
    head's V and W_O get none; the rest of the model trains as usual and can learn how much to
    trust the copy (a constant logit shift of its own).

    The head must sit above layer 0, where a position can hold information about earlier ones."""

    kind = "perfect_copy"
    token_pieces = ("copy_token",)
    head: Head

    def check(self, shape):
        _check_heads((self.head,), shape)
        if self.head[0] < 1:
            raise ConfigError(f"copy head {self.head[0]}:{self.head[1]} must be in layer 1 or above "
                              f"(the model has {shape.n_layers} layer(s))")

    def hooks(self, model, batch, runs):
        if not _few_shot(batch):
            return self.token_hooks(model, batch, runs)
        layer, head = self.head
        seen = {}

        def record(scores, _):
            seen["scores"] = scores[:, :, head, -1, 1:-1:2]  # [R, B, N]: query row, label keys

        def copy(logits, _):
            value = copy_logits(seen["scores"], batch.labels, logits.shape[-1]).unsqueeze(2)
            query = (torch.arange(logits.shape[2], device=logits.device) == logits.shape[2] - 1)[:, None]
            return torch.where(_expand(runs, 4) & query, value, logits)

        return [(f"blocks.{layer}.attn.hook_attn_scores", record), ("hook_logits", copy)]

    def token_hooks(self, model, batch, runs):
        layer, head = self.head
        seen = {}

        def record(scores, _):
            seen["scores"] = scores[:, :, head]  # [R, B, Tq, T]

        def copy(logits, _):
            tokens = self.task.copy_token(batch).to(logits.device)
            value = torch.logaddexp(logits, token_copy_logits(seen["scores"], tokens, logits.shape[-1]))
            return torch.where(_expand(runs, 4), value, logits)

        silence = _zero_heads(_expand(runs, 5) & _head_mask((head,), model.shape.n_heads, runs.device, dim=3))
        return [(f"blocks.{layer}.attn.hook_v", silence), (f"blocks.{layer}.attn.hook_attn_scores", record),
                ("hook_logits", copy)]


@dataclass(frozen=True, kw_only=True)
class Layer1Input(Clamp):
    """Perfect layer-1 input: block 1 reads the raw embeddings (`blocks.1.hook_resid_pre` :=
    `hook_embed`), its Q/K read them shifted by one position (`blocks.1.hook_qk_input`), so block 0
    is taken out entirely (its parameters get no gradient). Both values carry gradient into the
    embedding. The shift: on the few-shot layout token 0 and the query keep their own embedding,
    token t holds the one of t-1; on a token family position t holds the embedding of the family's
    `previous_position(t)` (its own where that is -1)."""

    kind = "layer1_input"
    token_pieces = ("previous_position",)

    def check(self, shape):
        if shape.n_layers < 2:
            raise ConfigError(f"needs at least 2 layers, the model has {shape.n_layers}")

    def hooks(self, model, batch, runs):
        seen = {}

        def record(embed, _):
            seen["embed"] = embed

        def residual(resid, _):
            return torch.where(_expand(runs, 4), seen["embed"], resid)

        def shifted(resid, _):  # token 0 and the query keep their own embedding, token t the one of t-1
            embed = seen["embed"]
            if _few_shot(batch):
                previous = torch.cat([embed[:, :, :1], embed[:, :, :-2], embed[:, :, -1:]], 2)
            else:
                source = self.task.previous_position(embed.shape[2]).to(embed.device)
                previous = embed[:, :, torch.where(source < 0, torch.arange(len(source), device=embed.device), source)]
            return torch.where(_expand(runs, 4), previous, resid)

        return [("hook_embed", record), ("blocks.1.hook_resid_pre", residual), ("blocks.1.hook_qk_input", shifted)]


@dataclass(frozen=True, kw_only=True)
class AblateEmbedding(Clamp):
    """Remove the embedding's direct path: the final residual minus the input residual (token and
    position embeddings). The embedding still gets gradient through the attention layers only."""

    kind = "ablate_embedding"

    def hooks(self, model, batch, runs):
        seen = {}

        def record(resid, _):
            seen["embed"] = resid

        def remove(resid, _):  # resid holds the query row alone in a query-only pass
            return torch.where(_expand(runs, 4), resid - seen["embed"][:, :, -resid.shape[2]:], resid)

        return [("blocks.0.hook_resid_pre", record), (f"blocks.{model.shape.n_layers - 1}.hook_resid_post", remove)]


@dataclass(frozen=True, kw_only=True)
class Graft(Clamp):
    """Base of graft clamps: a frozen copy of a checkpoint's model (never in any optimizer, no
    parameter requires gradient), run on the same batch."""

    layer: int
    checkpoint: str
    _models: dict = field(default_factory=dict, compare=False, repr=False)

    def check(self, shape):
        if not 0 <= self.layer < shape.n_layers:
            raise ConfigError(f"layer={self.layer} is outside the model's {shape.n_layers} layers")
        state = load_checkpoint_file(self.checkpoint)
        check_checkpoint_model(state, shape, f"checkpoint {self.checkpoint}")
        model = Transformer(shape, 1)
        try:
            model.load_state_dict(state["model"], 0)
        except ValueError:  # tensors that disagree with the config saved beside them
            raise ConfigError(f"checkpoint {self.checkpoint} holds a model of another shape") from None
        self._models[model.device] = _frozen(model)

    def frozen(self, device: torch.device) -> Transformer:
        if device not in self._models:
            cpu = self._models[torch.device("cpu")]
            self._models[device] = _frozen(Transformer(cpu.shape, 1, device), cpu.state_dict(0))
        return self._models[device]


@dataclass(frozen=True, kw_only=True)
class GraftIn(Graft):
    """The residual after block `layer` := the frozen model's, on the same batch. Carries no
    gradient: blocks up to `layer` and the embedding get none."""

    kind = "graft_in"

    def hooks(self, model, batch, runs):
        site = f"blocks.{self.layer}.hook_resid_post"

        def graft(resid, _):
            with torch.no_grad():
                value = self.frozen(resid.device).run_with_cache(batch, [site])[1][site]
            return torch.where(_expand(runs, 4), value[:, :, -resid.shape[2]:], resid)

        return [(site, graft)]


@dataclass(frozen=True, kw_only=True)
class GraftOut(Graft):
    """The blocks after `layer`, the final LayerNorm and the unembedding are the frozen model's,
    fed this model's residual after `layer`. The logits carry gradient into this model's blocks up
    to `layer`; this model's later blocks and unembedding get none."""

    kind = "graft_out"

    def hooks(self, model, batch, runs):
        site, seen = f"blocks.{self.layer}.hook_resid_post", {}

        def record(resid, _):
            seen["resid"] = resid

        def graft(logits, _):  # logits hold the query row alone in a query-only pass
            value = self.frozen(logits.device).run_with_hooks(batch, [(site, lambda *_: seen["resid"])])
            return torch.where(_expand(runs, 4), value[:, :, -logits.shape[2]:], logits)

        return [(site, record), ("hook_logits", graft)]


KINDS = {cls.kind: cls for cls in (AblateHeads, PrevTokenPattern, NoPrevToken, InductionPattern, MatchPattern,
                                    PerfectCopy, Layer1Input, HeadTemperature, SilenceNonLabel, AblateEmbedding,
                                    GraftIn, GraftOut)}


def copy_logits(label_scores: torch.Tensor, labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """[..., n_labels]: logsumexp of the scores [..., N] of the positions carrying each label (or
    token: labels [..., N]); -1e9 for labels no position carries."""
    carries = F.one_hot(labels, n_labels).bool()  # [..., N, L]
    per_label = torch.where(carries, label_scores.unsqueeze(-1), NEG).logsumexp(-2)
    return torch.where(carries.any(-2), per_label, NEG)


def token_copy_logits(scores: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[..., Tq, vocab]: copy_logits for every row of a causal head, as one matmul (no [Tq, T, vocab]
    tensor): logsumexp of the scores [..., Tq, T] over the visible positions whose token (tokens
    [..., T]) is v; -1e9 where none is."""
    top = scores.detach().amax(-1, keepdim=True)  # a constant for autograd: logsumexp's usual shift
    mass = (scores - top).exp() @ F.one_hot(tokens, vocab).to(scores.dtype)  # masked (-inf) positions add 0
    return torch.where(mass > 0, mass.clamp(min=torch.finfo(mass.dtype).tiny).log() + top, NEG)


# --- applying the clamps of a pack ----------------------------------------------------------------------


class ClampSet:
    """The clamps of each run of a pack, applied in one forward pass (training, eval and analysis).

    Identical clamps of several runs act once, masked to those runs. Preserving ablations add a
    clean pass first (every clamp except the ablations), whose recorded sites the main pass reads.
    """

    def __init__(self, per_run: list[list[Clamp]]):
        self.per_run = per_run
        groups: dict[Clamp, list[int]] = {}
        for run, clamps in enumerate(per_run):
            for clamp in clamps:
                groups.setdefault(clamp, []).append(run)
        self.groups = list(groups.items())
        self.preserved: dict[str, set[int]] = {}  # site suffix -> runs
        for clamp, runs in self.groups:
            for what in getattr(clamp, "preserve", ()):
                self.preserved.setdefault(PRESERVE_SITES[what], set()).update(runs)

    @property
    def functional(self) -> bool:
        """Whether the hooks read no parameters but those of the pass they are installed in, so the
        pass may run on any parameters (fast_path.train_step): not so with a preserving ablation,
        whose clean pass runs on the model's own."""
        return not self.preserved

    def forward(self, model: Transformer, batch: Batch, query_only: bool = False) -> torch.Tensor:
        """Logits of the clamped pass (query_only: see Transformer.__call__)."""
        if not self.groups:
            return model(batch, query_only)
        return model.run_with_hooks(batch, self.hooks(model, batch, query_only), query_only)

    def query_logits(self, model: Transformer, batch: Batch) -> torch.Tensor:
        """Logits at the query token [R, B, n_labels], as the training loss reads them."""
        return self.forward(model, batch, query_only=True)[..., -1, :]

    def all_logits(self, model: Transformer, batch: TensorBatch) -> torch.Tensor:
        """Logits at every position [R, B, T, V], as a next-token loss reads them."""
        return self.forward(model, batch)

    def run_with_cache(self, model: Transformer, batch: Batch, names, query_only: bool = False):
        hooks = self.hooks(model, batch, query_only) if self.groups else ()
        return model.run_with_cache(batch, names, fwd_hooks=hooks, query_only=query_only)

    def hooks(self, model: Transformer, batch: Batch, query_only: bool = False) -> list:
        """Every hook of one clamped pass (running the clean pass first if anything is preserved)."""
        hooks = self._preserve_hooks(model, batch, query_only) if self.preserved else []
        return hooks + [h for clamp, runs in self.groups for h in clamp.hooks(model, batch, self._mask(runs, model))]

    def _preserve_hooks(self, model: Transformer, batch: Batch, query_only: bool) -> list:
        sites = {f"blocks.{layer}.{suffix}": runs for suffix, runs in self.preserved.items()
                 for layer in range(model.shape.n_layers)}
        clean_hooks = [h for clamp, runs in self.groups if not isinstance(clamp, AblateHeads)
                       for h in clamp.hooks(model, batch, self._mask(runs, model))]
        _, clean = model.run_with_cache(batch, list(sites), fwd_hooks=clean_hooks, query_only=query_only)

        def restore(site, runs):
            return lambda x, _: torch.where(_expand(runs, x.dim()), clean[site], x)

        return [(site, restore(site, self._mask(runs, model))) for site, runs in sites.items()]

    def _mask(self, runs, model: Transformer) -> torch.Tensor:
        """[R] bool: true for `runs`."""
        return torch.tensor([run in runs for run in range(len(self.per_run))], device=model.device)


# --- building clamps from config ------------------------------------------------------------------------


def build_clamps(clamp_cfg, shape: ModelShape, task: TaskFamily | type[TaskFamily] | None = None) -> list[Clamp]:
    """The clamps one run's `clamp` config names, checked against the model and the run's task family
    (ConfigError, one line). `task`: the run's TaskFamily, whose pieces the clamps read on a token model
    (its class suffices to check a config)."""
    specs = OmegaConf.to_container(clamp_cfg, resolve=True) if isinstance(clamp_cfg, DictConfig) else clamp_cfg
    if specs is not None and not isinstance(specs, dict):
        raise ConfigError("clamp must be a mapping of clamp names to specs")
    family = task if isinstance(task, type) or task is None else type(task)
    instance = None if isinstance(task, type) else task
    clamps = [_build(str(name), spec, shape, family, instance) for name, spec in (specs or {}).items() if spec is not None]
    _check_one_pattern_per_head(clamps)
    _check_none_inert(clamps)
    return clamps


def _build(name: str, spec, shape: ModelShape, family: type[TaskFamily] | None, task: TaskFamily | None) -> Clamp:
    where = f"clamp '{name}'"
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"{where} needs a mapping with a 'kind' (one of {', '.join(['keep_only', *KINDS])})")
    kind, values = spec["kind"], {k: v for k, v in spec.items() if k != "kind"}
    cls = AblateHeads if kind == "keep_only" else KINDS.get(kind)
    if cls is None:
        raise ConfigError(f"{where}: unknown kind '{kind}' (known: {', '.join(['keep_only', *KINDS])})")
    where = f"{where} ({kind})"
    allowed = {f.name: f for f in fields(cls) if f.init and not f.name.startswith("_") and f.name not in ("name", "task")}
    unknown = set(values) - set(allowed)
    missing = {n for n, f in allowed.items() if _required(f)} - set(values)
    if unknown or missing:
        problem = f"unknown field(s) {', '.join(sorted(unknown))}" if unknown else f"missing {', '.join(sorted(missing))}"
        raise ConfigError(f"{where}: {problem} (fields: {', '.join(allowed) or 'none'})")
    try:
        kwargs = {key: _convert(key, value, allowed[key].default) for key, value in values.items()}
        for key, value in kwargs.items():
            valid = allowed[key].metadata.get("range")
            if valid is not None:
                valid.check(key, value)
        if kind == "keep_only":
            kwargs["heads"] = _complement(kwargs["heads"], shape)
        clamp = cls(name=name, task=task, **kwargs)
        clamp.check_layout(shape, family)
        clamp.check(shape)
    except UserError as exc:  # a bad field, or a graft checkpoint that cannot be loaded (CheckpointError)
        raise type(exc)(f"{where}: {exc}") from None
    return clamp


def _required(f) -> bool:
    return f.default is f.default_factory is MISSING


def _convert(key: str, value, default):
    if key == "heads":
        heads = tuple(_parse_head(h) for h in (value if isinstance(value, list) else [value]))
        if not heads:
            raise ConfigError("heads is empty: name at least one head")
        return heads
    if key == "head":
        return _parse_head(value)
    if key == "preserve":
        kinds = value if isinstance(value, list) else [value]
        for what in kinds:
            if what not in PRESERVE_SITES:
                raise ConfigError(f"preserve: unknown '{what}' (known: {', '.join(PRESERVE_SITES)})")
        return tuple(kinds)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if key == "layer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"layer must be an integer, got {value!r}")
        return value
    if key == "checkpoint":
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _parse_head(value) -> Head:
    if isinstance(value, dict) and set(value) == {"layer", "head"}:
        layer, head = value["layer"], value["head"]
    elif isinstance(value, str) and value.count(":") == 1:
        layer, head = value.split(":")
    else:
        hint = " (quote it in YAML: an unquoted 1:3 reads as the number 63)" if isinstance(value, int) else ""
        raise ConfigError(f"a head is \"layer:head\" or {{layer: L, head: H}}, got {value!r}{hint}")
    try:
        return int(layer), int(head)
    except (TypeError, ValueError):
        raise ConfigError(f"a head needs integer layer and head, got {value!r}") from None


def _complement(kept: tuple[Head, ...], shape: ModelShape) -> tuple[Head, ...]:
    """Every head of the kept heads' layers except the kept ones."""
    _check_heads(kept, shape)
    layers = sorted({layer for layer, _ in kept})
    return tuple((layer, h) for layer in layers for h in range(shape.n_heads) if (layer, h) not in kept)


def _check_one_pattern_per_head(clamps: list[Clamp]) -> None:
    owner: dict[Head, str] = {}
    for clamp in clamps:
        if isinstance(clamp, PatternClamp):
            for layer, head in clamp.heads:
                if (layer, head) in owner:
                    raise ConfigError(f"head {layer}:{head} gets two attention patterns "
                                      f"(clamps '{owner[(layer, head)]}' and '{clamp.name}')")
                owner[(layer, head)] = clamp.name


def _check_none_inert(clamps: list[Clamp]) -> None:
    """Refuse a clamp that another one makes do nothing (forward and gradient), so that a run never
    silently equals the run without it: a pattern on a head whose scores a perfect copy reads (the
    copy overwrites the query logits, the only place that head's output reaches), or a clamp on
    layer-0 heads beside layer1_input (which takes layer 0 out)."""
    copied = {clamp.head: clamp.name for clamp in clamps if isinstance(clamp, PerfectCopy)}
    layer1 = next((clamp.name for clamp in clamps if isinstance(clamp, Layer1Input)), None)
    for clamp in clamps:
        heads = getattr(clamp, "heads", ())
        head = next((h for h in heads if h in copied), None)
        if isinstance(clamp, PatternClamp) and head:
            raise ConfigError(f"clamp '{clamp.name}' sets the pattern of head {head[0]}:{head[1]}, whose scores (not "
                              f"pattern) '{copied[head]}' copies to the logits: '{clamp.name}' would do nothing")
        if layer1 and heads and all(layer == 0 for layer, _ in heads):
            raise ConfigError(f"clamp '{clamp.name}' acts on layer 0, which '{layer1}' (layer1_input) takes out: "
                              f"'{clamp.name}' would do nothing")


def _check_heads(heads: tuple[Head, ...], shape: ModelShape) -> None:
    for layer, head in heads:
        if not (0 <= layer < shape.n_layers and 0 <= head < shape.n_heads):
            raise ConfigError(f"head {layer}:{head} is outside the model ({shape.n_layers} layers x {shape.n_heads} heads)")


# --- mask and value helpers -------------------------------------------------------------------------------


def _by_layer(heads: tuple[Head, ...]) -> dict[int, tuple[int, ...]]:
    layers: dict[int, tuple[int, ...]] = {}
    for layer, head in heads:
        layers[layer] = layers.get(layer, ()) + (head,)
    return layers


def _expand(runs: torch.Tensor, ndim: int) -> torch.Tensor:
    """The run mask [R] viewed to broadcast against an activation with `ndim` dimensions."""
    return runs.view(-1, *[1] * (ndim - 1))


def _head_mask(heads: tuple[int, ...], n_heads: int, device: torch.device, dim: int) -> torch.Tensor:
    """Bool over heads, shaped to broadcast with the head axis at position `dim` of a 5-d activation."""
    mask = torch.zeros(n_heads, dtype=torch.bool, device=device)
    mask[list(heads)] = True
    return mask.view(n_heads, *[1] * (4 - dim))


def _positions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (query) and column (key) positions [Tq, 1] and [1, T] of an attention tensor [..., Tq, T]
    (Tq = 1 in a query-only pass: the last position)."""
    index = torch.arange(x.shape[-1], device=x.device)
    return index[-x.shape[-2]:, None], index[None, :]


def _on_label_tokens(weights: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """A query row [R, B, 1, Tq, T] (other rows 0) holding weights [R, B, N] on label tokens 2i+1."""
    R, B, _, Tq, T = pattern.shape
    rows = pattern.new_zeros(R, B, 1, Tq, T)
    rows[:, :, 0, -1, 1:-1:2] = weights
    return rows


def _few_shot(batch) -> bool:
    """Whether `batch` has the few-shot layout (exemplar and label tokens, a query) rather than a token family's."""
    return isinstance(batch, Batch)


def _zero_heads(mask: torch.Tensor):
    return lambda v, _: torch.where(mask, 0.0, v)


def _frozen(model: Transformer, state: dict | None = None) -> Transformer:
    if state is not None:
        model.load_state_dict(state, 0)
    for param in model.params.values():
        param.requires_grad_(False)
    return model
