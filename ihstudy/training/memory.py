"""How much memory a pack of runs needs, estimated from its config before anything is allocated.

A size the validator accepts can still be far too large together with the others (a long context
at the default eval size, a huge batch): such a run is refused in one line naming its largest
part, instead of crashing in an allocation after its run folder exists. Sweeps split packs that
would not fit (sweep.group_into_packs).

The estimate counts float32 tensors in the shapes the code makes them (train.py, model/transformer.py),
rounded up; tests/test_memory.py checks it against a measured allocation.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import ConfigError
from ihstudy.model.transformer import ModelShape
from ihstudy.training.pack_settings import shared_settings

FLOAT = 4  # bytes

PYTHON_VALUE = 64  # bytes per logged eval value kept in Python lists
HEADROOM = 0.8  # the estimate is approximate; leave the rest to the interpreter and the OS


@dataclass
class Part:
    name: str
    bytes: int
    lower: str  # what to lower to shrink it


def estimate(cfgs: list[DictConfig], exemplar_shapes: list[tuple[int, int, int]]) -> list[Part]:
    """The memory parts of a pack of len(cfgs) runs (shapes and schedule from the settings they share,
    pack_settings.py), with each run's exemplar array [classes, exemplars, dim]."""
    cfg, R = shared_settings(cfgs), len(cfgs)
    shape = ModelShape.of_config(cfg, exemplar_shapes[0][2])
    T, D, H, F = shape.n_tokens, shape.d_model, shape.n_heads, shape.n_features
    B, N = cfg.train.batch_size, shape.context_len
    n_params = sum(math.prod(s) for s in shape.param_shapes().values())
    n_steps = math.ceil(cfg.train.sequences / B)
    n_eval = len(cfg.eval.evaluators) * cfg.eval.n_sequences  # eval sequences per run
    eval_points = n_steps * B // cfg.train.eval_every + len(cfg.train.eval_at) + 2
    eval_values = len(cfg.eval.evaluators) * (12 + 2 * shape.n_layers * H)
    distinct_arrays = {OmegaConf.to_yaml(c.data): s for c, s in zip(cfgs, exemplar_shapes)}.values()
    sequence = (N + 1) * F + 4 * N  # a sequence's exemplars, labels and target
    chunk = cfg.train.chunk_batches  # training batches drawn at once (tasks/base.TrainStream), however short the run
    if shape.input == "exemplar_label":  # a chunk keeps exemplar rows (int64) and noise, not exemplars (fsl.Items)
        noisy = any(c.task.get("exemplar_noise") for c in cfgs)
        train_classes = max(c.task.get("class_split", [0])[0] for c in cfgs)  # drawing it, multinomial weighs each
        stored = 2 * (N + 1) + (N + 1) * F * noisy + 4 * N + train_classes
    else:
        stored = 2 * sequence  # drawn, then kept
    return [
        Part("parameters, gradients and optimizer state", 4 * R * n_params * FLOAT,
             "model.d_model or model.n_layers (or the runs per pack)"),
        # autograd through the head-major pass: scores, their exponentials, the pattern, and gradients
        Part("training attention [runs, batch, heads, T, T]", R * FLOAT * _attention(shape, B, kept=12),
             "train.batch_size or task.context_len"),
        Part("training activations [runs, batch, T, d_model]", R * B * T * shape.n_layers * (12 * D + 4 * shape.d_mlp) * FLOAT,
             "train.batch_size, task.context_len or model.d_model"),
        # the chunk, and a step's batches expanded from it and stacked
        Part(f"training batches ({chunk} steps at a time)", R * (chunk * stored + 2 * sequence) * B * FLOAT,
             "train.batch_size, task.context_len or train.chunk_batches"),
        Part("eval attention patterns [runs, eval sequences, heads, T, T]", 2 * R * FLOAT * _attention(shape, n_eval, kept=1),
             "eval.n_sequences or task.context_len"),
        Part("eval sets", R * n_eval * sequence * FLOAT, "eval.n_sequences"),
        Part("exemplar arrays [classes, exemplars, dim]", sum(3 * math.prod(s) * FLOAT for s in distinct_arrays),
             "data.n_classes, data.n_exemplars or data.dim"),
        Part("per-step log [steps, runs, 4]", n_steps * R * 4 * FLOAT, "train.sequences (or raise train.batch_size)"),
        Part("eval rows", R * eval_points * eval_values * PYTHON_VALUE, "train.sequences (or raise train.eval_every)"),
    ]


def _attention(shape: ModelShape, n_sequences: int, kept: int) -> int:
    """Values in `kept` attention tensors [sequences, heads, query rows, T] of every layer."""
    return kept * n_sequences * shape.n_heads * shape.query_rows * shape.n_tokens


def check_fits(cfgs: list[DictConfig], exemplar_shapes: list[tuple[int, int, int]], device: torch.device,
               budget: int | None = None) -> None:
    """Refuse (one line) a pack that would not fit in the memory available (or `budget` bytes)."""
    parts = estimate(cfgs, exemplar_shapes)
    need, have = sum(p.bytes for p in parts), budget or available_bytes(device)
    if need > HEADROOM * have:
        largest = max(parts, key=lambda p: p.bytes)
        what = "the run" if len(cfgs) == 1 else f"a pack of {len(cfgs)} runs"
        raise ConfigError(f"{what} would need about {_size(need)} of memory, {_size(have)} is available; the largest "
                          f"part is {largest.name} ({_size(largest.bytes)}): lower {largest.lower}")


def fits(cfgs: list[DictConfig], exemplar_shapes: list[tuple[int, int, int]], device: torch.device,
         budget: int | None = None) -> bool:
    try:
        check_fits(cfgs, exemplar_shapes, device, budget)
    except ConfigError:
        return False
    return True


def available_bytes(device: torch.device) -> int:
    """Memory this process can still allocate: free GPU memory, or the machine's available memory
    (/proc/meminfo), capped by the cgroup limit a Slurm job or container runs under."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()) if meminfo.exists() else None
    free = int(found[1]) * 1024 if found else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(free, _cgroup_room())


def _cgroup_room() -> int | float:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return math.inf
    return math.inf if limit == "max" else int(limit) - used


def _size(n: float) -> str:
    power = min(int(math.log(max(n, 1), 1024)), 4)
    return f"{n / 1024 ** power:,.1f} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB')[power]}"
