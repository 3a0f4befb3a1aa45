"""The hand-written training step (fast_path.py) against autograd through the model itself."""

import pytest
import torch

from ihstudy.compiled import Compiled
from ihstudy.fast_path import Tape, train_step
from ihstudy.model import ModelShape, query_loss
from tests.test_model import model, random_batch

SHAPES = {
    "paper": ModelShape(2, 8, 64, 16, 5, 2),
    "three layers, learned positions, MLP": ModelShape(3, 4, 32, 16, 5, 3, positional="learned", mlp_ratio=2.0),
    "one layer, sinusoidal": ModelShape(1, 4, 32, 16, 10, 4, positional="sinusoidal"),
}


def step(m, batch, weight, function=train_step):
    """(loss, grad norm, spread, lr, gradient, all finite) of one fast-path step."""
    grad, log = torch.full_like(m.flat, float("nan")), torch.empty(m.n_runs, 4)
    all_finite = function(m, m.flat, m.embedding_inputs(batch), batch.target, weight, torch.full((m.n_runs,), 0.1), grad, log)
    return (*log.T, grad, all_finite)


@pytest.mark.parametrize("name", SHAPES)
def test_loss_and_gradients_equal_autograd(name):
    shape = SHAPES[name]
    by_hand, by_autograd = model(shape, seeds=(1, 2, 3)), model(shape, seeds=(1, 2, 3))
    batch = random_batch(runs=3, n=7, shape=shape)
    weight = torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1) / 7  # per sequence; a failed run (0) gets no gradient

    per_sequence = query_loss(by_autograd(batch), batch.target)
    (per_sequence.sum(1) * weight.flatten()).sum().backward()
    losses = per_sequence.mean(1)
    loss, grad_norm, _, _, grad, _ = step(by_hand, batch, weight)

    assert torch.allclose(loss, losses.detach(), atol=1e-6)
    assert by_autograd.flat_grad[0].abs().sum() > 0
    assert torch.allclose(grad, by_autograd.flat_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[1] == 0)
    assert torch.allclose(grad_norm, by_autograd.flat_grad.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("name", SHAPES)
def test_forward_patterns_equal_the_models_sites(name):
    shape = SHAPES[name]
    m, batch = model(shape, seeds=(1, 2)), random_batch(runs=2, n=5, shape=shape)
    sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(shape.n_layers)]
    logits, cache = m.run_with_cache(batch, sites)
    for query_only in (False, True):
        tape = Tape(m, m.views(m.flat), m.embedding_inputs(batch), query_only=query_only)
        assert torch.allclose(tape.logits, logits[:, :, -1], atol=1e-5)
        for site, pattern in zip(sites, tape.patterns()):
            expected = cache[site][..., -1:, :] if query_only and site == sites[-1] else cache[site]
            assert torch.allclose(pattern, expected, atol=1e-6)


def test_a_run_whose_loss_is_not_finite_leaves_its_pack_mates_alone():
    shape = SHAPES["paper"]
    pack, alone = model(shape, seeds=(4, 5)), model(shape, seeds=(5,))
    with torch.no_grad():
        pack.flat[0, 0] = float("nan")
    batch = random_batch(runs=2, n=5, shape=shape)
    ones = torch.ones(2, 1, 1)
    loss, *_, grad, all_finite = step(pack, batch, ones)
    solo_loss, *_, solo_grad, _ = step(alone, batch[1:], ones[:1])
    assert loss[0].isnan() and not all_finite and torch.allclose(loss[1:], solo_loss)
    assert torch.allclose(grad[1], solo_grad[0], atol=1e-6)


@pytest.mark.slow  # torch.compile: ~35 s of CPU with a cold compile cache (a fresh CI machine)
def test_the_compiled_step_equals_the_plain_one():
    shape = ModelShape(2, 4, 16, 8, 5, 2)
    m, batch = model(shape, seeds=(1, 2)), random_batch(runs=2, n=4, shape=shape)
    compiled = Compiled(train_step, fullgraph=True)
    for by_compiled, by_plain in zip(step(m, batch, torch.ones(2, 1, 1) / 4, compiled), step(m, batch, torch.ones(2, 1, 1) / 4)):
        assert torch.allclose(by_compiled, by_plain, rtol=1e-5, atol=1e-6)
    assert compiled.compiled  # not the fallback
