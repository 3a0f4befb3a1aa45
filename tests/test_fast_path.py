"""The hand-written training step (fast_path.py) against autograd through the model itself."""

import pytest
import torch

from ihstudy.fast_path import Tape
from ihstudy.model import ModelShape, query_loss
from ihstudy.train import query_loss_and_gradients
from tests.test_model import model, random_batch

SHAPES = {
    "paper": ModelShape(2, 8, 64, 16, 5, 2),
    "three layers, learned positions, MLP": ModelShape(3, 4, 32, 16, 5, 3, positional="learned", mlp_ratio=2.0),
    "one layer, sinusoidal": ModelShape(1, 4, 32, 16, 10, 4, positional="sinusoidal"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_logits_and_gradients_equal_autograd(name):
    shape = SHAPES[name]
    by_hand, by_autograd = model(shape, seeds=(1, 2, 3)), model(shape, seeds=(1, 2, 3))
    batch = random_batch(runs=3, n=7, shape=shape)
    weight = torch.tensor([1.0, 0.0, 1.0])  # a failed run (weight 0) gets no gradient

    (query_loss(by_autograd(batch), batch.target).mean(1) * weight).sum().backward()
    tape = Tape(by_hand, batch)
    assert torch.allclose(tape.logits, by_autograd(batch)[..., -1, :], atol=1e-5)
    by_hand.flat_grad.fill_(float("nan"))  # every gradient must be written, none accumulated
    tape.backward(query_loss_and_gradients(tape.logits, batch.target)[1] * weight[:, None, None] / 7)

    assert torch.allclose(by_hand.flat_grad, by_autograd.flat_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(by_hand.flat_grad[1] == 0)


def test_one_run_alone_gets_the_gradient_it_gets_in_a_pack():
    shape = SHAPES["paper"]
    pack, alone = model(shape, seeds=(4, 5)), model(shape, seeds=(5,))
    batch = random_batch(runs=2, n=5, shape=shape)
    for m, b in ((pack, batch), (alone, batch[1:])):
        tape = Tape(m, b)
        tape.backward(query_loss_and_gradients(tape.logits, b.target)[1])
    assert torch.allclose(pack.flat_grad[1], alone.flat_grad[0], atol=1e-6)
