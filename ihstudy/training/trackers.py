"""Experiment trackers (config group `logger`): TensorBoard, MLflow, Weights & Biases, CSV.

Each run of a pack gets its own tracker run, named by its run folder inside the outputs folder. At
every eval point a tracker receives, with the sequences seen as its step:

    <evaluator>/<metric>             every column of eval.parquet: loss, acc, ..., induction.L1H3, ...
    train/loss, train/grad_norm, ... the mean of metrics.parquet's rows since the previous eval point

and at the start the run's config, at the end its status and run.json's summary. The run folder
stays the record: a tracker that fails (a full disk, a stopped server) is dropped with one warning
and the run goes on. The libraries are optional extras, imported only when chosen; a missing one
ends the command before training (`check_trackers`).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import ConfigError
from ihstudy.run_files import atomic_write_text, first_line, outputs_root
from ihstudy.schema import check_schema, one_of

log = logging.getLogger(__name__)
LIBRARIES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "csv": None}  # tracker -> module (= extra)


def chosen(cfg) -> dict:
    """The trackers a run config chooses: name -> settings."""
    node = cfg.get("logger")
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def check_trackers(cfg) -> None:
    """Refuse, before anything runs, an unknown tracker, settings its schema refuses, or a tracker whose
    library is not installed."""
    for name in chosen(cfg):
        if name not in LIBRARIES:
            raise ConfigError(f"logger: unknown tracker '{name}' (choose from none, {', '.join(LIBRARIES)})")
        settings = cfg.logger[name]
        if not isinstance(settings, DictConfig):
            raise ConfigError(f"logger.{name} must be a mapping of its settings, got {settings!r}")
        check_schema(TRACKERS[name].schema, settings, f"logger.{name}", what=f"the {name} tracker")
        module = LIBRARIES[name]
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logger={name} needs the {module} library: pip install -e '.[{name}]'")


def tracker_name(run_dir: Path) -> str:
    """A run's name in the trackers: its folder inside the outputs folder (else the folder's name)."""
    run_dir, root = Path(run_dir).resolve(), outputs_root()
    return str(run_dir.relative_to(root)) if root in run_dir.parents else run_dir.name


class Trackers:
    """The trackers of R runs; every call is guarded (a failing tracker is dropped, with a warning)."""

    def __init__(self, specs, step_columns: tuple[str, ...]):
        self.step_columns = step_columns
        self.names = [tracker_name(spec.run_dir) for spec in specs]
        self.cfgs = [OmegaConf.to_container(spec.cfg, resolve=True) for spec in specs]
        self.trackers: list[dict] = [dict.fromkeys(chosen(spec.cfg)) for spec in specs]  # name -> open tracker (None: not yet)
        self.settings = [chosen(spec.cfg) for spec in specs]
        self.last_step = [0] * len(specs)

    def start(self, r: int, step: int, sequences: int) -> None:
        """Open run r's trackers at `step` (> 0: resumed; what they hold after `sequences` is redone)."""
        self.last_step[r] = step
        for kind in list(self.trackers[r]):
            self.trackers[r][kind] = self.guarded(r, kind, TRACKERS[kind], self.settings[r][kind], self.names[r],
                                                  self.cfgs[r], sequences)

    def log_eval(self, r: int, rows: list[dict], step_log, step: int) -> None:
        """One eval point's rows, and the mean of run r's step rows since the previous eval point
        (step_log: [steps, columns], metrics.parquet's rows)."""
        if not rows:
            return
        sequences = int(rows[0]["sequences"])
        values = {f"{row['evaluator']}/{k}": float(v) for row in rows for k, v in row.items()
                  if k not in ("step", "sequences", "evaluator")}
        if step > self.last_step[r]:
            means = step_log[self.last_step[r]:step].double().mean(0).tolist()
            values |= {f"train/{c}": means[i] for i, c in enumerate(self.step_columns)}
        self.last_step[r] = step
        for kind, tracker in self.open(r):
            self.guarded(r, kind, tracker.log, values, sequences)

    def finish(self, r: int, status: str, summary: dict) -> None:
        for kind, tracker in self.open(r):
            self.guarded(r, kind, tracker.finish, status, summary)
            self.trackers[r][kind] = None

    def open(self, r: int) -> list[tuple[str, object]]:
        return [(kind, t) for kind, t in self.trackers[r].items() if t is not None]  # None: failed or closed

    def guarded(self, r: int, kind: str, call, *args):
        """call(*args); a failure drops run r's tracker `kind` with a warning (None returned)."""
        try:
            return call(*args)
        except Exception as exc:  # any failure of a tracker library: never the run's
            log.warning("logger=%s stopped for %s (%s); the run goes on, its folder holds every row",
                        kind, self.names[r], first_line(exc))
            self.trackers[r][kind] = None


def flat_config(cfg: dict) -> dict[str, str]:
    """Dotted key -> value as text (what parameter tables show)."""
    import pandas as pd

    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in pd.json_normalize(cfg, sep=".").iloc[0].items()}


# --- the trackers: each reads the settings its schema declares (conf/logger/<name>.yaml) --------------------


@dataclass
class FolderSettings:
    dir: str  # a folder per run inside it


@dataclass
class MLflowSettings:
    tracking_uri: str
    experiment: str


@dataclass
class WandbSettings:
    project: str
    dir: str
    mode: str = one_of("offline", "online")


class TensorBoardTracker:
    schema = FolderSettings

    def __init__(self, settings: dict, name: str, cfg: dict, sequences: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(settings["dir"]) / name), purge_step=sequences or None)  # resumed: drop later events
        self.writer.add_text("config", "```yaml\n" + OmegaConf.to_yaml(cfg) + "```")

    def log(self, values: dict, sequences: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, sequences)
        self.writer.flush()

    def finish(self, status: str, summary: dict) -> None:
        self.writer.add_text("summary", f"status: {status}\n\n```json\n{json.dumps(summary, indent=1)}\n```")
        self.writer.close()


class MLflowTracker:
    schema = MLflowSettings

    def __init__(self, settings: dict, name: str, cfg: dict, sequences: int):
        uri = str(settings["tracking_uri"])
        if "://" not in uri and not uri.startswith("sqlite:"):  # a local folder: MLflow's file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # kept by MLflow 3 in maintenance mode
            uri = Path(uri).resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(settings["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings["experiment"])
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags={"ihstudy.run": name}).info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg), "config.yaml")

    def log(self, values: dict, sequences: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("/", "."), value, now, sequences) for key, value in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, status: str, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_tag(self.run_id, "ihstudy.status", status)
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


class WandbTracker:
    schema = WandbSettings

    def __init__(self, settings: dict, name: str, cfg: dict, sequences: int):
        import wandb

        Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings["project"], name=name, dir=settings["dir"], mode=settings["mode"],
                              config=cfg, reinit="create_new", settings=wandb.Settings(console="off", silent=True))

    def log(self, values: dict, sequences: int) -> None:
        self.run.log(values | {"sequences": sequences}, step=sequences)

    def finish(self, status: str, summary: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in summary.items()} | {"status": status})
        self.run.finish(exit_code=0 if status == "completed" else 1)


class CSVTracker:
    """<dir>/<run>/metrics.csv (a row per eval point; appended, so a resumed run continues it),
    config.yaml and summary.json."""

    schema = FolderSettings

    def __init__(self, settings: dict, name: str, cfg: dict, sequences: int):
        self.dir = Path(settings["dir"]) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(cfg))
        self.path = self.dir / "metrics.csv"
        kept = []
        if sequences and self.path.exists():  # resumed: the rows from `sequences` on are redone
            with self.path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["sequences"]) < sequences]
        self.columns = list(kept[0]) if kept else None
        if kept:
            self.write(kept, "w")
        else:
            self.path.unlink(missing_ok=True)

    def log(self, values: dict, sequences: int) -> None:
        """Columns: those of the first row written plus train/* (empty at sequence 0, before any step),
        and any that a later row adds (an evaluator outside eval.dense, first measured after a resume)."""
        from ihstudy.training.recorder import STEP_COLUMNS  # (the recorder imports this module)

        new = self.columns is None
        if new:
            self.columns = ["sequences", *values, *(f"train/{c}" for c in STEP_COLUMNS if f"train/{c}" not in values)]
        elif added := [k for k in values if k not in self.columns]:
            with self.path.open(newline="") as f:
                earlier = list(csv.DictReader(f))
            self.columns += added
            self.write(earlier, "w")
        self.write([{"sequences": sequences} | values], "w" if new else "a", header=new)

    def write(self, rows: list[dict], mode: str, header: bool = True) -> None:
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            if header:
                writer.writeheader()
            writer.writerows(rows)

    def finish(self, status: str, summary: dict) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps({"status": status} | summary, indent=1) + "\n")


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker, "csv": CSVTracker}
