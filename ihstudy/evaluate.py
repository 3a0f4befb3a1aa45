"""Evaluation metrics (paper-notes §1) and the head scores of paper-notes §3, for R runs at once."""

from __future__ import annotations

import math

import torch

from ihstudy.data import Batch
from ihstudy.model import cross_entropy, log_softmax

LN2 = math.log(2)
PHASE_CHANGE_THRESHOLD = 0.4 * LN2  # the paper's phase-change criterion on the fsl_train loss

METRICS = ("loss", "acc", "icl_acc", "icl_prob", "ooc_acc", "ooc_prob", "in_context_mass")


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
