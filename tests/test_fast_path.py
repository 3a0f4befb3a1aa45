"""The fast path's training step (fast_path.py, torch.func) against autograd through the model itself."""

import itertools

import pytest
import torch

from ihstudy.model import transformer
from ihstudy.model.clamps import AblateHeads, ClampSet
from ihstudy.model.fast_path import train_step
from ihstudy.model.transformer import ModelShape, query_loss
from ihstudy.tasks.fsl import Batch
from ihstudy.training.compiled import VECTOR_BITS, Compiled, vector_width
from ihstudy.training.steps import FastPath, HookedPath, choose_path
from tests.test_model import model, random_batch

SHAPES = {
    "paper": ModelShape(2, 8, 64, 16, 5, 2),
    "three layers, learned positions, MLP": ModelShape(3, 4, 32, 16, 5, 3, positional="learned", mlp_ratio=2.0),
    "one layer, sinusoidal": ModelShape(1, 4, 32, 16, 10, 4, positional="sinusoidal"),
}


def step(m, batch, weight, function=train_step, clamps=None):
    """(loss, grad norm, spread, lr, gradient, all finite) of one fast-path step."""
    grad, log = torch.full_like(m.flat, float("nan")), torch.empty(m.n_runs, 4)
    clamps = clamps or ClampSet([[]] * m.n_runs)  # unclamped unless given
    all_finite = function(m, clamps, m.flat, batch, weight, torch.full((m.n_runs,), 0.1), grad, log)
    return (*log.T, grad, all_finite)


# Every combination of model options: positions x MLP x depth x (labels, context length).
OPTION_GRID = [ModelShape(n_layers, 2, 16, 8, n_labels, context_len, positional=positional, mlp_ratio=mlp_ratio)
               for positional, mlp_ratio, n_layers, (n_labels, context_len) in itertools.product(
                   ("rotary", "learned", "sinusoidal"), (0.0, 2.0), (1, 2, 3), ((5, 2), (10, 4)))]


@pytest.fixture
def float64():
    """Models and batches in float64 for the test: two evaluation orders of the same sums then agree far
    inside the tolerances (in float32 they differ by up to 2.9e-6 on some CPUs, an AMD EPYC among them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("shape", OPTION_GRID, ids=lambda s: f"{s.positional}-mlp{s.mlp_ratio:g}-L{s.n_layers}-N{s.context_len}")
def test_loss_and_gradients_equal_autograd(shape, float64):
    by_hand = by_autograd = model(shape, seeds=(1, 2, 3))  # the fast step writes its gradient elsewhere
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


class OneBatch:
    """A PackStream whose every step has the same batch."""

    def __init__(self, batch: Batch):
        self.one = batch

    def batch(self, step: int) -> Batch:
        return self.one


def shape_id(s) -> str:
    return f"{s.positional}-mlp{s.mlp_ratio:g}-L{s.n_layers}-N{s.context_len}"


@pytest.mark.parametrize("shape", OPTION_GRID[::7], ids=shape_id)
def test_both_paths_take_the_same_step(shape):
    """steps.FastPath and steps.HookedPath (what uncompiled packs use) on the same stream: the same
    bits in log rows, gradients, logits and patterns (eager, both run the same kernels on the same
    products), so the choice of path never changes an uncompiled run."""
    batch = random_batch(runs=2, n=7, shape=shape)
    logs = []
    for path_type in (FastPath, HookedPath):
        m = model(shape, seeds=(1, 2))
        path = path_type(m, ClampSet([[], []]))
        log_row = torch.empty(2, 4)
        assert path.step(OneBatch(batch), 0, torch.ones(2, 1, 1) / 7, torch.full((2,), 0.1), log_row)
        logs.append((log_row, m.flat_grad.clone(), path.eval_forward(batch, slice(0, 7))))
    (fast_log, fast_grad, (fast_logits, fast_patterns)), (hooked_log, hooked_grad, (hooked_logits, hooked_patterns)) = logs
    assert torch.equal(fast_log, hooked_log)
    assert torch.equal(fast_grad, hooked_grad)
    assert torch.equal(fast_logits, hooked_logits)
    for fast, hooked in zip(fast_patterns, hooked_patterns):
        assert torch.equal(fast, hooked)


def test_a_compiled_pack_takes_the_fast_path_unless_its_clamps_or_loss_need_the_hooked_model():
    m = model(SHAPES["paper"], seeds=(1,))
    ablate, preserving = AblateHeads(heads=((0, 1),)), AblateHeads(heads=((0, 1),), preserve=("patterns",))
    for clamps in ([], [ablate]):
        assert type(choose_path(m, ClampSet([clamps]), compiled=True)) is FastPath
        assert type(choose_path(m, ClampSet([clamps]))) is HookedPath  # uncompiled, autograd is faster
    for compiled in (False, True):
        assert type(choose_path(m, ClampSet([[preserving]]), compiled=compiled)) is HookedPath
        assert type(choose_path(m, ClampSet([[]]), every_position=True, compiled=compiled)) is HookedPath


@pytest.mark.parametrize("name", SHAPES)
def test_forward_patterns_equal_the_models_sites(name):
    """The evaluation's query-only pass (the last layer's query row alone) against the model's full pass."""
    shape = SHAPES[name]
    m, batch = model(shape, seeds=(1, 2)), random_batch(runs=2, n=5, shape=shape)
    sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(shape.n_layers)]
    logits, cache = m.run_with_cache(batch, sites)
    eval_logits, patterns = FastPath(m, ClampSet([[], []])).eval_forward(batch, slice(0, 5))
    assert torch.allclose(eval_logits, logits[:, :, -1], atol=1e-5)
    for site, pattern in zip(sites, patterns):
        expected = cache[site][..., -1:, :] if site == sites[-1] else cache[site]
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


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT"])
def test_compiled_kernels_are_capped_at_256_bit_vectors_only_on_avx512_cpus(monkeypatch, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert vector_width() == ({"cpp.simdlen": 256} if capability == "AVX512" else {})


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 CPU")
def test_inductor_picks_256_bit_vectors_with_the_cap_on_this_avx512_cpu():
    from torch._inductor import config, cpu_vec_isa

    with config.patch({"cpp.vec_isa_ok": True}):  # as Compiled sets it: no probing child processes
        assert cpu_vec_isa.pick_vec_isa().bit_width() == 512  # uncapped: AVX-512
        with config.patch(vector_width()):
            assert cpu_vec_isa.pick_vec_isa().bit_width() == VECTOR_BITS


@pytest.mark.slow  # torch.compile: ~35 s of CPU per case with a cold compile cache (a fresh CI machine)
@pytest.mark.parametrize("clamps", [[[], []], [[AblateHeads(heads=((1, 3),))], []]], ids=["unclamped", "clamped"])
def test_the_compiled_step_equals_the_plain_one(clamps):
    shape = ModelShape(2, 4, 16, 8, 5, 2)
    m, batch, weight = model(shape, seeds=(1, 2)), random_batch(runs=2, n=4, shape=shape), torch.ones(2, 1, 1) / 4
    compiled, clamp_set = Compiled(train_step, fullgraph=True), ClampSet(clamps)
    for by_compiled, by_plain in zip(step(m, batch, weight, compiled, clamp_set), step(m, batch, weight, clamps=clamp_set)):
        assert torch.allclose(by_compiled, by_plain, rtol=1e-5, atol=1e-6)
    assert compiled.compiled  # not the fallback


@pytest.mark.slow  # torch.compile twice: ~35 s of CPU with a cold compile cache
def test_a_compiled_step_comes_from_aotautograds_cache_the_second_time():
    """The step's graph holds a custom autograd.Function (transformer.PlainLoopMatmul), which
    AOTAutograd's on-disk cache would not keep by default: every process would redo its work."""
    shape = ModelShape(2, 4, 16, 8, 5, 2)
    m, batch = model(shape, seeds=(1, 2)), random_batch(runs=2, n=4, shape=shape)
    counters = torch._dynamo.utils.counters["aot_autograd"]
    for _ in range(2):  # the first compile may find the graph on disk already or save it
        torch._dynamo.reset()
        counters.clear()
        step(m, batch, torch.ones(2, 1, 1) / 4, Compiled(train_step, fullgraph=True))
    assert counters["autograd_cache_hit"] == 1 and counters["autograd_cache_bypass"] == 0


def compiled_with_and_without_written_out_products(monkeypatch, compute) -> list:
    """compute() (which compiles) as shipped, with attention's small products written out
    (transformer.head_matmul), and again with `@` throughout, each from an empty Dynamo cache."""
    results = []
    for plain_loop_max in (transformer.ATEN_PLAIN_LOOP_MAX, 0):
        monkeypatch.setattr(transformer, "ATEN_PLAIN_LOOP_MAX", plain_loop_max)
        torch._dynamo.reset()
        results.append(compute())
    return results


@pytest.mark.slow  # torch.compile twice: ~40 s of CPU with a cold compile cache
def test_the_compiled_step_writes_out_atens_small_matmuls_bit_for_bit(monkeypatch):
    """Compiled, attention's small per-head products are ATen's plain loop written out
    (transformer.head_matmul): loss, log row and gradient bit-identical to the same graph with `@`."""
    shape = ModelShape(2, 8, 64, 8, 5, 2)  # 5 x 8 by 8 x 5 per head, as in the paper
    m, batch = model(shape, seeds=(1, 2)), random_batch(runs=2, n=4, shape=shape)

    def compiled_step():
        compiled = Compiled(train_step, fullgraph=True)
        result = step(m, batch, torch.ones(2, 1, 1) / 4, compiled)
        assert compiled.compiled  # not the fallback
        return result

    written_out, with_matmul = compiled_with_and_without_written_out_products(monkeypatch, compiled_step)
    for value, expected in zip(written_out, with_matmul):
        assert torch.equal(value, expected)


@pytest.mark.slow  # torch.compile of a forward and its backward, twice: ~60 s of CPU with a cold cache
def test_the_compiled_hooked_step_writes_out_atens_small_matmuls_bit_for_bit(monkeypatch):
    """The hooked path compiled (a clamped pack's step and eval) with the forward's small products
    written out and the backward's by ATen (transformer.aten_backward_products): log row,
    gradient, logits and patterns bit-identical to the same graphs with `@`."""
    shape = ModelShape(2, 8, 64, 8, 5, 2)
    batch = random_batch(runs=2, n=4, shape=shape)

    def compiled_hooked_step_and_eval():
        m = model(shape, seeds=(1, 2))
        path = HookedPath(m, ClampSet([[AblateHeads(heads=((1, 3),))], []]))
        path.compile()
        log_row = torch.empty(2, 4)
        assert path.step(OneBatch(batch), 0, torch.ones(2, 1, 1) / 4, torch.full((2,), 0.1), log_row)
        logits, patterns = path.eval_forward(batch, slice(0, 4))
        assert path.query_logits.compiled and path.eval_chunk.compiled  # not the fallback
        return [log_row, m.flat_grad.clone(), logits, *patterns]

    for value, expected in zip(*compiled_with_and_without_written_out_products(monkeypatch, compiled_hooked_step_and_eval)):
        assert torch.equal(value, expected)
