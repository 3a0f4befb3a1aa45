"""How a pack computes, chosen once: the fast path or autograd through the hooked model.

Both give a training step (the loss and every parameter's gradient of all runs, and the step's log
row) and the evaluation's forward pass (query logits and every layer's attention pattern), through
the model's one forward pass (Transformer.forward):

  FastPath    compiled packs whose loss reads the query logits: the step, with the clamps' hooks,
              as one pure function differentiated by torch.func (fast_path.py)
  HookedPath  the rest (uncompiled packs, next-token tasks, preserving ablations): autograd through
              the model's sites with the clamps' hooks (ClampSet)

Either can be compiled (`compile()`, compiled.py) for long runs.
"""

from __future__ import annotations

import torch

from ihstudy.model.clamps import ClampSet
from ihstudy.model.fast_path import batch_spread, query_loss_and_gradients, train_step
from ihstudy.model.transformer import Transformer, aten_backward_products
from ihstudy.tasks.base import PackStream, TensorBatch
from ihstudy.training.compiled import Compiled


def choose_path(model: Transformer, clamps: ClampSet, every_position: bool = False,
                compiled: bool = False) -> FastPath | HookedPath:
    """every_position: the task's loss and metrics read the logits of every position (next-token
    tasks), not the query's alone: autograd through the hooked model, as for clamps that are not
    ClampSet.functional, and for any pack unless the step is compiled (torch.func's cost per op
    makes an uncompiled step slower than autograd's: docs/performance.md)."""
    if every_position or not clamps.functional or not compiled:
        return HookedPath(model, clamps, every_position)
    return FastPath(model, clamps)



class HookedPath:
    """Autograd through the model's sites, with the clamps' hooks: FastPath's work for any pack
    (compiled, in more time per step; uncompiled, in less: docs/performance.md).
    every_position: the loss is each run's mean next-token cross-entropy over every position of its
    batch, and evaluation gives every position's logits and every layer's full pattern."""

    def __init__(self, model: Transformer, clamps: ClampSet, every_position: bool = False):
        self.model, self.clamps, self.every_position = model, clamps, every_position
        self.query_logits = clamps.all_logits if every_position else clamps.query_logits
        self.eval_chunk = self.hooked_eval_chunk

    def compile(self) -> None:
        if not isinstance(self.query_logits, Compiled):
            self.query_logits, self.eval_chunk = Compiled(self.query_logits), Compiled(self.hooked_eval_chunk)

    def step(self, stream: PackStream, step: int, weight: torch.Tensor, lr: torch.Tensor, log_row: torch.Tensor) -> torch.Tensor:
        batch = stream.batch(step)
        self.model.flat_grad.zero_()
        with aten_backward_products():
            logits, target = self.query_logits(self.model, batch), batch.target
        if self.every_position:  # each position a "sequence" of the loss, weighted 1/T
            logits, target, weight = logits.flatten(1, 2), target.flatten(1, 2), weight / target.shape[-1]
        loss, logit_grads = query_loss_and_gradients(logits.detach(), target)
        finite = torch.isfinite(loss)
        logits.backward(torch.where(finite[:, None, None], logit_grads * weight, 0.0))
        torch.stack([loss, self.model.flat_grad.norm(dim=1), batch_spread(logit_grads), lr], 1, out=log_row)
        return finite.all()

    def eval_forward(self, eval_batch: TensorBatch, part: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.eval_chunk(eval_batch[:, part])

    def hooked_eval_chunk(self, batch: TensorBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.model.shape.n_layers)]
        logits, cache = self.clamps.run_with_cache(self.model, batch, sites, query_only=not self.every_position)
        return (logits if self.every_position else logits[:, :, -1]), [cache[s] for s in sites]


class FastPath(HookedPath):
    """fast_path.train_step; evaluation as HookedPath's."""

    def __init__(self, model: Transformer, clamps: ClampSet):
        super().__init__(model, clamps)
        self.train_step = train_step

    def compile(self) -> None:
        super().compile()
        if not isinstance(self.train_step, Compiled):
            self.train_step = Compiled(train_step, fullgraph=True)

    def step(self, stream: PackStream, step: int, weight: torch.Tensor, lr: torch.Tensor, log_row: torch.Tensor) -> torch.Tensor:
        """Gradients of every run into model.flat_grad, the log row into log_row [R, 4]; whether all
        losses are finite (fast_path.train_step)."""
        batch = stream.batch(step)
        return self.train_step(self.model, self.clamps, self.model.flat, batch, weight, lr, self.model.flat_grad, log_row)
