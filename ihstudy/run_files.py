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
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from ihstudy.errors import CheckpointError, ConfigError, RunInUseError

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = re.compile(r"step_(\d{8})\.pt")
LOCK_NAME = ".lock"
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


def claim_run_dir(run_dir: Path, resume: bool = False, overwrite: bool = False,
                  rename_on_collision: bool = False) -> tuple[Path, FileLock]:
    """Make `run_dir` this process's run folder; returns the folder and its held lock.

    A new folder is created atomically, so two processes never share one: with
    `rename_on_collision` (timestamped default names) a taken name gets a suffix -1, -2, ...
    An existing run is continued only with `resume`, replaced only with `overwrite`, and never
    while another process holds its lock. Keep the lock until the process stops writing.
    """
    run_dir = Path(run_dir)
    check_inside_outputs(run_dir)
    if resume:
        if not RunFiles(run_dir).holds_run():
            raise ConfigError(f"no run to resume in {run_dir}")
        return run_dir, lock_run_dir(run_dir)
    run_dir = make_fresh_dir(run_dir, rename_on_collision and not overwrite)
    lock = lock_run_dir(run_dir)
    leftovers = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if leftovers and not overwrite:
        lock.release()
        if RunFiles(run_dir).holds_run():
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
        raise ConfigError(f"{run_dir} is not empty and holds no run; choose another hydra.run.dir")
    for path in leftovers:  # --overwrite: everything but the lock we hold
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return run_dir, lock


def make_fresh_dir(run_dir: Path, rename_on_collision: bool) -> Path:
    """Create run_dir (or, if taken and allowed, run_dir-1, run_dir-2, ...); an existing folder is returned as is."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = run_dir.with_name(f"{run_dir.name}-{n}") if n else run_dir
        try:
            candidate.mkdir()  # atomic: exactly one process creates a given folder
            return candidate
        except FileExistsError:
            if not rename_on_collision:
                return candidate


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
