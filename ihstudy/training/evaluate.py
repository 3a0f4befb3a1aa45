"""Evaluation metrics (docs/science.md §1) and the head scores of docs/science.md §3, for R runs at once.

`Evaluator` holds the fixed eval sequences of a pack and turns one forward pass over them into the
rows of eval.parquet (`measure`); the forward pass itself is the pack's (ihstudy/training/steps.py).
"""

from __future__ import annotations

import math

import torch

from ihstudy.model.transformer import cross_entropy, log_softmax
from ihstudy.tasks.base import TaskFamily
from ihstudy.tasks.fsl import Batch
from ihstudy.training.pack_settings import shared_group

LN2 = math.log(2)
PHASE_CHANGE_THRESHOLD = 0.4 * LN2  # the paper's phase-change criterion on the fsl_train loss

METRICS = ("loss", "acc", "icl_acc", "icl_prob", "ooc_acc", "ooc_prob", "in_context_mass")
EVAL_CHUNK_POSITIONS = 5000  # per eval forward pass, over all runs of a pack: 1000 few-shot sequences


class Evaluator:
    """The eval sequences of R runs (every evaluator's n_sequences, concatenated) and their rows."""

    def __init__(self, tasks: list[TaskFamily], cfgs: list, device: torch.device, n_tokens: int):
        shared = shared_group([cfg.eval for cfg in cfgs], "eval")
        self.names, self.n = list(shared.evaluators), shared.n_sequences
        self.task = tasks[0]  # runs pack together only with equal task families
        sets = [[task.eval_set(name, self.n, cfg.eval_seed) for name in self.names] for task, cfg in zip(tasks, cfgs)]
        kind = type(sets[0][0])
        self.batch = kind.stack([kind.concat(run_sets) for run_sets in sets]).to(device)
        # equal chunks within one evaluator's sequences (one compiled graph; an evaluator's values do
        # not depend on which others are measured with it), small enough to stay in the CPU cache
        per_sequence = len(cfgs) * n_tokens  # positions of one sequence of every run
        self.chunk = max(d for d in range(1, self.n + 1)
                         if self.n % d == 0 and d * per_sequence <= max(EVAL_CHUNK_POSITIONS, per_sequence))

    @torch.no_grad()
    def measure(self, eval_forward, step: int, batch_size: int, names: list[str] | None = None) -> list[list[dict]]:
        """Per run, one row per evaluator of `names` (default: all): the task's metrics and head scores at `step`.
        eval_forward(batch, part) -> (logits, patterns) of the sequences `part` (steps.FastPath /
        HookedPath.eval_forward; logits at the query, or at every position for next-token tasks)."""
        rows: list[list[dict]] = [[] for _ in range(self.batch.target.shape[0])]
        for name in self.names if names is None else names:
            e = self.names.index(name)
            part = slice(e * self.n, (e + 1) * self.n)
            logits, patterns = self.forward(eval_forward, part)
            sub = self.batch[:, part]
            columns = self.task.metrics(logits, sub) | self.task.head_scores(patterns, sub)
            columns = {k: v.cpu() for k, v in columns.items()}
            for r, run_rows in enumerate(rows):
                run_rows.append({"step": step, "sequences": step * batch_size, "evaluator": name}
                                | {k: float(v[r]) for k, v in columns.items()})
        return rows

    def forward(self, eval_forward, part: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Query logits [R, n, L] on one evaluator's sequences `part`, and every layer's attention
        pattern [R, n, H, T, T] (the last layer's at the query row only, [R, n, H, 1, T]), in chunks."""
        chunks = [eval_forward(self.batch, slice(i, i + self.chunk)) for i in range(part.start, part.stop, self.chunk)]
        return torch.cat([c[0] for c in chunks], 1), [torch.cat(layer, 1) for layer in zip(*(c[1] for c in chunks))]


def query_metrics(query_logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-run means [R] over the sequences of `batch`, from the logits at the query [R, B, L].

    loss, acc: cross-entropy and accuracy over all labels at the query.
    icl_acc, icl_prob: accuracy and probability of the true label with the logits restricted to
        the labels present in the context.
    ooc_acc: fraction of queries whose predicted label is absent from the context.
    ooc_prob, in_context_mass: probability mass on labels absent from / present in the context.
    """
    in_context = torch.zeros_like(query_logits, dtype=torch.bool).scatter_(-1, batch.labels, True)
    probs = log_softmax(query_logits).exp()
    predicted = query_logits.argmax(-1)
    restricted = log_softmax(query_logits.masked_fill(~in_context, float("-inf")))
    in_context_mass = (probs * in_context).sum(-1)
    per_sequence = {
        "loss": cross_entropy(query_logits, batch.target),
        "acc": predicted == batch.target,
        "icl_acc": restricted.argmax(-1) == batch.target,
        "icl_prob": restricted.gather(-1, batch.target.unsqueeze(-1)).squeeze(-1).exp(),
        "ooc_acc": ~in_context.gather(-1, predicted.unsqueeze(-1)).squeeze(-1),
        "ooc_prob": 1 - in_context_mass,
        "in_context_mass": in_context_mass,
    }
    return {name: value.float().mean(-1) for name, value in per_sequence.items()}


def induction_strength(pattern: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per run and head [R, H]: at the query, attention on label tokens carrying the query's label
    minus attention on label tokens carrying any other label, averaged over sequences.

    With two context pairs this is exactly the paper's definition (correct minus incorrect label).
    pattern: [R, B, H, Tq, T] whose last row is the query's.
    """
    to_labels = pattern[..., -1, 1:-1:2]  # [R, B, H, N]: query row, label-token columns
    sign = torch.where(batch.labels == batch.target.unsqueeze(-1), 1.0, -1.0)  # [R, B, N]
    return (to_labels * sign.unsqueeze(2)).sum(-1).mean(1)


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Per run and head [R, H]: mean attention from each token to the one before it."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean((1, -1))
