"""Compose the Hydra config of a run from overrides, and validate it before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ihstudy.data import EVALUATORS
from ihstudy.errors import ConfigError

CONF_DIR = Path(os.environ.get("IHSTUDY_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))
POSITIONALS = ("rotary", "learned", "sinusoidal")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "warmup_decay", "cosine")


def compose_config(overrides: list[str]) -> tuple[DictConfig, Path]:
    """The resolved run config (without the `hydra` node) and the run folder it names."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="ihstudy"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        run_dir = Path(str(cfg.hydra.run.dir))
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_one_line(exc)) from None
    return cfg, run_dir


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if "Key '" in str(exc) and "is not in struct" in str(exc):
        text += " (unknown config key; prefix with + to add a new one)"
    return f"invalid config: {text}"


def validate(cfg: DictConfig, n_classes: int, n_exemplars: int) -> None:
    """Raise ConfigError (one line) for any value the run cannot use.

    `n_classes` and `n_exemplars` are the size of the exemplar array the run will read.
    """
    m, t, o, tr, ev = cfg.model, cfg.task, cfg.optim, cfg.train, cfg.eval
    _require(m.n_layers >= 1 and m.n_heads >= 1 and m.d_model >= 1, "model.n_layers, n_heads and d_model must be positive")
    _require(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require(m.positional in POSITIONALS, f"model.positional must be one of {', '.join(POSITIONALS)}")
    _require(m.positional != "rotary" or (m.d_model // m.n_heads) % 2 == 0, "rotary positions need an even head dimension")
    _require(m.mlp_ratio >= 0, "model.mlp_ratio must be >= 0")
    _require(t.context_len >= 1, f"task.context_len={t.context_len} must be at least 1")
    _require(t.burstiness >= 1, f"task.burstiness={t.burstiness} must be at least 1")
    fillers = t.context_len - 2 * t.burstiness
    _require(fillers >= 0, f"task.burstiness={t.burstiness} needs a context of at least {2 * t.burstiness} pairs "
                           f"(query class and distractor each appear burstiness times), got task.context_len={t.context_len}")
    _require(t.n_labels >= 2, f"task.n_labels={t.n_labels} must be at least 2")
    _require(fillers == 0 or t.n_labels >= 3, "filler context items need task.n_labels >= 3 (labels outside the pair)")
    _require(0 <= t.val_pair_fraction < 1, "task.val_pair_fraction must be in [0, 1)")
    _require(t.zipf_alpha >= 0 and t.exemplar_noise >= 0, "task.zipf_alpha and task.exemplar_noise must be >= 0")
    _check_split("task.class_split", t.class_split, n_classes, "classes")
    _check_split("task.exemplar_split", t.exemplar_split, n_exemplars, "exemplars per class")
    per_sequence = 2 + fillers
    _require(t.class_split[0] >= per_sequence, f"task.class_split gives {t.class_split[0]} train classes; "
                                               f"each sequence needs {per_sequence} distinct classes")
    _require(t.exemplar_split[0] >= 1, "task.exemplar_split needs at least one train exemplar")
    _require(o.name in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}")
    _require(o.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}")
    _require(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _require(tr.batch_size >= 1, f"train.batch_size={tr.batch_size} must be positive")
    _require(tr.sequences >= tr.batch_size, "train.sequences must be at least one batch")
    _require(tr.eval_every >= 1 and tr.ckpt_every >= 1, "train.eval_every and train.ckpt_every must be positive")
    _require(all(0 <= s <= tr.sequences for s in list(tr.eval_at) + list(tr.ckpt_at)),
             "train.eval_at and train.ckpt_at must lie within [0, train.sequences]")
    _require(ev.n_sequences >= 1, "eval.n_sequences must be positive")
    for name in ev.evaluators:
        _require(name in EVALUATORS, f"unknown evaluator '{name}' (known: {', '.join(EVALUATORS)})")
    if "fsl_train_valex" in ev.evaluators:
        _require(t.exemplar_split[1] >= 1, "evaluator fsl_train_valex needs val exemplars (task.exemplar_split[1] > 0)")
    if "fsl_test_class" in ev.evaluators:
        _require(t.class_split[2] >= per_sequence, f"evaluator fsl_test_class needs at least {per_sequence} test classes")
    if "fsl_val_rl" in ev.evaluators:
        _require(round(t.n_labels * (t.n_labels - 1) / 2 * t.val_pair_fraction) >= 1,
                 "evaluator fsl_val_rl needs held-out label pairs (raise task.val_pair_fraction or task.n_labels)")
    _require(str(cfg.device) == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda", "mps"),
             f"device must be auto, cpu, cuda or cuda:N, got {cfg.device}")


def _check_split(key: str, split, available: int, what: str) -> None:
    _require(len(split) == 3 and all(isinstance(n, int) and n >= 0 for n in split),
             f"{key} must be three non-negative counts (train, val, test)")
    _require(sum(split) <= available, f"{key}={list(split)} needs {sum(split)} {what}, the data has {available}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
