"""A task family of one's own (docs/tasks.md): each sequence repeats a random cycle of `period`
distinct tokens, so every token after the first cycle is predictable from the context alone."""

from dataclasses import dataclass

import torch

from ihstudy.errors import ConfigError
from ihstudy.model.transformer import cross_entropy
from ihstudy.schema import within
from ihstudy.tasks.base import TaskFamily, TokenBatch


@dataclass
class CycleConfig:  # the keys of cycle.yaml (but _target_), each with its type and range
    vocab: int = within(2, 4096)
    length: int = within(2, 4096)
    period: int = within(2, 4096)  # at most min(vocab, length - 1): check


class CycleTask(TaskFamily):
    schema = CycleConfig
    evaluators = ("cycle",)
    main_evaluator = "cycle"  # `ihstudy analyze` times the loss of this evaluator

    def __init__(self, task_cfg):
        self.vocab, self.length, self.period = task_cfg.vocab, task_cfg.length, task_cfg.period

    @classmethod
    def check(cls, task_cfg):
        super().check(task_cfg)  # the schema: types, ranges, unknown keys
        if not 2 <= task_cfg.period <= min(task_cfg.vocab, task_cfg.length - 1):
            raise ConfigError(f"task.period={task_cfg.period} must lie in [2, min(vocab, length - 1)]")

    def sample(self, n, generator):
        cycle = torch.rand(n, self.vocab, generator=generator).argsort(-1)[:, :self.period]  # distinct tokens
        tokens = cycle.repeat(1, self.length // self.period + 2)[:, :self.length + 1]
        return TokenBatch(tokens[:, :-1], tokens[:, 1:])  # the next token is the target at every position

    def metrics(self, logits, batch):
        loss = cross_entropy(logits, batch.target)  # [runs, sequences, positions]
        return {"loss": loss.mean((1, 2)), "loss_after_first_cycle": loss[..., self.period:].mean((1, 2))}

    def induction_target(self, batch):
        """Where an ideal induction head looks from position t: t - period + 1, the token after the
        current token's previous occurrence (head scores `induction.L1H*` in eval.parquet)."""
        T = self.length
        rows = torch.arange(T)
        target = torch.zeros(T, T)
        later = rows >= self.period
        target[rows[later], rows[later] - self.period + 1] = 1.0
        return target.expand(*batch.tokens.shape[:-1], T, T)
