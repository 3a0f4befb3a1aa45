"""The task protocol: what a task family gives the task-agnostic model, training loop, packs and analyses.

A family is one `TaskFamily` subclass plus one YAML file under conf/task/ whose `_target_` names the
class (docs/tasks.md has a worked example). It owns:
  - its batches (a `TensorBatch`: named tensors with leading [runs, batch] axes) and how they are
    sampled: `sample(n, generator)` for the training stream, `eval_set(name, n, seed)` for the fixed
    evaluation sets, both seeded as the streams below make them;
  - the model's input and output: `model_input` ("tokens": one token id per position, embedded by a
    table; "exemplar_label": fsl's exemplar vectors and one-hot labels) and `model_dims`;
  - which positions carry the loss (`loss_at_every_position`: next-token loss everywhere, or the
    query's label only) and the loss target (`batch.target`);
  - its config's keys, their types and ranges (`schema`, a dataclass of ihstudy/schema.py fields),
    and the rules across them (`check`);
  - its evaluators and their metrics (`metrics`), the head scores analyses read (`head_scores`), and
    the evaluator whose loss times the phase change (`main_evaluator`);
  - the positions clamps need, where the family defines them: `previous_position` (the token a
    previous-token head reads), `induction_target` (the earlier positions an ideal induction head
    attends to) and `copy_token` (the token an ideal copy writes: the one the attended position carries).
A clamp that needs a piece the family does not define is refused with one line (ConfigError).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import ClassVar

import numpy as np
import torch

from ihstudy.errors import ConfigError
from ihstudy.schema import check_schema

DEFAULT_FAMILY = "ihstudy.tasks.fsl.FewShotTask"  # a task config without _target_ (runs saved before families)
SCORE_SEQUENCES = 25  # per chunk of the induction score (TaskFamily.induction_masses)


class TensorBatch:
    """Base of a family's batch dataclass: every field a tensor with the same leading axes [runs, batch]
    (the run axis may be absent). Stacking, slicing and moving act on every field alike."""

    def map(self, fn) -> TensorBatch:
        return type(self)(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @classmethod
    def stack(cls, batches: list) -> TensorBatch:
        """Stack per-run batches along a new leading run axis (one batch: a view, no copy)."""
        if len(batches) == 1:
            return batches[0].map(lambda t: t.unsqueeze(0))
        return cls(*(torch.stack([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)))

    @classmethod
    def concat(cls, batches: list) -> TensorBatch:
        """Concatenate batches along the (first) sequence axis."""
        return cls(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)))

    def __getitem__(self, index) -> TensorBatch:
        return self.map(lambda t: t[index])

    def to(self, device) -> TensorBatch:
        return self.map(lambda t: t.to(device))


@dataclasses.dataclass
class TokenBatch(TensorBatch):
    """Sequences of token ids with next-token targets: target[..., t] = the token after tokens[..., t]."""

    tokens: torch.Tensor  # [..., T] long
    target: torch.Tensor  # [..., T] long


class TaskFamily:
    """A task family (see the module docstring). Subclasses set the class attributes and implement the
    methods that raise NotImplementedError here; the clamp pieces are optional."""

    schema: ClassVar[type | None] = None  # the task config's keys, types and ranges (ihstudy/schema.py); None: unchecked
    evaluators: ClassVar[tuple[str, ...]]
    main_evaluator: ClassVar[str]
    model_input: ClassVar[str] = "tokens"  # tokens | exemplar_label
    loss_at_every_position: ClassVar[bool] = True
    # what `ihstudy analyze` times by default: the eval column, its thresholds (numbers or Xln2) and the
    # one that marks the phase change
    timed_column: ClassVar[str] = "loss"
    timing_thresholds: ClassVar[str] = "ln2,0.4ln2,0.1"
    phase_change: ClassVar[str] = "0.4ln2"
    curves: ClassVar[tuple[str, ...]] = ("loss",)  # the eval columns a run's figure shows

    @classmethod
    def from_config(cls, cfg, data) -> TaskFamily:
        """The task of a whole run config (cfg.task is this family's group). data(data_cfg) loads the
        array a `data` config group names (fsl's exemplars), for families that read one."""
        return cls(cfg.task)

    @classmethod
    def model_dims(cls, task_cfg) -> tuple[int, int]:
        """(outputs, positions): the vocabulary (or number of labels) the model predicts over and the
        length its positional tables are built for, from the task config alone (checkpoints use it)."""
        return int(task_cfg["vocab"]), int(task_cfg["length"])

    @classmethod
    def check(cls, task_cfg) -> None:
        """Raise ConfigError (one line) for a task config this family cannot use: here, a key `schema`
        does not declare or a value of another type or out of its range; a family with rules across
        its fields adds them after calling this."""
        if cls.schema is not None:
            check_schema(cls.schema, task_cfg, "task", what=f"the task family {cls.__name__}", skip=("_target_",))

    def sample(self, n: int, generator: torch.Generator) -> TensorBatch:
        """n training sequences drawn from `generator` (a pure function of its state)."""
        raise NotImplementedError

    def sample_compact(self, n: int, generator: torch.Generator) -> TensorBatch:
        """sample(n, generator) in the form the training stream keeps a chunk of batches in memory;
        `expand` turns a step's part of it into the batch. Default: the batch itself. A family whose
        sequences carry large vectors keeps indices instead (fsl: a chunk of 512-d exemplars is 50 MB)."""
        return self.sample(n, generator)

    def expand(self, compact: TensorBatch) -> TensorBatch:
        """The batch that `compact` (sample_compact's, or a slice of it) stands for."""
        return compact

    def eval_set(self, name: str, n: int, eval_seed: int) -> TensorBatch:
        """The fixed sequences of evaluator `name`, drawn once from the eval seed."""
        return self.sample(n, chunk_generator(eval_seed, self.evaluators.index(name)))

    def metrics(self, logits: torch.Tensor, batch: TensorBatch) -> dict[str, torch.Tensor]:
        """Per-run means [R] of every metric, from the model's logits on `batch` (at every position for
        a family with loss_at_every_position, [R, B, T, V]; else at the query, [R, B, V])."""
        raise NotImplementedError

    def head_scores(self, patterns: list[torch.Tensor], batch: TensorBatch) -> dict[str, torch.Tensor]:
        """Per-run scores [R, H] of every head, named "score.L{layer}H{head}", from each layer's
        attention pattern [R, B, H, T, T]. Default: the previous-token score of every layer but the
        last and the induction score of every layer above the first, where the family defines their positions."""
        previous = self.previous_position(patterns[0].shape[-1])
        induction = self.induction_masses(patterns[1:], batch)
        scores = {}
        for layer, pattern in enumerate(patterns):
            if previous is not None and layer < len(patterns) - 1:
                scores |= per_head(f"prev_token.L{layer}", row_mean(*previous_token_mass(pattern, previous)))
            if induction is not None and layer > 0:
                scores |= per_head(f"induction.L{layer}", row_mean(*induction[layer - 1]))
        return scores

    def induction_masses(self, patterns: list[torch.Tensor], batch: TensorBatch) -> list[tuple] | None:
        """attention_mass of each pattern on induction_target(batch), SCORE_SEQUENCES sequences at a
        time: each row's sum is its own, so the numbers are those of all at once, while a chunk's
        [B, T, T] temporaries stay in the CPU cache (docs/performance.md). None: no target defined."""
        if not patterns:  # a one-layer model: no layer above the first
            return None
        chunks = []
        for start in range(0, patterns[0].shape[1], SCORE_SEQUENCES):
            part = slice(start, start + SCORE_SEQUENCES)
            target = self.induction_target(batch[:, part])
            if target is None:
                return None
            chunks.append([attention_mass(pattern[:, part], target) for pattern in patterns])
        return [tuple(torch.cat(parts, 1) for parts in zip(*layer)) for layer in zip(*chunks)]

    # --- what clamps and analyses need (None: the family does not define it) ---------------------

    def previous_position(self, n_tokens: int) -> torch.Tensor | None:
        """[T] long: the position each position's previous-token head reads (-1: none)."""
        return torch.arange(n_tokens) - 1

    def induction_target(self, batch: TensorBatch) -> torch.Tensor | None:
        """[..., T, T] float, rows summing to 1 or 0: where an ideal induction head attends from each
        position (rows with nothing to attend to are all zero)."""
        return None

    def copy_token(self, batch: TensorBatch) -> torch.Tensor | None:
        """[..., T] long: the token an ideal copy writes when it attends to each position."""
        return None

    @classmethod
    def defines(cls, piece: str) -> bool:
        """Whether the family gives clamp piece `piece` (previous_position has a default, t-1; the
        others exist once a family overrides them)."""
        return piece == "previous_position" or getattr(cls, piece) is not getattr(TaskFamily, piece)

    def induction_rows(self, batch: TensorBatch) -> torch.Tensor | None:
        """[..., T] bool: the positions whose induction score is averaged (default: rows with a target)."""
        target = self.induction_target(batch)
        return None if target is None else target.sum(-1) > 0


def attention_on(pattern: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per run and head [R, H]: the attention mass `pattern` [R, B, H, T, T] puts on the cells where
    `where` ([.., T, T], broadcastable with the run and batch axes) is positive, averaged over the rows
    that have any such cell (a row without one does not count) and over sequences."""
    return row_mean(*attention_mass(pattern, where))


def attention_mass(pattern: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_on's two parts: each row's mass on its cells [R, B, H, T], and whether the row has any [R, B, 1, T]."""
    if where.dim() == 2:
        where = where.expand(*pattern.shape[:2], *where.shape)
    cells = (where > 0).to(pattern.dtype)
    return (pattern * cells.unsqueeze(2)).sum(-1), (cells.sum(-1) > 0).unsqueeze(2).to(pattern.dtype)


def previous_token_mass(pattern: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_mass on the one cell previous[t] of each row t (none where it is -1), read directly
    rather than summed under a [T, T] mask: the same numbers (a row's other terms are zeros)."""
    previous = previous.to(pattern.device)
    has_one = previous >= 0
    index = previous.clamp(min=0).expand(*pattern.shape[:-1]).unsqueeze(-1)
    mass = pattern.gather(-1, index).squeeze(-1) * has_one
    return mass, has_one.to(pattern.dtype).expand(*pattern.shape[:2], 1, -1)


def row_mean(mass: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[R, H]: the mass of the counted rows, averaged over them and over sequences (attention_on)."""
    return (mass * counted).sum(-1).sum(1) / counted.sum(-1).sum(1).clamp(min=1)


def per_head(prefix: str, score: torch.Tensor) -> dict[str, torch.Tensor]:
    """{prefix}H{h}: each head's column of a score [R, H]."""
    return {f"{prefix}H{h}": column for h, column in enumerate(score.T)}


def earlier_occurrence_successors(tokens: torch.Tensor) -> torch.Tensor:
    """[..., T, T]: row t spreads weight 1 equally over the positions s+1 <= t where tokens[s] equals
    tokens[t] for some earlier s < t (the token after an earlier occurrence of the current token:
    where an induction head looks); rows without an earlier occurrence are zero."""
    T = tokens.shape[-1]
    same = tokens.unsqueeze(-1) == tokens.unsqueeze(-2)  # [..., t, s]
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)
    hit = same & earlier  # s < t with tokens[s] == tokens[t]
    successor = torch.zeros_like(hit)
    successor[..., 1:] = hit[..., :-1]  # weight on s+1 (s+1 <= t since s < t)
    weights = successor.to(torch.float32)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1)


def threshold_value(name: str) -> float:
    """A timing threshold written as a number or as Xln2 ("0.4ln2" = 0.4 ln 2); ValueError otherwise."""
    return float(name.removesuffix("ln2") or 1) * math.log(2) if name.endswith("ln2") else float(name)


# --- choosing a family ----------------------------------------------------------------------------


def task_family(task_cfg) -> type[TaskFamily]:
    """The TaskFamily class a task config names by `_target_` (module.Class); fsl without one. Only a
    TaskFamily subclass is accepted: a config cannot make ihstudy call anything else."""
    target = task_cfg.get("_target_") or DEFAULT_FAMILY
    module_name, _, class_name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"task._target_={target}: cannot import it ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not (isinstance(cls, type) and issubclass(cls, TaskFamily)):
        raise ConfigError(f"task._target_={target} is not a task family (a subclass of ihstudy.tasks.base.TaskFamily)")
    return cls


# --- the training stream --------------------------------------------------------------------------


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """An independent generator for chunk `chunk` of the stream seeded by `seed`."""
    state = np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class TrainStream:
    """The training batches of one run: batch k is a pure function of (data seed, chunk_batches, k).

    The sequences of chunk c are drawn together from one generator, so chunk_batches (the config's
    train.chunk_batches) decides which sequences a data seed yields; a chunk is kept in the family's
    compact form and each batch expanded from it when a step asks (`TaskFamily.sample_compact`).
    `sampler` has sample_compact(n, generator) and expand(compact)."""

    def __init__(self, sampler, seed: int, batch_size: int, chunk_batches: int):
        self.sampler, self.seed, self.batch_size, self.chunk_batches = sampler, seed, batch_size, chunk_batches
        self._chunk_index, self._chunk = -1, None

    def batch(self, step: int) -> TensorBatch:
        chunk, offset = divmod(step, self.chunk_batches)
        return self.sampler.expand(self.chunk(chunk)[offset])

    def chunk(self, index: int) -> TensorBatch:
        """Batches index*chunk_batches ... in compact form [chunk_batches, batch_size, ...] (the latest is kept)."""
        if index != self._chunk_index:
            self._chunk, self._chunk_index = None, -1  # the previous chunk goes first: one in memory at a time
            self._chunk, self._chunk_index = self.draw(index), index
        return self._chunk

    def draw(self, index: int) -> TensorBatch:
        """Chunk `index` in compact form, drawn afresh (nothing kept)."""
        drawn = self.sampler.sample_compact(self.chunk_batches * self.batch_size, chunk_generator(self.seed, index))
        return drawn.map(lambda t: t.view(self.chunk_batches, self.batch_size, *t.shape[1:]))


class PackStream:
    """Every run's training batch of a step, stacked [R, B, ...]: each run's stream keeps its chunk
    compact, so a step's batches are expanded and stacked as the step asks (for 512-d exemplars a
    step's batch is 200 KB, its chunk 50 MB)."""

    def __init__(self, streams: list[TrainStream], device: torch.device):
        self.streams, self.device = streams, device

    def batch(self, step: int) -> TensorBatch:
        batches = [stream.batch(step) for stream in self.streams]
        return type(batches[0]).stack(batches).to(self.device)
