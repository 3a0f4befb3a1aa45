"""The `ihstudy` command line: train, sweep, analyze.

Every command takes Hydra overrides (`model.n_heads=4 task.n_labels=10 clamp=layer1`). Bad input
ends in one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import math
import shlex
import signal
import threading
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand

from ihstudy.analysis import defaults
from ihstudy.errors import ConfigError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, clamp, sweep and analyse small transformers that form induction heads.")
console = Console(stderr=True)
OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. model.n_heads=4 task.n_labels=10 clamp=layer1")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def say(text: str, label: str = "") -> None:
    """One line on stderr: a styled label, then `text` as it is (messages and paths may hold
    [brackets], which rich would otherwise read as markup and drop)."""
    console.print(label + escape(text), highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    say(message, "[bold red]error:[/] ")
    raise typer.Exit(2)


USAGE_ERROR = typer.BadParameter.__mro__[1]  # click's UsageError, whichever click typer runs on


class OneLineErrors(TyperCommand):
    """A value an option cannot take (a word for a number, below its minimum, a missing value) ends,
    like every refused input, in one line on stderr and exit code 2, not click's usage box."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except USAGE_ERROR as exc:
            fail(exc.format_message())


class WithConfigGroups(OneLineErrors):
    """A command whose --help ends with the config groups and their options, as a Hydra app's help does."""

    hydra_groups: tuple[str, ...] = ()  # Hydra's own groups to list too

    def format_help(self, ctx, formatter) -> None:
        from ihstudy.config import config_groups

        self.epilog = "Config groups (choose with group=option):\n\n" + "\n\n".join(
            f"{group}: {', '.join(options)}" for group, options in config_groups(self.hydra_groups))
        super().format_help(ctx, formatter)


class WithLauncherGroups(WithConfigGroups):
    hydra_groups = ("hydra/launcher",)


class ConfigPart(str, Enum):
    job = "job"
    hydra = "hydra"
    all = "all"


RETRY_FAILED = typer.Option(False, "--retry-failed", help="Also train again the runs that failed for a numerical reason "
                                                         "(NaN loss); other failed runs resume anyway.")
ALLOW_CALLBACKS = typer.Option(False, "--allow-callbacks", help="Run the hydra.callbacks that the config tree's pack_job.yaml "
                                                               "declares (they run code; refused without this flag).")
PRINT_CONFIG = typer.Option(None, "--cfg", "-c", help="Print the composed config (job: the run's, hydra: Hydra's, "
                                                      "all: both) and exit without running, as Hydra's --cfg.")


@app.command(context_settings=EXTRA, cls=WithConfigGroups)
def train(
    overrides: list[str] | None = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in hydra.run.dir from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run already in hydra.run.dir and start afresh."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
    print_config: ConfigPart | None = PRINT_CONFIG,
) -> None:
    """Train one model (the paper's base setup by default) and write its run folder under outputs/."""
    from ihstudy.config import compose_config, compose_hydra_node
    from ihstudy.run_files import RunFiles, claim_run_dir
    from ihstudy.training.compiled import use_compile
    from ihstudy.training.train import Pack, RunSpec

    overrides = overrides or []
    try:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        cfg, run_dir = compose_config(overrides, single_run=True)
        if print_config:
            parts = {"job": cfg, "hydra": compose_hydra_node(overrides)}
            print_yaml(*(v for k, v in parts.items() if print_config.value in (k, "all")))
            return
        pack = Pack([RunSpec(cfg, run_dir, run_dir.name)])  # validates everything before a file is written
        run_dir, lock = claim_run_dir(run_dir, resume, overwrite, rename_on_collision=not sets_run_dir(overrides))
    except UserError as exc:
        fail(str(exc))
    try:  # the lock keeps other processes out of the run folder until we are done
        pack.specs[0].run_dir = run_dir  # a taken default folder name may have got a suffix
        if resume and RunFiles(run_dir).read_status().get("status") == "completed":
            say(f"{run_dir} is already completed")
            return
        if resume and pack.restore():
            say(f"resuming {run_dir} at {pack.step * pack.batch_size:,} sequences")
        if not quiet and use_compile(cfg.train.compile, pack.n_steps, pack.device):
            say("compiling the training step first (train.compile: ~30 s the first time on a machine, "
                "a few seconds once cached)")
        with training_progress(pack.n_steps * pack.batch_size, quiet) as progress:
            results = pack.train(progress)
    except UserError as exc:  # a checkpoint that does not fit this config: the run stays as it was
        fail(str(exc))
    except Exception as exc:  # the run folder exists: record the failure in it, never leave it "running"
        results = pack.fail_with(exc)
    finally:
        lock.release()
    if not quiet:
        print_summary(results)
    report_unfinished(results, overrides)


def print_yaml(*configs) -> None:
    from omegaconf import OmegaConf

    print("\n".join(OmegaConf.to_yaml(c) for c in configs), end="")


def sets_run_dir(overrides: list[str]) -> bool:
    return any(o.lstrip("+~").startswith("hydra.run.dir=") for o in overrides)


def report_unfinished(results, overrides: list[str]) -> None:
    """One line per failed or interrupted run (even with --quiet), then exit 1 (failed) or 130 (interrupted)."""
    for r in results:
        if r.status == "failed":
            say(f"{r.run_dir}: {r.summary.get('error')}", "[bold red]error:[/] ")
        elif r.status == "interrupted":
            again = [o for o in overrides if not sets_run_dir([o])] + [f"hydra.run.dir={r.run_dir}"]
            say(f"interrupted; continue with: {shlex.join(['ihstudy', 'train', '--resume', *again])}")
    statuses = {r.status for r in results}
    if "failed" in statuses:
        raise typer.Exit(1)
    if "interrupted" in statuses:
        raise typer.Exit(130)


@contextmanager
def training_progress(total_sequences: int, quiet: bool, description: str = "training"):
    """A callback (sequences done, per-run losses) driving a rich progress bar (or nothing)."""
    if quiet:
        yield None
        return
    with progress_display() as bars:
        yield progress_bar(bars, description, total_sequences)


def progress_display() -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} seq"), TextColumn("{task.fields[rate]} seq/s"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console)


def progress_bar(bars: Progress, description: str, total_sequences: int):
    """Add a bar; returns its update(sequences done, per-run losses)."""
    task = bars.add_task(description, total=total_sequences, loss="-", rate="-")

    def update(sequences: int, losses) -> None:
        speed = bars.tasks[task].speed
        bars.update(task, completed=sequences, rate=f"{speed:,.0f}" if speed else "-",
                    loss=" ".join(f"{float(x):.3f}" for x in losses[:4]))

    return update


def print_summary(results, root: Path | None = None) -> None:
    """One row per run, labelled by its folder name inside `root` (a sweep) or, for one run, by its
    folder's name, the whole folder on a line of its own."""
    from ihstudy.terminal import print_table

    title = [f"sweep folder: {root}" if root is not None else f"run folder: {results[0].run_dir}",
             f"final loss per evaluator; phase change: sequences at the first eval with "
             f"{' or '.join(sorted({r.summary['phase_change'] for r in results if 'phase_change' in r.summary}))} (-: not yet)"]
    statuses = {r.status for r in results}
    if len(statuses) == 1:  # one status for all: said once, not in a column
        title.append(f"{'all ' if len(results) > 1 else ''}{len(results)} run{'s' * (len(results) > 1)} {statuses.pop()}")
    keys = list(dict.fromkeys(k for r in results for k in r.summary if k.endswith(".loss")))
    columns = ["run", *(["status"] if len(title) == 2 else []), "phase change",
               *(k.removeprefix("fsl_").removesuffix(".loss") for k in keys)]
    rows = []
    for r in results:
        change = r.summary.get("phase_change_sequences")
        rows.append([r.run_dir.name if root is None else str(r.run_dir.relative_to(root)),
                     *([r.status] if len(title) == 2 else []), "-" if change is None else f"{change:,}",
                     *(f"{r.summary[k]:.4f}" if k in r.summary else "-" for k in keys)])
    print_table(columns, rows, title)


@app.command(context_settings=EXTRA, cls=WithLauncherGroups)
def sweep(
    overrides: list[str] | None = OVERRIDES,
    max_pack_runs: int | None = typer.Option(None, "--max-pack-runs", min=0, show_default=False,
                                             help="Most runs trained together in one pack (0: no limit; default: as "
                                                  "suits this machine's cores, docs/sweeps.md)."),
    subsets: str | None = typer.Option(None, "--subsets", metavar="clamp=A,B,...",
                                       help="Sweep every subset of these clamp presets, on top of the base clamp=... "
                                            "(docs/subsets.md)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and their packs; train nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary table."),
    retry_failed: bool = RETRY_FAILED,
    allow_callbacks: bool = ALLOW_CALLBACKS,
    print_config: ConfigPart | None = PRINT_CONFIG,
) -> None:
    """Train many runs: Hydra multirun overrides (clamp=none,copy seed=5,6) or a preset (experiment=fig5b).

    Runs of equal tensor shapes train together as one batched pack; packs run through a Hydra
    launcher (hydra/launcher=joblib, submitit_local or submitit_slurm; default: chosen for this
    machine, in this process or side by side in one worker process per core).
    Running the same command again skips completed runs and runs whose loss became NaN (unless
    --retry-failed) and resumes the others."""
    from ihstudy.training.lattice import label
    from ihstudy.training.sweep import PARALLEL_LAUNCHER, plan_sweep

    try:
        with planning_progress(quiet) as on_run:
            plan = plan_sweep(overrides or [], max_pack_runs, allow_callbacks, on_run, retry_failed, subsets)
    except UserError as exc:
        fail(str(exc))
    if plan.lattice:
        kept = plan.lattice.kept()
        say(f"subsets of {', '.join(plan.lattice.clamps)}: {len(kept)} of {len(plan.lattice.subsets())} swept"
            + (f" on top of {','.join(plan.lattice.base)}" if plan.lattice.base else ""))
        for subset, reason in plan.lattice.skipped.items():
            say(f"{label(subset)}: {reason}", "[yellow]skipped:[/] ")
    if print_config:
        print_sweep_configs(plan, print_config.value)
        return
    n_todo = sum(map(len, plan.packs))
    side_by_side = ", side by side in one worker process per core" if plan.launcher_overrides == PARALLEL_LAUNCHER else ""
    say(f"sweep {plan.dir}: {len(plan.runs)} runs, {len(plan.runs) - n_todo} already finished, "
        f"{n_todo} to train in {len(plan.packs)} pack(s){side_by_side}")
    if dry_run:
        print_plan(plan)
        return
    results = train_sweep(plan, quiet)
    if not quiet:
        print_summary(results, plan.dir)
    for r in results:
        if r.status == "failed":
            say(f"{r.name}: {r.summary.get('error')}", "[bold red]failed:[/] ")
    if any(r.status != "completed" for r in results):
        raise typer.Exit(1)


@contextmanager
def planning_progress(quiet: bool):
    """on_run(done, total) for sweep.plan_sweep: a bar while the runs are composed (a fraction of a
    second each: a long sweep takes minutes), gone once they are planned."""
    if quiet or not console.is_terminal:
        yield None
        return
    columns = [TextColumn("planning"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} runs"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bars:
        task = bars.add_task("planning", total=0)
        yield lambda done, total: bars.update(task, completed=done, total=total)


def train_sweep(plan, quiet: bool) -> list:
    """Train a planned sweep with progress bars; the state of every run."""
    return train_sweeps({"": plan}, plan.dir, quiet)[0]


def train_sweeps(sweeps: dict, folder: Path, quiet: bool) -> list[list]:
    """Train planned sweeps (label -> sweep) as one launch with progress bars; the state of every
    run, sweep by sweep. A failed pack job is said on stderr (its runs stay resumable); an
    interrupt exits 130, a sweep folder in use exits 2."""
    from ihstudy.training.sweep import PackJobError, collect_results, run_sweeps

    try:
        with sigterm_as_interrupt(), sweep_progress(sweeps, quiet) as on_progress:
            return run_sweeps(list(sweeps.values()), folder, on_progress)
    except UserError as exc:  # another command holds a sweep folder
        fail(str(exc))
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to continue")
        raise typer.Exit(130) from None
    except PackJobError as exc:
        say(f"a pack job failed: {exc}", "[bold red]error:[/] ")
        return [collect_results(sweep) for sweep in sweeps.values()]


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (kill, a job scheduler) stops a sweep as Ctrl-C does. Its default, ending this process
    on the spot, would leave the worker processes of a parallel launcher training (and holding their
    run folders) with no one to collect them. In-process packs still stop at a step boundary
    (train.StopRequest takes SIGTERM while a pack trains)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only there can handlers be set
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sweep_progress(sweeps: dict, quiet: bool):
    """on_progress(job, sequences, losses) driving one bar per pack job (or nothing)."""
    from ihstudy.training.sweep import pack_jobs

    labels = {id(sweep): label for label, sweep in sweeps.items()}
    jobs = pack_jobs(list(sweeps.values()))
    if quiet or not jobs:
        yield None
        return
    with progress_display() as bars:
        updates = [progress_bar(bars, f"{labels[id(sweep)]}pack {i} ({len(sweep.packs[i])} runs)", sweep.pack_total(i))
                   for sweep, i in jobs]
        yield lambda job, sequences, losses: updates[job](sequences, losses)


def print_sweep_configs(plan, part: str) -> None:
    """The first run's config in full, then every run's overrides (what differs between the runs), as YAML."""
    from omegaconf import OmegaConf

    from ihstudy.training.sweep import compose_pack_job

    configs = []
    if part in ("job", "all"):
        configs.append(OmegaConf.create({"runs": {run.name: run.overrides for run in plan.runs}}))
        configs.append(OmegaConf.create({"first_run": plan.runs[0].cfg}))
    if part in ("hydra", "all"):
        configs.append(OmegaConf.create({"pack_job": compose_pack_job(plan.launcher_overrides).hydra}))
    print_yaml(*configs)


def print_plan(plan) -> None:
    from ihstudy.terminal import print_table

    pack_of = {run.name: i for i, runs in enumerate(plan.packs) for run in runs}
    print_table(["run", "pack", "overrides"],
                [[run.name, str(pack_of.get(run.name, "finished")), " ".join(run.overrides)] for run in plan.runs],
                [f"sweep folder: {plan.dir}"])


@app.command(context_settings=EXTRA, cls=WithLauncherGroups)
def reproduce(
    args: list[str] | None = typer.Argument(None, metavar="[FIGURE...] [OVERRIDES...]",
                                      help="Figures 3 4b 5b 6 8 15 17 toy markov lattice (default: all) and Hydra "
                                           "overrides for every preset."),
    scale: float = typer.Option(1.0, "--scale", help="Shorten every run by this factor (a quick look; own folder)."),
    quick: bool = typer.Option(False, "--quick", help="Quick mode: every run shorter at a higher learning rate, time "
                                                      "compressed (docs/reproduce.md#quick-mode; own folder)."),
    out: Path | None = typer.Option(None, "--out",
                                    help="Reproduction folder inside the outputs folder (default: outputs/reproduce)."),
    max_pack_runs: int = typer.Option(0, "--max-pack-runs", min=0, help="Most runs trained together in one pack (0: no limit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs, packs and estimated times; train nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    retry_failed: bool = RETRY_FAILED,
    allow_callbacks: bool = ALLOW_CALLBACKS,
) -> None:
    """Train the paper's figure presets as sweeps and write report.md judging every finding.

    \b
    ihstudy reproduce                         all figures at full length (outputs/reproduce/full)
    ihstudy reproduce --quick                 every figure in a few minutes, time compressed (outputs/reproduce/quick)
    ihstudy reproduce 3 5b --scale 0.1        a quick look at two figures, runs 10x shorter
    ihstudy reproduce seed=5,6,7 data=features_file data.path=omniglot.h5
    Running the same command again skips finished runs and resumes interrupted ones."""
    from ihstudy.analysis import reproduce as rep
    from ihstudy.terminal import print_table

    try:
        with planning_progress(quiet) as on_run:
            plan = rep.plan_reproduction(args or [], scale, out, max_pack_runs, allow_callbacks, on_run, retry_failed, quick)
    except UserError as exc:
        fail(str(exc))
    for preset, sweep in plan.sweeps.items():
        todo = sum(map(len, sweep.packs))
        say(f"{preset}: {len(sweep.runs)} runs, {len(sweep.runs) - todo} finished, {todo} to train in "
            f"{len(sweep.packs)} pack(s), estimated {rep.estimate_seconds(sweep) / 60:.1f} min")
    if dry_run:
        for sweep in plan.sweeps.values():
            print_plan(sweep)
        say(f"estimated {rep.estimate_wall_seconds(plan) / 60:.0f} min of training in all, {plan.workers} pack job(s) "
            f"at a time, the longest first: an estimate from the cost of a training sequence and of an eval point "
            f"measured end to end on an idle 2-core CPU (docs/reproduce.md), without compilation; not a "
            f"measurement: a loaded machine takes longer")
        return
    train_sweeps({f"{preset}: ": sweep for preset, sweep in plan.sweeps.items()}, plan.folder, quiet)
    try:
        rep.run_toy(plan)
        folder, table = rep.write_reproduction_report(plan)
    except UserError as exc:  # a checkpoint that cannot be read, a toy folder in use
        fail(str(exc))
    print_table(["finding", "ihstudy", "holds"], [[r.finding, r.ihstudy, r.holds] for r in table.itertuples()],
                ["findings (docs/science.md §5)"])
    say(f"report: {folder / 'report.md'}")
    if any(run.files.read_status().get("status") != "completed" for sweep in plan.sweeps.values() for run in sweep.runs):
        raise typer.Exit(1)


ANALYSES = {"eval": "re-evaluate a checkpoint, optionally under clamps (post-hoc ablation)",
            "heads": "last-layer head ablations, complementarity and first-layer roles of a checkpoint",
            "wiring": "single-head wiring grid and Q/K/V composition scores of a checkpoint",
            "progress": "progress measures over every checkpoint of a run",
            "subsets": "a subset sweep's lattice: clamp effects, interactions, composition rules (docs/subsets.md)"}


@app.command(context_settings=EXTRA, cls=OneLineErrors)
def analyze(
    args: list[str] | None = typer.Argument(None, metavar="[eval|heads|wiring|progress|subsets] PATH...",
                                               help="Run or sweep folders (timing), or an analysis and one run folder."),
    by: str = typer.Option("", "--by", help="Group runs by config field(s), e.g. clamp, task.n_labels or clamp,seed."),
    evaluator: str = typer.Option("", "--evaluator", help="Evaluator whose curve is timed (default: the task family's "
                                                          "main one, e.g. fsl_train)."),
    thresholds: str = typer.Option("", "--thresholds", help="Thresholds to time, numbers or Xln2 (default: the task "
                                                            "family's, fsl: ln2,0.4ln2,0.1)."),
    metric: str = typer.Option("", "--metric", help="The threshold summarised over groups (default: the family's "
                                                    "phase change, fsl: 0.4ln2)."),
    band: float = typer.Option(defaults.PLATEAU_BAND, "--band", help="Plateau: the loss within ln 2 ± band."),
    report: Path | None = typer.Option(None, "--report", help="Report folder (default: analysis/<analysis> next to the runs)."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png, svg or pdf."),
    step: int | None = typer.Option(None, help="Checkpoint step (default: the newest)."),
    sequences: int = typer.Option(100_000, "--sequences", min=1,
                                  help="heads/wiring: enumerate the training distribution up to this size, "
                                       "else sample this many."),
) -> None:
    """Analyse runs: phase-change timing (default), or a checkpoint's heads and circuits.

    \b
    ihstudy analyze outputs/sweeps/fig5b --by clamp        timing of every run, grouped by clamp
    ihstudy analyze outputs/sweeps outputs/2026-11-29 --by task.n_labels,seed
    ihstudy analyze eval RUN clamp=keep_only clamp.keep.heads=1:5 [--step N]   post-hoc clamp evaluation
    ihstudy analyze heads RUN [--step N]      keep-one/remove-one head, add-back, complementarity, layer-1 roles
    ihstudy analyze wiring RUN [--step N]     one layer-1 x one layer-2 head kept; Q/K/V composition scores
    ihstudy analyze progress RUN              perfect-match / previous-token / direct-path measures per checkpoint
    ihstudy analyze subsets SWEEP             a subset sweep (sweep --subsets): effects, interactions, composition

    Timing writes tables (CSV), figures and report.md to --report (default: analysis/timing next to
    the runs); the checkpoint analyses to analysis/<analysis>-<run>. Run folders are never changed."""
    args = list(args or [])
    if not args:
        fail("give run or sweep folders to time, or one of: " + ", ".join(ANALYSES) + " and a run folder")
    from ihstudy.analysis.report import FORMATS

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    what = args.pop(0) if args[0] in ANALYSES else "timing"
    if what == "timing" and len(args) > 1 and all("=" in a and not Path(a).exists() for a in args[1:]):
        what = "eval"  # `ihstudy analyze RUN clamp=...`: the earlier syntax of analyze eval
    if what == "eval":
        return analyze_eval(args, step)
    if what == "timing":
        return analyze_timing([Path(a) for a in args], by, evaluator, thresholds, metric, band, report, fmt)
    if len(args) != 1:
        fail(f"analyze {what} takes one {'sweep' if what == 'subsets' else 'run'} folder")
    if what == "subsets":
        return analyze_subsets(Path(args[0]), evaluator, metric, report, fmt)
    analyze_checkpoint(what, Path(args[0]), step, sequences, report, fmt)


def analyze_eval(args: list[str], step: int | None) -> None:
    """Today's post-hoc evaluation: a checkpoint's eval rows under optional clamp overrides."""
    from ihstudy.analysis.circuits import loading_errors
    from ihstudy.api import clamp_config
    from ihstudy.training.train import evaluate_checkpoint

    if not args:
        fail("analyze eval takes a run folder")
    run_dir, overrides = Path(args[0]), args[1:]
    try:
        with loading_errors(run_dir):
            rows = evaluate_checkpoint(run_dir, step, clamp_config(overrides))
    except UserError as exc:
        fail(str(exc))
    from ihstudy.terminal import frame_rows, print_table

    clamped = f" with {' '.join(overrides)}" if overrides else ""
    columns = [c for c in ("loss", "acc", "icl_acc", "in_context_mass") if c in rows] if "acc" in rows else \
        [c for c in rows.columns if c not in ("step", "sequences", "evaluator") and "." not in c]  # the family's metrics
    columns = ["evaluator", *columns]
    print_table(columns, frame_rows(rows[columns]),
                [f"run folder: {run_dir}", f"eval at {int(rows.sequences.iloc[0]):,} sequences{clamped}"])


def analyze_timing(paths: list[Path], by: str, evaluator: str, thresholds: str, metric: str, band: float,
                   report_dir: Path | None, fmt: str) -> None:
    from ihstudy.analysis import timing
    from ihstudy.analysis.report import timing_report
    from ihstudy.run_files import check_report_dir

    out = report_dir or default_report_dir(paths, "timing")
    try:
        check_report_dir(out)
        if not 0 < band < math.inf:
            raise ConfigError(f"--band {band} must be a positive finite number")
        runs = timing.find_runs(paths)
        usable = [r for r in runs if r.evals is not None]
        notes = [f"{run.dir}: {note}" for run in runs for note in run.notes]
        if not usable:  # nothing to analyse: one line, with the first reason
            raise ConfigError("none of the runs found has eval rows to analyse" + (f" ({notes[0]})" if notes else ""))
        for note in notes:
            say(note, "[yellow]warning:[/] ")
        family, evaluator, limits, metric = timing.timed(usable[0], evaluator, thresholds, metric)
        if metric not in limits:
            raise ConfigError(f"--metric '{metric}' is not one of --thresholds ({', '.join(limits)})")
        if evaluator not in {e for r in usable for e in r.evaluators}:
            found = sorted({e for r in usable for e in r.evaluators})
            raise ConfigError(f"no run has evaluator '{evaluator}' (found: {', '.join(found)})")
        result, table, summary = timing_report(runs, by or None, evaluator, metric, limits, band, family.timed_column,
                                               family.curves)
    except UserError as exc:
        fail(str(exc))
    for note in result.notes:
        if "different tasks" in note:
            say(note, "[yellow]warning:[/] ")
    print_timing(table, summary, evaluator, metric, family.timed_column)
    save_report(result, out, fmt)


def save_report(result, out: Path, fmt: str) -> None:
    from ihstudy.analysis.report import write_report

    try:
        write_report(result, out, fmt)
    except UserError as exc:  # a folder that holds other files by now, a read-only or full filesystem
        fail(str(exc))
    say(f"report: {out / 'report.md'}")


def default_report_dir(paths: list[Path], name: str) -> Path:
    """analysis/<name> in the folder given (a sweep or a folder of runs), else next to the run folders."""
    from ihstudy.analysis.timing import common_root, is_run_dir
    from ihstudy.run_files import ANALYSIS_FOLDER

    if len(paths) == 1 and not is_run_dir(paths[0]):
        return paths[0] / ANALYSIS_FOLDER / name
    return common_root([p.resolve() for p in paths]) / ANALYSIS_FOLDER / name


def print_timing(table, summary, evaluator: str, metric: str, column: str = "loss") -> None:
    from ihstudy.analysis.timing import format_sequences
    from ihstudy.terminal import print_table

    rows = table[table.evaluator == evaluator]
    names = [c.removesuffix("_eval") for c in rows.columns if c.endswith("_eval")]
    cells = []
    for _, r in rows.iterrows():
        crossings = [f"{format_sequences(r[f'{n}_eval'])} / {format_sequences(r[f'{n}_interp'])}"
                     + (" (recrossed)" if r[f"{n}_recrossed"] else "") for n in names]
        plateau = "-" if not r.plateau_length else f"{format_sequences(r.plateau_start)}-{format_sequences(r.plateau_end)}"
        cells.append([r.run, r.status, *crossings, plateau, f"{r.final_loss:.4f}"])
    print_table(["run", "status", *names, "plateau", f"final {column}"], cells,
                [f"{evaluator} {column}: sequences to each threshold (first eval point / interpolated);",
                 "-: never crossed (censored at the last eval)"])
    if summary is not None and not summary.empty:
        print_table([str(c) for c in summary.columns],
                    [[format_sequences(v) if isinstance(v, float) else str(v) for v in r] for _, r in summary.iterrows()],
                    [f"time to {evaluator} {column} < {metric} by group, ordered by median (interpolated)"])


def analyze_checkpoint(what: str, run_dir: Path, step: int | None, sequences: int, report_dir: Path | None,
                       fmt: str) -> None:
    from ihstudy.analysis import circuits, report
    from ihstudy.run_files import check_report_dir

    out = report_dir or default_report_dir([run_dir], f"{what}-{run_dir.resolve().name}")
    try:
        check_report_dir(out)
        subject = circuits.Subject(run_dir, step)
        if what == "progress":
            with progress_display() as bars:
                task = bars.add_task("checkpoints", total=len(subject.files.checkpoint_steps()), loss="-", rate="-")
                result, tables = report.progress_report(subject, lambda done, total: bars.update(task, completed=done))
        else:
            batch, enumerated = circuits.training_distribution(subject.task, sequences)
            build = report.heads_report if what == "heads" else report.wiring_report
            with console.status(f"{what}: {len(batch.target):,} sequences, every condition in one stacked model"):
                result, tables = build(subject, batch, enumerated)
    except UserError as exc:
        fail(str(exc))
    from ihstudy.terminal import frame_rows, print_table

    for name, frame in tables.items():
        print_table([str(c) for c in frame.columns], frame_rows(frame.head(40)), [name])
    save_report(result, out, fmt)


def analyze_subsets(sweep_dir: Path, evaluator: str, metric: str, report_dir: Path | None, fmt: str) -> None:
    from ihstudy.analysis import subsets
    from ihstudy.run_files import check_report_dir

    out = report_dir or sweep_dir / "analysis" / "subsets"
    try:
        check_report_dir(out)
        lattice = subsets.load(sweep_dir, evaluator, metric)
        result, _ = subsets.subsets_report(lattice)
    except UserError as exc:
        fail(str(exc))
    for note in result.notes:  # the ranking and the composition result in words; the tables are in the report
        say(note)
    save_report(result, out, fmt)


@app.command(cls=OneLineErrors)
def toy(
    dim: int = typer.Option(defaults.TOY["dim"], help="Length of each of the three vectors (the tensor has dim³ entries)."),
    lr: float = typer.Option(defaults.TOY["lr"], help="Gradient-descent learning rate."),
    iterations: int = typer.Option(defaults.TOY["iterations"], help="Gradient-descent steps per condition."),
    seed: int = typer.Option(defaults.TOY["seed"], help="Seed of the true and initial vectors."),
    conditions: str = typer.Option(",".join(defaults.TOY["conditions"]),
                                   help="Comma-separated: none, or the vectors clamped to their true values (c, bc, ...)."),
    out: Path | None = typer.Option(None, help="A new output folder inside the outputs folder "
                                               "(default: outputs/toy/<date>_<time>)."),
) -> None:
    """The paper's toy model (Figs. 5a, 9): fit a rank-1 3-tensor a*⊗b*⊗c* by a⊗b⊗c, with vectors clamped."""
    from ihstudy.analysis.toy import run_conditions, write_toy

    settings = {"dim": dim, "lr": lr, "iterations": iterations, "seed": seed, "conditions": conditions.split(",")}
    try:
        table = run_conditions(settings["conditions"], dim, lr, iterations, seed)
        folder, fits = write_toy(table, out, settings)
    except UserError as exc:  # a bad setting, a used or outside folder, a folder in use
        fail(str(exc))
    for condition, fit in fits.items():
        when = "never" if fit is None else f"at iteration {fit}"
        say(f"{condition}: loss below 1% of the zero-prediction loss {when}")
    say(f"wrote {folder}/toy.parquet, toy.png, toy.json")


if __name__ == "__main__":
    app()
