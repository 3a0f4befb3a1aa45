"""The files of one run folder, all written atomically (temporary file, then rename).

    <run>/config.yaml          resolved config
    <run>/run.json             status (running | completed | failed | interrupted), times, versions, summary
    <run>/.lock                held by the process training in the folder
    <run>/metrics.parquet      one row per optimizer step
    <run>/eval.parquet         one row per eval point and evaluator
    <run>/checkpoints/step_XXXXXXXX.pt (+ .sha256)   model, optimizer and RNG state
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import CheckpointError, ConfigError, RunInUseError

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = re.compile(r"step_(\d{8})\.pt")
LOCK_NAME = ".lock"
SWEEP_INDEX = "sweep.parquet"  # a sweep folder's index of its runs (sweep.write_index, read by timing.py)
OUTPUTS_ENV = "IHSTUDY_OUTPUTS"  # the default run folder in conf/config.yaml reads it too
FILE_MODE = 0o666 & ~os.umask(os.umask(0))  # what open() would give; mkstemp alone gives 0600


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary file, then rename it over `path`: readers and crashes see the old or the
    new file, never a mix. `durable` also flushes it to the disk first (power loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_parquet(path: Path, table: pd.DataFrame | pa.Table, durable: bool = True) -> None:
    """Without dictionary encoding, which for float columns costs most of the writing time (tables
    are rewritten at every eval) and saves little space."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, use_dictionary=False)
    atomic_write_bytes(path, buffer.getvalue(), durable)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    from importlib.metadata import version

    return {"ihstudy": version("ihstudy"), "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform()}


class RunFiles:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.checkpoints = self.dir / "checkpoints"

    # --- status -------------------------------------------------------------------------------

    def holds_run(self) -> bool:
        return (self.dir / "run.json").exists()

    def read_status(self) -> dict:
        try:
            return json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, **fields) -> dict:
        status = self.read_status() | fields
        atomic_write_text(self.dir / "run.json", json.dumps(status, indent=2, default=float) + "\n")
        return status

    def read_config(self) -> DictConfig:
        """The run's saved config; ConfigError (one line) if the folder holds no readable run."""
        path = self.dir / "config.yaml"
        if not self.dir.is_dir():
            raise ConfigError(f"{self.dir} is not a run folder ({'a file' if self.dir.exists() else 'no such folder'})")
        if not path.is_file():
            raise ConfigError(f"{self.dir} holds no run (no config.yaml)")
        try:
            cfg = OmegaConf.load(path)
        except Exception as exc:  # YAML, OmegaConf and OS errors of a damaged or foreign file
            raise ConfigError(f"cannot read {path}: {first_line(exc)}") from None
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"{path} holds no run config")
        return cfg

    def write_config(self, cfg) -> None:
        atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(cfg))

    # --- tables -------------------------------------------------------------------------------

    def write_metrics(self, table: pa.Table, durable: bool = True) -> None:
        atomic_write_parquet(self.dir / "metrics.parquet", table, durable)

    def write_eval(self, table: pa.Table, durable: bool = True) -> None:
        atomic_write_parquet(self.dir / "eval.parquet", table, durable)

    def read_table(self, name: str) -> pd.DataFrame | None:
        path = self.dir / f"{name}.parquet"
        if not path.exists():
            return None
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise ConfigError(f"cannot read {path}: {first_line(exc)}") from None

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, step: int, payload: dict) -> Path:
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, **payload}, buffer)
        data = buffer.getvalue()
        path = self.checkpoints / f"step_{step:08d}.pt"
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(".pt.sha256"), hashlib.sha256(data).hexdigest() + "\n")
        return path

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m[1]) for p in self.checkpoints.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name)))

    def load_checkpoint(self, step: int) -> dict:
        """A checkpoint, verified against its checksum and loaded without executing code."""
        return load_checkpoint_file(self.checkpoints / f"step_{step:08d}.pt")


# --- where runs may be written, and who writes them --------------------------------------------


def outputs_root() -> Path:
    """The folder every run folder lies in: $IHSTUDY_OUTPUTS, by default ./outputs."""
    return Path(os.environ.get(OUTPUTS_ENV) or "outputs").expanduser().resolve()


def check_inside_outputs(path: Path) -> None:
    """Refuse a run folder that resolves (following `..` and symlinks) outside the outputs folder."""
    root, resolved = outputs_root(), Path(path).expanduser().resolve()
    if root not in resolved.parents:
        raise ConfigError(f"run folder {path} is not inside the outputs folder {root} "
                          f"(choose another hydra.run.dir or set {OUTPUTS_ENV})")


def check_folder_path(path: Path, key: str = "hydra.run.dir") -> None:
    """Refuse, before anything is written, a folder path that cannot be created or written: outside
    the outputs folder, a name too long for the filesystem, a file on the way, no write permission."""
    check_inside_outputs(path)
    path = Path(path).expanduser().absolute()
    existing = next(p for p in [path, *path.parents] if os.path.lexists(p))
    limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    too_long = next((part for part in path.parts if len(part.encode()) > limit), None)
    if too_long is not None:
        raise ConfigError(f"{key}: the folder name {too_long[:40]}... is {len(too_long.encode())} bytes long, "
                          f"the filesystem allows {limit}")
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, not a folder; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write in {existing} (permission denied); choose another {key}")


# Everything an ihstudy run writes in its folder: `--overwrite` replaces a folder only if it holds
# nothing else, so a mistyped hydra.run.dir never deletes the user's other files.
RUN_FILE_NAMES = {"config.yaml", "run.json", "metrics.parquet", "eval.parquet", LOCK_NAME}
CHECKPOINT_FILE_NAME = re.compile(r"step_\d{8}\.pt(\.sha256)?")
TEMPORARY_NAME = re.compile(r"\..+\.tmp")  # atomic_write_bytes' files, left by a crash


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of a run folder that no ihstudy run writes (checkpoints/ holds only checkpoints)."""
    foreign = []
    for path in run_dir.iterdir():
        if path.name == "checkpoints" and path.is_dir() and not path.is_symlink():
            foreign += [f"checkpoints/{p.name}" for p in path.iterdir()
                        if not (p.is_file() and (CHECKPOINT_FILE_NAME.fullmatch(p.name) or TEMPORARY_NAME.fullmatch(p.name)))]
        elif not (path.is_file() and not path.is_symlink()
                  and (path.name in RUN_FILE_NAMES or TEMPORARY_NAME.fullmatch(path.name))):
            foreign.append(path.name)
    return sorted(foreign)


def check_claimable(run_dir: Path, overwrite: bool) -> None:
    """Refuse (writing nothing) a folder a new run may not take: not a folder, other files, a run
    without --overwrite, or a run together with other files even with --overwrite."""
    if not os.path.lexists(run_dir):
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a folder; choose another hydra.run.dir")
    if not any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return
    if not RunFiles(run_dir).holds_run():
        raise ConfigError(f"{run_dir} is not empty and holds no run; choose another hydra.run.dir")
    if not overwrite:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    foreign = foreign_entries(run_dir)
    if foreign:
        raise ConfigError(f"{run_dir} holds a run and other files ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); --overwrite replaces only a folder holding "
                          "exactly one run: choose another hydra.run.dir")


def claim_run_dir(run_dir: Path, resume: bool = False, overwrite: bool = False,
                  rename_on_collision: bool = False) -> tuple[Path, FileLock]:
    """Make `run_dir` this process's run folder; returns the folder and its held lock.

    A new folder is created atomically, so two processes never share one: with
    `rename_on_collision` (timestamped default names) a taken name gets a suffix -1, -2, ...
    An existing run is continued only with `resume`, replaced only with `overwrite` (and only if
    the folder holds nothing but that run), and never while another process holds its lock. A
    refused folder is left untouched. Keep the lock until the process stops writing.
    """
    run_dir = Path(run_dir)
    check_folder_path(run_dir)
    if resume:
        if not RunFiles(run_dir).holds_run():
            raise ConfigError(f"no run to resume in {run_dir}")
        return run_dir, lock_run_dir(run_dir)
    if not rename_on_collision:
        check_claimable(run_dir, overwrite)  # before the lock file is created in it
    run_dir = make_fresh_dir(run_dir, rename_on_collision)
    lock = lock_run_dir(run_dir)
    try:
        check_claimable(run_dir, overwrite)  # again under the lock: another process may have written meanwhile
        remove_run_files(run_dir)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def remove_run_files(run_dir: Path) -> None:
    """Delete the files of the run in `run_dir` (checked by check_claimable), all but its lock."""
    for path in run_dir.iterdir():
        if path.name == "checkpoints":
            for checkpoint in path.iterdir():
                checkpoint.unlink()
            path.rmdir()
        elif path.name != LOCK_NAME:
            path.unlink()


def make_fresh_dir(run_dir: Path, rename_on_collision: bool) -> Path:
    """Create run_dir (or, if taken and allowed, run_dir-1, run_dir-2, ...); an existing folder is returned as is."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            candidate = run_dir.with_name(f"{run_dir.name}-{n}") if n else run_dir
            try:
                candidate.mkdir()  # atomic: exactly one process creates a given folder
                return candidate
            except FileExistsError:
                if not rename_on_collision:
                    return candidate
    except OSError as exc:  # what check_folder_path could not foresee (a read-only filesystem, a full disk)
        raise ConfigError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}") from None


def lock_run_dir(run_dir: Path) -> FileLock:
    """Hold the run folder's lock (released by the OS if the process dies, even by SIGKILL)."""
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunInUseError(f"{run_dir} is in use by another ihstudy process (it holds {run_dir / LOCK_NAME})") from None
    return lock


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` after checking its sha256 sidecar (if present)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    sidecar = path.with_suffix(".pt.sha256")
    if sidecar.exists() and sidecar.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, or a pickle that would execute code
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line(exc)}") from None


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
