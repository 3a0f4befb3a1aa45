"""Phase-change timing (docs/science.md §3, §5): crossings, plateau and steepest descent of each run's
loss curve, and their summary over groups of runs. Pure pandas/numpy on the run folders' tables.

Detector conventions (tested in tests/test_timing.py):
  - crossing of a threshold: the first eval point with loss < threshold (`*_eval`, what run.json's
    phase_change_sequences holds), and the time interpolated linearly in log-loss between that
    point and the one before it (`*_interp`). A run that never crosses is censored at its last eval
    point (`*_censored` true, times NaN): it is listed, never dropped.
  - a curve that dips below a threshold and comes back above it later still reports its first
    crossing (the paper's definition) and is flagged in `*_recrossed`.
  - plateau: the longest stretch of consecutive eval points with |loss - ln 2| <= band; start, end
    and length (end - start) in sequences; NaN and length 0 when no eval point lies in the band.
  - steepest descent: the midpoint of the pair of consecutive eval points over which log-loss
    (moving average of 5 eval points) falls fastest per sequence, from the first eval point at or
    below ln 2 + band on: the phase change's drop, not the early fall from ln(n_labels).
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ihstudy.analysis import defaults
from ihstudy.errors import ConfigError
from ihstudy.run_files import SWEEP_INDEX, RunFiles
from ihstudy.tasks.base import TaskFamily, task_family
from ihstudy.training.evaluate import LN2

THRESHOLDS = defaults.parse_thresholds(defaults.THRESHOLDS)
PHASE_CHANGE, PLATEAU_BAND = defaults.PHASE_CHANGE, defaults.PLATEAU_BAND
STEEPEST_WINDOW = 5  # eval points averaged before the steepest descent is found (noise)
SEED_FIELDS = ("seed", "data_seed", "eval_seed")


@dataclass
class Run:
    """A run folder as found on disk: its config (flattened to dotted keys), status and eval table."""

    dir: Path
    name: str
    status: str
    config: dict  # dotted key -> scalar (mappings and lists as their override value or a short string)
    evals: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)

    @property
    def evaluators(self) -> list[str]:
        return [] if self.evals is None else list(dict.fromkeys(self.evals.evaluator))


# --- finding runs ---------------------------------------------------------------------------------


def find_runs(paths) -> list[Run]:
    """Every run folder (run.json + config.yaml) at or below `paths`, named by its path below their
    common folder. Runs still running, failed or interrupted are returned as they are; a run that
    cannot be analysed has `evals` None and says why in `notes`."""
    dirs: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"{path} is not a folder")
        found = [path] if is_run_dir(path) else sorted(p.parent for p in path.rglob("run.json") if is_run_dir(p.parent))
        dirs |= dict.fromkeys(run_dir.resolve() for run_dir in found)
    if not dirs:
        raise ConfigError(f"no runs (folders with run.json and config.yaml) under {', '.join(map(str, paths))}")
    root = common_root(list(dirs))
    return [load_run(run_dir, str(run_dir.relative_to(root))) for run_dir in dirs]


def task_family_of(run: Run) -> type[TaskFamily]:
    """The task family a run was trained on (fsl for runs saved before families had a `_target_`)."""
    return task_family(OmegaConf.load(run.dir / "config.yaml").get("task") or {})


def timed(run: Run, evaluator: str = "", thresholds: str = "", metric: str = "") -> tuple[type[TaskFamily], str, dict, str]:
    """What the timing analysis reads on runs like `run`: (its task family, the evaluator, the thresholds,
    the phase-change threshold's name), the family's own where not given."""
    family = task_family_of(run)
    return (family, evaluator or family.main_evaluator, defaults.parse_thresholds(thresholds or family.timing_thresholds),
            metric or family.phase_change)


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file() and (path / "config.yaml").is_file()


def common_root(dirs: list[Path]) -> Path:
    """The deepest folder holding all of `dirs` (the parent of a single run)."""
    if len(dirs) == 1:
        return dirs[0].parent
    parts = [d.parts for d in dirs]
    shared = [p[0] for p in zip(*parts) if len(set(p)) == 1] if parts else []
    return Path(*shared) if shared else Path("/")


def load_run(run_dir: Path, name: str) -> Run:
    files = RunFiles(run_dir)
    try:
        status = files.read_status().get("status", "unknown")
        cfg = OmegaConf.to_container(files.read_config(), resolve=False)
        evals = files.read_table("eval")
    except ConfigError as exc:  # a damaged or hand-edited run.json, config.yaml or eval.parquet
        return Run(run_dir, name, "unknown", {}, None, [str(exc)])
    notes = []
    if evals is None or evals.empty:
        notes.append("no eval rows yet")
        evals = None
    elif missing := {"sequences", "evaluator", "loss"} - set(evals.columns):
        notes.append(f"eval.parquet lacks column(s) {', '.join(sorted(missing))}")
        evals = None
    elif not_numbers := [c for c in ("sequences", "loss") if not pd.api.types.is_numeric_dtype(evals[c])]:
        notes.append(f"eval.parquet column(s) {', '.join(not_numbers)} hold no numbers")
        evals = None
    return Run(run_dir, name, status, flatten(cfg, sweep_overrides(run_dir)), evals, notes)


def sweep_overrides(run_dir: Path) -> dict[str, str]:
    """The override values a sweep gave this run, parsed by Hydra's override parser (so that
    `clamp=[pt_attention,copy]` is one value): from the sweep's sweep.parquet (the overrides
    separated by spaces), else from the run folder's name `key=value,key=value`."""
    index = run_dir.parent / SWEEP_INDEX
    items = re.split(r",(?=[+~]?[\w.@/-]+=)", run_dir.name)  # commas that start another key=
    if index.is_file():
        try:
            table = pd.read_parquet(index, columns=["run", "overrides"])
            row = table[table.run == run_dir.name]
            if len(row):
                items = str(row.overrides.iloc[0]).split(" ")
        except (OSError, ValueError, KeyError):
            pass
    parser, values = OverridesParser.create(), {}
    for item in items:
        try:
            (override,) = parser.parse_overrides([item])
        except HydraException:  # a folder name that is not an override (characters made safe, a hash)
            continue
        if not override.is_delete():  # the value as written (Hydra's string form escapes the colons of head names)
            key = override.get_key_element()
            values[key.lstrip("+~")] = item.strip()[len(key) + 1:]
    return values


def flatten(cfg: dict, overrides: dict[str, str], prefix: str = "") -> dict:
    """Dotted keys -> scalars. A mapping or list becomes the sweep's override value for it (e.g. the
    clamp preset name), else for `clamp` the name of the preset it equals, else a short canonical
    string (`none` for an empty mapping)."""
    flat = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if dotted in overrides and isinstance(value, (dict, list)):
            flat[dotted] = overrides[dotted]
        elif dotted == "clamp" and value and canonical(value) in clamp_presets():
            flat[dotted] = clamp_presets()[canonical(value)]
        elif isinstance(value, dict) and dotted != "clamp":
            flat |= flatten(value, overrides, dotted + ".")
        elif isinstance(value, (dict, list)) or value is None:
            flat[dotted] = canonical(value)
        else:
            flat[dotted] = value
    return flat


@functools.cache
def clamp_presets() -> dict[str, str]:
    """canonical(clamp config) -> preset name, for every preset of the `clamp` config group."""
    from ihstudy.config import compose_with_hydra, config_groups

    presets = {}
    for name in dict(config_groups()).get("clamp", []):
        try:
            cfg = compose_with_hydra([f"clamp={name}"]).clamp
        except ConfigError:
            continue
        presets[canonical(OmegaConf.to_container(cfg, resolve=True))] = name  # only_l2h3 over its twin keep_only
    return presets


def canonical(value) -> str:
    if not value:
        return "none"
    return json.dumps(value, sort_keys=True, separators=(",", ":")).replace('"', "")


# --- detectors on one curve -------------------------------------------------------------------------


def crossing(sequences: np.ndarray, loss: np.ndarray, threshold: float) -> dict:
    """First eval point below `threshold`, the log-loss-interpolated time, and whether the loss
    comes back to or above the threshold later (see the module docstring)."""
    below = np.flatnonzero(loss < threshold)
    if not len(below):
        return {"eval": np.nan, "interp": np.nan, "censored": True, "recrossed": False}
    i = below[0]
    interp = float(sequences[i])
    if i > 0 and loss[i - 1] > 0 and loss[i] > 0:
        l0, l1 = np.log(loss[i - 1]), np.log(loss[i])
        interp = float(sequences[i - 1] + (np.log(threshold) - l0) / (l1 - l0) * (sequences[i] - sequences[i - 1]))
    return {"eval": float(sequences[i]), "interp": interp, "censored": False,
            "recrossed": bool((loss[i + 1:] >= threshold).any())}


def plateau(sequences: np.ndarray, loss: np.ndarray, band: float = PLATEAU_BAND) -> dict:
    """The longest stretch of consecutive eval points with |loss - ln 2| <= band."""
    inside = np.abs(loss - LN2) <= band
    best, start = None, None
    for i, flag in enumerate([*inside, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or sequences[i - 1] - sequences[start] > sequences[best[1]] - sequences[best[0]]:
                best = (start, i - 1)
            start = None
    if best is None:
        return {"start": np.nan, "end": np.nan, "length": 0.0}
    return {"start": float(sequences[best[0]]), "end": float(sequences[best[1]]),
            "length": float(sequences[best[1]] - sequences[best[0]])}


def steepest_descent(sequences: np.ndarray, loss: np.ndarray, band: float = PLATEAU_BAND,
                     window: int = STEEPEST_WINDOW) -> float:
    """Midpoint (sequences) of the eval interval over which log-loss, smoothed by a centred moving
    average of `window` eval points, falls fastest per sequence, counting only intervals from the
    first eval point at or below ln 2 + band on (the phase change, not the early fall from ln L)."""
    reached = np.flatnonzero(loss <= LN2 + band)
    if len(loss) < 2 or not len(reached) or reached[0] >= len(loss) - 1:
        return np.nan
    smooth = pd.Series(np.log(np.maximum(loss, 1e-12))).rolling(window, center=True, min_periods=1).mean().to_numpy()
    slope = np.nan_to_num(np.diff(smooth) / np.maximum(np.diff(sequences), 1), nan=np.inf)  # a failed run's NaN losses
    i = reached[0] + int(np.argmin(slope[reached[0]:]))
    return float((sequences[i] + sequences[i + 1]) / 2) if slope[i] < 0 else np.nan


def curve_timing(sequences, loss, thresholds: dict[str, float] = THRESHOLDS, band: float = PLATEAU_BAND) -> dict:
    """Every detector on one loss curve (eval points sorted by sequences) as one flat row."""
    sequences, loss = np.asarray(sequences, dtype=float), np.asarray(loss, dtype=float)
    row = {"final_loss": float(loss[-1]), "last_sequences": float(sequences[-1])}
    for name, threshold in thresholds.items():
        row |= {f"{name}_{key}": value for key, value in crossing(sequences, loss, threshold).items()}
    row |= {f"plateau_{key}": value for key, value in plateau(sequences, loss, band).items()}
    return row | {"steepest_descent": steepest_descent(sequences, loss, band)}


# --- runs and groups ----------------------------------------------------------------------------------


def crossings(run: Run, thresholds: dict[str, float] = THRESHOLDS, band: float = PLATEAU_BAND,
              column: str = "loss") -> pd.DataFrame:
    """One row per evaluator of `run`: the detectors of its `column` curve (the loss, or another metric
    a task family times, e.g. markov's kl_bigram; empty without eval rows or that column)."""
    if run.evals is not None and column not in run.evals.columns:
        return pd.DataFrame()
    if run.evals is None:
        return pd.DataFrame()
    rows = []
    for evaluator, curve in run.evals.groupby("evaluator", sort=False):
        curve = curve.sort_values("sequences")
        rows.append({"run": run.name, "status": run.status, "evaluator": evaluator,
                     **curve_timing(curve.sequences, curve[column], thresholds, band)})
    return pd.DataFrame(rows)


def timing_table(runs: list[Run], thresholds: dict[str, float] = THRESHOLDS, band: float = PLATEAU_BAND,
                 column: str = "loss") -> pd.DataFrame:
    """crossings() of every run, one row per run and evaluator, with each run's config fields."""
    frames = [crossings(run, thresholds, band, column).assign(**{f"config.{k}": v for k, v in run.config.items()})
              for run in runs if run.evals is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def resolve_fields(table: pd.DataFrame, by) -> list[str]:
    """Grouping fields as config keys; an unknown one is refused naming the nearest known field."""
    fields = [f.strip() for f in (by.split(",") if isinstance(by, str) else by) if f.strip()]
    known = [c.removeprefix("config.") for c in table.columns if c.startswith("config.")]
    for f in fields:
        if f not in known:
            near = difflib.get_close_matches(f, known, n=1, cutoff=0.4)
            raise ConfigError(f"unknown grouping field '{f}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    return fields


def group_summary(table: pd.DataFrame, by, metric: str = PHASE_CHANGE, evaluator: str = "fsl_train") -> pd.DataFrame:
    """Per group of runs (config fields `by`, e.g. "clamp" or ["task.n_labels", "seed"]): the number
    of runs, how many never crossed (censored), median, min, max and spread (max - min) of the
    interpolated crossing time `metric` over the remaining fields, sorted by median. A censored run
    counts as later than every crossing (its time is +inf for the median and max)."""
    fields = resolve_fields(table, by)
    rows = table[table.evaluator == evaluator]
    if rows.empty:
        return pd.DataFrame()
    times = rows[f"{metric}_interp"].where(~rows[f"{metric}_censored"], np.inf)
    grouped = times.groupby([rows[f"config.{f}"].astype(str) for f in fields], sort=False)
    summary = pd.DataFrame({"runs": grouped.size(), "censored": grouped.apply(lambda t: int(np.isinf(t).sum())),
                            "median": grouped.median(), "min": grouped.min(), "max": grouped.max()})
    summary["spread"] = summary["max"] - summary["min"]
    summary = summary.replace([np.inf, -np.inf], np.nan).assign(_order=grouped.median().values)
    summary.index.names = fields
    return summary.sort_values("_order", kind="stable").drop(columns="_order").reset_index()


def mixed_tasks(table: pd.DataFrame, by) -> list[str]:
    """task.* / data.* fields that differ between runs but are not grouped by: the groups then mix
    different tasks (said, then grouped anyway)."""
    fields = set(resolve_fields(table, by))
    varying = [c.removeprefix("config.") for c in table.columns
               if c.startswith(("config.task.", "config.data.")) and table[c].astype(str).nunique() > 1]
    return [f for f in varying if f not in fields]


def group_label(row: pd.Series, fields: list[str]) -> str:
    return ", ".join(str(row[f"config.{f}"]) if len(fields) == 1 else f"{f}={row[f'config.{f}']}" for f in fields)


def format_sequences(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.0f}"
