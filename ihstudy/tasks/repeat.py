"""Token-level induction (Olsson et al. 2022; docs/tasks.md): random tokens in which a segment repeats.

A sequence of `length` uniformly random tokens from a vocabulary of `vocab` holds a segment of L
tokens (L uniform in [min_segment, max_segment]) at offset o (uniform in [0, length - 2L]) that is
repeated right after itself: tokens[o + L + i] = tokens[o + i]. The segment's length varies so that
no fixed relative position finds the earlier copy: only an induction mechanism (find the earlier
occurrence of the current token, read the token after it) completes the repeat. With
min_segment = max_segment = length / 2 the second half repeats the first. Next-token loss at every
position; only the repeat is predictable from the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ihstudy.errors import ConfigError
from ihstudy.model.transformer import cross_entropy
from ihstudy.schema import within
from ihstudy.tasks.base import TaskFamily, TokenBatch


@dataclass
class RepeatConfig:
    """conf/task/repeat.yaml."""

    vocab: int = within(2, 100_000)
    length: int = within(4, 100_000)
    min_segment: int = within(2, 100_000)  # at most max_segment: check
    max_segment: int = within(2, 100_000)  # repeated, within length: check


@dataclass
class RepeatBatch(TokenBatch):
    offset: torch.Tensor  # [...] long: where the first occurrence of the segment starts
    segment: torch.Tensor  # [...] long: its length


class RepeatTask(TaskFamily):
    schema = RepeatConfig
    evaluators = ("repeat",)
    main_evaluator = "repeat"
    # the loss on the repeat: ln vocab before the induction heads form; below 2 nats once they have
    timed_column, timing_thresholds, phase_change = "loss_repeat", "3,2,1", "2"
    curves = ("loss_first", "loss_repeat")

    def __init__(self, task_cfg):
        self.vocab, self.length = int(task_cfg.vocab), int(task_cfg.length)
        self.min_segment, self.max_segment = int(task_cfg.min_segment), int(task_cfg.max_segment)

    @classmethod
    def check(cls, task_cfg) -> None:
        super().check(task_cfg)
        if task_cfg.min_segment > task_cfg.max_segment:
            raise ConfigError(f"task.min_segment={task_cfg.min_segment} exceeds task.max_segment={task_cfg.max_segment}")
        if 2 * task_cfg.max_segment > task_cfg.length:
            raise ConfigError(f"task.max_segment={task_cfg.max_segment} repeated needs task.length >= {2 * task_cfg.max_segment}")

    def sample(self, n: int, generator: torch.Generator) -> RepeatBatch:
        T = self.length
        tokens = torch.randint(self.vocab, (n, T + 1), generator=generator)
        segment = torch.randint(self.min_segment, self.max_segment + 1, (n,), generator=generator)
        offset = (torch.rand(n, generator=generator) * (T - 2 * segment + 1)).long()  # uniform in [0, T - 2L]
        position = torch.arange(T + 1)
        in_repeat = (position >= (offset + segment)[:, None]) & (position < (offset + 2 * segment)[:, None])
        tokens = tokens.gather(1, position - segment[:, None] * in_repeat)  # the repeat reads the first copy
        return RepeatBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), offset, segment)

    def parts(self, batch: RepeatBatch) -> dict[str, torch.Tensor]:
        """[..., T] bool: the positions whose target lies in the first occurrence (after its first token,
        which is as unpredictable as any) and those whose target lies in the repeat (after its first token)."""
        predicted = torch.arange(1, self.length + 1, device=batch.offset.device)  # the position each target sits at
        start, S = batch.offset.unsqueeze(-1), batch.segment.unsqueeze(-1)
        inside = lambda a, b: (predicted > start + a) & (predicted < start + b)  # noqa: E731
        return {"first": inside(0, S), "repeat": inside(S, 2 * S)}

    def metrics(self, logits: torch.Tensor, batch: RepeatBatch) -> dict[str, torch.Tensor]:
        """loss (every position), loss_first and loss_repeat (targets inside the segment's first occurrence
        and inside its repeat), icl_score = loss_first - loss_repeat (in nats), repeat_acc."""
        loss = cross_entropy(logits, batch.target)  # [R, B, T]
        parts = self.parts(batch)
        mean_over = lambda x, m: (x * m).sum((1, 2)) / m.sum((1, 2))  # noqa: E731
        first, repeat = mean_over(loss, parts["first"]), mean_over(loss, parts["repeat"])
        correct = (logits.argmax(-1) == batch.target).float()
        return {"loss": loss.mean((1, 2)), "loss_first": first, "loss_repeat": repeat, "icl_score": first - repeat,
                "repeat_acc": mean_over(correct, parts["repeat"])}

    def induction_target(self, batch: RepeatBatch) -> torch.Tensor:
        """From each position t of the repeat, the position after its first occurrence, t - L + 1."""
        T, S = self.length, batch.segment[..., None]
        t = torch.arange(T, device=batch.offset.device)
        start = batch.offset[..., None]
        in_repeat = (t >= start + S) & (t < start + 2 * S)  # [..., T]
        target = torch.zeros(*batch.offset.shape, T, T, device=batch.offset.device)
        rows = (t - S + 1).clamp(min=0).expand_as(in_repeat)
        target.scatter_(-1, rows.unsqueeze(-1), in_repeat.unsqueeze(-1).float())
        return target

    def copy_token(self, batch: RepeatBatch) -> torch.Tensor:
        return batch.tokens
