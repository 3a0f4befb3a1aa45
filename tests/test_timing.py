"""Phase-change timing: the detectors on synthetic curves, grouping, and the CLI on real run folders."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.analysis import timing
from ihstudy.cli import app
from ihstudy.errors import ConfigError
from ihstudy.training.evaluate import LN2, PHASE_CHANGE_THRESHOLD
from ihstudy.training.train import phase_change_sequences

SEQ = np.arange(0, 1_000_001, 5000, dtype=float)


def sigmoid_drop(center=400_000, width=20_000, low=0.005):
    """ln 5 -> ln 2 quickly, a plateau at ln 2, then a sigmoid drop to `low` around `center`."""
    start = np.log(5) * np.exp(-SEQ / 20_000) + LN2 * (1 - np.exp(-SEQ / 20_000))
    drop = 1 / (1 + np.exp(-(SEQ - center) / width))
    return np.exp(np.log(start) * (1 - drop) + np.log(low) * drop)


def test_clean_sigmoid_drop():
    loss = sigmoid_drop()
    row = timing.curve_timing(SEQ, loss)
    first = np.flatnonzero(loss < PHASE_CHANGE_THRESHOLD)[0]
    assert row["0.4ln2_eval"] == SEQ[first] and not row["0.4ln2_censored"] and not row["0.4ln2_recrossed"]
    # interpolated linearly in log-loss between the last point above and the first below
    l0, l1 = np.log(loss[first - 1]), np.log(loss[first])
    expected = SEQ[first - 1] + (np.log(PHASE_CHANGE_THRESHOLD) - l0) / (l1 - l0) * 5000
    assert row["0.4ln2_interp"] == pytest.approx(expected) and SEQ[first - 1] < row["0.4ln2_interp"] <= SEQ[first]
    assert row["ln2_eval"] < row["0.4ln2_eval"] < row["0.1_eval"]
    assert 350_000 < row["steepest_descent"] < 450_000  # the centre of the sigmoid in log-loss
    assert row["plateau_start"] < 150_000 and 300_000 < row["plateau_end"] < 400_000
    assert row["plateau_length"] == row["plateau_end"] - row["plateau_start"]
    assert row["final_loss"] == pytest.approx(loss[-1]) and row["last_sequences"] == 1_000_000


def test_a_curve_that_never_crosses_is_censored_at_its_last_eval():
    loss = np.full(50, LN2 + 0.01)
    row = timing.curve_timing(SEQ[:50], loss)
    for name in ("0.4ln2", "0.1"):
        assert row[f"{name}_censored"] and math.isnan(row[f"{name}_eval"]) and math.isnan(row[f"{name}_interp"])
    assert row["last_sequences"] == SEQ[49]
    assert row["plateau_start"] == 0 and row["plateau_end"] == SEQ[49]


def test_a_spurious_early_dip_is_the_first_crossing_and_is_flagged():
    loss = sigmoid_drop()
    loss[20] = 0.2  # one noisy eval point at 100,000 sequences, then back on the plateau
    row = timing.curve_timing(SEQ, loss)
    assert row["0.4ln2_eval"] == 100_000 and row["0.4ln2_recrossed"]  # the paper's definition, flagged
    clean = timing.curve_timing(SEQ, sigmoid_drop())
    assert not clean["0.4ln2_recrossed"] and clean["0.4ln2_eval"] > 300_000
    assert row["plateau_length"] < clean["plateau_length"]  # the dip splits the plateau; the longest part counts


def test_a_curve_with_no_plateau():
    loss = 1.6 * np.exp(-SEQ[:40] / 20_000) + 0.001
    loss[np.abs(loss - LN2) <= 0.1] = 0.5  # make sure no eval point lies in the band
    row = timing.curve_timing(SEQ[:40], loss)
    assert row["plateau_length"] == 0 and math.isnan(row["plateau_start"]) and math.isnan(row["plateau_end"])
    assert not row["0.4ln2_censored"] and row["0.4ln2_eval"] > 0


def test_a_failed_run_with_nan_losses_keeps_what_it_reached():
    loss = sigmoid_drop()
    loss[100:] = np.nan  # the run failed at 500,000 sequences
    row = timing.curve_timing(SEQ, loss)
    clean = timing.curve_timing(SEQ, sigmoid_drop())
    assert row["0.4ln2_eval"] == clean["0.4ln2_eval"] and row["0.1_censored"] == clean["0.1_censored"]
    assert row["steepest_descent"] == pytest.approx(clean["steepest_descent"], abs=10_000)


def test_a_curve_starting_below_the_threshold_crosses_at_its_first_point():
    row = timing.curve_timing([0, 1000], [0.1, 0.05], {"t": 0.5})
    assert row["t_eval"] == 0 and row["t_interp"] == 0


def timing_rows(spec):
    """A timing table from (clamp, seed, crossing or None, last eval)."""
    rows = [{"run": f"{c}-{s}", "evaluator": "fsl_train", "config.clamp": c, "config.seed": s, "config.task.n_labels": 5,
             "0.4ln2_interp": np.nan if t is None else t, "0.4ln2_censored": t is None, "last_sequences": last}
            for c, s, t, last in spec]
    return pd.DataFrame(rows)


def test_group_summary_orders_by_median_and_counts_censored_runs():
    table = timing_rows([("none", 5, 300, 600), ("none", 6, 500, 600), ("none", 7, None, 600),
                         ("copy", 5, 40, 600), ("copy", 6, 60, 600), ("match", 5, None, 600), ("match", 6, None, 600)])
    summary = timing.group_summary(table, "clamp")
    assert list(summary.clamp) == ["copy", "none", "match"]
    copy, none, match = (summary.iloc[i] for i in range(3))
    assert (copy.runs, copy.censored, copy["median"], copy["min"], copy["max"], copy.spread) == (2, 0, 50, 40, 60, 20)
    assert none.runs == 3 and none.censored == 1 and none["median"] == 500  # the censored run counts as latest
    assert math.isnan(none["max"]) and match.censored == 2 and math.isnan(match["median"])
    both = timing.group_summary(table, "clamp,seed")
    assert len(both) == 7 and list(both.columns[:2]) == ["clamp", "seed"]


def test_unknown_grouping_field_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'task.n_labels'"):
        timing.group_summary(timing_rows([("none", 5, 1, 2)]), "task.nlabels")


def test_a_clamp_mapping_is_named_by_its_override_or_preset():
    from omegaconf import OmegaConf

    from ihstudy.config import compose_config

    copy = OmegaConf.to_container(compose_config(["clamp=only_l2h3"])[0].clamp)
    assert timing.flatten({"clamp": copy}, {}) == {"clamp": "only_l2h3"}  # a run trained with clamp=only_l2h3
    assert timing.flatten({"clamp": copy}, {"clamp": "mine"}) == {"clamp": "mine"}  # a sweep's override value
    assert timing.flatten({"clamp": {}, "task": {"n_labels": 5, "split": [1, 2]}}, {}) == \
        {"clamp": "none", "task.n_labels": 5, "task.split": "[1,2]"}
    odd = {"x": {"kind": "ablate", "heads": ["0:1"]}}
    assert timing.flatten({"clamp": odd}, {}) == {"clamp": "{x:{heads:[0:1],kind:ablate}}"}


def test_mixed_tasks_are_reported():
    table = timing_rows([("none", 5, 1, 2), ("copy", 5, 1, 2)])
    table.loc[1, "config.task.n_labels"] = 10
    assert timing.mixed_tasks(table, "clamp") == ["task.n_labels"]
    assert timing.mixed_tasks(table, "clamp,task.n_labels") == []


# --- real run folders ------------------------------------------------------------------------------------

SHORT = ["train.sequences=3200", "train.eval_every=640", "eval.n_sequences=100", "train.threads=1",
         "model.d_model=16", "model.n_heads=4", "data.dim=16"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("timing")
    with pytest.MonkeyPatch.context() as env:  # the per-test outputs folder does not exist yet
        env.setenv("IHSTUDY_OUTPUTS", str(root))
        result = CliRunner().invoke(app, ["sweep", "-q", "clamp=none,copy", "seed=5,6", f"hydra.sweep.dir={root}/sweep", *SHORT])
    assert result.exit_code == 0, result.output
    return root / "sweep"


def test_crossings_match_run_json_and_a_hand_computation(sweep):
    runs = timing.find_runs([sweep])
    assert len(runs) == 4 and not any(r.notes for r in runs)
    assert {r.config["clamp"] for r in runs} == {"none", "copy"}  # the sweep's override values
    for run in runs:
        status = json.loads((run.dir / "run.json").read_text())
        evals = pd.read_parquet(run.dir / "eval.parquet")
        row = timing.crossings(run).set_index("evaluator").loc["fsl_train"]
        expected = status["summary"]["phase_change_sequences"]
        assert (math.isnan(row["0.4ln2_eval"]) and expected is None) or row["0.4ln2_eval"] == expected
        # a threshold this short run does cross, against run.json's definition and by hand
        threshold = float(evals[evals.evaluator == "fsl_train"]["loss"].median())
        row = timing.crossings(run, {"t": threshold}).set_index("evaluator").loc["fsl_train"]
        train = evals[evals.evaluator == "fsl_train"].sort_values("sequences")
        by_hand = next(s for s, loss in zip(train.sequences, train["loss"]) if loss < threshold)
        assert row["t_eval"] == by_hand == phase_change_sequences(evals, threshold)


def test_cli_timing_writes_tables_figures_and_report(sweep, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["analyze", str(sweep), "--by", "clamp", "--thresholds", "ln2,0.4ln2,1.2",
                                      "--report", str(out), "--format", "svg"])
    assert result.exit_code == 0, result.output
    assert {"report.md", "timing.csv", "groups.csv", "timing.svg", "curves.svg"} <= {p.name for p in out.iterdir()}
    groups = pd.read_csv(out / "groups.csv")
    assert sorted(groups.clamp) == ["copy", "none"] and groups.runs.tolist() == [2, 2]
    report = (out / "report.md").read_text()
    assert "![curves](curves.svg)" in report and "| run |" in report
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file() and "analysis" not in p.parts}
    again = CliRunner().invoke(app, ["analyze", str(sweep / "clamp=copy,seed=5"), "--report", str(out)])  # replaces it whole
    assert again.exit_code == 0 and not (out / "groups.csv").exists()
    assert before == {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file() and "analysis" not in p.parts}


@pytest.mark.parametrize("args,message", [
    (["{empty}"], "no runs"),
    (["{sweep}", "--by", "clams"], "did you mean 'clamp'"),
    (["{sweep}", "--metric", "0.3"], "--metric"),
    (["{sweep}", "--thresholds", "abc"], "not a number"),
    (["{sweep}", "--evaluator", "nope"], "evaluator 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(sweep=sweep, empty=tmp_path / "empty") for a in args]
    result = CliRunner().invoke(app, ["analyze", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_unreadable_runs_are_listed_and_the_rest_analysed(sweep, tmp_path):
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(sweep, root)
    evals = pd.read_parquet(root / "clamp=copy,seed=5/eval.parquet")
    evals.drop(columns=["loss"]).to_parquet(root / "clamp=copy,seed=5/eval.parquet")
    status = json.loads((root / "clamp=none,seed=6/run.json").read_text()) | {"status": "interrupted"}
    (root / "clamp=none,seed=6/run.json").write_text(json.dumps(status))
    result = CliRunner().invoke(app, ["analyze", str(root), "--by", "task.n_labels"])
    assert result.exit_code == 0, result.output
    assert "lacks column(s) loss" in result.output
    table = pd.read_csv(root / "analysis/timing/timing.csv").query("evaluator == 'fsl_train'").set_index("run")
    assert len(table) == 3 and table.loc["clamp=none,seed=6", "status"] == "interrupted"
    report = (root / "analysis/timing/report.md").read_text()
    assert "clamp=none,seed=6 is interrupted" in report and "lacks column(s) loss" in report


def test_help_shows_every_analysis_with_an_example():
    result = CliRunner().invoke(app, ["analyze", "--help"], env={"COLUMNS": "160"})
    for example in ("ihstudy analyze outputs/sweeps/fig5b --by clamp", "ihstudy analyze eval RUN clamp=",
                    "ihstudy analyze heads RUN", "ihstudy analyze wiring RUN", "ihstudy analyze progress RUN"):
        assert example in result.output


def test_the_named_phase_change_is_the_threshold_training_records():
    from ihstudy.analysis import defaults
    from ihstudy.training.evaluate import PHASE_CHANGE_THRESHOLD

    assert defaults.parse_thresholds(defaults.PHASE_CHANGE) == {defaults.PHASE_CHANGE: PHASE_CHANGE_THRESHOLD}
    assert timing.THRESHOLDS[timing.PHASE_CHANGE] == PHASE_CHANGE_THRESHOLD


@pytest.mark.parametrize("index", [True, False], ids=["from the sweep index", "from the folder name"])
def test_sweep_overrides_are_parsed_as_hydra_parses_them(tmp_path, index):
    """A list value holds commas: clamp=[pt_attention,copy] is one override, not `[pt_attention`."""
    overrides = ["clamp=[pt_attention,copy]", "seed=5", "clamp.keep.heads=[1:3,1:0]", "+clamp.mine={kind:ablate,heads:[0:1]}"]
    run_dir = tmp_path / ",".join(overrides)
    run_dir.mkdir()
    if index:
        pd.DataFrame([{"run": run_dir.name, "overrides": " ".join(overrides)}]).to_parquet(tmp_path / "sweep.parquet")
    assert timing.sweep_overrides(run_dir) == {"clamp": "[pt_attention,copy]", "seed": "5", "clamp.keep.heads": "[1:3,1:0]",
                                               "clamp.mine": "{kind:ablate,heads:[0:1]}"}
