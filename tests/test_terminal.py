"""Tables that fit: 80 columns in a terminal, whole rows in a log (ihstudy/terminal.py and the CLI's tables)."""

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.terminal import print_table

COLUMNS = ["run", "status", "phase change", "train", "val_rl", "train_valex", "test_class"]
ROWS = [["seed=5,clamp=copy", "failed", "-", "0.7960", "0.8302", "0.8293", "0.7435"],
        ["seed=15,clamp.keep.heads=[1:3,1:0]", "completed", "123,456", "0.1234", "0.5678", "0.9012", "0.3456"]]
TITLE = ["sweep folder: /a/very/long/folder/" + "x" * 90]


def render(width: int, terminal: bool) -> str:
    out = io.StringIO()
    print_table(COLUMNS, ROWS, TITLE, Console(file=out, width=width, force_terminal=terminal, color_system=None))
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 50, 30])
def test_a_terminal_table_fits_and_keeps_every_cell_whole(width):
    text = render(width, terminal=True)
    lines = text.splitlines()
    assert lines[0] == TITLE[0]  # the folder whole, on its own line
    assert all(len(line) <= width for line in lines[1:]), text
    assert "…" not in text
    for header in COLUMNS[1:]:
        assert header in text
    for row in ROWS:
        for cell in row[1:]:
            assert cell in text
    labels = "".join(line.split("  ")[0] for line in lines[1:])  # the label column may wrap, never lose a character
    for row in ROWS:
        assert row[0] in labels


def test_off_a_terminal_every_row_is_one_whole_line():
    lines = render(80, terminal=False).splitlines()
    assert lines[0] == TITLE[0]
    for row in ROWS:
        assert any(re.fullmatch(r"\s*".join(map(re.escape, row)) + r"\s*", line) for line in lines), lines


SHORT = ["train.sequences=3200", "train.eval_every=1600", "train.ckpt_every=1600", "eval.n_sequences=100", "train.threads=1"]


def plain(text: str) -> list[str]:
    return re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()  # bold headers in a terminal


@pytest.mark.parametrize("terminal", ["1", "0"])
def test_train_and_sweep_summaries_at_80_columns(tmp_path, terminal):
    env = {"COLUMNS": "80", "TTY_COMPATIBLE": terminal, "NO_COLOR": "1"}
    run_dir = tmp_path / "a-run-folder-whose-name-alone-is-longer-than-an-eighty-column-terminal-is-wide-0123456789"
    result = CliRunner().invoke(app, ["train", f"hydra.run.dir={run_dir}", *SHORT], env=env)
    assert result.exit_code == 0, result.output
    lines = plain(result.stdout)
    assert f"run folder: {run_dir}" in lines
    table = lines[lines.index(f"run folder: {run_dir}") + 3:]
    if terminal == "1":
        assert all(len(line) <= 80 for line in table), result.stdout
    else:  # a log: the row whole on one line
        assert any(line.startswith(run_dir.name) and len(line.split()) == 6 for line in table), result.stdout
    assert "1 run completed" in lines and "…" not in result.stdout
    header = next(line for line in table if line.startswith("run"))
    assert header.split() == ["run", "phase", "change", "train", "val_rl", "train_valex", "test_class"]

    sweep_args = ["sweep", "seed=5,6", "clamp=none,copy", f"hydra.sweep.dir={tmp_path / 's'}", *SHORT]
    sweep = CliRunner().invoke(app, sweep_args, env=env)
    assert sweep.exit_code == 0, sweep.output
    lines = plain(sweep.stdout)
    assert f"sweep folder: {tmp_path / 's'}" in lines and "all 4 runs completed" in lines
    rows = [line for line in lines if line.startswith("seed=")]
    assert sorted(r.split()[0] for r in rows) == [f"seed={s},clamp={c}" for s in (5, 6) for c in ("copy", "none")]
    assert all(len(r.split()) == 6 and len(r) <= 80 for r in rows)  # label, phase change, 4 losses: one line each
