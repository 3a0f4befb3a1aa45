"""Figure presets (conf/experiment/): the plan of each at full length (what the authors' run scripts
train), the clamps each run gets, and tiny real sweeps of a few of them."""

import functools
import logging
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.model.clamps import AblateHeads, InductionPattern, PrevTokenPattern, build_clamps
from ihstudy.model.transformer import ModelShape
from ihstudy.training.sweep import plan_sweep

EXPERIMENTS = Path(__file__).resolve().parent.parent / "conf" / "experiment"
# preset: runs, packs, sequences per run, eval every (ih_paper_runs.sh / ih_paper_appendix_runs.sh)
PAPER_PLANS = {
    "fig3": (1, 1, 1_000_000, 5000),
    "fig4b": (8, 1, 1_000_000, 5000),
    "fig5b": (6, 1, 600_000, 1000),
    "fig6_long": (5, 3, 2_000_000, 5000),
    "fig6_clamps": (12, 3, 300_000, 1000),
    "fig8": (3, 1, 800_000, 5000),
    "fig15": (16, 1, 600_000, 5000),
    "fig17": (7, 1, 1_000_000, 5000),
}
# train.compile=false: a preset that compiles (fig6_clamps) would spend its test waiting for the compiler
TINY = ["train.sequences=320", "train.eval_every=160", "eval.n_sequences=40", "data.dim=16", "train.threads=1",
        "train.compile=false"]


@functools.cache  # planning composes every run: once per preset for the whole module
def plan(name: str, *extra: str):
    return plan_sweep([f"experiment={name}", *extra], max_pack_runs=0)  # one pack per shape, whatever the machine


def clamps_of(run) -> list:
    return build_clamps(run.cfg.clamp, ModelShape.of_config(run.cfg, run.n_features))


def ablated(run) -> set:
    return {head for clamp in clamps_of(run) if isinstance(clamp, AblateHeads) for head in clamp.heads}


def test_every_preset_file_is_covered_and_documented():
    figures = {p.stem for p in EXPERIMENTS.glob("fig*.yaml")}
    assert figures == set(PAPER_PLANS)
    for name in figures:
        header = (EXPERIMENTS / f"{name}.yaml").read_text().splitlines()[1]
        assert header.startswith("# Paper") and "Fig." in header, name


@pytest.mark.parametrize("name", sorted(PAPER_PLANS))
def test_full_length_plan_matches_the_authors_runs(name):
    n_runs, n_packs, sequences, eval_every = PAPER_PLANS[name]
    sweep = plan(name)
    assert (len(sweep.runs), len(sweep.packs)) == (n_runs, n_packs)
    assert {(r.cfg.train.sequences, r.cfg.train.eval_every, r.cfg.seed) for r in sweep.runs} == {(sequences, eval_every, 5)}


def test_dense_checkpoints_for_progress_measures_only_where_the_authors_took_them():
    assert plan("fig3").runs[0].cfg.train.ckpt_every == 1000
    for name in ("fig4b", "fig17"):
        assert {r.cfg.train.ckpt_every for r in plan(name).runs} == {1_000_000}


def test_fig4b_keeps_each_layer2_head_alone():
    runs = plan("fig4b").runs
    layer2 = {(1, h) for h in range(8)}
    assert [layer2 - ablated(run) for run in runs] == [{(1, h)} for h in range(8)]


def test_fig17_keeps_l2h3_with_each_other_head():
    kept = [{(1, h) for h in range(8)} - ablated(run) for run in plan("fig17").runs]
    assert kept == [{(1, 3), (1, h)} for h in (0, 1, 2, 4, 5, 6, 7)]


def test_fig8_clamps_previous_token_attention_on_other_layer1_heads_keeping_l2h3():
    runs = plan("fig8").runs
    patterns = [{h for c in clamps_of(r) if isinstance(c, PrevTokenPattern) for h in c.heads} for r in runs]
    assert patterns == [{(0, 6)}, {(0, 1), (0, 2), (0, 5)}, {(0, h) for h in range(8)}]
    assert all(ablated(r) == {(1, h) for h in range(8) if h != 3} for r in runs)


def test_fig15_sweeps_the_induction_strength_with_every_head_active():
    runs = plan("fig15").runs
    clamps = [clamps_of(r) for r in runs]
    assert all(len(c) == 1 and isinstance(c[0], InductionPattern) and c[0].heads == ((1, 3),) for c in clamps)
    strengths = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    assert [c[0].strength for c in clamps] == strengths


def test_fig6_varies_classes_at_5_labels_and_labels_at_50_classes():
    data = {(r.cfg.task.class_split[0], r.cfg.task.n_labels) for r in plan("fig6_long").runs}
    assert data == {(50, 5), (100, 5), (200, 5), (50, 10), (50, 15)}
    assert {r.cfg.task.class_split[1] for r in plan("fig6_long").runs} == {1473, 1423, 1323}
    clamped = plan("fig6_clamps").runs
    conditions = {(r.cfg.task.class_split[0], r.cfg.task.n_labels, tuple(sorted(r.cfg.clamp))) for r in clamped}
    variants = {(100, 5), (200, 5), (50, 10), (50, 15)}
    kinds = {("copy", "layer1"), ("keep", "match"), ("keep", "layer1")}
    assert conditions == {(*v, k) for v in variants for k in kinds}


def test_command_line_sweeps_combine_with_a_preset():
    sweep = plan("fig6_clamps", "task=fsl,fsl_10labels", "seed=5,6")
    assert len(sweep.runs) == 3 * 2 * 2
    assert {r.cfg.task.n_labels for r in sweep.runs} == {5, 10}


def test_dry_run_of_a_preset_writes_nothing(outputs_root):
    result = CliRunner().invoke(app, ["sweep", "experiment=fig6_long", "--dry-run", "--max-pack-runs", "0"])
    assert result.exit_code == 0, result.output
    assert "5 runs" in result.output and "3 pack(s)" in result.output
    assert not any(outputs_root.iterdir())


@pytest.fixture
def keep_logging():
    """An in-process sweep lets Hydra configure logging onto the test's captured streams, which
    close after the test: later tests' warnings would fail to print. Restore the root logger."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def tiny_sweep(tmp_path, *args) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["sweep", "-q", *args, *TINY, f"hydra.sweep.dir={tmp_path}/s"])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(tmp_path / "s" / "sweep.parquet")


def test_tiny_fig15_clamps_the_induction_strength_it_names(tmp_path, keep_logging):
    """With two context pairs the clamped head's induction strength is 2s-1 at every eval."""
    index = tiny_sweep(tmp_path, "experiment=fig15", "clamp.match.strength=1.0,0.25")
    assert (index.status == "completed").all()
    for run, strength in zip(index.dir, (1.0, 0.25)):
        evals = pd.read_parquet(Path(run) / "eval.parquet")
        assert evals["induction.L1H3"].to_numpy() == pytest.approx(2 * strength - 1, abs=1e-5)


def test_tiny_fig6_clamps_trains_every_variant_in_packs_by_label_count(tmp_path, keep_logging):
    index = tiny_sweep(tmp_path, "experiment=fig6_clamps", "task=fsl_100classes,fsl_10labels", "clamp=layer1_copy,match")
    assert (index.status == "completed").all() and len(index) == 4
    assert index.pack.nunique() == 2
    for run in index.dir:
        evals = pd.read_parquet(Path(run) / "eval.parquet")
        assert sorted(evals.sequences.unique()) == [0, 160, 320]
