"""The files of one run folder, all written atomically (temporary file, then rename).

    <run>/config.yaml          resolved config
    <run>/run.json             status (running | completed | failed), times, versions, summary
    <run>/metrics.parquet      one row per optimizer step
    <run>/eval.parquet         one row per eval point and evaluator
    <run>/checkpoints/step_XXXXXXXX.pt (+ .sha256)   model, optimizer and RNG state
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from ihstudy.errors import ConfigError

CHECKPOINT_FORMAT = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


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

    def write_metrics(self, frame: pd.DataFrame) -> None:
        atomic_write_parquet(self.dir / "metrics.parquet", frame)

    def write_eval(self, frame: pd.DataFrame) -> None:
        atomic_write_parquet(self.dir / "eval.parquet", frame)

    def read_table(self, name: str) -> pd.DataFrame | None:
        path = self.dir / f"{name}.parquet"
        return pd.read_parquet(path) if path.exists() else None

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
        return sorted(int(p.stem.split("_")[1]) for p in self.checkpoints.glob("step_*.pt"))

    def load_checkpoint(self, step: int) -> dict:
        """A checkpoint, verified against its checksum and loaded without executing code."""
        return load_checkpoint_file(self.checkpoints / f"step_{step:08d}.pt")


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` after checking its sha256 sidecar (if present)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    sidecar = path.with_suffix(".pt.sha256")
    if sidecar.exists() and sidecar.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise ConfigError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, or a pickle that would execute code
        raise ConfigError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
