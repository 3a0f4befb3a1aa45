"""Training: a pack of R runs with identical tensor shapes trains as one batched computation.

A single `ihstudy train` is a pack of one. Each run keeps its own seeds, data stream, clamps,
learning-rate schedule and optimizer state, so a run trains identically alone or in a pack.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ihstudy.clamps import ClampSet, build_clamps
from ihstudy.errors import ConfigError
from ihstudy.config import validate
from ihstudy.data import Batch, FewShotTask, TrainStream, load_features
from ihstudy.evaluate import PHASE_CHANGE_THRESHOLD, induction_strength, previous_token_score, query_metrics
from ihstudy.model import ModelShape, Transformer, log_softmax, query_loss
from ihstudy.optim import StackedOptimizer, lr_schedule
from ihstudy.run_files import RunFiles, now, versions

log = logging.getLogger(__name__)
STEP_COLUMNS = ("loss", "grad_norm", "grad_batch_stddev", "lr")


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


def model_shape(cfg: DictConfig, n_features: int) -> ModelShape:
    m = cfg.model
    return ModelShape(n_layers=m.n_layers, n_heads=m.n_heads, d_model=m.d_model, n_features=n_features,
                      n_labels=cfg.task.n_labels, context_len=cfg.task.context_len, positional=m.positional,
                      rotary_base=float(m.rotary_base), mlp_ratio=float(m.mlp_ratio))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sequences_to_step(sequences: int, batch_size: int) -> int:
    return math.ceil(sequences / batch_size)


def schedule_steps(every: int, extra, n_steps: int, batch_size: int) -> set[int]:
    """Steps (updates done) at which an every-N-sequences schedule plus explicit points fire."""
    steps = set(range(0, n_steps + 1, max(1, sequences_to_step(every, batch_size))))
    return steps | {sequences_to_step(s, batch_size) for s in extra} | {n_steps}


class Pack:
    """Everything needed to train R runs together; `train()` runs the loop."""

    def __init__(self, specs: list[RunSpec], features_cache: dict | None = None):
        self.specs = specs
        cfg = specs[0].cfg
        self.device = resolve_device(cfg.device)
        cache = {} if features_cache is None else features_cache
        self.tasks = []
        for spec in specs:
            features = _features(spec.cfg.data, cache)
            validate(spec.cfg, *features.shape[:2])
            self.tasks.append(FewShotTask(spec.cfg.task, features))
        self.shape = model_shape(cfg, self.tasks[0].features.shape[-1])
        self.batch_size = cfg.train.batch_size
        self.n_steps = sequences_to_step(cfg.train.sequences, self.batch_size)
        self.model = Transformer(self.shape, len(specs), self.device).init_([s.cfg.seed for s in specs])
        self.optimizer = StackedOptimizer([s.cfg.optim for s in specs], self.model.flat, self.model.flat_grad)
        self.lrs = torch.stack([lr_schedule(s.cfg.optim, self.n_steps, self.batch_size) for s in specs], 1).to(self.device)
        self.streams = [TrainStream(t.sampler(), s.cfg.data_seed, self.batch_size) for t, s in zip(self.tasks, specs)]
        self.clamps = ClampSet([build_clamps(s.cfg.clamp, self.shape) for s in specs])
        self.evaluators = list(cfg.eval.evaluators)
        self.eval_batch = Batch.stack([
            _concat([t.eval_set(name, cfg.eval.n_sequences, s.cfg.eval_seed) for name in self.evaluators])
            for t, s in zip(self.tasks, specs)]).to(self.device)
        self.eval_steps = schedule_steps(cfg.train.eval_every, cfg.train.eval_at, self.n_steps, self.batch_size)
        self.ckpt_steps = schedule_steps(cfg.train.ckpt_every, cfg.train.ckpt_at, self.n_steps, self.batch_size) - {0}
        self.files = [RunFiles(s.run_dir) for s in specs]
        self.active = torch.ones(len(specs), dtype=torch.bool, device=self.device)
        self.step_log = torch.zeros(self.n_steps, len(specs), len(STEP_COLUMNS))
        self.eval_rows: list[list[dict]] = [[] for _ in specs]
        self.errors: list[str | None] = [None] * len(specs)
        self.step = 0

    # --- the loop -----------------------------------------------------------------------------

    def train(self, progress=None) -> list[RunResult]:
        for files, spec in zip(self.files, self.specs):
            files.write_config(spec.cfg)
            files.write_status(status="running", started=files.read_status().get("started", now()), ended=None,
                               versions=versions(), step=self.step)
        while self.step < self.n_steps and self.active.any():
            if self.step in self.eval_steps:
                self.evaluate()
            self.train_step()
            if self.step in self.ckpt_steps:
                self.checkpoint()
            if progress is not None and (self.step % 100 == 0 or self.step == self.n_steps):
                progress(self.step * self.batch_size, self.step_log[self.step - 1, :, 0])
        if self.step == self.n_steps and self.step in self.eval_steps:
            self.evaluate()
        return self.finish()

    def train_step(self) -> None:
        batch = self.batch(self.step)
        self.model.flat_grad.zero_()
        logits = self.clamps.forward(self.model, batch)
        loss = query_loss(logits, batch.target).mean(1)  # [R]
        finite = torch.isfinite(loss)
        if not finite[self.active].all():
            self.fail_runs(~finite & self.active, "loss became NaN or infinite")
        torch.where(self.active, loss, 0.0).sum().backward()
        lr = self.lrs[self.step]
        self.optimizer.step(lr, self.active)
        with torch.no_grad():
            self.step_log[self.step] = torch.stack(
                [loss, self.model.flat_grad.norm(dim=1), output_gradient_spread(logits, batch.target), lr], 1).cpu()
        self.step += 1

    def batch(self, step: int) -> Batch:
        return Batch.stack([stream.batch(step) for stream in self.streams]).to(self.device)

    @torch.no_grad()
    def evaluate(self) -> None:
        """Metrics of every evaluator for every run, and the head scores, at the current step."""
        patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.shape.n_layers)]
        logits, cache = self.clamps.run_with_cache(self.model, self.eval_batch, patterns)
        n = self.eval_batch.target.shape[1] // len(self.evaluators)
        for e, name in enumerate(self.evaluators):
            part = slice(e * n, (e + 1) * n)
            sub = self.eval_batch[:, part]
            columns = {k: v.cpu() for k, v in query_metrics(logits[:, part], sub).items()}
            for layer, site in enumerate(patterns):
                pattern = cache[site][:, part]
                for h, (ind, prev) in enumerate(zip(induction_strength(pattern, sub).T, previous_token_score(pattern).T)):
                    columns[f"induction.L{layer}H{h}"] = ind.cpu()
                    columns[f"prev_token.L{layer}H{h}"] = prev.cpu()
            for r in range(len(self.specs)):
                if self.errors[r] is None:
                    self.eval_rows[r].append({"step": self.step, "sequences": self.step * self.batch_size,
                                              "evaluator": name} | {k: float(v[r]) for k, v in columns.items()})
        self.flush()

    def restore(self) -> int:
        """Continue from the newest checkpoint that every run of the pack holds intact.

        Rows logged after that checkpoint are dropped: the run redoes those steps exactly.
        Returns the step restored (0: nothing to restore, the runs start afresh).
        """
        common = set.intersection(*(set(f.checkpoint_steps()) for f in self.files))
        for step in sorted(common, reverse=True):
            try:
                states = [f.load_checkpoint(step) for f in self.files]
            except ConfigError as exc:
                log.warning("%s; trying an older checkpoint", exc)
                continue
            for r, (state, files) in enumerate(zip(states, self.files)):
                self.model.load_state_dict(state["model"], r)
                self.optimizer.load_state(state["optimizer"], r)
                metrics, evals = files.read_table("metrics"), files.read_table("eval")
                if metrics is None or evals is None or len(metrics) < step:
                    raise ConfigError(f"run {files.dir} has a checkpoint at step {step} but lost its metrics")
                kept = metrics[metrics.step <= step]
                self.step_log[:step, r] = torch.tensor(kept[list(STEP_COLUMNS)].to_numpy())
                self.eval_rows[r] = evals[evals.step <= step].to_dict("records")
            torch.set_rng_state(states[0]["rng"]["torch"])
            self.step = step
            return step
        return 0

    # --- outputs ------------------------------------------------------------------------------

    def metrics_frame(self, r: int) -> pd.DataFrame:
        steps = np.arange(1, self.step + 1)
        frame = pd.DataFrame({"step": steps, "sequences": steps * self.batch_size})
        for c, column in enumerate(STEP_COLUMNS):
            frame[column] = self.step_log[: self.step, r, c].numpy()
        return frame

    def flush(self) -> None:
        for r, files in enumerate(self.files):
            if self.errors[r] is None:
                files.write_metrics(self.metrics_frame(r))
                files.write_eval(pd.DataFrame(self.eval_rows[r]))

    def checkpoint(self) -> None:
        for r, (files, spec) in enumerate(zip(self.files, self.specs)):
            if self.errors[r] is None:
                files.save_checkpoint(self.step, {
                    "sequences": self.step * self.batch_size,
                    "model": self.model.state_dict(r),
                    "optimizer": self.optimizer.state(r),
                    "rng": {"torch": torch.get_rng_state()},
                    "config": OmegaConf.to_container(spec.cfg),
                })
        self.flush()

    def fail_runs(self, which: torch.Tensor, message: str) -> None:
        for r in which.nonzero().flatten().tolist():
            self.errors[r] = f"{message} at step {self.step + 1}"
            self.files[r].write_status(status="failed", ended=now(), error=self.errors[r], step=self.step)
        self.active &= ~which

    def finish(self) -> list[RunResult]:
        results = []
        for r, (files, spec) in enumerate(zip(self.files, self.specs)):
            if self.errors[r] is not None:
                results.append(RunResult(spec.name, spec.run_dir, "failed", {"error": self.errors[r]}))
                continue
            summary = summarize(pd.DataFrame(self.eval_rows[r]))
            files.write_status(status="completed", ended=now(), step=self.step, summary=summary)
            results.append(RunResult(spec.name, spec.run_dir, "completed", summary))
        return results


def output_gradient_spread(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per run [R]: root-mean-square deviation, across the batch, of each sequence's loss gradient
    with respect to the query logits (softmax - one-hot) from the batch mean: gradient noise."""
    query = logits.detach()[..., -1, :]
    per_sequence = log_softmax(query).exp() - torch.nn.functional.one_hot(target, query.shape[-1])
    deviation = per_sequence - per_sequence.mean(1, keepdim=True)
    return deviation.pow(2).sum(-1).mean(1).sqrt()


def phase_change_sequences(eval_frame: pd.DataFrame, threshold: float = PHASE_CHANGE_THRESHOLD) -> float | None:
    """First eval point (sequences) at which the fsl_train loss is below the threshold (0.4 ln 2)."""
    train = eval_frame[eval_frame.evaluator == "fsl_train"]
    below = train[train["loss"] < threshold]
    return int(below.sequences.iloc[0]) if len(below) else None


def summarize(eval_frame: pd.DataFrame) -> dict:
    if eval_frame.empty:
        return {}
    last = eval_frame[eval_frame.step == eval_frame.step.max()]
    summary = {"phase_change_sequences": phase_change_sequences(eval_frame) if "fsl_train" in set(eval_frame.evaluator) else None}
    for _, row in last.iterrows():
        summary[f"{row.evaluator}.loss"] = float(row["loss"])
        summary[f"{row.evaluator}.acc"] = float(row["acc"])
    return summary


def _features(data_cfg, cache: dict) -> torch.Tensor:
    key = OmegaConf.to_yaml(data_cfg)
    if key not in cache:
        cache[key] = load_features(data_cfg)
    return cache[key]


def _concat(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("exemplars", "labels", "target")))
