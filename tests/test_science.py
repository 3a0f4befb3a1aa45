"""The default experiment really shows the phase change (opt-in: `pytest --runslow`, ~2 minutes)."""

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.training.train import phase_change_sequences

LN2 = math.log(2)


@pytest.mark.slow
def test_default_run_shows_plateau_then_phase_change(tmp_path):
    result = CliRunner().invoke(app, ["train", "-q", f"hydra.run.dir={tmp_path / 'default'}"])
    assert result.exit_code == 0, result.output
    evals = pd.read_parquet(tmp_path / "default" / "eval.parquet")
    train = evals[evals.evaluator == "fsl_train"].set_index("sequences")
    change = phase_change_sequences(evals)
    assert change is not None and change <= 1_000_000
    before = train.loc[:change, "loss"]
    plateau = before[(before > LN2 - 0.1) & (before < LN2 + 0.1)]
    assert len(plateau) * 5000 >= 50_000, "the loss should sit near ln 2 for a while before the drop"
    final = evals[evals.sequences == evals.sequences.max()].set_index("evaluator")
    assert final.loc["fsl_train", "loss"] < 0.1
    assert final.loc["fsl_val_rl", "loss"] < 0.5 * LN2  # held-out label pairs
    assert final.loc["fsl_test_class", "loss"] < 0.5 * LN2  # held-out classes
    strengths = final.loc["fsl_train", [c for c in final.columns if c.startswith("induction.L1")]]
    assert (strengths > 0.3).sum() >= 2
