"""In-context Markov chains (Edelman et al., NeurIPS 2024; docs/tasks.md): each sequence draws its own
transition matrix, then a chain from it; the model predicts the next state at every position.

The references the metrics compare the model with, at position t (predicting state t+1 from states
0..t), with c the prior's concentration:
  uniform   1/k for every state
  unigram   (count of j in 0..t + c) / (t + 1 + k c): the in-context state frequencies
  bigram    (count of transitions x_t -> j in 0..t + c) / (count of transitions from x_t + k c): the
            Bayes posterior predictive of the next state under the Dirichlet(c) prior on each row
            (exact for the `dirichlet` prior; for `doubly_stochastic` it is the same estimator)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ihstudy.errors import ConfigError
from ihstudy.model.transformer import log_softmax
from ihstudy.schema import one_of, within
from ihstudy.tasks.base import TaskFamily, TokenBatch, earlier_occurrence_successors

PRIORS = ("dirichlet", "doubly_stochastic")
REFERENCES = ("uniform", "unigram", "bigram")


@dataclass
class MarkovConfig:
    """conf/task/markov.yaml."""

    vocab: int = within(2, 64)
    length: int = within(2, 4096)
    prior: str = one_of(*PRIORS)  # doubly_stochastic for vocab <= 4: check
    concentration: float = within(0, 1e6, low_open=True)


class MarkovTask(TaskFamily):
    """k-state chains of `length` tokens; transition rows from the prior named by task.prior."""

    schema = MarkovConfig
    evaluators = ("markov",)
    main_evaluator = "markov"
    # the bigram phase: the KL to the Bayes bigram predictor falls below 0.04 nats (k=2: ~0.065 on the
    # unigram plateau, ~0.02 after the transition; see docs/tasks.md)
    timed_column, timing_thresholds, phase_change = "kl_bigram", "0.05,0.04,0.03", "0.04"
    curves = tuple(f"kl_{name}" for name in REFERENCES)

    def __init__(self, task_cfg):
        self.k, self.length = int(task_cfg.vocab), int(task_cfg.length)
        self.prior, self.concentration = str(task_cfg.prior), float(task_cfg.concentration)

    @classmethod
    def check(cls, task_cfg) -> None:
        super().check(task_cfg)
        if task_cfg.prior == "doubly_stochastic" and task_cfg.vocab > 4:
            raise ConfigError("task.prior=doubly_stochastic draws uniform doubly stochastic matrices for task.vocab <= 4 only")

    # --- sampling ---------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator) -> TokenBatch:
        """n chains of length+1 states: inputs are states 0..length-1, targets 1..length. The first state
        is drawn from the chain's stationary distribution (as the authors' sampler does)."""
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        matrices = self.transition_matrices(n, rng)  # [n, k, k]
        cumulative = torch.from_numpy(np.cumsum(matrices, -1)).float()
        uniforms = torch.from_numpy(rng.random((n, self.length + 1))).float()
        start = torch.from_numpy(np.cumsum(stationary_distribution(matrices), -1)).float()
        states = torch.empty(n, self.length + 1, dtype=torch.long)
        states[:, 0] = _draw(start, uniforms[:, 0])
        rows = torch.arange(n)
        for t in range(1, self.length + 1):
            states[:, t] = _draw(cumulative[rows, states[:, t - 1]], uniforms[:, t])
        return TokenBatch(states[:, :-1].contiguous(), states[:, 1:].contiguous())

    def transition_matrices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n, k, k] row-stochastic matrices from the prior."""
        if self.prior == "dirichlet":
            return rng.dirichlet(np.full(self.k, self.concentration), size=(n, self.k))
        return uniform_doubly_stochastic(n, self.k, rng)

    # --- metrics ------------------------------------------------------------------------------------

    def references(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each reference strategy's predictive distribution [..., T, k] at every position."""
        k, c = self.k, self.concentration
        one_hot = torch.nn.functional.one_hot(tokens, k).float()  # [..., T, k]
        seen = one_hot.cumsum(-2)
        positions = torch.arange(1, tokens.shape[-1] + 1, dtype=torch.float32).unsqueeze(-1)
        transitions = torch.zeros(*tokens.shape, k, k)  # [..., T, from, to]: transition s-1 -> s at s
        transitions[..., 1:, :, :] = one_hot[..., :-1, :, None] * one_hot[..., 1:, None, :]
        from_current = (transitions.cumsum(-3) * one_hot.unsqueeze(-1)).sum(-2)  # row of the current state
        return {"uniform": torch.full_like(one_hot, 1 / k),
                "unigram": (seen + c) / (positions + k * c),
                "bigram": (from_current + c) / (from_current.sum(-1, keepdim=True) + k * c)}

    def metrics(self, logits: torch.Tensor, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """loss: next-state cross-entropy; kl_<reference>: KL(reference || model) in nats; both averaged
        over positions and sequences."""
        log_model = log_softmax(logits)
        per_position = {"loss": -log_model.gather(-1, batch.target.unsqueeze(-1)).squeeze(-1)}
        for name, reference in self.references(batch.tokens.cpu()).items():
            reference = reference.to(logits.device)
            per_position[f"kl_{name}"] = (reference * (reference.log() - log_model)).sum(-1)
        return {name: value.mean((1, 2)) for name, value in per_position.items()}

    # --- clamp pieces -----------------------------------------------------------------------------

    def induction_target(self, batch: TokenBatch) -> torch.Tensor:
        """The statistical induction head's target: the positions right after earlier occurrences of the
        current state (their tokens are samples of the current state's transition row)."""
        return earlier_occurrence_successors(batch.tokens)

    def copy_token(self, batch: TokenBatch) -> torch.Tensor:
        return batch.tokens


def _draw(cumulative: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The state whose cumulative-probability bin holds `uniform` [n] (cumulative [n, k])."""
    return (cumulative < uniform.unsqueeze(-1)).sum(-1).clamp(max=cumulative.shape[-1] - 1)


def stationary_distribution(matrices: np.ndarray) -> np.ndarray:
    """[n, k]: pi with pi P = pi and sum 1, for each row-stochastic P [n, k, k] (solved directly)."""
    n, k, _ = matrices.shape
    system = np.swapaxes(matrices, 1, 2) - np.eye(k)
    system[:, -1, :] = 1.0  # replace one (redundant) balance equation by the normalisation
    rhs = np.zeros((n, k, 1))
    rhs[:, -1] = 1.0
    pi = np.linalg.solve(system, rhs)[..., 0]
    pi = np.clip(pi, 0, None)
    return pi / pi.sum(-1, keepdims=True)


def uniform_doubly_stochastic(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k, k] doubly stochastic matrices, uniform over the Birkhoff polytope (k <= 4): the free
    (k-1)x(k-1) block uniform in [0, 1], the last row and column completing the sums, rejected unless
    every entry is positive."""
    kept: list[np.ndarray] = []
    count = 0
    while count < n:
        m = np.empty((2 * (n - count) + 16, k, k))
        m[:, :-1, :-1] = rng.random((len(m), k - 1, k - 1))
        m[:, -1, :-1] = 1 - m[:, :-1, :-1].sum(1)
        m[:, :, -1] = 1 - m[:, :, :-1].sum(2)
        good = m[(m > 0).all((1, 2))]
        kept.append(good)
        count += len(good)
    return np.concatenate(kept)[:n]
