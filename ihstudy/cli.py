"""The `ihstudy` command line: train, sweep, analyze.

Every command takes Hydra overrides (`model.n_heads=4 task.n_labels=10 clamp=layer1`). Bad input
ends in one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ihstudy.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, clamp, sweep and analyse small transformers that form induction heads.")
console = Console(stderr=True)
OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. model.n_heads=4 task.n_labels=10 clamp=layer1")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command(context_settings=EXTRA)
def train(
    overrides: Optional[List[str]] = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in hydra.run.dir from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run already in hydra.run.dir and start afresh."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
) -> None:
    """Train one model (paper-notes §1-2 by default) and write its run folder under outputs/."""
    from ihstudy.config import compose_config
    from ihstudy.train import Pack, RunSpec

    try:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        cfg, run_dir = compose_config(overrides or [])
        pack = Pack([RunSpec(cfg, run_dir, run_dir.name)])
        run_dir = claim_run_dir(run_dir, resume, overwrite)
        if resume and pack.restore():
            console.print(f"resuming {run_dir} at {pack.step * pack.batch_size:,} sequences")
    except ConfigError as exc:
        fail(str(exc))
    with training_progress(pack.n_steps * pack.batch_size, quiet) as progress:
        results = pack.train(progress)
    if not quiet:
        print_summary(results)
    if any(r.status != "completed" for r in results):
        raise typer.Exit(1)


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Create the run folder, refusing to touch an existing run unless asked to."""
    from ihstudy.run_files import RunFiles

    files = RunFiles(run_dir)
    if files.holds_run():
        if overwrite:
            shutil.rmtree(run_dir)
        elif not resume:
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif resume:
        raise ConfigError(f"no run to resume in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@contextmanager
def training_progress(total_sequences: int, quiet: bool, description: str = "training"):
    """A callback (sequences done, per-run losses) driving a rich progress bar (or nothing)."""
    if quiet:
        yield None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} seq"), TextColumn("{task.fields[rate]} seq/s"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total_sequences, loss="-", rate="-")

        def update(sequences: int, losses) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=sequences, rate=f"{speed:,.0f}" if speed else "-",
                       loss=" ".join(f"{float(x):.3f}" for x in losses[:4]))

        yield update


def print_summary(results) -> None:
    from ihstudy.evaluate import PHASE_CHANGE_THRESHOLD

    table = Table(title=f"Summary (phase change: first eval with fsl_train loss < 0.4·ln2 = {PHASE_CHANGE_THRESHOLD:.3f})")
    keys = sorted({k for r in results for k in r.summary if k.endswith(".loss")})
    for column in ["run", "status", "phase change (seq)", *keys]:
        table.add_column(column)
    for r in results:
        change = r.summary.get("phase_change_sequences")
        table.add_row(str(r.run_dir), r.status, "-" if change is None else f"{change:,}",
                      *(f"{r.summary[k]:.4f}" if k in r.summary else "-" for k in keys))
    Console().print(table)
    for r in results:
        if r.status == "failed":
            console.print(f"[red]{r.run_dir}: {r.summary.get('error')}[/]")


@app.command(context_settings=EXTRA)
def sweep(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Run many configurations as batched packs (not available yet)."""
    fail("`ihstudy sweep` is not available yet")


@app.command(context_settings=EXTRA)
def analyze(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Analyse saved runs (not available yet)."""
    fail("`ihstudy analyze` is not available yet")


if __name__ == "__main__":
    app()
