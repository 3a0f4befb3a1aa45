"""Optimizers and learning-rate schedules for R runs stacked in one flat parameter buffer.

Adam and SGD are elementwise, so updating the stacked [R, P] buffer with a per-run learning rate
is exactly R separate optimizers: a run trains identically alone or inside a batched sweep.
"""

from __future__ import annotations

import math

import torch

from ihstudy.training.pack_settings import shared_group


def lr_schedule(optim_cfg, n_steps: int, batch_size: int) -> torch.Tensor:
    """Learning rate before each of the n_steps updates: [n_steps]."""
    step = torch.arange(n_steps, dtype=torch.float64)
    base, floor = optim_cfg.lr, optim_cfg.lr * optim_cfg.min_lr_fraction
    warmup = optim_cfg.warmup_sequences / batch_size
    ramp = torch.clamp((step + 1) / warmup, max=1.0) if warmup > 0 else torch.ones_like(step)
    if optim_cfg.schedule == "constant":
        return (base * ramp).float()
    progress = torch.clamp((step - warmup) / max(n_steps - warmup, 1), 0.0, 1.0)
    if optim_cfg.schedule == "cosine":
        decayed = floor + (base - floor) * 0.5 * (1 + torch.cos(math.pi * progress))
    else:  # warmup_decay: linear decay to the floor after warmup
        decayed = base + (floor - base) * progress
    return (ramp * decayed).float()


class StackedOptimizer:
    """Adam (bias-corrected, like torch.optim.Adam) or SGD with momentum over a [R, P] buffer."""

    def __init__(self, optim_cfgs: list, params: torch.Tensor, grads: torch.Tensor):
        shared = shared_group(optim_cfgs, "optim")
        self.name, self.params, self.grads = shared.name, params, grads
        self.beta1, self.beta2 = shared.get("betas", (0.9, 0.999))  # each optimizer's config holds only its own keys
        self.eps = shared.get("eps", 1e-8)
        self.momentum = torch.tensor([float(c.get("momentum", 0.0)) for c in optim_cfgs], device=params.device)[:, None]
        self.exp_avg = torch.zeros_like(params)
        self.exp_avg_sq = torch.zeros_like(params) if self.name == "adam" else None
        self.step_count = torch.zeros((), device=params.device)  # Adam's bias correction reads it as a tensor
        self.steps_done = 0
        # Adam's tensors of each run, made once (detached: updated in place outside autograd): a step's
        # Python costs about as much as its kernel, so it makes no views and no autograd context.
        self.run_tensors = [] if self.exp_avg_sq is None else [
            (params[r].detach(), grads[r].detach(), self.exp_avg[r], self.exp_avg_sq[r]) for r in range(len(params))]

    def step(self, lr: torch.Tensor, active: torch.Tensor) -> None:
        """One update with per-run learning rates lr [R]; inactive (failed) runs stay unchanged."""
        self.steps_done += 1
        if self.name == "sgd":
            with torch.no_grad():
                self.exp_avg.mul_(self.momentum).add_(self.grads)
                self.params.sub_((lr * active)[:, None] * self.exp_avg)
            return
        # The kernel behind torch.optim.Adam(fused=True): one pass over the buffer instead of ~10 ops.
        # It takes one learning rate per call, so runs with different rates are updated separately.
        runs = [r for r, on in enumerate(active.tolist()) if on]
        self.step_count.fill_(self.steps_done)
        adam = torch._fused_adam_ if hasattr(torch, "_fused_adam_") else plain_adam  # a private kernel may go away
        for rate, group in self.lr_groups(lr, runs):
            params, grads, exp_avgs, exp_avg_sqs = zip(*(self.run_tensors[r] for r in group))
            adam(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], [self.step_count] * len(group),
                 lr=rate, beta1=self.beta1, beta2=self.beta2, weight_decay=0.0, eps=self.eps, amsgrad=False,
                 maximize=False)

    @staticmethod
    def lr_groups(lr: torch.Tensor, runs: list[int]) -> list[tuple[float, list[int]]]:
        rates = lr.tolist()
        groups: dict[float, list[int]] = {}
        for r in runs:
            groups.setdefault(rates[r], []).append(r)
        return list(groups.items())

    def state(self, run: int) -> dict:
        state = {"steps_done": self.steps_done, "exp_avg": self.exp_avg[run].clone().cpu()}
        if self.exp_avg_sq is not None:
            state["exp_avg_sq"] = self.exp_avg_sq[run].clone().cpu()
        return state

    def load_state(self, state: dict, run: int) -> None:
        self.steps_done = int(state["steps_done"])
        self.exp_avg[run] = state["exp_avg"]
        if self.exp_avg_sq is not None:
            self.exp_avg_sq[run] = state["exp_avg_sq"]


def plain_adam(params, grads, exp_avgs, exp_avg_sqs, _max_exp_avg_sqs, steps, *, lr, beta1, beta2, weight_decay, eps,
               amsgrad, maximize) -> None:
    """torch.optim.Adam's update in plain ops, with `torch._fused_adam_`'s signature (no weight decay,
    amsgrad or maximize: StackedOptimizer uses none of them)."""
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = float(step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
