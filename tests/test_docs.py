"""The documentation works: every relative link in README.md and docs/*.md resolves (file and
#anchor), and every `ihstudy ...` command in the README's code blocks is a valid invocation.

Commands are checked in-process, without training: `train` composes and validates its config
(`--cfg job`), `sweep` and `reproduce` plan their runs (`--dry-run`), `analyze` and `toy` are
parsed by the CLI itself (the paths in the README are examples, so analyze's are not read)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.exceptions import TyperException
from typer.testing import CliRunner

from ihstudy.cli import ANALYSES, app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a [x](y) is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The #anchor GitHub gives a heading: its text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*)$", FENCE.sub("", page.read_text()), re.M):
        slug = github_anchor(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no network)
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: with `code` (and punctuation)\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code-and-punctuation) [gone](missing.md) "
                    "[bad anchor](other.md#nope) `[code](not-a-link.md)`\n```\n[fenced](not-a-link.md)\n```\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no heading with that anchor in other.md"]


def readme_commands() -> list[list[str]]:
    """Every `ihstudy ...` line of the README's code blocks, as arguments (comments dropped)."""
    return [shlex.split(line, comments=True)[1:] for block in FENCE.findall((ROOT / "README.md").read_text())
            for line in block.splitlines() if line.startswith("ihstudy ")]


CHECK_FLAGS = {"train": ["--cfg", "job"], "sweep": ["--dry-run"], "reproduce": ["--dry-run"]}


def checked_form(args: list[str]) -> list[str]:
    """The command as it is checked: train with --cfg job, sweep and reproduce with --dry-run."""
    return args + [a for a in CHECK_FLAGS.get(args[0], []) if a not in args]


def check_command(args: list[str]) -> None:
    """Fail unless `ihstudy ARGS` is a valid invocation; nothing is trained."""
    command, rest = args[0], args[1:]
    cli = typer.main.get_command(app)
    assert command in cli.commands, f"no command '{command}'"
    if command in CHECK_FLAGS:
        result = CliRunner().invoke(app, checked_form(args))
        assert result.exit_code == 0, result.output
        return
    try:  # unknown options and bad values end in one line and exit 2, as for a user
        context = cli.commands[command].make_context(command, list(rest))
    except typer.Exit as exc:
        raise AssertionError(f"ihstudy {shlex.join(args)}: exit {exc.exit_code}") from None
    if command == "analyze":
        check_analyze(context.params["args"] or [])


def check_analyze(args: list[str]) -> None:
    """analyze passes unknown options on as arguments: only an analysis name, run paths and (for eval)
    clamp overrides are valid."""
    from ihstudy.config import compose_config

    assert not any(a.startswith("-") for a in args), f"unknown option in {args}"
    what, paths = (args[0], args[1:]) if args and args[0] in ANALYSES else ("timing", args)
    overrides = [a for a in paths if "=" in a]
    paths = [a for a in paths if "=" not in a]
    assert paths and all("/" in p for p in paths), f"analyze {what}: expected run folders, got {paths}"
    if what in ("heads", "wiring", "progress"):
        assert len(paths) == 1 and not overrides, f"analyze {what} takes one run folder"
    if overrides:
        assert what == "eval" and all(o.lstrip("+~").startswith("clamp") for o in overrides)
        compose_config(overrides)


@pytest.fixture
def in_scratch_folder(tmp_path, monkeypatch):
    """README commands name folders under outputs/: run them from a scratch folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IHSTUDY_OUTPUTS", str(tmp_path / "outputs"))


@pytest.mark.parametrize("args", list(map(list, dict.fromkeys(tuple(checked_form(a)) for a in readme_commands()))),
                         ids=shlex.join)
def test_readme_command_is_valid(args, in_scratch_folder):
    check_command(args)


def test_readme_shows_every_command():
    shown = {args[0] for args in readme_commands()}
    assert shown == set(typer.main.get_command(app).commands)


@pytest.mark.parametrize("args", [
    "tran", "train clamp=mtch", "train --resum", "train model.n_head=4",
    "sweep seed=5,6 --dry-rn", "analyze head outputs/run", "analyze outputs/run --bi clamp",
    "analyze eval outputs/run model.n_heads=4", "analyze heads outputs/run --step x", "toy --dims 3",
], ids=str)
def test_command_check_refuses_misspellings(args, in_scratch_folder):
    with pytest.raises((AssertionError, TyperException)):
        check_command(args.split())


def test_quick_run_shows_a_phase_change(in_scratch_folder, tmp_path):
    """`ihstudy train experiment=quick` (the README's first run) shows what the README says it does:
    a plateau above ln 2, a drop below 0.4·ln 2 within its 20,000 sequences, induction heads forming."""
    import math

    import pandas as pd

    result = CliRunner().invoke(app, ["train", "-q", "experiment=quick", "hydra.run.dir=outputs/quick"])
    assert result.exit_code == 0, result.output
    evals = pd.read_parquet(tmp_path / "outputs/quick/eval.parquet").query("evaluator == 'fsl_train'").set_index("sequences")
    induction = evals.filter(like="induction.L1").max(axis=1)
    assert evals.loss.iloc[0] > 1.5
    assert (evals.loss.loc[2000:4100] > math.log(2)).all() and induction.loc[:4100].max() < 0.05
    crossed = evals.index[evals.loss < 0.4 * math.log(2)]
    assert 6000 < crossed[0] < 14000 and evals.loss.iloc[-1] < 0.15
    assert induction.iloc[-1] > 0.3
