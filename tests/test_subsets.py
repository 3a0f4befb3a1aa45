"""The subset-lattice analysis on timing tables with known answers (analysis/subsets.py)."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.analysis import subsets
from ihstudy.cli import app
from ihstudy.training.lattice import label

SEED_FACTORS = {"5": 1.0, "6": 1.3, "7": 0.8}  # each seed scales every subset alike: paired, so effects are exact


def lattice_of(times: dict[tuple, float], clamps=("a", "b"), censored_at: dict[tuple, float] | None = None):
    """A lattice whose subset S crosses at times[S] x the seed's factor; subsets in censored_at never
    crossed up to that many sequences."""
    censored_at = censored_at or {}
    rows = []
    for subset in [s for n in range(len(clamps) + 1) for s in itertools.combinations(clamps, n)]:
        for seed, factor in SEED_FACTORS.items():
            if subset in censored_at:
                rows.append({"subset": label(subset), "seed": seed, "time": np.nan, "censored": True,
                             "bound": censored_at[subset]})
            elif subset in times:
                rows.append({"subset": label(subset), "seed": seed, "time": times[subset] * factor, "censored": False,
                             "bound": 1e9})
    return subsets.Lattice(list(clamps), pd.DataFrame(rows), {})


def row(table, key, value):
    return table.set_index(key).loc[value]


def test_synergy():
    lattice = lattice_of({(): 1000, ("a",): 800, ("b",): 800, ("a", "b"): 100})
    pair = row(subsets.interactions(lattice), "pair", "a & b")
    assert pair.estimate == pytest.approx(math.log(100 * 1000 / 800**2))
    assert pair.low == pytest.approx(pair.estimate) and pair.high == pytest.approx(pair.estimate)  # seed factors cancel
    assert pair.verdict == "synergy" and pair.bound == "exact"
    a = row(subsets.effects(lattice)[0], "clamp", "a")
    assert a.estimate == pytest.approx((math.log(0.8) + math.log(100 / 800)) / 2) and a.contexts == 2
    assert any("a and b together do more than apart" in line for line in subsets.subsets_report(lattice)[0].notes)


def test_redundancy():
    lattice = lattice_of({(): 1000, ("a",): 100, ("b",): 100, ("a", "b"): 100})
    pair = row(subsets.interactions(lattice), "pair", "a & b")
    assert pair.estimate == pytest.approx(math.log(10)) and pair.verdict == "redundancy"


def test_noise_widens_the_interval_and_an_interaction_within_it_is_unclear():
    lattice = lattice_of({(): 1000, ("a",): 500, ("b",): 500, ("a", "b"): 250})  # additive: no interaction
    lattice.times.loc[lattice.times.subset == "a+b", "time"] *= [1.3, 0.7, 1.0]
    pair = row(subsets.interactions(lattice), "pair", "a & b")
    assert pair.low < 0 < pair.high and pair.verdict == "unclear"


def test_censored_runs_are_kept_as_bounds():
    lattice = lattice_of({("a",): 100, ("b",): 200, ("a", "b"): 50}, censored_at={(): 500})
    node = row(subsets.nodes(lattice), "subset", "none")
    assert node.runs == 3 and node.censored == 3 and np.isnan(node["median"]) and node.bound == 500
    effects, detail = subsets.effects(lattice)
    a = row(effects, "clamp", "a")
    # context none: log(100 x seed factor / 500), a bound (the true time of none is >= 500); context b: log(50/200), exact
    mean_log_factor = np.mean(np.log(list(SEED_FACTORS.values())))
    assert a.estimate == pytest.approx((math.log(100 / 500) + mean_log_factor + math.log(50 / 200)) / 2)
    assert a.bound == "at most" and a.censored == 3 and a.comparisons == 6 and a.verdict == "shortens"
    assert set(detail[(detail.clamp == "a") & (detail.context == "none")].bound) == {-1}
    pair = row(subsets.interactions(lattice), "pair", "a & b")
    assert pair.bound == "at least" and pair.verdict == "undetermined (censored)"  # + log T(none) is a lower bound
    words = subsets.ranking_words(effects, subsets.interactions(lattice))
    assert words[0].startswith("Giving the model a shortens formation at least")


def test_a_comparison_bounded_both_ways_is_undetermined():
    lattice = lattice_of({("a",): 100}, censored_at={(): 500, ("b",): 500, ("a", "b"): 400})
    pair = row(subsets.interactions(lattice), "pair", "a & b")  # + none, - b: bounds of opposite directions
    assert pair.undetermined == 3 and pair.comparisons == 0 and pair.verdict == "undetermined (censored)"


CLAMPS3 = ("a", "b", "c")
ALL3 = [s for n in range(4) for s in itertools.combinations(CLAMPS3, n)]


@pytest.mark.parametrize("rule, time", [
    ("additive in log time", lambda s: 1000 * math.prod({"a": 0.6, "b": 0.35, "c": 0.75}[c] for c in s)),
    ("slowest sets the pace", lambda s: max([50, *({"a": 500, "b": 300, "c": 200}[c] for c in CLAMPS3 if c not in s)])),
    ("rates add", lambda s: 1 / (1 / 1000 + sum({"a": 2e-3, "b": 5e-3, "c": 1e-3}[c] for c in s))),
])
def test_the_composition_rule_that_built_the_table_predicts_held_out_subsets(rule, time):
    lattice = lattice_of({s: time(s) for s in ALL3}, clamps=CLAMPS3)
    rules, predictions = subsets.composition(lattice)
    best = rules.iloc[0]
    assert best["rule"] == rule and best.median_factor == pytest.approx(1, abs=0.02)
    assert best.empty_subset_factor == pytest.approx(1, abs=0.02)
    others = rules[rules.rule != rule]
    assert (others.median_factor > 1.05).all() or (others.mean_factor > 1.1).all()
    assert len(predictions[predictions.rule == rule]) == len(ALL3) * len(SEED_FACTORS)


def test_a_censored_held_out_subset_is_judged_by_its_bound():
    lattice = lattice_of({s: 1000 * 0.5 ** len(s) for s in ALL3 if s}, clamps=CLAMPS3, censored_at={(): 800})
    predictions = subsets.composition(lattice)[1]
    held = predictions[(predictions.rule == "additive in log time") & (predictions.held_out == "none")]
    assert held.censored.all() and list(held.predicted) == pytest.approx([1000 * f for f in SEED_FACTORS.values()])
    assert list(held.log_error) == pytest.approx([0, 0, 0])  # predicted at or beyond the bound of 800: no error
    lattice.times.loc[lattice.times.subset == "none", "bound"] = 2000 * 1.3
    late = subsets.composition(lattice)[1]
    late = late[(late.rule == "additive in log time") & (late.held_out == "none") & (late.seed == "6")]
    assert late.log_error.iloc[0] == pytest.approx(math.log(2))  # censored later: a prediction of 1300 falls short


def test_analyze_subsets_on_a_subset_sweep(tmp_path):
    tiny = ["train.sequences=320", "train.eval_every=160", "eval.n_sequences=50", "train.threads=1"]
    result = CliRunner().invoke(app, ["sweep", "-q", "--subsets", "clamp=layer1,copy", "clamp=only_l2h3", *tiny,
                                      f"hydra.sweep.dir={tmp_path}/s"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["analyze", "subsets", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "s" / "analysis" / "subsets" / "report.md").read_text()
    assert "# Subset lattice of layer1, copy" in report and "![lattice](lattice.png)" in report
    nodes = pd.read_csv(tmp_path / "s" / "analysis" / "subsets" / "nodes.csv")
    assert list(nodes.runs) == [1, 1, 1, 1] and (nodes.censored == 1).all()  # 320 sequences: nobody crossed, nobody dropped
    bad = CliRunner().invoke(app, ["analyze", "subsets", str(tmp_path)])
    assert bad.exit_code == 2 and "has no subsets.json" in bad.output
