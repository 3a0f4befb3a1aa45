"""The memory estimate: close to what a run really allocates, and every config either refused
before anything large is allocated or small enough to fit."""

import resource
import tempfile
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ihstudy.config import compose_config
from ihstudy.errors import ConfigError
from ihstudy.training import memory, sweep, train
from ihstudy.training.memory import check_fits, estimate
from ihstudy.training.sweep import plan_sweep
from ihstudy.training.train import Pack, RunSpec, exemplar_shape


def peak_growth(overrides: list[str]) -> int:
    """In a forked child (whose peak memory starts at its current memory): how far building the
    pack, one training step and one evaluation raise the peak (bytes)."""
    cfg, _ = compose_config(overrides)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pack = Pack([RunSpec(cfg, Path(tempfile.mkdtemp()) / "run")])
    pack.train_step()
    pack.measure()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def test_the_estimate_has_the_order_of_a_measured_allocation():
    """A config whose training batches, attention and eval passes all weigh ~100 MB: the peak
    memory of building its pack, one training step and one evaluation, against the estimate."""
    overrides = ["task.context_len=16", "eval.n_sequences=300", "train.threads=1"]
    cfg, _ = compose_config(overrides)
    estimated = sum(part.bytes for part in estimate([cfg], [exemplar_shape(cfg.data, {})]))
    with get_context("fork").Pool(1) as pool:
        measured = pool.apply(peak_growth, (overrides,))
    assert estimated > 100 * 2**20
    assert estimated / 3 < measured < estimated * 3, (measured, estimated)


def test_a_large_chunk_of_training_batches_is_counted_and_measured():
    """train.chunk_batches up to 65,536: the estimate grows with it, names it, and has the order of
    the measured peak of a pack drawing 16,384 batches at once (a chunk keeps exemplar rows, not
    exemplars, so it takes that many to weigh ~100 MB)."""
    overrides = ["train.chunk_batches=16384", "train.threads=1"]
    cfg, _ = compose_config(overrides)
    shape = exemplar_shape(cfg.data, {})
    parts = {p.name: p for p in estimate([cfg], [shape])}
    default = {p.name: p for p in estimate([compose_config([])[0]], [shape])}
    assert parts["training batches (16384 steps at a time)"].bytes > 50 * default["training batches (256 steps at a time)"].bytes
    huge, _ = compose_config(["train.chunk_batches=65536"])
    with pytest.raises(ConfigError, match=r"largest part is training batches \(65536 steps .*lower .*train.chunk_batches"):
        check_fits([huge], [shape], torch.device("cpu"), budget=2**29)
    estimated = sum(p.bytes for p in parts.values())
    with get_context("fork").Pool(1) as pool:
        measured = pool.apply(peak_growth, (overrides,))
    assert estimated / 3 < measured < estimated * 3, (measured, estimated)


def test_a_pack_needs_more_than_one_run_and_the_refusal_names_the_largest_part():
    cfg, _ = compose_config(["task.context_len=64", "task.burstiness=1"])
    shape = exemplar_shape(cfg.data, {})
    one, four = (sum(p.bytes for p in estimate([cfg] * n, [shape] * n)) for n in (1, 4))
    assert 2 * one < four < 4 * one  # the exemplar array is shared
    with pytest.raises(ConfigError, match=r"the largest part is eval attention patterns .*: lower eval.n_sequences"):
        check_fits([cfg], [shape], torch.device("cpu"), budget=one // 2)
    with pytest.raises(ConfigError, match="a pack of 4 runs would need"):
        check_fits([cfg] * 4, [shape] * 4, torch.device("cpu"), budget=2 * one)


@pytest.mark.parametrize("runs_that_fit,sizes,side_by_side", [(2.5, [1, 1], True), (1.5, [1, 1], False)])
def test_packs_side_by_side_fit_in_memory_together(monkeypatch, runs_that_fit, sizes, side_by_side):
    """Two long runs go side by side (sweep.packs_for_machine) only if each fits in half the memory."""
    cfg, _ = compose_config(["train.sequences=2000000"])
    one = sum(p.bytes for p in estimate([cfg], [exemplar_shape(cfg.data, {})]))
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(runs_that_fit * one / memory.HEADROOM))
    monkeypatch.setattr(sweep, "available_cores", lambda: 2)
    plan = plan_sweep(["seed=5,6", "train.sequences=2000000"])
    assert [len(pack) for pack in plan.packs] == sizes and (plan.launcher_overrides == sweep.PARALLEL_LAUNCHER) == side_by_side


def test_a_sweep_splits_a_pack_that_would_not_fit(monkeypatch):
    cfg, _ = compose_config([])
    one, two = (sum(p.bytes for p in estimate([cfg] * n, [exemplar_shape(cfg.data, {})] * n)) for n in (1, 2))
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(two / memory.HEADROOM) + 1)
    plan = plan_sweep(["seed=1,2,3"])
    assert [len(pack) for pack in plan.packs] == [2, 1]
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(0.5 * one / memory.HEADROOM))
    with pytest.raises(ConfigError, match="3 of 3 runs fail validation.*would need about"):
        plan_sweep(["seed=1,2,3"])


SIZES = {  # each from harmless to absurd; the validator accepts every value on its own
    "task.context_len": [2, 8, 64, 1024], "task.burstiness": [1, 4, 512], "model.n_layers": [1, 2, 64],
    "model.n_heads": [1, 8, 1024], "model.d_model": [8, 64, 1024, 16384], "model.mlp_ratio": [0, 4, 64],
    "model.positional": ["rotary", "learned"], "train.batch_size": [1, 32, 2**20],
    "train.chunk_batches": [1, 256, 2**16], "eval.n_sequences": [1, 100, 100_000],
    "train.sequences": [2**20, 10**9], "data.n_classes": [200, 10**6], "data.n_exemplars": [5, 20], "data.dim": [8, 100],
}
BUDGET = 256 * 2**20


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.fixed_dictionaries({key: st.sampled_from(values) for key, values in SIZES.items()}))
def test_every_config_is_refused_before_allocating_or_fits(sizes, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: BUDGET)
    allocated = []
    for name in ("load_cached_features", "Transformer"):  # where Pack makes its first large tensors
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, real=real, name=name, **k: allocated.append(name) or real(*a, **k))
    overrides = [f"{key}={value}" for key, value in sizes.items()] + ["task.class_split=[150,40,10]", "train.threads=1"]
    try:
        cfg, _ = compose_config(overrides)
        Pack([RunSpec(cfg, tmp_path / "run")])
    except ConfigError as exc:
        assert not allocated, (overrides, str(exc))
        return
    assert sum(p.bytes for p in estimate([cfg], [exemplar_shape(cfg.data, {})])) <= BUDGET
