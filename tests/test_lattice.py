"""Subset sweeps (training/lattice.py): every subset of k clamp presets, the base they share, the
combinations skipped with their reason, and subsets.json."""

import json

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.training.sweep import plan_sweep

FIG5B = "clamp=pt_attention,layer1,match,copy"
TINY = ["train.sequences=640", "train.eval_every=320", "train.ckpt_every=320", "eval.n_sequences=50", "train.threads=1"]


def clamps_of(plan) -> dict[str, dict]:
    return {run.name: OmegaConf.to_container(run.cfg.clamp) for run in plan.runs}


def test_fig5b_subsets_are_unions_on_the_base_and_inert_ones_are_skipped():
    plan = plan_sweep(["clamp=only_l2h3"], subsets=FIG5B)
    lattice = plan.lattice
    assert len(lattice.subsets()) == 16 and len(plan.runs) == len(lattice.kept())
    assert {"+".join(s) for s in lattice.kept()} == {"", "pt_attention", "layer1", "match", "copy", "pt_attention+match",
                                                      "pt_attention+copy", "layer1+match", "layer1+copy"}
    assert "would do nothing" in lattice.skipped[("pt_attention", "layer1")]
    assert "'match' would do nothing" in lattice.skipped[("match", "copy")]
    clamps = clamps_of(plan)
    assert clamps["clamp=[only_l2h3]"] == {"keep": {"kind": "keep_only", "heads": "1:3"}}
    assert set(clamps["clamp=[only_l2h3,layer1,copy]"]) == {"keep", "layer1", "copy"}


def test_without_a_base_the_empty_subset_is_no_clamp():
    plan = plan_sweep(["seed=5"], subsets="clamp=copy,layer1")
    assert clamps_of(plan)["clamp=none"] == {} and len(plan.runs) == 4


def test_subsets_compose_with_an_experiment_preset():
    plan = plan_sweep(["experiment=fig5b", "clamp=only_l2h3"], subsets="clamp=layer1,copy")
    assert [run.name for run in plan.runs] == ["clamp=[only_l2h3]", "clamp=[only_l2h3,layer1]", "clamp=[only_l2h3,copy]",
                                               "clamp=[only_l2h3,layer1,copy]"]  # the preset's clamp sweep is replaced
    assert plan.runs[0].cfg.train.eval_every == 1000


def test_presets_giving_one_clamp_two_specs_are_skipped():
    lattice = plan_sweep(["seed=5"], subsets="clamp=match,match_similarity,copy").lattice
    assert lattice.skipped[("match", "match_similarity")] == "match and match_similarity both set clamp.match, differently"


def test_a_subset_sweep_writes_its_lattice(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "-q", "--subsets", "clamp=pt_attention,layer1", *TINY,
                                      f"hydra.sweep.dir={tmp_path}/s"])
    assert result.exit_code == 0, result.output
    assert "skipped: pt_attention+layer1: clamp 'pt_attention' acts on layer 0" in result.output
    lattice = json.loads((tmp_path / "s" / "subsets.json").read_text())
    assert lattice["clamps"] == ["pt_attention", "layer1"] and lattice["base"] == []
    by_label = {s["label"]: s for s in lattice["subsets"]}
    assert by_label["none"]["runs"] == ["clamp=none"] and by_label["layer1"]["runs"] == ["clamp=[layer1]"]
    assert by_label["pt_attention+layer1"]["runs"] == [] and by_label["pt_attention+layer1"]["skipped"]


@pytest.mark.parametrize("args,message", [
    (["--subsets", "clamp=copy,nope"], "'nope' is not a clamp preset"),
    (["--subsets", "seed=5,6"], "--subsets takes clamp=A,B,..."),
    (["--subsets", "clamp=copy,copy"], "1 to 6 different presets"),
    (["--subsets", "clamp=copy", "clamp=none,layer1"], "give one base clamp=NAME"),
    (["--subsets", "clamp=copy", "clamp=[only_l2h3,copy]"], "copy is also in the base"),
])
def test_bad_subsets_are_one_line_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["sweep", "--dry-run", *args, "seed=5"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert list(tmp_path.iterdir()) == []
