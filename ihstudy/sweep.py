"""Sweeps: many runs from Hydra multirun overrides, trained in packs, one Hydra job per pack.

    ihstudy sweep clamp=none,copy seed=5,6 task.n_labels=5,10   # 8 runs in 2 packs (one per n_labels)
    ihstudy sweep experiment=fig5b                              # a preset: conf/experiment/fig5b.yaml
    ihstudy sweep seed=5,6,7 hydra/launcher=joblib              # packs in local worker processes

Runs whose tensors have the same shapes and whose training schedules agree (`pack_key`) train
together as one `Pack`. Hydra's launcher plugins run the packs (the job config is conf/pack_job.yaml).
The sweep folder (default outputs/sweeps/<the overrides>, or hydra.sweep.dir=...):

    sweep.parquet    index, one row per run: overrides, status, phase change, final losses
    plan.json        the packs of the latest invocation; every pack job reads its runs from it
    <run name>/      one run folder per run, named by its swept overrides (layout: run_files.py)
    packs/<i>/       Hydra's folder of pack job i: .hydra/, its log, progress.json

Running the same command again skips finished runs (completed or failed: a NaN comes back) and
resumes the others from their newest checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from ihstudy.clamps import build_clamps
from ihstudy.config import compose_config, compose_with_hydra, config_errors, hydra_initialized, validate
from ihstudy.errors import ConfigError
from ihstudy.run_files import (
    RunFiles,
    atomic_write_parquet,
    atomic_write_text,
    check_inside_outputs,
    first_line,
    lock_run_dir,
    outputs_root,
)
from ihstudy.train import Pack, RunResult, RunSpec, load_cached_features, model_shape

log = logging.getLogger(__name__)
PLAN = "plan.json"
INDEX = "sweep.parquet"
FINISHED = ("completed", "failed")
SWEEP_DIR = "hydra.sweep.dir"


@dataclass
class Run:
    name: str
    overrides: list[str]
    cfg: DictConfig
    dir: Path
    n_features: int

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.dir)


@dataclass
class Sweep:
    dir: Path
    runs: list[Run]
    packs: list[list[Run]]  # the runs still to train, grouped
    launcher_overrides: list[str]  # hydra.* overrides for the pack jobs
    jobs_per_machine: int

    def pack_total(self, i: int) -> int:
        """Sequences each run of pack i trains in all."""
        return self.packs[i][0].cfg.train.sequences


# --- planning: everything is composed and validated before anything is written ----------------


def plan_sweep(overrides: list[str], max_pack_runs: int = 0) -> Sweep:
    """Expand the overrides into runs, validate all of them and group the unfinished ones into packs."""
    parsed = parse(overrides)
    hydra_args = [o.input_line for o in parsed if o.is_hydra_override()]
    run_args = [o.input_line for o in parsed if not o.is_hydra_override()]
    if not run_args:
        raise ConfigError("nothing to sweep: give overrides such as seed=5,6 clamp=none,copy, or experiment=NAME")
    expanded = expand(run_args)
    if not expanded:
        raise ConfigError(f"the sweep {' '.join(run_args)} has no runs")
    job_cfg = compose_pack_job(hydra_args)
    chosen = any(o.key_or_group == SWEEP_DIR for o in parsed)
    sweep_dir = Path(job_cfg.hydra.sweep.dir) if chosen else outputs_root() / "sweeps" / folder_name("_".join(run_args))
    check_inside_outputs(sweep_dir)
    runs = compose_runs(expanded, sweep_dir.resolve())  # absolute: pack jobs may start in another folder
    todo = [run for run in runs if run.files.read_status().get("status") not in FINISHED]
    packs = group_into_packs(todo, max_pack_runs)
    launcher_args = [o.input_line for o in parsed if o.is_hydra_override() and o.key_or_group != SWEEP_DIR]
    return Sweep(sweep_dir.resolve(), runs, packs, launcher_args, jobs_per_machine(job_cfg, len(packs)))


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


def compose_runs(expanded: list[list[str]], sweep_dir: Path) -> list[Run]:
    """Compose and validate every run; report all runs that fail (one line) and the repeated ones."""
    runs, errors, seen, features = [], [], {}, {}
    for overrides, name in zip(expanded, run_names(expanded)):
        try:
            cfg, _ = compose_config(overrides)
            n_classes, n_exemplars, n_features = load_cached_features(cfg.data, features).shape
            validate(cfg, n_classes, n_exemplars)
            build_clamps(cfg.clamp, model_shape(cfg, n_features))
            check_same_config(RunFiles(sweep_dir / name), cfg)
        except ConfigError as exc:
            errors.append(f"{name}: {exc}")
            continue
        text = OmegaConf.to_yaml(cfg)
        if text in seen or name in {r.name for r in runs}:
            raise ConfigError(f"the sweep repeats a run: {seen.get(text, name)} and {name} are the same run")
        seen[text] = name
        runs.append(Run(name, overrides, cfg, sweep_dir / name, n_features))
    if errors:
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        raise ConfigError(f"{len(errors)} of {len(expanded)} runs fail validation, none was run: {'; '.join(errors[:3])}{more}")
    return runs


def check_same_config(files: RunFiles, cfg: DictConfig) -> None:
    """A run folder left by an earlier invocation must hold the same run."""
    saved = files.dir / "config.yaml"
    if saved.exists() and OmegaConf.to_container(OmegaConf.load(saved)) != OmegaConf.to_container(cfg):
        raise ConfigError(f"{files.dir} holds a run with another config; choose another hydra.sweep.dir")


def pack_key(run: Run) -> str:
    """Runs with equal keys can train as one Pack: Pack takes these settings from its first run
    (tensor shapes, training schedule, optimizer kind). Seeds, clamps, lr and data settings that
    keep the shapes are per run. A resumed run packs with runs stopped at the same checkpoint."""
    c = run.cfg
    shared = {"model": c.model, "train": c.train, "eval": c.eval, "device": c.device,
              "optim": {k: v for k, v in c.optim.items() if k in ("name", "betas", "eps")},
              "task": {k: c.task[k] for k in ("n_labels", "context_len")}}
    resume_step = max(run.files.checkpoint_steps(), default=0)
    return json.dumps([OmegaConf.to_container(OmegaConf.create(shared)), run.n_features, resume_step], sort_keys=True)


def group_into_packs(runs: list[Run], max_pack_runs: int) -> list[list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(pack_key(run), []).append(run)
    size = max_pack_runs if max_pack_runs > 0 else len(runs)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


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

    on_progress(pack, sequences, losses) is called from a watcher thread as the packs advance."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(sweep.dir)  # one sweep command per folder at a time
    try:
        write_plan(sweep)
        watcher = ProgressWatcher(sweep, on_progress) if on_progress else None
        try:
            if sweep.packs:
                launch_packs(sweep)
        finally:
            if watcher:
                watcher.stop()
            write_index(sweep)
    finally:
        lock.release()
    return collect_results(sweep)


def progress_file(sweep_dir: Path, pack: int) -> Path:
    return sweep_dir / "packs" / str(pack) / "progress.json"


def write_plan(sweep: Sweep) -> None:
    packs = [{"runs": [{"name": r.name, "dir": str(r.dir), "config": OmegaConf.to_container(r.cfg)} for r in pack],
              "progress": str(progress_file(sweep.dir, i))} for i, pack in enumerate(sweep.packs)]
    atomic_write_text(sweep.dir / PLAN, json.dumps({"jobs_per_machine": sweep.jobs_per_machine, "packs": packs}, indent=1))
    for i in range(len(sweep.packs)):
        progress_file(sweep.dir, i).unlink(missing_ok=True)


class PackJobError(Exception):
    """A pack job stopped with an error (its runs stay resumable); the message is one line."""


def launch_packs(sweep: Sweep) -> None:
    """One Hydra multirun over the pack index; the launcher decides where the pack jobs run."""
    packs = ",".join(str(i) for i in range(len(sweep.packs)))
    overrides = [*sweep.launcher_overrides, f"{SWEEP_DIR}={quoted(sweep.dir)}", f"pack={packs}",
                 f"jobs_per_machine={sweep.jobs_per_machine}"]
    try:
        with hydra_initialized(job_name="pack"):
            GlobalHydra.instance().hydra.multirun("pack_job", train_pack_job, overrides)
    except Exception as exc:  # Hydra re-raises the first failed job's error once the launcher returns
        raise PackJobError(f"{first_line(exc)} (pack logs: {sweep.dir}/packs/<i>/pack.log)") from exc


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value (commas and = in folder names stay literal)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


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
        raise KeyboardInterrupt  # stop the whole sweep, not just this pack
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
    """A thread polling the pack progress files and calling on_progress(pack, sequences, losses)."""

    def __init__(self, sweep: Sweep, on_progress, interval: float = 0.5):
        self.sweep, self.on_progress, self.interval = sweep, on_progress, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        for i in range(len(self.sweep.packs)):
            try:
                state = json.loads(progress_file(self.sweep.dir, i).read_text())
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
    atomic_write_parquet(sweep.dir / INDEX, pd.DataFrame(rows))
