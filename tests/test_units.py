"""Small pieces checked against hand-computed values: lr schedules, the stacked optimizer (against
torch.optim), the eval metrics and head scores (docs/science.md §1, §3), the eval/checkpoint schedule."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from ihstudy.tasks.fsl import Batch
from ihstudy.training.evaluate import induction_strength, previous_token_score, query_metrics
from ihstudy.training.optim import StackedOptimizer, lr_schedule
from ihstudy.training.train import eval_plan, schedule_steps

# --- learning-rate schedules: 6 steps of 32 sequences, warmup over 64 sequences = 2 steps ---------


def schedule(name: str, warmup_sequences: int = 64) -> list[float]:
    cfg = OmegaConf.create({"lr": 1.0, "schedule": name, "warmup_sequences": warmup_sequences, "min_lr_fraction": 0.1})
    return lr_schedule(cfg, n_steps=6, batch_size=32).tolist()


@pytest.mark.parametrize("name,warmup,expected", [
    ("constant", 0, [1, 1, 1, 1, 1, 1]),
    ("constant", 64, [0.5, 1, 1, 1, 1, 1]),  # linear ramp (step + 1) / 2 over the first two steps
    # after warmup, progress (step - 2) / 4 = 0, 0.25, 0.5, 0.75; lr = 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    ("cosine", 64, [0.5, 1, 1, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5))]),
    ("warmup_decay", 64, [0.5, 1, 1, 0.775, 0.55, 0.325]),  # linear from 1 towards 0.1
])
def test_lr_schedule_values(name, warmup, expected):
    assert schedule(name, warmup) == pytest.approx(expected, abs=1e-6)


# --- the stacked optimizer equals one torch.optim optimizer per run ------------------------------

RUN_LRS = [1e-2, 3e-2, 1e-2]  # two runs share a rate, as the fused kernel groups them


def optim_cfg(name: str, run: int) -> dict:
    extra = {"betas": [0.9, 0.99], "eps": 1e-6} if name == "adam" else {"momentum": [0.9, 0.5, 0.0][run]}
    return OmegaConf.create({"name": name, "lr": RUN_LRS[run], **extra})


def reference(name: str, param: torch.Tensor, cfg) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam([param], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD([param], lr=cfg.lr, momentum=cfg.momentum)


@pytest.mark.parametrize("name,kernel", [("adam", "fused"), ("adam", "plain"), ("sgd", "plain")])
def test_stacked_optimizer_matches_torch_optim_step_by_step(name, kernel, monkeypatch):
    if kernel == "plain":
        monkeypatch.delattr(torch, "_fused_adam_", raising=False)  # the fallback for a torch without the kernel
    generator = torch.Generator().manual_seed(0)
    params = torch.randn(3, 7, generator=generator)
    grads = torch.zeros_like(params)
    cfgs = [optim_cfg(name, r) for r in range(3)]
    stacked = StackedOptimizer(cfgs, params, grads)
    singles = [params[r].clone().requires_grad_(True) for r in range(3)]
    references = [reference(name, p, c) for p, c in zip(singles, cfgs)]
    for _ in range(5):
        grads.copy_(torch.randn(3, 7, generator=generator))
        stacked.step(torch.tensor(RUN_LRS), torch.ones(3, dtype=torch.bool))
        for r, (single, opt) in enumerate(zip(singles, references)):
            single.grad = grads[r].clone()
            opt.step()
            torch.testing.assert_close(params[r], single.detach(), rtol=1e-5, atol=1e-7)


def test_stacked_optimizer_leaves_inactive_runs_alone():
    params = torch.ones(2, 4)
    grads = torch.full_like(params, 0.5)
    stacked = StackedOptimizer([optim_cfg("adam", 0), optim_cfg("adam", 1)], params, grads)
    stacked.step(torch.tensor(RUN_LRS[:2]), torch.tensor([True, False]))
    assert torch.equal(params[1], torch.ones(4)) and not torch.equal(params[0], torch.ones(4))


# --- metrics and head scores on hand-built values -------------------------------------------------


def hand_batch() -> Batch:
    """One run, two sequences of two context pairs over 4 labels: labels (0, 1) with query label 0,
    and labels (2, 2) (a bursty context) with query label 2."""
    return Batch(exemplars=torch.zeros(1, 2, 3, 1), labels=torch.tensor([[[0, 1], [2, 2]]]), target=torch.tensor([[0, 2]]))


def test_query_metrics_values():
    # sequence 0: the largest logit is label 3, which is not in the context (labels 0, 1)
    # sequence 1: the largest logit is label 2, the true one
    logits = torch.tensor([[[math.log(2), 0.0, 0.0, math.log(5)], [0.0, 0.0, math.log(6), 0.0]]])
    m = {k: v.item() for k, v in query_metrics(logits, hand_batch()).items()}
    # probabilities: sequence 0 = (2, 1, 1, 5) / 9; sequence 1 = (1, 1, 6, 1) / 9
    assert m["loss"] == pytest.approx((-math.log(2 / 9) - math.log(6 / 9)) / 2)
    assert m["acc"] == 0.5
    assert m["icl_acc"] == 1.0  # restricted to in-context labels, both are right
    assert m["icl_prob"] == pytest.approx((2 / 3 + 1) / 2)  # 2 / (2 + 1); the only in-context label
    assert m["ooc_acc"] == 0.5
    assert m["in_context_mass"] == pytest.approx((3 / 9 + 6 / 9) / 2)
    assert m["ooc_prob"] == pytest.approx(1 - m["in_context_mass"])


def test_induction_strength_and_previous_token_score_values():
    # 5 tokens x1 y1 x2 y2 xq; label tokens at positions 1 and 3. Two heads; one run, two sequences.
    pattern = torch.zeros(1, 2, 2, 5, 5)
    pattern[..., 0, 0] = 1.0
    for t in range(1, 5):  # head 0: every token puts 0.75 on the one before it, 0.25 on itself
        pattern[:, :, 0, t, t - 1], pattern[:, :, 0, t, t] = 0.75, 0.25
    pattern[:, :, 1] = 1 / torch.arange(1, 6).view(5, 1) * torch.tril(torch.ones(5, 5))  # head 1: uniform
    pattern[:, 0, 0, 4] = torch.tensor([0.0, 0.6, 0.1, 0.3, 0.0])  # query row: 0.6 on y1 (label 0, correct)
    pattern[:, 1, 0, 4] = torch.tensor([0.0, 0.2, 0.0, 0.2, 0.6])  # both label tokens carry label 2: correct
    strength = induction_strength(pattern, hand_batch())
    assert strength[0, 0].item() == pytest.approx(((0.6 - 0.3) + (0.2 + 0.2)) / 2)
    assert strength[0, 1].item() == pytest.approx((0.0 + 0.4) / 2)  # uniform query row: 0.2 per token
    score = previous_token_score(pattern)
    # head 0: rows 1-3 put 0.75 on the previous token; the query rows 0.3 (on y2, seq 0) and 0.2 (seq 1)
    assert score[0, 0].item() == pytest.approx(((0.75 * 3 + 0.3) + (0.75 * 3 + 0.2)) / 8)
    assert score[0, 1].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)


# --- when evals and checkpoints happen -------------------------------------------------------------


def test_schedule_steps_every_and_extra_points():
    # 10 steps of 32 sequences; every 64 sequences -> steps 0, 2, 4, 6, 8, 10; sequences 40 and 100 round
    # up to steps 2 and 4; 1000 lies past the end and lands on the last step, which is always included
    assert schedule_steps(64, [40, 100, 1000], n_steps=10, batch_size=32) == {0, 2, 4, 6, 8, 10}
    assert schedule_steps(96, [33], n_steps=10, batch_size=32) == {0, 2, 3, 6, 9, 10}
    assert schedule_steps(10**6, [], n_steps=10, batch_size=32) == {0, 10}


def test_eval_plan_measures_dense_evaluators_at_every_point_and_the_rest_sparsely():
    train = OmegaConf.create({"eval_every": 64, "eval_at": [40], "batch_size": 32})
    names = ["fsl_train", "fsl_val_rl", "fsl_test_class"]

    def plan(dense, sparse_every=160):
        return eval_plan(train, OmegaConf.create({"evaluators": names, "dense": dense, "sparse_every": sparse_every}), 10)

    assert plan(None) == {step: names for step in (0, 2, 4, 6, 8, 10)}  # dense unset: every evaluator everywhere
    # every 160 sequences = steps 0 and 5 (not on the 64-sequence grid: all three measured there too), and the end
    assert plan(["fsl_train"]) == {0: names, 2: ["fsl_train"], 4: ["fsl_train"], 5: names, 6: ["fsl_train"],
                                   8: ["fsl_train"], 10: names}
    two = ["fsl_train", "fsl_test_class"]
    assert plan(two, 10**6) == {0: names, **dict.fromkeys((2, 4, 6, 8), two), 10: names}
    assert plan([]) == {0: names, 5: names, 10: names}  # no dense evaluator: only the sparse points
