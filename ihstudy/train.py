"""Training: a pack of R runs with identical tensor shapes trains as one batched computation.

A single `ihstudy train` is a pack of one. Each run keeps its own seeds, data stream, clamps,
learning-rate schedule and optimizer state, so a run trains identically alone or in a pack.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from ihstudy.clamps import ClampSet, build_clamps
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.config import validate
from ihstudy.data import Batch, FewShotTask, TrainStream, load_features
from ihstudy.compiled import Compiled, use_compile
from ihstudy.fast_path import Tape, batch_spread, query_loss_and_gradients, train_step
from ihstudy.evaluate import PHASE_CHANGE_THRESHOLD, induction_strength, previous_token_score, query_metrics
from ihstudy.model import ModelShape, Transformer
from ihstudy.optim import StackedOptimizer, lr_schedule
from ihstudy.run_files import CHECKPOINT_FORMAT, RunFiles, now, versions

log = logging.getLogger(__name__)
STEP_COLUMNS = ("loss", "grad_norm", "grad_batch_stddev", "lr")
EVAL_CHUNK_SEQUENCES = 1000  # per eval forward pass, over all runs of a pack


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
    regular = range(0, n_steps * batch_size + 1, every)
    return {min(sequences_to_step(s, batch_size), n_steps) for s in [*regular, *extra]} | {n_steps}


class Pack:
    """Everything needed to train R runs together; `train()` runs the loop."""

    def __init__(self, specs: list[RunSpec], features_cache: dict | None = None):
        self.specs = specs
        cfg = specs[0].cfg
        self.device = resolve_device(cfg.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        cache = {} if features_cache is None else features_cache
        self.tasks = []
        for spec in specs:
            features = load_cached_features(spec.cfg.data, cache)
            validate(spec.cfg, *features.shape[:2])
            self.tasks.append(FewShotTask(spec.cfg.task, features))
        self.shape = model_shape(cfg, self.tasks[0].features.shape[-1])
        self.batch_size = cfg.train.batch_size
        self.n_steps = sequences_to_step(cfg.train.sequences, self.batch_size)
        self.model = Transformer(self.shape, len(specs), self.device).init_([s.cfg.seed for s in specs], cfg.model.init)
        self.optimizer = StackedOptimizer([s.cfg.optim for s in specs], self.model.flat, self.model.flat_grad)
        self.lrs = torch.stack([lr_schedule(s.cfg.optim, self.n_steps, self.batch_size) for s in specs], 1).to(self.device)
        self.streams = [TrainStream(t.sampler(), s.cfg.data_seed, self.batch_size) for t, s in zip(self.tasks, specs)]
        self.chunk_index, self.chunk_inputs = -1, None
        self.clamps = ClampSet([build_clamps(s.cfg.clamp, self.shape) for s in specs])
        self.evaluators = list(cfg.eval.evaluators)
        self.eval_batch = Batch.stack([
            _concat([t.eval_set(name, cfg.eval.n_sequences, s.cfg.eval_seed) for name in self.evaluators])
            for t, s in zip(self.tasks, specs)]).to(self.device)
        self.fast_step, self.clamped_logits, self.eval_chunk = train_step, self.clamps.query_logits, self.eval_chunk_plain
        self.eval_steps = schedule_steps(cfg.train.eval_every, cfg.train.eval_at, self.n_steps, self.batch_size)
        self.ckpt_steps = schedule_steps(cfg.train.ckpt_every, cfg.train.ckpt_at, self.n_steps, self.batch_size) - {0}
        self.active = torch.ones(len(specs), dtype=torch.bool, device=self.device)
        self.loss_weight = self.loss_weights()
        self.step_log = torch.zeros(self.n_steps, len(specs), len(STEP_COLUMNS), device=self.device)  # no per-step copy
        self.eval_columns: list[dict[str, list]] = [{} for _ in specs]  # columnar: cheap to write at every eval
        self.errors: list[str | None] = [None] * len(specs)
        self.step = 0

    @property
    def files(self) -> list[RunFiles]:
        return [RunFiles(s.run_dir) for s in self.specs]

    # --- the loop -----------------------------------------------------------------------------

    def train(self, progress=None) -> list[RunResult]:
        """Train to the end. A first SIGINT/SIGTERM stops at the next step boundary with a checkpoint
        (status interrupted, resumable); a failed write (e.g. a full disk) fails the runs cleanly."""
        if use_compile(self.specs[0].cfg.train.compile, self.n_steps, self.device):
            self.compile()
        try:
            with StopRequest() as stop:
                self.run_loop(stop, progress)
            if stop.signal is not None:
                self.checkpoint()  # between two steps the state is consistent
            return self.finish("completed" if stop.signal is None else "interrupted")
        except OSError as exc:  # atomic writes leave every earlier file intact
            self.fail_runs(self.active.clone(), f"cannot write run files ({exc.strerror or exc})")
            return self.finish()

    def compile(self) -> None:
        """Compile the step and evaluation functions this pack uses (compiled.py)."""
        if self.clamps.groups:
            self.clamped_logits, self.eval_chunk = Compiled(self.clamps.query_logits), Compiled(self.eval_chunk_plain)
        else:
            self.fast_step = Compiled(train_step, fullgraph=True)

    def run_loop(self, stop: "StopRequest", progress) -> None:
        for files, spec in zip(self.files, self.specs):
            files.write_config(spec.cfg)
            files.write_status(status="running", started=files.read_status().get("started", now()), ended=None,
                               versions=versions(), step=self.step)
        while self.step < self.n_steps and self.active.any() and stop.signal is None:
            if self.step in self.eval_steps:
                self.evaluate()
            self.train_step()
            if self.step in self.ckpt_steps:
                self.checkpoint()
            if progress is not None and (self.step % 100 == 0 or self.step == self.n_steps):
                progress(self.step * self.batch_size, self.step_log[self.step - 1, :, 0])
        if self.step == self.n_steps and self.step in self.eval_steps and stop.signal is None:
            self.evaluate()

    def train_step(self) -> None:
        batch = self.batch(self.step)
        lr, log = self.lrs[self.step], self.step_log[self.step]  # log: [R, len(STEP_COLUMNS)]
        if self.clamps.groups:
            all_finite = self.autograd_step(batch, lr, log)
        else:  # the same gradients without autograd's overhead (fast_path.py)
            all_finite = self.fast_step(self.model, self.model.flat, self.embedding_inputs(self.step), batch.target,
                                        self.loss_weight, lr, self.model.flat_grad, log)
        if not all_finite:
            self.fail_runs(~torch.isfinite(log[:, 0]) & self.active, "loss became NaN or infinite")
        self.optimizer.step(lr, self.active)
        self.step += 1

    def autograd_step(self, batch: Batch, lr: torch.Tensor, log: torch.Tensor) -> torch.Tensor:
        """fast_path.train_step's work through the clamps' hooks, with autograd."""
        self.model.flat_grad.zero_()
        logits = self.clamped_logits(self.model, batch)
        loss, logit_grads = query_loss_and_gradients(logits.detach(), batch.target)
        finite = torch.isfinite(loss)
        logits.backward(torch.where(finite[:, None, None], logit_grads * self.loss_weight, 0.0))
        torch.stack([loss, self.model.flat_grad.norm(dim=1), batch_spread(logit_grads), lr], 1, out=log)
        return finite.all()

    def batch(self, step: int) -> Batch:
        """Every run's batch of `step` [R, B, ...], stacked for a whole chunk of steps at once
        (per-step stacking and copying would cost more than the step's arithmetic)."""
        chunk, offset = divmod(step, self.streams[0].chunk_batches)
        if chunk != self.chunk_index:
            self.chunk = Batch.stack([stream.chunk(chunk) for stream in self.streams]).to(self.device)
            self.chunk_index, self.chunk_inputs = chunk, None
        return self.chunk[:, offset]

    def embedding_inputs(self, step: int) -> torch.Tensor:
        """model.embedding_inputs of batch(step), which the fast path reads, made for its whole chunk."""
        if self.chunk_inputs is None:
            self.chunk_inputs = self.model.embedding_inputs(self.chunk)
        return self.chunk_inputs[:, step % self.streams[0].chunk_batches]

    def evaluate(self) -> None:
        """Record the eval rows of the current step and write the tables."""
        for r, rows in enumerate(self.measure()):
            if self.errors[r] is None:
                for row in rows:
                    for column, value in row.items():
                        self.eval_columns[r].setdefault(column, []).append(value)
        self.flush()

    @torch.no_grad()
    def measure(self) -> list[list[dict]]:
        """Per run, one row per evaluator: the metrics and every head's scores at the current step
        (induction strength in every layer, previous-token score in every layer but the last, whose
        pattern is kept at the query row only)."""
        logits, patterns = self.eval_forward()
        n = self.eval_batch.target.shape[1] // len(self.evaluators)
        rows: list[list[dict]] = [[] for _ in self.specs]
        for e, name in enumerate(self.evaluators):
            part = slice(e * n, (e + 1) * n)
            sub = self.eval_batch[:, part]
            columns = {k: v.cpu() for k, v in query_metrics(logits[:, part], sub).items()}
            for layer, pattern in enumerate(patterns):
                for h, score in enumerate(induction_strength(pattern[:, part], sub).T):
                    columns[f"induction.L{layer}H{h}"] = score.cpu()
                if layer < len(patterns) - 1:
                    for h, score in enumerate(previous_token_score(pattern[:, part]).T):
                        columns[f"prev_token.L{layer}H{h}"] = score.cpu()
            for r, run_rows in enumerate(rows):
                run_rows.append({"step": self.step, "sequences": self.step * self.batch_size,
                                 "evaluator": name} | {k: float(v[r]) for k, v in columns.items()})
        return rows

    def eval_forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Query logits [R, N, L] on the eval sequences, and every layer's attention pattern [R, N, H, T, T]
        (the last layer's at the query row only, [R, N, H, 1, T]). In equal chunks that keep the
        activations in the CPU cache (and need one compiled graph)."""
        n = self.eval_batch.target.shape[1]
        size = max(d for d in range(1, n + 1) if n % d == 0 and d * len(self.specs) <= max(EVAL_CHUNK_SEQUENCES, len(self.specs)))
        parts = [slice(i, i + size) for i in range(0, n, size)]
        if self.clamps.groups:
            chunks = [self.eval_chunk(self.eval_batch[:, part]) for part in parts]
        else:
            chunks = [self.fast_eval_chunk(part) for part in parts]
        return torch.cat([c[0] for c in chunks], 1), [torch.cat(layer, 1) for layer in zip(*(c[1] for c in chunks))]

    @functools.cached_property
    def eval_inputs(self) -> torch.Tensor:
        """model.embedding_inputs of the eval sequences, for the fast path."""
        return self.model.embedding_inputs(self.eval_batch)

    def fast_eval_chunk(self, part: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """eval_forward on the eval sequences `part` of an unclamped pack, through the fast path."""
        tape = Tape(self.model, self.model.views(self.model.flat), self.eval_inputs[:, part])
        return tape.logits, tape.patterns()

    def eval_chunk_plain(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """eval_forward on the eval sequences `batch` of a clamped pack, through the clamps' hooks."""
        sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.shape.n_layers)]
        logits, cache = self.clamps.run_with_cache(self.model, batch, sites, query_only=True)
        return logits[:, :, -1], [cache[s] for s in sites]

    def restore(self) -> int:
        """Continue from the newest checkpoint that every run of the pack holds intact.

        Unreadable or corrupt checkpoints are reported and skipped. Metric rows after the checkpoint
        and eval rows at or after it are dropped: the loop redoes them exactly, so a resumed run
        writes the same tables as an uninterrupted one. Returns the step restored (0: start afresh).
        """
        common = set.intersection(*(set(f.checkpoint_steps()) for f in self.files))
        for step in sorted(common, reverse=True):
            try:
                states = [f.load_checkpoint(step) for f in self.files]
            except CheckpointError as exc:
                log.warning("%s; trying an older checkpoint", exc)
                continue
            for r, state in enumerate(states):
                self.load_state(r, step, state)
            self.step = step
            return step
        return 0

    def load_state(self, r: int, step: int, state: dict) -> None:
        """Run r's model, optimizer and logged rows as they were at checkpoint `step`."""
        files, cfg = self.files[r], OmegaConf.to_container(self.specs[r].cfg)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("config") != cfg:
            raise ConfigError(f"{files.dir} was started with another config ({config_difference(state.get('config'), cfg)}); "
                              "resume it with the overrides it was started with")
        try:
            self.model.load_state_dict(state["model"], r)
            self.optimizer.load_state(state["optimizer"], r)
            torch.set_rng_state(state["rng"]["torch"])  # the same global state in every run's checkpoint
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a checksum-valid file with foreign content
            raise CheckpointError(f"checkpoint {step} of {files.dir} does not fit this model: {exc}") from None
        metrics, evals = files.read_table("metrics"), files.read_table("eval")
        kept = None if metrics is None else metrics[metrics.step <= step]
        if kept is None or evals is None or kept.step.tolist() != list(range(1, step + 1)):
            raise ConfigError(f"run {files.dir} has a checkpoint at step {step} but lost its metrics")
        self.step_log[:step, r] = torch.tensor(kept[list(STEP_COLUMNS)].to_numpy())
        self.eval_columns[r] = evals[evals.step < step].to_dict("list")

    # --- outputs ------------------------------------------------------------------------------

    def metrics_table(self, r: int) -> pa.Table:
        steps = np.arange(1, self.step + 1)
        log = self.step_log[: self.step, r].cpu().numpy()
        return pa.table({"step": steps, "sequences": steps * self.batch_size} | {c: log[:, i] for i, c in enumerate(STEP_COLUMNS)})

    def flush(self, durable: bool = False) -> None:
        """Write every live run's tables: at each eval for anyone watching, durably at checkpoints."""
        for r in range(len(self.specs)):
            if self.errors[r] is None:
                self.write_tables(r, durable)

    def write_tables(self, r: int, durable: bool = True) -> None:
        self.files[r].write_metrics(self.metrics_table(r), durable)
        self.files[r].write_eval(pa.Table.from_pydict(self.eval_columns[r]), durable)

    def checkpoint(self) -> None:
        """Tables first: a checkpoint on disk always has its metric rows on disk."""
        self.flush(durable=True)
        for r, (files, spec) in enumerate(zip(self.files, self.specs)):
            if self.errors[r] is None:
                files.save_checkpoint(self.step, {
                    "sequences": self.step * self.batch_size,
                    "model": self.model.state_dict(r),
                    "optimizer": self.optimizer.state(r),
                    "rng": {"torch": torch.get_rng_state()},
                    "config": OmegaConf.to_container(spec.cfg),
                })

    def fail_runs(self, which: torch.Tensor, message: str) -> None:
        """Stop runs for good: keep their rows so far and their last checkpoint, mark them failed."""
        for r in which.nonzero().flatten().tolist():
            self.errors[r] = f"{message} at step {self.step + 1}"
            try:
                self.write_tables(r)
                self.files[r].write_status(status="failed", ended=now(), error=self.errors[r], step=self.step)
            except OSError as exc:  # e.g. the disk is still full: the message still reaches the user
                log.warning("%s: cannot record the failure (%s)", self.files[r].dir, exc.strerror or exc)
        self.active &= ~which
        self.loss_weight = self.loss_weights()

    def loss_weights(self) -> torch.Tensor:
        """[R, 1, 1]: the loss of a training step is every active run's mean loss over its batch."""
        return (self.active / self.batch_size).view(-1, 1, 1)

    def finish(self, status: str = "completed") -> list[RunResult]:
        results = []
        for r, (files, spec) in enumerate(zip(self.files, self.specs)):
            if self.errors[r] is not None:
                results.append(RunResult(spec.name, spec.run_dir, "failed", {"error": self.errors[r]}))
                continue
            summary = summarize(pd.DataFrame(self.eval_columns[r]))
            files.write_status(status=status, ended=now(), step=self.step, summary=summary)
            results.append(RunResult(spec.name, spec.run_dir, status, summary))
        return results


class StopRequest:
    """Within `with`, a first SIGINT (Ctrl-C) or SIGTERM (e.g. Slurm) only records a request to stop,
    which the loop honours between two steps; a second one acts as usual (KeyboardInterrupt / exit)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}
        return self

    def request(self, signum, frame) -> None:
        self.signal = signum
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self.restore_handlers()


def config_difference(saved, current: dict) -> str:
    """The dotted keys whose values differ between two config dicts, for a one-line message."""
    if not isinstance(saved, dict):
        return "no config saved"
    flat = [pd.json_normalize(c, sep=".").iloc[0].to_dict() for c in (saved, current)]
    keys = sorted(k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k, "?") != flat[1].get(k, "?"))
    return "differs in " + ", ".join(keys) if keys else "another checkpoint format"


def pack_from_checkpoint(run_dir: Path, step: int | None = None, clamp=None) -> Pack:
    """A pack of one holding a saved run at a checkpoint (default: the newest): its model, task,
    eval sequences and clamps, or another clamp config (for post-hoc ablations). Nothing is written."""
    files = RunFiles(run_dir)
    cfg = OmegaConf.load(files.dir / "config.yaml")
    if clamp is not None:
        cfg.clamp = clamp
    steps = files.checkpoint_steps()
    if not steps or (step is not None and step not in steps):
        raise ConfigError(f"{files.dir} has no checkpoint at step {step}" if steps else f"{files.dir} has no checkpoint")
    pack = Pack([RunSpec(cfg, files.dir)])
    pack.step = steps[-1] if step is None else step
    pack.model.load_state_dict(files.load_checkpoint(pack.step)["model"], 0)
    return pack


def evaluate_checkpoint(run_dir: Path, step: int | None = None, clamp=None) -> pd.DataFrame:
    """Eval rows of a saved checkpoint, through the same evaluation and clamp code as training."""
    return pd.DataFrame(pack_from_checkpoint(run_dir, step, clamp).measure()[0])


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


def load_cached_features(data_cfg, cache: dict) -> torch.Tensor:
    """The exemplar array a data config names, loaded once per distinct config into `cache`."""
    key = OmegaConf.to_yaml(data_cfg)
    if key not in cache:
        cache[key] = load_features(data_cfg)
    return cache[key]


def _concat(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("exemplars", "labels", "target")))
