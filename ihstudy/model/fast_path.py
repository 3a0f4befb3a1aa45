"""The training step as one pure function of the parameters, differentiated by torch.func.

A training step of a few-shot pack needs only the query logits and every parameter's gradient, of
all stacked runs at once. The step below runs the model's own forward pass (Transformer.forward, the
one wiring of the model) with the clamps' hooks installed (none for an unclamped pack: every site a
no-op) and takes its gradient with `torch.func.grad`, so it is a pure function of tensors that
torch.compile turns into one graph, forward and backward fused (`train.compile`,
ihstudy/training/compiled.py). A hand-written backward pass was measured against it and was not
worth its second copy of the wiring (docs/performance.md). Packs this cannot serve, and uncompiled
ones (torch.func costs more per op than autograd), train through autograd on the hooked model
instead (ihstudy/training/steps.py).

Shapes: R runs, B sequences, T tokens, L labels, P parameters per run.
"""

from __future__ import annotations

import torch

from ihstudy.model.clamps import ClampSet
from ihstudy.model.transformer import Transformer, log_softmax
from ihstudy.tasks.fsl import Batch


def train_step(model: Transformer, clamps: ClampSet, flat: torch.Tensor, batch: Batch,
               weight: torch.Tensor, lr: torch.Tensor, grad_out: torch.Tensor, log_out: torch.Tensor) -> torch.Tensor:
    """Loss and gradient of every run with parameters `flat` [R, P] on a batch [R, B, ...] under
    the pack's clamps (whose hooks must read no parameters but the pass's own: ClampSet.functional);
    the loss being each run's mean cross-entropy of the query label times weight [R, 1, 1].

    Writes the gradient into grad_out [R, P] and the step's log row (loss, gradient norm, batch
    spread of the logit gradients, lr [R]) into log_out [R, 4]; returns whether every loss is
    finite. A run whose loss is not finite gets a zero gradient at the logits (its parameters'
    gradients may still be NaN); no run's numbers affect another's.
    """

    def objective(params: dict[str, torch.Tensor]):
        # sum(logits * d_logits) with d_logits held constant: its gradient is the backward pass of the
        # logits' gradient d_logits, which the finite mask and the per-run weight shape.
        with model.hooks(clamps.hooks(model, batch, query_only=True)):
            logits = model.forward(params, model.embedding_inputs(batch), query_only=True)[:, :, -1]
        loss, logit_grads = query_loss_and_gradients(logits.detach(), batch.target)
        finite = torch.isfinite(loss)
        d_logits = torch.where(finite[:, None, None], logit_grads * weight, 0.0)
        return (logits * d_logits).sum(), (loss, logit_grads, finite)

    # by the parameters, then one cat in flat's layout: differentiated by flat itself, the compiled
    # gradient was a sum of every parameter's zero-padded slice, one masked pass over the whole
    # buffer per parameter (1.1-1.5 ms of a clamped pack's 9-10 ms step: docs/performance.md)
    grads, (loss, logit_grads, finite) = torch.func.grad(objective, has_aux=True)(model.views(flat))
    grad = torch.cat([g.flatten(1) for g in grads.values()], 1)
    grad_out.copy_(grad)
    log_out.copy_(torch.stack([loss, grad.norm(dim=1), batch_spread(logit_grads), lr], 1))
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
