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
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import CheckpointError, ConfigError, RunInUseError

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = re.compile(r"step_(\d{8})\.pt")
LOCK_NAME = ".lock"
SWEEP_INDEX = "sweep.parquet"  # a sweep folder's index of its runs (sweep.write_index, read by timing.py)
OUTPUTS_ENV = "IHSTUDY_OUTPUTS"  # conf/config.yaml's default run folder reads it through outputs_setting
MAX_YAML_BYTES = 16 * 2**20  # a run's config.yaml is a few KB; run.json smaller still


def with_umask(mode: int) -> int:
    """`mode` as the user's umask leaves it (what open() and mkdir() give; mkstemp and mkdtemp give
    0600 and 0700). Python can read the umask only by setting it: set a strict one for that
    instant, so a file another thread creates meanwhile is at most more private, never less."""
    umask = os.umask(0o077)
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary file, then rename it over `path`: readers and crashes see the old or the
    new file, never a mix. `durable` also flushes it to the disk first (power loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, with_umask(0o666))
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
        """run.json as a dict ({} when there is none); ConfigError (one line) when it is damaged."""
        path = self.dir / "run.json"
        if not os.path.lexists(path):
            return {}
        try:
            status = json.loads(read_small_file(path, MAX_YAML_BYTES))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {first_line(exc)}") from None
        if not isinstance(status, dict):
            raise ConfigError(f"cannot read {path}: it holds a {type(status).__name__}, not a run's status")
        return status

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
        cfg = load_yaml(path)
        if not isinstance(cfg, DictConfig) or not cfg:
            raise ConfigError(f"{path} holds no run config (a YAML {type(cfg).__name__.removesuffix('Config').lower()})")
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


def outputs_setting() -> str:
    """$IHSTUDY_OUTPUTS as given, or `outputs` when it is unset or empty."""
    return os.environ.get(OUTPUTS_ENV) or "outputs"


def outputs_root() -> Path:
    """The folder every run folder lies in: $IHSTUDY_OUTPUTS, by default ./outputs."""
    return Path(outputs_setting()).expanduser().resolve()


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
    path_limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_PATH_MAX")
    if len(str(path).encode()) >= path_limit:  # checked before mkdir(parents=True) creates the first of them
        raise ConfigError(f"{key}: the path {str(path)[:40]}... is {len(str(path).encode())} bytes long, "
                          f"the filesystem allows {path_limit - 1}")
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


# --- report folders: replaced only if ihstudy wrote them -------------------------------------------

REPORT_MARK = ".ihstudy-report"  # a report folder's list of its own files
ANALYSIS_FOLDER = "analysis"  # where `ihstudy analyze` puts its reports by default, inside the folder analysed


def report_files(folder: Path) -> set[str]:
    """The files of the report in `folder` as its mark lists them (with the mark); empty if it has none."""
    try:
        names = json.loads(read_small_file(folder / REPORT_MARK, 2**20))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {REPORT_MARK, *names} if isinstance(names, list) and all(isinstance(n, str) for n in names) else set()


def is_report_dir(path: Path) -> bool:
    """A folder holding a report ihstudy wrote and nothing else."""
    return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= report_files(path)


def check_report_dir(out_dir: Path) -> None:
    """A report goes to a new path, an empty folder, or over a report ihstudy wrote that holds nothing
    else; anything else (the user's folder, a run, a file, /) is refused in one line, untouched."""
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ConfigError(f"report folder {out_dir} is {'a symlink' if out_dir.is_symlink() else 'a file'}; "
                          "choose another report folder")
    foreign = sorted({p.name for p in out_dir.iterdir()} - report_files(out_dir))
    if foreign:
        raise ConfigError(f"report folder {out_dir} holds files no ihstudy report wrote ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); a report replaces only an earlier report: "
                          "choose another report folder")


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` after checking its sha256 sidecar (if present)."""
    from ihstudy.training.memory import available_bytes

    path, sidecar = Path(path), Path(path).with_suffix(".pt.sha256")
    try:  # a file larger than the memory available could not be loaded anyway
        data = read_small_file(path, available_bytes(torch.device("cpu")))
        checksum = read_small_file(sidecar, 1024).decode(errors="replace").strip() if os.path.lexists(sidecar) else None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if checksum is not None and checksum != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, or a pickle that would execute code
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line(exc)}") from None


def load_yaml(path: Path):
    """A YAML file that ihstudy wrote (OmegaConf.to_yaml), read as OmegaConf; ConfigError (one line)
    for a file that is not regular, too large, not YAML, or uses anchors and aliases (never written by
    ihstudy; nested aliases expand exponentially: a 1 KB file can stand for billions of values)."""
    try:
        text = read_small_file(path, MAX_YAML_BYTES).decode()
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ConfigError(f"{path} uses YAML aliases (*name), which ihstudy never writes")
        return OmegaConf.create(text)
    except ConfigError:
        raise
    except Exception as exc:  # YAML, OmegaConf, Unicode and OS errors of a damaged or foreign file
        raise ConfigError(f"cannot read {path}: {first_line(exc)}") from None


def read_small_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`: a device (/dev/zero), a FIFO (/dev/stdin)
    or a huge file is refused before it is opened, so a read never blocks or fills the memory.
    OSError (with strerror) otherwise."""
    info = os.stat(path)  # stat never blocks, open() on a FIFO does
    if not stat.S_ISREG(info.st_mode):
        raise OSError(0, "not a regular file")
    if info.st_size > max_bytes:
        raise OSError(0, f"{info.st_size:,} bytes is more than the {max_bytes:,} such a file can have")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # a file still growing stops at the limit too
    if len(data) > max_bytes:
        raise OSError(0, f"more than the {max_bytes:,} bytes such a file can have")
    return data


def first_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # without "[Errno N]" and the path the message names already
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
