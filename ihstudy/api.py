"""The Python API (docs/notebook.md): open runs and sweeps, restore models, run the CLI's analyses.

A thin facade over the code the CLI runs: run_files for the folders, training.train for restoring
a checkpoint (pack_from_checkpoint) and for training, analysis.* for the analyses. Errors are the
CLI's (ihstudy.errors.UserError and its kinds), raised instead of printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import ConfigError
from ihstudy.run_files import RunFiles
from ihstudy.tasks.fsl import Batch

__all__ = ["Model", "Run", "Sweep", "load_run", "load_sweep", "train"]


def load_run(path) -> Run:
    """A run folder (written by `ihstudy train`, or a run folder of a sweep)."""
    return Run(path)


def load_sweep(path) -> Sweep:
    """A sweep folder (written by `ihstudy sweep`)."""
    return Sweep(path)


def train(cfg_or_overrides: DictConfig | dict | Sequence[str] = (), run_dir=None) -> Run:
    """Train one run, as `ihstudy train` does, and return it. Takes Hydra overrides
    (["model.n_heads=4", "clamp=layer1"]) or a whole run config (e.g. `load_run(...).config`); the run
    folder is `run_dir`, else hydra.run.dir of the overrides, else a new timestamped folder."""
    from ihstudy.config import check_values, compose_config
    from ihstudy.run_files import claim_run_dir
    from ihstudy.training.trackers import check_trackers
    from ihstudy.training.train import Pack, RunSpec

    if isinstance(cfg_or_overrides, (DictConfig, dict)):
        cfg, default_dir = OmegaConf.create(cfg_or_overrides), compose_config([])[1]
        check_values(cfg)
        check_trackers(cfg)
    else:
        cfg, default_dir = compose_config(list(cfg_or_overrides), single_run=True)
    pack = Pack([RunSpec(cfg, Path(run_dir or default_dir), "")])  # validates everything before a file is written
    folder, lock = claim_run_dir(pack.specs[0].run_dir, rename_on_collision=run_dir is None)
    try:
        pack.specs[0].run_dir = folder
        [result] = pack.train()
    finally:
        lock.release()
    return Run(result.run_dir)


def clamp_config(overrides: Sequence[str]):
    """The clamp config of clamp overrides (["clamp=keep_only", "clamp.keep.heads=[1:3]"]), as
    `ihstudy analyze eval RUN clamp=...` takes them; None for no overrides (the run's own clamps)."""
    from ihstudy.config import compose_config

    overrides = list(overrides)
    if any(not o.lstrip("+~").startswith("clamp") for o in overrides):
        raise ConfigError("analyze takes only clamp overrides (clamp=..., clamp.NAME.FIELD=...)")
    return compose_config(overrides)[0].clamp if overrides else None


class Run:
    """One run folder: its config, tables, status and checkpoints; its model at any checkpoint; its
    task's eval sets and sampler; the CLI's analyses of it."""

    def __init__(self, path):
        from ihstudy.analysis.timing import is_run_dir

        self.dir = Path(path).absolute()  # a notebook may change its working folder later
        self.files = RunFiles(self.dir)
        if not is_run_dir(self.dir):
            raise ConfigError(f"{self.dir} is not a run folder (it needs run.json and config.yaml)")

    def __repr__(self) -> str:
        return f"Run('{self.dir}', status={self.status}, checkpoints={self.checkpoints})"

    # --- what the folder holds ------------------------------------------------------------------

    @cached_property
    def config(self) -> DictConfig:
        """The run's config (config.yaml)."""
        return self.files.read_config()

    @property
    def info(self) -> dict:
        """run.json: status, start and end times, versions, the final summary."""
        return self.files.read_status()

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def summary(self) -> dict:
        """Final loss and accuracy per evaluator and the phase change (run.json's summary)."""
        return self.info.get("summary", {})

    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.parquet: one row per optimizer step (loss, grad_norm, grad_batch_stddev, lr)."""
        return self._table("metrics")

    @property
    def evals(self) -> pd.DataFrame:
        """eval.parquet: one row per eval point and evaluator (metrics and per-head scores)."""
        return self._table("eval")

    def _table(self, name: str) -> pd.DataFrame:
        table = self.files.read_table(name)
        return pd.DataFrame() if table is None else table

    @property
    def phase_change(self) -> int | None:
        """Sequences at the first eval with fsl_train loss < 0.4 ln 2 (None: not reached)."""
        from ihstudy.training.recorder import phase_change_sequences

        return phase_change_sequences(self.evals) if not self.evals.empty else None

    @property
    def checkpoints(self) -> list[int]:
        """The steps (optimizer updates) that have a checkpoint; sequences = step * batch size."""
        return self.files.checkpoint_steps()

    # --- the model and the task -----------------------------------------------------------------

    def model(self, step: int | None = None, clamp: Sequence[str] = ()) -> Model:
        """The model at checkpoint `step` (default: the newest) with the run's clamps, or with
        `clamp` overrides in their place (a post-hoc ablation)."""
        from ihstudy.analysis.circuits import loading_errors
        from ihstudy.training.train import pack_from_checkpoint

        with loading_errors(self.dir):
            return Model(pack_from_checkpoint(self.dir, step, clamp_config(clamp)))

    @cached_property
    def task(self):
        """The run's task family (tasks.base.TaskFamily; fsl's FewShotTask has the splits and samplers)."""
        from ihstudy.tasks.base import task_family
        from ihstudy.tasks.fsl import load_features

        return task_family(self.config.task).from_config(self.config, load_features)

    def eval_sets(self) -> dict[str, Batch]:
        """Every evaluator's fixed sequences, as training evaluates them."""
        n, seed = self.config.eval.n_sequences, self.config.eval_seed
        return {name: self.task.eval_set(name, n, seed) for name in self.config.eval.evaluators}

    def sample(self, n: int, seed: int = 0, **splits: str) -> Batch:
        """`n` fresh sequences from the task's training distribution; a few-shot run also takes its
        splits (classes=, exemplars=, pairs= train|val|test)."""
        generator = torch.Generator().manual_seed(seed)
        if splits:
            if not hasattr(self.task, "sampler"):
                raise ConfigError(f"{type(self.task).__name__} has no splits to choose from")
            return self.task.sampler(**splits).sample(n, generator)
        return self.task.sample(n, generator)

    def training_batch(self, step: int) -> Batch:
        """The batch the run trained on at `step` (0-based), exactly (the stream is counter-based)."""
        from ihstudy.tasks.base import TrainStream

        t = self.config.train
        return TrainStream(self.task, self.config.data_seed, t.batch_size, t.chunk_batches).batch(step)

    # --- the CLI's analyses ---------------------------------------------------------------------

    def evaluate(self, step: int | None = None, clamp: Sequence[str] = ()) -> pd.DataFrame:
        """`ihstudy analyze eval RUN [clamp overrides] --step N`: eval rows of a checkpoint."""
        return self.model(step, clamp).evaluate()

    def timing(self, thresholds: dict[str, float] | None = None, band: float | None = None) -> pd.DataFrame:
        """`ihstudy analyze RUN`: per evaluator, the sequences to each loss threshold, plateau, steepest descent."""
        from ihstudy.analysis import report, timing

        run = timing.load_run(self.dir, self.dir.name)
        family, evaluator, limits, metric = timing.timed(run)
        return report.timing_report([run], None, evaluator, metric, thresholds or limits, band, family.timed_column,
                                    family.curves)[1]

    def heads(self, step: int | None = None, sequences: int = 100_000) -> dict[str, pd.DataFrame]:
        """`ihstudy analyze heads RUN`: head ablations, add-back, complementarity, layer-1 roles."""
        return self._checkpoint_tables("heads", step, sequences)

    def wiring(self, step: int | None = None, sequences: int = 100_000) -> dict[str, pd.DataFrame]:
        """`ihstudy analyze wiring RUN`: the single-head wiring grid and Q/K/V composition scores."""
        return self._checkpoint_tables("wiring", step, sequences)

    def progress(self) -> pd.DataFrame:
        """`ihstudy analyze progress RUN`: progress measures over every checkpoint."""
        from ihstudy.analysis import circuits, report

        return report.progress_report(circuits.Subject(self.dir), lambda done, total: None)[1]["progress"]

    def _checkpoint_tables(self, what: str, step: int | None, sequences: int) -> dict[str, pd.DataFrame]:
        from ihstudy.analysis import circuits, report

        subject = circuits.Subject(self.dir, step)
        batch, enumerated = circuits.training_distribution(subject.task, sequences)
        return (report.heads_report if what == "heads" else report.wiring_report)(subject, batch, enumerated)[1]


class Model:
    """A run's model at one checkpoint with its clamps, TransformerLens-style. Every tensor has the
    run axis (size 1) first, as the site table of ihstudy/model/transformer.py lists them; a Batch
    without it gets it. `clamped=False` runs the bare model."""

    def __init__(self, runs):
        self.runs = runs  # training.train.Runs: the model, clamps, task and eval sets of this checkpoint
        self.transformer, self.clamps, self.step = runs.model, runs.clamps, runs.step

    def __repr__(self) -> str:
        return f"Model(step={self.step}, {self.transformer.shape}, clamps={len(self.clamps.groups)})"

    @property
    def site_names(self) -> list[str]:
        return self.transformer.site_names()

    def __call__(self, batch: Batch, clamped: bool = True) -> torch.Tensor:
        return self.run_with_hooks(batch, (), clamped)

    def run_with_hooks(self, batch: Batch, fwd_hooks=(), clamped: bool = True) -> torch.Tensor:
        """Logits [1, B, T, n_labels]; fwd_hooks: (site name, fn(tensor, hook) -> tensor | None),
        run after the clamps' hooks (they see clamped activations)."""
        batch = with_run_axis(batch)
        with torch.no_grad():
            return self.transformer.run_with_hooks(batch, self.clamp_hooks(batch, clamped) + list(fwd_hooks))

    def run_with_cache(self, batch: Batch, names_filter=None, fwd_hooks=(), clamped: bool = True):
        """(logits, {site name: activation}) for every always-on site, or those names_filter names
        (a name, a list or a predicate; opt-in sites such as attn.hook_result only when named)."""
        batch = with_run_axis(batch)
        with torch.no_grad():
            return self.transformer.run_with_cache(batch, names_filter, self.clamp_hooks(batch, clamped) + list(fwd_hooks))

    def clamp_hooks(self, batch: Batch, clamped: bool) -> list:
        return self.clamps.hooks(self.transformer, batch) if clamped and self.clamps.groups else []

    def evaluate(self) -> pd.DataFrame:
        """The eval rows of this checkpoint (what eval.parquet holds at its step)."""
        return pd.DataFrame(self.runs.measure()[0])


def with_run_axis(batch: Batch) -> Batch:
    """A batch of one run's sequences [B, ...] as [1, B, ...] (a batch with the run axis is kept)."""
    if batch.exemplars.dim() == 4:
        return batch
    return Batch(batch.exemplars.unsqueeze(0), batch.labels.unsqueeze(0), batch.target.unsqueeze(0))


class Sweep:
    """A sweep folder: its index (sweep.parquet), its runs, and the timing analysis over them."""

    def __init__(self, path):
        from ihstudy.run_files import SWEEP_INDEX

        self.dir = Path(path).absolute()  # a notebook may change its working folder later
        if not (self.dir / SWEEP_INDEX).is_file():
            raise ConfigError(f"{self.dir} is not a sweep folder (no {SWEEP_INDEX})")
        self.index = pd.read_parquet(self.dir / SWEEP_INDEX)  # one row per run: overrides, status, phase change, final losses

    def __repr__(self) -> str:
        return f"Sweep('{self.dir}', {len(self.index)} runs)"

    @cached_property
    def runs(self) -> dict[str, Run]:
        return {name: Run(self.dir / name) for name in self.index.run}

    def __getitem__(self, name: str) -> Run:
        return self.runs[name]

    @property
    def evals(self) -> pd.DataFrame:
        """Every run's eval rows, with a `run` column."""
        return pd.concat([run.evals.assign(run=name) for name, run in self.runs.items()], ignore_index=True)

    def timing(self, by: str | Sequence[str] | None = None, evaluator: str = "", metric: str = "",
               thresholds: dict[str, float] | None = None, band: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """`ihstudy analyze SWEEP --by ...`: (per-run timing table, summary by group); evaluator and metric
        default to the task family's (fsl: fsl_train and 0.4ln2)."""
        from ihstudy.analysis import report, timing

        runs = timing.find_runs([self.dir])
        family, evaluator, limits, metric = timing.timed(runs[0], evaluator, "", metric)
        return report.timing_report(runs, by, evaluator, metric, thresholds or limits, band, family.timed_column,
                                    family.curves)[1:]
