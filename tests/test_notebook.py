"""docs/notebook.md runs as written, and what the Python API gives equals the CLI's tables (ihstudy/api.py)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "notebook.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """The doc's sweep command run, then its Python blocks executed in order; their namespace."""
    folder = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("IHSTUDY_OUTPUTS", str(folder / "outputs"))
        [command] = blocks("bash")
        args = shlex.split(command.replace("\\\n", " "))
        assert args[:2] == ["ihstudy", "sweep"]
        result = CliRunner().invoke(app, [*args[1:], "-q", "train.threads=1"])
        assert result.exit_code == 0, result.output
        namespace = {}
        for code in blocks("python"):
            exec(compile(code, str(DOC), "exec"), namespace)
    return folder, namespace


def test_the_notebook_page_runs(notebook):
    _, ns = notebook
    assert ns["run"].status == "completed" and ns["run"].checkpoints == [50, 100]
    assert sorted(ns["heads"]) and not ns["progress"].empty and len(ns["sweep"].index) == 4


def test_a_restored_model_reproduces_the_eval_table_and_the_training_loss(notebook):
    _, ns = notebook
    run, model, batch, logits = ns["run"], ns["model"], ns["batch"], ns["logits"]
    from ihstudy.model.transformer import cross_entropy

    final = ns["final"]
    assert float(cross_entropy(logits[0, :, -1], batch.target).mean()) == pytest.approx(final.loss["fsl_train"], rel=1e-6)
    pd.testing.assert_frame_equal(model.evaluate(), run.evals[run.evals.step == 100].reset_index(drop=True))
    # the loss logged at step 51 is that of training batch 50 under the weights of checkpoint 50
    early = run.model(step=50)(run.training_batch(50))
    logged = run.metrics.set_index("step").loss[51]
    assert float(cross_entropy(early[0, :, -1], run.training_batch(50).target).mean()) == pytest.approx(logged, rel=1e-5)
    assert not ns["ablated"].equal(ns["bare"])


def cli_rows(args: list[str]) -> dict[str, list[str]]:
    """Rows of a table the CLI prints off a terminal: first cell -> the other cells."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("fsl_")}


def test_the_analyses_equal_the_cli_tables(notebook):
    folder, ns = notebook
    run = ns["run"]
    for overrides, rows in (([], ns["rows"]), (["clamp=layer1"], ns["clamped"])):
        printed = cli_rows(["analyze", "eval", str(run.dir), *overrides])
        assert {r.evaluator: [f"{r[c]:.4f}" for c in ("loss", "acc", "icl_acc", "in_context_mass")]
                for _, r in rows.iterrows()} == printed
    summary = ns["by_clamp"].set_index("clamp")
    assert summary.runs.to_dict() == {"copy": 2, "none": 2}
    sweep_index = pd.read_parquet(folder / "outputs" / "sweeps" / "demo" / "sweep.parquet")
    pd.testing.assert_frame_equal(ns["sweep"].index, sweep_index)


def test_import_ihstudy_stays_light():
    code = "import sys, ihstudy; print(sorted(m for m in ('torch', 'pandas', 'hydra') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
