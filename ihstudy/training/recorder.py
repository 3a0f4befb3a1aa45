"""What a pack of R runs leaves on disk: metric and eval tables, checkpoints, status and failures.

The recorder knows nothing of models or data: the loop hands it rows and checkpoint states. Every
write goes through run_files' atomic helpers, so a crash or a full disk never leaves half a file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from ihstudy.config import run_identity
from ihstudy.errors import ConfigError
from ihstudy.run_files import CHECKPOINT_FORMAT, RunFiles, first_line, now, versions
from ihstudy.tasks.base import TaskFamily, task_family, threshold_value
from ihstudy.tasks.fsl import FewShotTask
from ihstudy.training.evaluate import PHASE_CHANGE_THRESHOLD
from ihstudy.training.trackers import Trackers

log = logging.getLogger(__name__)
STEP_COLUMNS = ("loss", "grad_norm", "grad_batch_stddev", "lr")
# Why a run failed, as run.json's "failure" records it: a numerical failure (the loss became NaN or
# infinite) comes back if the run is trained again; an environmental one (a write that failed, e.g.
# a full disk, memory, any other error) may not, so a sweep run again resumes it (sweep.needs_training).
NUMERICAL, ENVIRONMENT = "numerical", "environment"
# Eval rows reach the tables on disk at most this often for anyone watching a run (and always at
# checkpoints, at the end and on failure): the tables are rewritten whole, and a short run evaluating
# every few hundred sequences would otherwise spend 8% of its time writing them (docs/performance.md).
WATCH_SECONDS = 5.0


@dataclass
class RunSpec:
    cfg: DictConfig
    run_dir: Path
    name: str = ""


@dataclass
class RunResult:
    name: str
    run_dir: Path
    status: str
    summary: dict = field(default_factory=dict)


class RunRecorder:
    """The tables, checkpoints and status files of R runs."""

    def __init__(self, specs: list[RunSpec], n_steps: int, batch_size: int, device: torch.device):
        self.specs, self.batch_size = specs, batch_size
        # one row per step and run, written by the step itself (no per-step copy): [steps, R, columns]
        self.step_log = torch.zeros(n_steps, len(specs), len(STEP_COLUMNS), device=device)
        self.eval_columns: list[dict[str, list]] = [{} for _ in specs]  # columnar: cheap to write whole
        self.errors: list[str | None] = [None] * len(specs)
        self.written_at = time.monotonic()
        self.trackers = Trackers(specs, STEP_COLUMNS)  # logger=...: copies of the rows for experiment trackers

    @property
    def files(self) -> list[RunFiles]:
        return [RunFiles(s.run_dir) for s in self.specs]

    def live(self) -> list[int]:
        return [r for r, error in enumerate(self.errors) if error is None]

    def start(self, step: int) -> None:
        for files, spec in zip(self.files, self.specs):
            files.write_config(spec.cfg)
            files.write_status(status="running", started=files.read_status().get("started", now()), ended=None,
                               error=None, failure=None, versions=versions(), step=step)
        for r in range(len(self.specs)):
            self.trackers.start(r, step, step * self.batch_size)

    def add_evals(self, rows: list[list[dict]], step: int) -> None:
        """Record every live run's eval rows; write the tables at the last step, or for anyone
        watching if WATCH_SECONDS have passed since they were last written."""
        for r in self.live():
            for row in rows[r]:
                for column, value in row.items():
                    self.eval_columns[r].setdefault(column, []).append(value)
        if step == len(self.step_log) or time.monotonic() - self.written_at >= WATCH_SECONDS:
            self.flush(step)
        for r in self.live():
            self.trackers.log_eval(r, rows[r], self.step_log[:step, r], step)

    def metrics_table(self, r: int, step: int) -> pa.Table:
        steps = np.arange(1, step + 1)
        log_rows = self.step_log[:step, r].cpu().numpy()
        return pa.table({"step": steps, "sequences": steps * self.batch_size}
                        | {c: log_rows[:, i] for i, c in enumerate(STEP_COLUMNS)})

    def flush(self, step: int, durable: bool = False) -> None:
        """Write every live run's tables: at evals for anyone watching, durably at checkpoints."""
        for r in self.live():
            self.write_tables(r, step, durable)
        self.written_at = time.monotonic()

    def write_tables(self, r: int, step: int, durable: bool = True) -> None:
        self.files[r].write_metrics(self.metrics_table(r, step), durable)
        self.files[r].write_eval(pa.Table.from_pydict(self.eval_columns[r]), durable)

    def checkpoint(self, step: int, state) -> None:
        """Save state(r) (model, optimizer, rng) of every live run; tables first, so a checkpoint on
        disk always has its metric rows on disk."""
        self.flush(step, durable=True)
        for r in self.live():
            self.files[r].save_checkpoint(step, {"sequences": step * self.batch_size} | state(r)
                                          | {"config": OmegaConf.to_container(self.specs[r].cfg)})

    def checkpoint_steps(self) -> list[int]:
        """Steps at which every run holds a checkpoint, newest first."""
        return sorted(set.intersection(*(set(f.checkpoint_steps()) for f in self.files)), reverse=True)

    def check_config(self, r: int, state: dict) -> None:
        """Refuse a checkpoint of run r written for another config."""
        files, cfg = self.files[r], run_identity(self.specs[r].cfg)
        if state.get("format") != CHECKPOINT_FORMAT or run_identity(state.get("config")) != cfg:
            raise ConfigError(f"{files.dir} was started with another config ({config_difference(state.get('config'), cfg)}); "
                              "resume it with the overrides it was started with")

    def restore_rows(self, r: int, step: int) -> None:
        """Run r's rows as they were at checkpoint `step`: metric rows after it and eval rows at or
        after it are dropped (the loop redoes them exactly)."""
        files = self.files[r]
        metrics, evals = files.read_table("metrics"), files.read_table("eval")
        kept = None if metrics is None else metrics[metrics.step <= step]
        if kept is None or evals is None or kept.step.tolist() != list(range(1, step + 1)):
            raise ConfigError(f"run {files.dir} has a checkpoint at step {step} but lost its metrics")
        self.step_log[:step, r] = torch.tensor(kept[list(STEP_COLUMNS)].to_numpy())
        self.eval_columns[r] = evals[evals.step < step].to_dict("list")

    def fail(self, runs: list[int], message: str, step: int, write_rows: bool = True, failure: str = ENVIRONMENT) -> None:
        """Mark runs failed (`failure`: NUMERICAL or ENVIRONMENT), keeping their rows so far (written
        unless `write_rows` is false: the tables on disk stay) and their last checkpoint."""
        for r in runs:
            self.errors[r] = f"{message} at step {step + 1}"
            if write_rows:
                try:
                    self.write_tables(r, step)
                except Exception as exc:  # e.g. the disk is still full: the status and message still count
                    log.warning("%s: cannot write the tables (%s)", self.files[r].dir, first_line(exc))
            try:
                self.files[r].write_status(status="failed", ended=now(), error=self.errors[r], failure=failure, step=step)
            except OSError as exc:  # the message still reaches the user
                log.warning("%s: cannot record the failure (%s)", self.files[r].dir, exc.strerror or exc)

    def finish(self, status: str, step: int) -> list[RunResult]:
        """Write every run's final status and summary."""
        results = []
        for r, (files, spec) in enumerate(zip(self.files, self.specs)):
            if self.errors[r] is not None:
                results.append(RunResult(spec.name, spec.run_dir, "failed", {"error": self.errors[r]}))
            else:
                summary = summarize(pd.DataFrame(self.eval_columns[r]), task_family(spec.cfg.task))
                files.write_status(status=status, ended=now(), step=step, summary=summary)
                results.append(RunResult(spec.name, spec.run_dir, status, summary))
            self.trackers.finish(r, results[-1].status, results[-1].summary)
        return results


def config_difference(saved, current: dict) -> str:
    """The dotted keys whose values differ between two config dicts, for a one-line message."""
    if not isinstance(saved, dict):
        return "no config saved"
    flat = [pd.json_normalize(c, sep=".").iloc[0].to_dict() for c in (saved, current)]
    keys = sorted(k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k, "?") != flat[1].get(k, "?"))
    return "differs in " + ", ".join(keys) if keys else "another checkpoint format"


def phase_change_sequences(eval_frame: pd.DataFrame, threshold: float = PHASE_CHANGE_THRESHOLD,
                           evaluator: str = "fsl_train", column: str = "loss") -> float | None:
    """First eval point (sequences) at which the evaluator's `column` is below the threshold (fsl: the
    fsl_train loss below 0.4 ln 2)."""
    train = eval_frame[eval_frame.evaluator == evaluator]
    below = train[train[column] < threshold]
    return int(below.sequences.iloc[0]) if len(below) else None


def phase_change_criterion(family: type[TaskFamily]) -> str:
    """How the family's phase change is timed, in words: e.g. "fsl_train loss < 0.4ln2 = 0.277"."""
    return f"{family.main_evaluator} {family.timed_column} < {family.phase_change} = {threshold_value(family.phase_change):.3g}"


def summarize(eval_frame: pd.DataFrame, family: type[TaskFamily] = FewShotTask) -> dict:
    """run.json's summary: the phase change by the task family's criterion, and each evaluator's final
    loss (and accuracy, where the family measures one): its last row (eval.dense: the others' rows are sparser)."""
    if eval_frame.empty:
        return {}
    last = eval_frame.sort_values("step", kind="stable").groupby("evaluator", sort=False).tail(1)
    found = family.main_evaluator in set(eval_frame.evaluator) and family.timed_column in eval_frame
    summary = {"phase_change_sequences": phase_change_sequences(eval_frame, threshold_value(family.phase_change),
                                                                family.main_evaluator, family.timed_column) if found else None,
               "phase_change": phase_change_criterion(family)}
    for _, row in last.iterrows():
        summary[f"{row.evaluator}.loss"] = float(row["loss"])
        if "acc" in row:
            summary[f"{row.evaluator}.acc"] = float(row["acc"])
    return summary
