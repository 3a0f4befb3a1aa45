"""Training: a pack of R runs with identical tensor shapes trains as one batched computation.

A single `ihstudy train` is a pack of one. Each run keeps its own seeds, data stream, clamps,
learning-rate schedule and optimizer state, so a run trains identically alone or in a pack.

The loop (`Pack`) is thin; its pieces work alone:
  Runs                    tasks, model, clamps, compute path and evaluator of R runs: all that
                          evaluating a checkpoint needs (pack_from_checkpoint), no optimizer or data
  steps.choose_path       fast path or hooked autograd, chosen once (compiled or not: compile())
  evaluate.Evaluator      the eval sets and measure(): metrics and head scores
  recorder.RunRecorder    tables, checkpoints, status, failures
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from ihstudy.config import check_values, config_errors, validate, with_later_defaults
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.model.clamps import ClampSet, build_clamps
from ihstudy.model.transformer import ModelShape, Transformer, check_checkpoint_model
from ihstudy.run_files import RunFiles, first_line
from ihstudy.tasks.base import PackStream, TaskFamily, TrainStream, task_family
from ihstudy.tasks.fsl import load_features
from ihstudy.training.allocator import keep_freed_memory
from ihstudy.training.compiled import use_compile
from ihstudy.training.evaluate import Evaluator
from ihstudy.training.memory import check_fits
from ihstudy.training.optim import StackedOptimizer, lr_schedule
from ihstudy.training.pack_settings import shared_settings
from ihstudy.training.recorder import (  # noqa: F401 (public here)
    ENVIRONMENT,
    NUMERICAL,
    RunRecorder,
    RunResult,
    RunSpec,
    phase_change_sequences,
    summarize,
)
from ihstudy.training.steps import choose_path

log = logging.getLogger(__name__)


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


def eval_plan(train, ev, n_steps: int) -> dict[int, list[str]]:
    """Step -> the evaluators measured there (train and eval: a pack's shared config groups). Every
    evaluator at the train.eval_every and train.eval_at points and at the end; with eval.dense set,
    only those there, and all of them every eval.sparse_every sequences (and at the end)."""
    dense = schedule_steps(train.eval_every, train.eval_at, n_steps, train.batch_size)
    if ev.dense is None:
        return {step: list(ev.evaluators) for step in sorted(dense)}
    sparse = schedule_steps(ev.sparse_every, [], n_steps, train.batch_size)
    plan = {step: [e for e in ev.evaluators if step in sparse or e in ev.dense] for step in sorted(dense | sparse)}
    return {step: names for step, names in plan.items() if names}


class Runs:
    """R runs' tasks, model (at `step`), clamps, compute path and eval sets, without optimizer or data
    stream: what evaluating and analysing a checkpoint needs."""

    def __init__(self, specs: list[RunSpec], features_cache: dict | None = None):
        self.specs = specs
        cache = {} if features_cache is None else features_cache
        exemplar_shapes = [input_shape(spec.cfg, cache) for spec in specs]
        for spec, shape in zip(specs, exemplar_shapes):
            validate(spec.cfg, *shape[:2])
        self.settings = shared = shared_settings([spec.cfg for spec in specs])
        if len({shape[2] for shape in exemplar_shapes}) > 1:
            raise ConfigError("runs packed together must share the exemplar dimension (data.dim or the feature file's)")
        self.device = resolve_device(shared.device)
        keep_freed_memory()  # a step's freed tensors stay mapped for the next (allocator.py)
        if shared.train.threads:
            torch.set_num_threads(shared.train.threads)
        check_fits([spec.cfg for spec in specs], exemplar_shapes, self.device)  # before anything large is made

        def data(data_cfg):
            return load_cached_features(data_cfg, cache)

        self.tasks: list[TaskFamily] = [task_family(spec.cfg.task).from_config(spec.cfg, data) for spec in specs]
        self.shape = ModelShape.of_config(shared, exemplar_shapes[0][2])
        self.batch_size = shared.train.batch_size
        self.model = Transformer(self.shape, len(specs), self.device).init_([s.cfg.seed for s in specs], shared.model.init)
        self.clamps = ClampSet([build_clamps(s.cfg.clamp, self.shape, task) for s, task in zip(specs, self.tasks)])
        self.path = choose_path(self.model, self.clamps, self.tasks[0].loss_at_every_position)
        self.evaluator = Evaluator(self.tasks, [s.cfg for s in specs], self.device, self.shape.n_tokens)
        self.step = 0

    @property
    def eval_batch(self):
        """Every evaluator's sequences, concatenated: [R, n_evaluators * eval.n_sequences, ...]."""
        return self.evaluator.batch

    @property
    def evaluators(self) -> list[str]:
        return self.evaluator.names

    def measure(self, names: list[str] | None = None) -> list[list[dict]]:
        """Per run, one eval row per evaluator of `names` (default: all) at the current step (evaluate.Evaluator.measure)."""
        return self.evaluator.measure(self.path.eval_forward, self.step, self.batch_size, names)


class Pack(Runs):
    """R runs training together: Runs plus optimizer, data stream and recorder; `train()` is the loop."""

    def __init__(self, specs: list[RunSpec], features_cache: dict | None = None):
        super().__init__(specs, features_cache)
        train = self.settings.train
        self.n_steps = sequences_to_step(train.sequences, self.batch_size)
        self.optimizer = StackedOptimizer([s.cfg.optim for s in specs], self.model.flat, self.model.flat_grad)
        self.lrs = torch.stack([lr_schedule(s.cfg.optim, self.n_steps, self.batch_size) for s in specs], 1).to(self.device)
        self.stream = PackStream([TrainStream(task, s.cfg.data_seed, self.batch_size, train.chunk_batches)
                                  for task, s in zip(self.tasks, specs)], self.device)
        self.eval_plan = eval_plan(train, self.settings.eval, self.n_steps)  # step -> evaluators measured
        self.ckpt_steps = schedule_steps(train.ckpt_every, train.ckpt_at, self.n_steps, self.batch_size) - {0}
        self.active = torch.ones(len(specs), dtype=torch.bool, device=self.device)
        self.loss_weight = self.loss_weights()
        self.recorder = RunRecorder(specs, self.n_steps, self.batch_size, self.device)

    # --- the loop -----------------------------------------------------------------------------

    def train(self, progress=None) -> list[RunResult]:
        """Train to the end. A first SIGINT/SIGTERM stops at the next step boundary with a checkpoint
        (status interrupted, resumable); a failed write (e.g. a full disk) fails the runs cleanly."""
        if use_compile(self.settings.train.compile, self.n_steps, self.device):
            self.compile()
        try:
            with StopRequest() as stop:
                self.run_loop(stop, progress)
            if stop.signal is not None:
                self.checkpoint()  # between two steps the state is consistent
            return self.recorder.finish("completed" if stop.signal is None else "interrupted", self.step)
        except Exception as exc:  # a failed write (atomic: earlier files stay intact) or anything unexpected
            return self.fail_with(exc)

    def fail_with(self, exc: Exception) -> list[RunResult]:
        """Fail every live run with the error that stopped the pack, in one line (a failed write,
        e.g. a full disk, or anything unexpected): rows so far and checkpoints stay, resumable."""
        if isinstance(exc, OSError):
            message = f"cannot write run files ({exc.strerror or exc})"
        else:
            message = f"stopped by {type(exc).__name__}: {first_line(exc)}"
        self.fail_runs(self.active.clone(), message, write_rows=self.step > 0)  # at 0: not restored yet
        return self.recorder.finish("completed", self.step)

    def compile(self) -> None:
        """Compile the step and evaluation functions of this pack's path (compiled.py), chosen again
        for a compiled step (steps.choose_path)."""
        self.path = choose_path(self.model, self.clamps, self.path.every_position, compiled=True)
        self.path.compile()

    def run_loop(self, stop: StopRequest, progress) -> None:
        self.recorder.start(self.step)
        while self.step < self.n_steps and self.active.any() and stop.signal is None:
            if self.step in self.eval_plan:
                self.evaluate()
            self.train_step()
            if self.step in self.ckpt_steps:
                self.checkpoint()
            if progress is not None and (self.step % 100 == 0 or self.step == self.n_steps):
                progress(self.step * self.batch_size, self.recorder.step_log[self.step - 1, :, 0])
        if self.step == self.n_steps and self.step in self.eval_plan and stop.signal is None:
            self.evaluate()

    def train_step(self) -> None:
        lr, log_row = self.lrs[self.step], self.recorder.step_log[self.step]  # log_row: [R, len(STEP_COLUMNS)]
        if not self.path.step(self.stream, self.step, self.loss_weight, lr, log_row):
            self.fail_runs(~torch.isfinite(log_row[:, 0]) & self.active, "loss became NaN or infinite", failure=NUMERICAL)
        self.optimizer.step(lr, self.active)
        self.step += 1

    def evaluate(self) -> None:
        """Record the eval rows of the current step (the evaluators its plan names; off the plan: all) and write the tables."""
        self.recorder.add_evals(self.measure(self.eval_plan.get(self.step)), self.step)

    def checkpoint(self) -> None:
        self.recorder.checkpoint(self.step, lambda r: {"model": self.model.state_dict(r),
                                                       "optimizer": self.optimizer.state(r),
                                                       "rng": {"torch": torch.get_rng_state()}})

    def fail_runs(self, which: torch.Tensor, message: str, write_rows: bool = True, failure: str = ENVIRONMENT) -> None:
        """Stop runs (the recorder keeps their rows and last checkpoint and marks them failed, with
        `failure` saying why: recorder.NUMERICAL or ENVIRONMENT); without `write_rows` the tables
        on disk stay as they are."""
        self.recorder.fail(which.nonzero().flatten().tolist(), message, self.step, write_rows, failure)
        self.active &= ~which
        self.loss_weight = self.loss_weights()

    def loss_weights(self) -> torch.Tensor:
        """[R, 1, 1]: the loss of a training step is every active run's mean loss over its batch."""
        return (self.active / self.batch_size).view(-1, 1, 1)

    # --- resuming -----------------------------------------------------------------------------

    def restore(self) -> int:
        """Continue from the newest checkpoint that every run of the pack holds intact.

        Unreadable or corrupt checkpoints are reported and skipped; one written for another config
        is refused. Rows logged after the checkpoint are redone exactly by the loop, so a resumed run
        writes the same tables as an uninterrupted one. Returns the step restored (0: start afresh).
        """
        for step in self.recorder.checkpoint_steps():
            try:
                states = [files.load_checkpoint(step) for files in self.recorder.files]
            except CheckpointError as exc:
                log.warning("%s; trying an older checkpoint", exc)
                continue
            for r, state in enumerate(states):
                self.recorder.check_config(r, state)
                self.load_state(r, step, state)
                self.recorder.restore_rows(r, step)
            self.step = step
            return step
        return 0

    def load_state(self, r: int, step: int, state: dict) -> None:
        """Run r's model and optimizer as they were at checkpoint `step`, and the random state."""
        try:
            self.model.load_state_dict(state["model"], r)
            self.optimizer.load_state(state["optimizer"], r)
            torch.set_rng_state(state["rng"]["torch"])  # the same global state in every run's checkpoint
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a checksum-valid file with foreign content
            raise CheckpointError(f"checkpoint {step} of {self.recorder.files[r].dir} does not fit this model: {exc}") from None


class StopRequest:
    """Within `with`, a first SIGINT (Ctrl-C), SIGTERM (scancel) or SIGUSR2 (the warning submitit has
    Slurm send before a job's time limit) only records a request to stop, which the loop honours
    between two steps; a second one acts as usual (KeyboardInterrupt / exit / submitit's handler)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopRequest:
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


def pack_from_checkpoint(run_dir: Path, step: int | None = None, clamp=None) -> Runs:
    """The runs of one saved run at a checkpoint (default: the newest): its model, task, eval sequences
    and clamps, or another clamp config (for post-hoc ablations). Nothing is written."""
    files = RunFiles(run_dir)
    cfg = with_later_defaults(files.read_config())
    if clamp is not None:
        cfg.clamp = clamp
    steps = files.checkpoint_steps()
    if not steps or (step is not None and step not in steps):
        raise ConfigError(f"{files.dir} has no checkpoint at step {step}" if steps else f"{files.dir} has no checkpoint")
    try:
        with config_errors():  # a hand-edited or damaged config.yaml
            check_values(cfg)
            runs = Runs([RunSpec(cfg, files.dir)])
    except ConfigError as exc:
        raise ConfigError(f"cannot load the run in {files.dir}: {exc}") from None
    runs.step = steps[-1] if step is None else step
    load_checkpoint_model(runs, files, runs.step)
    return runs


def load_checkpoint_model(runs: Runs, files: RunFiles, step: int) -> None:
    """Load run 0's weights from its checkpoint `step`, which must hold the model its config defines
    (a checkpoint copied in from another run is refused, not evaluated as if it were this one)."""
    state = files.load_checkpoint(step)
    check_checkpoint_model(state, runs.shape, f"checkpoint {step} of {files.dir}")
    try:
        runs.model.load_state_dict(state["model"], 0)
    except ValueError as exc:
        raise ConfigError(f"checkpoint {step} of {files.dir}: {exc}") from None


def evaluate_checkpoint(run_dir: Path, step: int | None = None, clamp=None) -> pd.DataFrame:
    """Eval rows of a saved checkpoint, through the same evaluation and clamp code as training."""
    return pd.DataFrame(pack_from_checkpoint(run_dir, step, clamp).measure()[0])


def input_shape(cfg, cache: dict) -> tuple[int, int, int]:
    """exemplar_shape of a run whose task family reads exemplars (fsl); (0, 0, 0) for one that reads tokens."""
    return exemplar_shape(cfg.data, cache) if task_family(cfg.task).model_input == "exemplar_label" else (0, 0, 0)


def exemplar_shape(data_cfg, cache: dict) -> tuple[int, int, int]:
    """[classes, exemplars, dim] of a run's exemplar array: the built-in one from its config (it is
    made only once its memory is checked), a file's by loading it into `cache`."""
    if data_cfg.source == "gaussian":
        return data_cfg.n_classes, data_cfg.n_exemplars, data_cfg.dim
    return tuple(load_cached_features(data_cfg, cache).shape)


def load_cached_features(data_cfg, cache: dict) -> torch.Tensor:
    """The exemplar array a data config names, loaded once per distinct config into `cache`."""
    key = OmegaConf.to_yaml(data_cfg)
    if key not in cache:
        cache[key] = load_features(data_cfg)
    return cache[key]
