"""Sweeps: many runs from Hydra multirun overrides, trained in packs, one Hydra job per pack.

    ihstudy sweep clamp=none,copy seed=5,6 task.n_labels=5,10   # 8 runs in 2 packs (one per n_labels)
    ihstudy sweep experiment=fig5b                              # a preset: conf/experiment/fig5b.yaml
    ihstudy sweep seed=5,6,7 hydra/launcher=joblib              # packs in local worker processes

Runs whose tensors have the same shapes and whose training schedules agree (`pack_key`) train
together as one `Pack`. Hydra's launcher plugins run the packs (the job config is conf/pack_job.yaml);
unless the command line says, `packs_for_machine` chooses the packs and the launcher.
The sweep folder (default outputs/sweeps/<the overrides>, or hydra.sweep.dir=...):

    sweep.parquet    index, one row per run: overrides, status, phase change, final losses
    plan.json        the packs of the latest invocation; every pack job reads its runs from it
    <run name>/      one run folder per run, named by its swept overrides (layout: run_files.py)
    packs/<i>/       Hydra's folder of pack job i: .hydra/, its log, progress.json

Running the same command again skips completed runs and runs that failed for a numerical reason
(a NaN comes back: `--retry-failed` trains them again), and resumes the others from their newest
checkpoints: interrupted, killed, or failed for an environmental reason (a full disk, memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ihstudy.config import (
    check_added_keys,
    check_hydra_overrides,
    check_launch_config,
    compose_config,
    compose_with_hydra,
    config_errors,
    hydra_initialized,
    literal_folders,
    quote,
    run_identity,
    validate,
)
from ihstudy.errors import ConfigError
from ihstudy.model.clamps import build_clamps
from ihstudy.model.transformer import ModelShape
from ihstudy.run_files import (
    ANALYSIS_FOLDER,
    LOCK_NAME,
    SWEEP_INDEX,
    TEMPORARY_NAME,
    RunFiles,
    atomic_write_parquet,
    atomic_write_text,
    check_folder_path,
    first_line,
    foreign_entries,
    is_report_dir,
    lock_run_dir,
    outputs_root,
)
from ihstudy.tasks.base import task_family
from ihstudy.training import memory
from ihstudy.training.lattice import LATTICE, Lattice, drop_incompatible, subset_sweep
from ihstudy.training.pack_settings import shared_group, shared_part
from ihstudy.training.recorder import NUMERICAL
from ihstudy.training.train import Pack, RunResult, RunSpec, eval_plan, input_shape, resolve_device, sequences_to_step

log = logging.getLogger(__name__)
PLAN = "plan.json"
SWEEP_DIR = "hydra.sweep.dir"


@dataclass
class Run:
    name: str
    overrides: list[str]
    cfg: DictConfig
    dir: Path
    exemplar_shape: tuple[int, int, int]  # [classes, exemplars, dim]

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.dir)

    @property
    def n_features(self) -> int:
        return self.exemplar_shape[2]


# What a pack job costs on this project's 2-core CPU, one torch thread, beside another pack job
# (measured end to end: docs/reproduce.md): per run, a training sequence (clamped or
# not: in packs they cost about the same) and an eval point (4 evaluators x EVAL_SEQUENCES sequences;
# in proportion for fewer evaluators or sequences). Orders the pack jobs, longest first, and estimates their time.
TRAIN_SEQUENCES_PER_SECOND = 20_000
EVAL_SECONDS = 0.08
EVAL_SEQUENCES = 1000  # per evaluator in the eval points EVAL_SECONDS was measured on
# Both were measured on few-shot runs of the default model: a sequence computes 6 positions (query
# rows: ModelShape.query_rows) of width 64. A sequence of another shape costs in proportion to its
# rows x width, never less (a token family's: 8-8.3x; measured 6-11x, docs/sweeps.md).
BASIS_ACTIVATIONS = 6 * 64
# Unless the command line names a launcher, packs may train side by side: one worker process per core,
# each with one torch thread (jobs_per_machine). `packs_for_machine` weighs that against fewer, larger
# packs with more threads, by two numbers measured on this project's 2-core CPU (docs/sweeps.md): per
# run, a pack with t threads takes t**-THREADS_EXPONENT of the time of one-thread packs side by side
# (what the threads and the larger batch gain together; fitted to the time ratios of six sweeps of
# 2-27 runs, 0.72-0.92), and starting the workers costs WORKER_START_SECONDS.
PARALLEL_LAUNCHER = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"]
THREADS_EXPONENT = 0.6
WORKER_START_SECONDS = 3.0


@dataclass
class Sweep:
    dir: Path
    runs: list[Run]
    packs: list[list[Run]]  # the runs still to train, grouped
    launcher_overrides: list[str]  # hydra.* overrides for the pack jobs
    lattice: Lattice | None = None  # a subset sweep's clamps (training/lattice.py)

    def pack_total(self, i: int) -> int:
        """Sequences each run of pack i trains in all."""
        return shared_group([run.cfg.train for run in self.packs[i]], "train").sequences


def pack_seconds(pack: list[Run]) -> float:
    """Estimated time of a pack's remaining training and evals (TRAIN_SEQUENCES_PER_SECOND, EVAL_SECONDS,
    in proportion to the evaluators each eval point measures, to their sequences and to a sequence's cost)."""
    train, ev = (shared_group([run.cfg[group] for run in pack], group) for group in ("train", "eval"))
    n_steps = sequences_to_step(train.sequences, train.batch_size)
    done = max(pack[0].files.checkpoint_steps(), default=0)
    evaluations = sum(len(names) for step, names in eval_plan(train, ev, n_steps).items() if step > done)
    evals = evaluations / len(ev.evaluators) * ev.n_sequences / EVAL_SEQUENCES
    sequences = (n_steps - done) * train.batch_size
    return len(pack) * sequence_cost(pack[0]) * (sequences / TRAIN_SEQUENCES_PER_SECOND + evals * EVAL_SECONDS)


def sequence_cost(run: Run) -> float:
    """What a sequence of this run's model costs, in sequences of the cost model's basis (BASIS_ACTIVATIONS)."""
    shape = ModelShape.of_config(run.cfg, run.n_features)
    return max(1.0, shape.query_rows * shape.d_model / BASIS_ACTIVATIONS)


# --- planning: everything is composed and validated before anything is written ----------------


def plan_sweep(overrides: list[str], max_pack_runs: int | None = None, allow_callbacks: bool = False, on_run=None,
               retry_failed: bool = False, subsets: str | None = None) -> Sweep:
    """Expand the overrides into runs, validate all of them and group the ones to train into packs
    (`needs_training`) of at most `max_pack_runs` runs (0: any number; None: as suits this machine
    unless the overrides name a launcher, `packs_for_machine`). `allow_callbacks`: run the
    hydra.callbacks of the config tree's pack_job.yaml; `on_run(done, total)` is called as the runs
    are composed (a fraction of a second each); `subsets` (clamp=A,B,...) sweeps every subset of
    those clamp presets (training/lattice.py)."""
    parsed = parse(literal_folders(overrides))
    check_hydra_overrides(overrides, SWEEP_DIR, launches=True)
    hydra_args = [o.input_line for o in parsed if o.is_hydra_override()]
    run_args = [o.input_line for o in parsed if not o.is_hydra_override()]
    if not run_args:
        raise ConfigError("nothing to sweep: give overrides such as seed=5,6 clamp=none,copy, or experiment=NAME")
    check_added_keys(run_args)  # once, not once per run
    lattice, named = None, [f"subsets={subsets}", *run_args] if subsets else run_args
    if subsets:
        lattice, run_args = subset_sweep(subsets, run_args)
    expanded = expand(run_args)
    if lattice:
        expanded = drop_incompatible(lattice, expanded, check_clamps)
    if not expanded:
        raise ConfigError(f"the sweep {' '.join(run_args)} has no runs")
    job_cfg = compose_pack_job(hydra_args)
    check_launch_config(job_cfg, allow_callbacks)
    chosen = any(o.key_or_group == SWEEP_DIR for o in parsed)
    named_by = [o for o in named if not o.lstrip("+~").startswith("logger")]  # trackers watch runs, they don't define them
    sweep_dir = Path(job_cfg.hydra.sweep.dir) if chosen else outputs_root() / "sweeps" / folder_name("_".join(named_by))
    check_folder_path(sweep_dir, SWEEP_DIR)
    check_sweep_dir(sweep_dir)
    budget = memory_budget(job_cfg)
    runs = compose_runs(expanded, sweep_dir.resolve(), budget, on_run)  # absolute: pack jobs may start in another folder
    todo = [run for run in runs if needs_training(run.files.read_status(), retry_failed)]
    launcher_args = [o.input_line for o in parsed if o.is_hydra_override() and o.key_or_group != SWEEP_DIR]
    if max_pack_runs is None and not launcher_args:
        packs, side_by_side = packs_for_machine(todo, budget)
        launcher_args = list(PARALLEL_LAUNCHER) if side_by_side else []
    else:
        packs = group_into_packs(todo, max_pack_runs or 0, budget)
    packs = sorted(packs, key=pack_seconds, reverse=True)  # see pack_jobs
    return Sweep(sweep_dir.resolve(), runs, packs, launcher_args, lattice)


def check_clamps(cfg: DictConfig) -> None:
    build_clamps(cfg.clamp, ModelShape.of_config(cfg, input_shape(cfg, {})[2]), task_family(cfg.task))


def needs_training(status: dict, retry_failed: bool = False) -> bool:
    """Whether a sweep trains a run (again) given its run.json: not when completed, nor when it failed
    for a numerical reason (its loss became NaN: training it again gives the same NaN) unless
    `retry_failed`. Interrupted, killed (still "running") and environmental failures resume."""
    if status.get("status") == "completed":
        return False
    return status.get("status") != "failed" or retry_failed or status.get("failure") not in (NUMERICAL, None)


def parse(overrides: list[str]) -> list:
    with config_errors():
        return OverridesParser.create().parse_overrides(list(overrides))


def expand(run_args: list[str]) -> list[list[str]]:
    """One override list per run: the cartesian product of the command line's sweeps and the
    `hydra.sweeper.params` of an experiment preset (the command line wins for the same key)."""
    parsed = parse(run_args)
    if any(o.is_sweep_override() and o.get_key_element().lstrip("+~") == "experiment" for o in parsed):
        raise ConfigError("give one experiment per sweep (experiment=NAME), not a list of them")
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = compose_with_hydra(fixed).hydra.sweeper.params or {}
    preset = [f"{key}={value}" for key, value in params.items()]
    with config_errors():
        return BasicSweeper.split_arguments(parse(preset + run_args), max_batch_size=None)[0]


def run_names(expanded: list[list[str]]) -> list[str]:
    """Readable names from the overrides that vary across runs (all of them for a single run)."""
    values: dict[str, set] = {}
    for run in expanded:
        for item in run:
            values.setdefault(item.split("=", 1)[0], set()).add(item)
    varying = {key for key, items in values.items() if len(items) > 1}
    return [folder_name(",".join(i for i in run if i.split("=", 1)[0] in varying) or ",".join(run)) for run in expanded]


def folder_name(text: str) -> str:
    """`text` as one safe folder name: odd characters become _, long names end in a short hash."""
    name = re.sub(r"[^\w=,.+\-\[\]]", "_", text).lstrip(".") or "run"
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def compose_runs(expanded: list[list[str]], sweep_dir: Path, memory_budget: int | None = None, on_run=None) -> list[Run]:
    """Compose and validate every run; report all runs that fail (one line) and the repeated ones."""
    runs, errors, seen, features = [], [], {}, {}
    for done, (overrides, name) in enumerate(zip(expanded, run_names(expanded))):
        if on_run is not None:
            on_run(done, len(expanded))
        try:
            cfg, _ = compose_config(overrides)
            shape = input_shape(cfg, features)
            validate(cfg, *shape[:2])
            memory.check_fits([cfg], [shape], resolve_device(cfg.device), memory_budget)
            build_clamps(cfg.clamp, ModelShape.of_config(cfg, shape[2]), task_family(cfg.task))
            check_same_config(RunFiles(sweep_dir / name), cfg)
        except ConfigError as exc:
            errors.append(f"{name}: {exc}")
            continue
        text = OmegaConf.to_yaml(cfg)
        if text in seen or name in {r.name for r in runs}:
            raise ConfigError(f"the sweep repeats a run: {seen.get(text, name)} and {name} are the same run")
        seen[text] = name
        runs.append(Run(name, overrides, cfg, sweep_dir / name, shape))
    if on_run is not None:
        on_run(len(expanded), len(expanded))
    if errors:
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        raise ConfigError(f"{len(errors)} of {len(expanded)} runs fail validation, none was run: {'; '.join(errors[:3])}{more}")
    return runs


def check_same_config(files: RunFiles, cfg: DictConfig) -> None:
    """A run folder left by an earlier invocation must hold the same run."""
    if (files.dir / "config.yaml").exists() and run_identity(files.read_config()) != run_identity(cfg):
        raise ConfigError(f"{files.dir} holds a run with another config; choose another hydra.sweep.dir")


def pack_key(run: Run) -> str:
    """Runs with equal keys can train as one Pack: equal shared settings (pack_settings.py) and
    exemplar dimension. A resumed run packs with runs stopped at the same checkpoint."""
    resume_step = max(run.files.checkpoint_steps(), default=0)
    return json.dumps([shared_part(run.cfg), run.n_features, resume_step], sort_keys=True)


def group_into_packs(runs: list[Run], max_pack_runs: int, memory_budget: int | None = None) -> list[list[Run]]:
    """Runs of equal pack keys, in packs of at most max_pack_runs (0: any number) that fit in memory
    (each run alone does: compose_runs checked it)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(pack_key(run), []).append(run)
    size = max_pack_runs if max_pack_runs > 0 else len(runs)
    packs = []
    for group in groups.values():
        pack: list[Run] = []
        for run in group:
            if pack and (len(pack) == size or not fits_in_memory([*pack, run], memory_budget)):
                packs.append(pack)
                pack = []
            pack.append(run)
        packs.append(pack)
    return packs


def packs_for_machine(runs: list[Run], memory_budget: int | None = None) -> tuple[list[list[Run]], bool]:
    """The packs of `runs`, and whether they train side by side (PARALLEL_LAUNCHER), that the cost
    model above expects to finish first on this machine's cores: one pack per group of packable runs
    in this process, or each group split into 1 to cores packs of near-equal size side by side (each
    fitting in a core's share of the memory). CPU runs with train.threads=0 only; others train as
    one pack per group, in this process."""
    cores, whole = available_cores(), group_into_packs(runs, 0, memory_budget)
    free_to_choose = all(resolve_device(run.cfg.device).type == "cpu" and not run.cfg.train.threads for run in runs)
    if cores == 1 or not free_to_choose or not runs:
        return whole, False
    share = (memory_budget or memory.available_bytes(torch.device("cpu"))) // cores
    plans = [(whole, False)]
    if all(fits_in_memory([run], share) for run in runs):  # group_into_packs keeps larger packs within share
        sizes = sorted({math.ceil(len(pack) / parts) for pack in whole for parts in range(1, cores + 1)})
        plans += [(group_into_packs(runs, size, share), True) for size in sizes]
    # of plans equal to the millisecond, the one of fewest packs: it batches more and compiles fewer shapes
    return min(plans, key=lambda plan: (round(predicted_seconds(*plan, cores), 3), len(plan[0])))


def predicted_seconds(packs: list[list[Run]], side_by_side: bool, cores: int) -> float:
    """Wall time of training `packs` on `cores` cores by the cost model above."""
    workers = min(cores, len(packs)) if side_by_side else 1
    speedup = (cores // workers) ** THREADS_EXPONENT
    start = WORKER_START_SECONDS if side_by_side else 0.0
    return start + makespan([pack_seconds(pack) / speedup for pack in packs], workers)


def makespan(seconds: list[float], workers: int) -> float:
    """When the last of these jobs ends on `workers` workers, each taking the longest job left (pack_jobs)."""
    loads = [0.0] * workers
    for job in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += job
    return max(loads)


def fits_in_memory(pack: list[Run], memory_budget: int | None) -> bool:
    device = resolve_device(shared_group([run.cfg.device for run in pack], "device"))
    return memory.fits([run.cfg for run in pack], [run.exemplar_shape for run in pack], device, memory_budget)


def memory_budget(job_cfg: DictConfig) -> int | None:
    """The memory of one pack job: the launcher's mem_gb (Slurm, submitit), else what this machine
    has available (None)."""
    mem_gb = OmegaConf.select(job_cfg, "hydra.launcher.mem_gb")
    return int(mem_gb * 2**30) if mem_gb else None


SWEEP_FILES = {PLAN, SWEEP_INDEX, LATTICE, LOCK_NAME, "multirun.yaml"}
SWEEP_FOLDERS = {"packs", ".submitit"}


def check_sweep_dir(sweep_dir: Path) -> None:
    """A sweep writes only into a new or empty folder or one an earlier sweep left (to continue it):
    its own files, Hydra's folders and run folders. Refuse anything else, writing nothing."""
    if not sweep_dir.exists():
        return
    if not sweep_dir.is_dir():
        raise ConfigError(f"{SWEEP_DIR}={sweep_dir} is a file, not a folder")
    foreign = sorted(p.name for p in sweep_dir.iterdir() if not is_sweep_entry(p))
    if foreign:
        raise ConfigError(f"{sweep_dir} holds files no sweep wrote ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); choose another {SWEEP_DIR}")


def is_sweep_entry(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir() and path.name == ANALYSIS_FOLDER:  # ihstudy analyze's reports on the sweep
        return all(is_report_dir(p) or TEMPORARY_NAME.fullmatch(p.name) for p in path.iterdir())
    if path.is_dir():
        return path.name in SWEEP_FOLDERS or not foreign_entries(path)  # a run folder
    return path.name in SWEEP_FILES or TEMPORARY_NAME.fullmatch(path.name) is not None


def compose_pack_job(hydra_args: list[str]) -> DictConfig:
    """A pack job's config with Hydra's node: checks the launcher and its settings."""
    return compose_with_hydra([*hydra_args, "pack=0"], config_name="pack_job")


def jobs_per_machine(job_cfg: DictConfig, n_packs: int) -> int:
    """How many pack jobs share this machine's cores at once (each job takes cores / this threads).

    Slurm gives every job its own CPUs (cpus_per_task), which the job sees as its CPU affinity."""
    launcher, cores = job_cfg.hydra.launcher, available_cores()
    at_once = min(n_packs, job_cfg.hydra.sweeper.max_batch_size or n_packs)
    if launcher._target_.endswith("JoblibLauncher"):
        workers = launcher.n_jobs if launcher.n_jobs > 0 else cores + 1 + launcher.n_jobs  # joblib's rule for -1, -2, ...
        return max(1, min(at_once, workers))
    if launcher._target_.endswith("submitit_launcher.LocalLauncher"):  # starts a whole batch at once
        return max(1, at_once)
    return 1


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- running ----------------------------------------------------------------------------------


def run_sweep(sweep: Sweep, on_progress=None) -> list[RunResult]:
    """Train every pack through the chosen Hydra launcher; returns the state of every run of the sweep.

    on_progress(job, sequences, losses) is called from a watcher thread as the packs advance; job
    indexes `pack_jobs([sweep])`."""
    return run_sweeps([sweep], sweep.dir, on_progress)[0]


def run_sweeps(sweeps: list[Sweep], folder: Path, on_progress=None) -> list[list[RunResult]]:
    """Train the packs of several sweeps with the same launcher overrides as one Hydra multirun, so
    that a parallel launcher keeps every worker busy across sweeps. `folder` (a sweep's own folder
    for one sweep) holds the multirun's plan.json and pack job folders; each sweep folder gets its
    sweep.parquet. Returns the state of every run, sweep by sweep."""
    folders = list(dict.fromkeys([folder, *(sweep.dir for sweep in sweeps)]))
    locks = []
    try:
        for path in folders:  # one command per sweep folder at a time
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only or full filesystem, a file on the way
                raise ConfigError(f"cannot create the sweep folder {path}: {first_line(exc)}") from None
            locks.append(lock_run_dir(path))
        for sweep in sweeps:
            if sweep.lattice:  # before training: `analyze subsets` can follow a sweep under way
                atomic_write_text(sweep.dir / LATTICE, sweep.lattice.to_json(sweep.runs))
        jobs = pack_jobs(sweeps)
        if jobs:
            per_machine = jobs_per_machine(compose_pack_job(sweeps[0].launcher_overrides), len(jobs))
            write_plan(folder, [sweep.packs[i] for sweep, i in jobs], per_machine)
            watcher = ProgressWatcher(folder, len(jobs), on_progress) if on_progress else None
            try:
                launch_packs(folder, len(jobs), sweeps[0].launcher_overrides, per_machine)
            finally:
                if watcher:
                    watcher.stop()
    finally:
        try:
            for sweep in sweeps:
                write_index(sweep)
        finally:
            for lock in locks:
                lock.release()
    return [collect_results(sweep) for sweep in sweeps]


def pack_jobs(sweeps: list[Sweep]) -> list[tuple[Sweep, int]]:
    """(sweep, pack index) of every pack to train, the longest first: parallel workers then end
    close together instead of one worker starting a long pack last."""
    jobs = [(sweep, i) for sweep in sweeps for i in range(len(sweep.packs))]
    return sorted(jobs, key=lambda job: pack_seconds(job[0].packs[job[1]]), reverse=True)


def progress_file(folder: Path, job: int) -> Path:
    return folder / "packs" / str(job) / "progress.json"


def write_plan(folder: Path, packs: list[list[Run]], per_machine: int) -> None:
    entries = [{"runs": [{"name": r.name, "dir": str(r.dir), "config": OmegaConf.to_container(r.cfg)} for r in pack],
                "progress": str(progress_file(folder, i))} for i, pack in enumerate(packs)]
    atomic_write_text(folder / PLAN, json.dumps({"jobs_per_machine": per_machine, "packs": entries}, indent=1))
    for i in range(len(packs)):
        progress_file(folder, i).unlink(missing_ok=True)


class PackJobError(Exception):
    """A pack job stopped with an error (its runs stay resumable); the message is one line."""


class PackInterrupted(Exception):
    """A pack job outside the sweep's process was stopped by a signal; its runs are resumable."""


def launch_packs(folder: Path, n_jobs: int, launcher_overrides: list[str], per_machine: int) -> None:
    """One Hydra multirun over the pack jobs of `folder`'s plan; the launcher decides where they run."""
    overrides = [*launcher_overrides, f"{SWEEP_DIR}={quote(str(folder))}", f"pack={','.join(map(str, range(n_jobs)))}",
                 f"jobs_per_machine={per_machine}"]
    try:
        with hydra_initialized(job_name="pack"):
            GlobalHydra.instance().hydra.multirun("pack_job", train_pack_job, overrides)
    except Exception as exc:  # Hydra re-raises the first failed job's error once the launcher returns
        raise PackJobError(f"{first_line(exc)} (pack logs: {folder}/packs/<i>/pack.log)") from exc


def train_pack_job(job_cfg: DictConfig) -> list[str]:
    """The Hydra task of one pack job, in this process, a worker process or a Slurm job: train the
    pack's runs (resuming from their checkpoints) and return their statuses."""
    plan = json.loads((Path(HydraConfig.get().sweep.dir) / PLAN).read_text())
    pack = plan["packs"][job_cfg.pack]
    torch.set_num_threads(max(1, available_cores() // job_cfg.jobs_per_machine))  # a run's train.threads wins
    specs = [RunSpec(OmegaConf.create(run["config"]), Path(run["dir"]), run["name"]) for run in pack["runs"]]
    locks = []
    try:
        for spec in specs:
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            locks.append(lock_run_dir(spec.run_dir))
        trainer = Pack(specs)
        trainer.restore()
        results = trainer.train(ProgressWriter(Path(pack["progress"])))
    except Exception:
        log.exception("pack %s failed", job_cfg.pack)  # the traceback lands in the job's log file
        raise
    finally:
        for lock in locks:
            lock.release()
    if any(r.status == "interrupted" for r in results):
        if HydraConfig.get().launcher._target_.endswith("BasicLauncher"):  # Ctrl-C in the sweep's own process
            raise KeyboardInterrupt  # stop the whole sweep, not just this pack
        # A job stopped by a signal (scancel, time limit, preemption): an error the launcher hands back
        # once every job has ended. A KeyboardInterrupt would end a submitit job without a result file,
        # and the sweep would wait for it as long as Slurm keeps no accounting (sacct).
        raise PackInterrupted(f"pack {job_cfg.pack} was stopped by a signal (scancel, time limit or preemption) "
                              f"after a checkpoint; run the same sweep command again to continue it")
    return [r.status for r in results]


class ProgressWriter:
    """Pack.train's progress callback: writes the pack's progress to a small file (at most twice a
    second) that `ProgressWatcher` reads, whichever process or machine the pack runs on."""

    def __init__(self, path: Path, interval: float = 0.5):
        self.path, self.interval, self.last = path, interval, 0.0

    def __call__(self, sequences: int, losses: torch.Tensor) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            atomic_write_text(self.path, json.dumps({"sequences": sequences, "losses": losses.tolist()}))


class ProgressWatcher:
    """A thread polling the pack jobs' progress files and calling on_progress(job, sequences, losses)."""

    def __init__(self, folder: Path, n_jobs: int, on_progress, interval: float = 0.5):
        self.folder, self.n_jobs, self.on_progress, self.interval = folder, n_jobs, on_progress, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        for i in range(self.n_jobs):
            try:
                state = json.loads(progress_file(self.folder, i).read_text())
            except (OSError, ValueError):
                continue
            self.on_progress(i, state["sequences"], state["losses"])

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.poll()


# --- results ----------------------------------------------------------------------------------


def collect_results(sweep: Sweep) -> list[RunResult]:
    """Every run's state as its run folder records it (pending: not started)."""
    results = []
    for run in sweep.runs:
        status = run.files.read_status()
        summary = status.get("summary", {}) | ({"error": status["error"]} if status.get("error") else {})
        results.append(RunResult(run.name, run.dir, status.get("status", "pending"), summary))
    return results


def write_index(sweep: Sweep) -> None:
    pack_of = {run.name: i for i, pack in enumerate(sweep.packs) for run in pack}
    rows = [{"run": r.name, "status": r.status, "overrides": " ".join(run.overrides), "pack": pack_of.get(r.name, -1),
             "phase_change_sequences": r.summary.get("phase_change_sequences"),
             **{k: v for k, v in r.summary.items() if k.endswith((".loss", ".acc"))},
             "error": r.summary.get("error"), "dir": str(r.run_dir)}
            for run, r in zip(sweep.runs, collect_results(sweep))]
    atomic_write_parquet(sweep.dir / SWEEP_INDEX, pd.DataFrame(rows))
