"""Compose the Hydra config of a run from overrides, and validate it before any work starts."""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ihstudy.errors import ConfigError
from ihstudy.model.transformer import INIT_SCHEMES, POSITIONALS
from ihstudy.run_files import check_folder_path, outputs_setting
from ihstudy.schema import MAX_SEED, Range, check_schema, non_empty, one_of, within
from ihstudy.tasks.base import task_family
from ihstudy.tasks.fsl import DATA_SOURCES, MAX_FEATURE_ELEMENTS, FewShotTask
from ihstudy.training.trackers import check_trackers

CONF_DIR_ENV = "IHSTUDY_CONF_DIR"  # a config tree of the user's own, in place of ihstudy's
CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"  # conf/ beside the code in a source checkout
CONF_MODULE = "ihstudy.conf"  # where an installed wheel holds the same tree (pyproject.toml maps conf/ there)
SCHEDULES = ("constant", "warmup_decay", "cosine")
MAX_STEPS = 10**8  # the per-step log alone holds 16 bytes per step and run
OmegaConf.register_new_resolver("ihstudy.outputs", outputs_setting, replace=True)  # conf/config.yaml's run folder


# --- the schema of a run config (ihstudy/schema.py): each key's type and values; its default is in conf/ ---------


@dataclass
class RunSettings:
    """The top-level keys of conf/config.yaml."""

    seed: int = within(0, MAX_SEED)
    data_seed: int = within(0, MAX_SEED)
    eval_seed: int = within(0, MAX_SEED)
    device: str = MISSING  # auto | cpu | mps | cuda | cuda:N: _check_device


@dataclass
class ModelConfig:
    n_layers: int = within(1, 64)
    n_heads: int = within(1, 1024)  # dividing d_model: validate
    d_model: int = within(1, 16384)
    positional: str = one_of(*POSITIONALS)
    rotary_base: float = within(1, 1e12)
    mlp_ratio: float = within(0, 64)
    init: str = one_of(*INIT_SCHEMES)


@dataclass
class TrainConfig:
    sequences: int = within(1)  # at most MAX_STEPS batches: check_values
    batch_size: int = within(1, 2**20)
    eval_every: int = within(1)
    eval_at: list[int] = within(0)  # within train.sequences: validate
    ckpt_every: int = within(1)
    ckpt_at: list[int] = within(0)
    chunk_batches: int = within(1, 2**16)
    threads: int = within(0, 1024)
    compile: Any = one_of(True, False, "auto")


@dataclass
class EvalConfig:
    evaluators: list[str] = non_empty()  # the task family's: validate
    n_sequences: int = within(1, 100_000)
    dense: list[str] | None  # evaluators measured at every eval point (null: all); names checked by validate
    sparse_every: int = within(1)


@dataclass
class OptimConfig:
    """What every optimizer takes: its learning rate and schedule (in conf/config.yaml)."""

    lr: float = within(0, math.inf, low_open=True)
    schedule: str = one_of(*SCHEDULES)
    warmup_sequences: float = within(0)
    min_lr_fraction: float = within(0, 1)


@dataclass
class AdamConfig(OptimConfig):
    betas: list[float] = within(0, 1, length=2)
    eps: float = within(0)


@dataclass
class SgdConfig(OptimConfig):
    momentum: float = within(0, 1)


OPTIMIZERS = {"adam": AdamConfig, "sgd": SgdConfig}  # optim.name chooses
GROUP_SCHEMAS = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
# groups whose schema a key of theirs chooses; the task group's schema is its family's (TaskFamily.schema)
CHOSEN_SCHEMAS = {"optim": ("name", OPTIMIZERS), "data": ("source", DATA_SOURCES)}


def compose_config(overrides: list[str], single_run: bool = False) -> tuple[DictConfig, Path]:
    """The resolved run config (without the `hydra` node) and the run folder it names.

    `single_run`: refuse an experiment preset that sweeps a key the overrides leave open (train
    would silently run only one of its runs)."""
    with config_errors():
        check_hydra_overrides(overrides, "hydra.run.dir")
        if single_run:
            check_no_sweep(overrides)
        check_added_keys(overrides)
        cfg = compose_with_hydra(overrides)
        if single_run:
            check_single_run(cfg.hydra.sweeper.params, overrides)
        run_dir = Path(str(cfg.hydra.run.dir))
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
        if OmegaConf.select(cfg, "eval.evaluators") is None:  # the task family's own
            cfg.eval.evaluators = list(task_family(cfg.task).evaluators)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing config value: {', '.join(missing)} (set it on the command line, e.g. {missing[0]}=...)")
    check_values(cfg)
    check_trackers(cfg)
    check_folder_path(run_dir)
    return cfg, run_dir


def compose_with_hydra(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The unresolved config with Hydra's own node (run folder, sweeper params of experiments)."""
    with config_errors(), hydra_initialized(job_name="ihstudy"):
        return compose(config_name, overrides=literal_folders(overrides), return_hydra_config=True)


def check_no_sweep(overrides: list[str]) -> None:
    sweeps = [o.input_line for o in OverridesParser.create().parse_overrides(literal_folders(overrides)) if o.is_sweep_override()]
    if sweeps:
        raise ConfigError(f"{sweeps[0]} gives several values: run a sweep with `{shlex.join(['ihstudy', 'sweep', *overrides])}`")


def check_single_run(swept: DictConfig | None, overrides: list[str]) -> None:
    """The keys an experiment preset sweeps (hydra.sweeper.params) must be fixed by the overrides."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    open_keys = [key for key in (swept or {}) if key not in given]
    if open_keys:
        preset = next((o for o in overrides if o.lstrip("+~").startswith("experiment=")), "the experiment preset")
        raise ConfigError(f"{preset} is a sweep over {', '.join(open_keys)}: run it with `ihstudy sweep {preset}`, "
                          f"or choose one run with {open_keys[0]}=...")


def compose_hydra_node(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Hydra's own settings (run and sweep folders, launcher, sweeper) for these overrides."""
    return OmegaConf.create({"hydra": compose_with_hydra(overrides, config_name).hydra})


def config_groups(hydra_groups: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """(group, its options) for every config group of a run, and those of Hydra's own groups named
    (e.g. hydra/launcher), as `ihstudy train --help` lists them."""
    with hydra_initialized(job_name="ihstudy"):
        hydra = GlobalHydra.instance().hydra
        groups = [g for g in hydra.list_all_config_groups() if not g.startswith("hydra") or g in hydra_groups]
        return [(g, sorted(hydra.config_loader.get_group_options(g))) for g in sorted(groups)]


def hydra_initialized(job_name: str):
    """Hydra's global state for composing (or launching) from ihstudy's config tree: $IHSTUDY_CONF_DIR,
    else the conf/ of a source checkout, else the tree installed with the package (pkg://ihstudy.conf)."""
    folder = own_conf_dir()
    if folder is not None:
        return initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name=job_name)
    return initialize_config_module(CONF_MODULE, version_base="1.3", job_name=job_name)


def own_conf_dir() -> Path | None:
    """$IHSTUDY_CONF_DIR, or the conf/ of a source checkout; None for an installed package."""
    own = os.environ.get(CONF_DIR_ENV)
    if own or (CHECKOUT_CONF / "pack_job.yaml").is_file():  # pack_job.yaml: ihstudy's tree, not any conf/
        return Path(own or CHECKOUT_CONF).resolve()
    return None


def conf_dir() -> Path:
    """The folder of the config tree hydra_initialized composes from (an installed wheel holds it as files)."""
    return own_conf_dir() or Path(str(importlib.resources.files(CONF_MODULE)))


FOLDER_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def literal_folders(overrides: list[str]) -> list[str]:
    """Folder overrides with their values quoted, so that folder names holding = or , (a sweep's
    run folders are named like `clamp=copy,seed=5`) pass as they are: `hydra.run.dir=.../seed=5`."""
    quoted = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") in FOLDER_KEYS and value and value[0] not in "'\"":
            override = f"{key}={quote(value)}"
        quoted.append(override)
    return quoted


def quote(value: str) -> str:
    """A string as a quoted Hydra override value (interpolations like ${now:...} still resolve)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_added_keys(overrides: list[str]) -> None:
    """`+key=value` may add a clamp (`+clamp.NAME=...`), choose a config group, or set a key that some
    option of its group declares (`+data.path=...`); any other added key would be kept silently and read
    by nothing, so a misspelt name would look like a setting that took effect."""
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.split(".")[0] in ("clamp", "hydra"):
            continue
        if key not in known_keys() and not (conf_dir() / key).is_dir():
            group = key.split(".")[0] if "." in key else "the top level"
            raise ConfigError(f"unknown config key {key}: nothing reads it (see the keys of {group} in conf/)")


def parse_overrides(overrides: list[str]) -> list:
    with config_errors():
        return OverridesParser.create().parse_overrides(literal_folders(overrides))


@functools.cache
def known_keys() -> frozenset[str]:
    """Every dotted key that config.yaml or an option of a config group (conf/<group>/*.yaml) declares."""
    with config_errors():  # a config tree of the user's own may hold broken YAML
        return _declared_keys()


def _declared_keys() -> frozenset[str]:
    keys = set()
    root = conf_dir()
    for path in root.glob("*/*.yaml"):
        if path.parent.name not in ("clamp", "experiment"):
            keys |= dotted_keys(OmegaConf.load(path), path.parent.name)
    top = OmegaConf.load(root / "config.yaml")
    return frozenset(keys | {k for k in dotted_keys(top, "") if not k.startswith(("defaults", "hydra"))})


def dotted_keys(node, prefix: str) -> set[str]:
    keys = {prefix} if prefix else set()
    if isinstance(node, DictConfig):
        for key in node.keys():
            keys |= dotted_keys(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))
    return keys


@contextmanager
def config_errors():
    """Turn Hydra's and OmegaConf's errors about a config into a one-line ConfigError."""
    try:
        yield
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:  # YAMLError: a config tree's file
        raise ConfigError(_one_line(exc)) from None


# --- the hydra.* settings a user may give ------------------------------------------------------------
# Only these (docs/reliability.md): the folder the command writes, and for the commands that launch
# pack jobs (sweep, reproduce) the launcher, its resources and how many jobs run at once. Every other
# hydra.* key is refused: callbacks would run code, output and logging keys write outside the outputs
# folder, and the rest does nothing ihstudy needs.
LAUNCHER_GROUP = "hydra/launcher"
LAUNCHER_KEY = "hydra.launcher."
SWEEPER_SETTINGS = ("hydra.sweeper.max_batch_size",)
LAUNCHER_CODE_OR_FILES = ("_target_", "submitit_folder", "setup", "srun_args")  # code to run, or a folder of its own
SBATCH_FILE_OPTIONS = ("output", "error", "input", "chdir", "wrap")  # in hydra.launcher.additional_parameters
CALLBACKS_FLAG = "--allow-callbacks"


def check_hydra_overrides(overrides: list[str], folder_key: str, launches: bool = False) -> None:
    """Refuse (one line) a hydra.* override other than `folder_key` (hydra.run.dir for train,
    hydra.sweep.dir for sweep) and, if the command `launches` pack jobs, the launcher's settings."""
    allowed = [folder_key, *([LAUNCHER_GROUP, LAUNCHER_KEY + "<resource>", *SWEEPER_SETTINGS] if launches else [])]
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if not override.is_hydra_override() or (key == folder_key and not override.is_delete()):
            continue
        if launches and not override.is_delete() and (key == LAUNCHER_GROUP or key in SWEEPER_SETTINGS):
            continue
        if launches and not override.is_delete() and key.startswith(LAUNCHER_KEY):
            check_launcher_setting(key, override.value())
            continue
        if not launches and (key == LAUNCHER_GROUP or key.startswith(LAUNCHER_KEY)):
            raise ConfigError(f"{key} applies to sweep and reproduce (their pack jobs); train runs in this process")
        raise ConfigError(f"{override.input_line}: ihstudy takes only {', '.join(allowed)} among the hydra.* "
                          f"settings (others would run code or write outside the outputs folder; docs/reliability.md)")


def check_launcher_setting(key: str, value) -> None:
    setting = key.removeprefix(LAUNCHER_KEY).split(".")
    nested = set(setting[1:]) | (set(value) if isinstance(value, dict) else set())
    if setting[0] in LAUNCHER_CODE_OR_FILES or (setting[0] == "additional_parameters" and nested & set(SBATCH_FILE_OPTIONS)):
        raise ConfigError(f"{key} cannot be set: it names code to run or files outside the sweep folder "
                          f"(ihstudy places the launcher's files and logs itself)")


def check_launch_config(job_cfg: DictConfig, allow_callbacks: bool) -> None:
    """A pack job's composed Hydra settings, before anything is written: the launcher's numbers in
    range, and no callbacks (the config tree's own) unless the user allows them."""
    callbacks = OmegaConf.select(job_cfg, "hydra.callbacks") or {}
    if callbacks and not allow_callbacks:
        raise ConfigError(f"the config tree's pack_job.yaml sets hydra.callbacks ({', '.join(callbacks)}), which would run "
                          f"code: ihstudy runs them only with {CALLBACKS_FLAG}")
    batch = OmegaConf.select(job_cfg, "hydra.sweeper.max_batch_size")
    if batch is not None:
        _check_number("hydra.sweeper.max_batch_size", batch, int, Range(1))
    launcher = job_cfg.hydra.launcher
    if "n_jobs" in launcher:
        _check_number("hydra.launcher.n_jobs", launcher.n_jobs, int, Range(-1024, 1024))
        _require(launcher.n_jobs != 0, "hydra.launcher.n_jobs=0 starts no worker (use N > 0, or -1 for one per core)")
    for key, kind in (("mem_gb", float), ("timeout_min", float), ("cpus_per_task", int), ("nodes", int),
                      ("tasks_per_node", int), ("array_parallelism", int), ("gpus_per_node", int)):
        value = launcher.get(key)
        if value is not None:
            _check_number(f"hydra.launcher.{key}", value, kind, Range(0))
            _require(value > 0 or key == "gpus_per_node", f"hydra.launcher.{key}={value} must be positive")


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
    m, tr, ev = cfg.model, cfg.train, cfg.eval
    _require(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require(m.positional != "rotary" or (m.d_model // m.n_heads) % 2 == 0, "rotary positions need an even head dimension")
    _require(tr.sequences >= tr.batch_size, "train.sequences must be at least one batch")
    _require(all(0 <= s <= tr.sequences for s in list(tr.eval_at) + list(tr.ckpt_at)),
             "train.eval_at and train.ckpt_at must lie within [0, train.sequences]")
    family = task_family(cfg.task)
    for name in ev.evaluators:
        _require(name in family.evaluators, f"unknown evaluator '{name}' (known: {', '.join(family.evaluators)})")
    for name in ev.dense or []:
        _require(name in ev.evaluators, f"eval.dense names '{name}', not one of eval.evaluators ({', '.join(ev.evaluators)})")
    if family is FewShotTask:
        _validate_fsl(cfg, n_classes, n_exemplars)


def _validate_fsl(cfg: DictConfig, n_classes: int, n_exemplars: int) -> None:
    t, ev = cfg.task, cfg.eval
    fillers = t.context_len - 2 * t.burstiness
    _require(fillers >= 0, f"task.burstiness={t.burstiness} needs a context of at least {2 * t.burstiness} pairs "
                           f"(query class and distractor each appear burstiness times), got task.context_len={t.context_len}")
    _require(fillers == 0 or t.n_labels >= 3, "filler context items need task.n_labels >= 3 (labels outside the pair)")
    _require(t.val_pair_fraction < 1, "task.val_pair_fraction must be below 1")
    _check_split("task.class_split", t.class_split, n_classes, "classes")
    _check_split("task.exemplar_split", t.exemplar_split, n_exemplars, "exemplars per class")
    per_sequence = 2 + fillers
    _require(t.class_split[0] >= per_sequence, f"task.class_split gives {t.class_split[0]} train classes; "
                                               f"each sequence needs {per_sequence} distinct classes")
    _require(t.exemplar_split[0] >= 1, "task.exemplar_split needs at least one train exemplar")
    if "fsl_train_valex" in ev.evaluators:
        _require(t.exemplar_split[1] >= 1, "evaluator fsl_train_valex needs val exemplars (task.exemplar_split[1] > 0)")
    if "fsl_test_class" in ev.evaluators:
        _require(t.class_split[2] >= per_sequence, f"evaluator fsl_test_class needs at least {per_sequence} test classes")
    if "fsl_val_rl" in ev.evaluators:
        n_val = len(t.val_pairs) if t.val_pairs is not None else round(t.n_labels * (t.n_labels - 1) / 2 * t.val_pair_fraction)
        _require(n_val >= 1, "evaluator fsl_val_rl needs held-out label pairs (raise task.val_pair_fraction or task.n_labels)")


def _check_split(key: str, split, available: int, what: str) -> None:
    _require(sum(split) <= available, f"{key}={list(split)} needs {sum(split)} {what}, the data has {available}")


# Groups whose keys mean the same whatever option is chosen: a key added to them later has a default
# that reproduces what runs saved before it did (e.g. train.chunk_batches, task.val_pairs).
STABLE_GROUPS = ("model", "task", "train", "eval")


def with_later_defaults(saved: DictConfig) -> DictConfig:
    """A saved run config in today's schema, so that older runs stay analysable: keys added to ihstudy
    since the run was made get their defaults, optimizer keys its optimizer no longer has are dropped
    (an analysis reads no optimizer); no value that defines the run changes."""
    with config_errors(), hydra_initialized(job_name="ihstudy"):
        defaults = compose("config")
    completed = OmegaConf.merge(saved, {k: v for k, v in defaults.items() if k not in saved and k != "hydra"})
    same_family = task_family(saved.get("task") or {}) is task_family(defaults.task)
    for group in STABLE_GROUPS:
        if isinstance(saved.get(group), DictConfig) and (group != "task" or same_family):
            completed[group] = OmegaConf.merge(defaults[group], saved[group])
    optim = completed.get("optim")
    if isinstance(optim, DictConfig) and optim.get("name") in OPTIMIZERS:
        kept = {"name", *OPTIMIZERS[optim.name].__dataclass_fields__}
        completed.optim = {k: v for k, v in optim.items() if k in kept}
    return completed


def run_identity(cfg):
    """A run config (DictConfig or dict) without `logger`, which says where copies of its rows go, not
    what the run is: what must match to resume a run or to find it again in a sweep."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg)
    return {k: v for k, v in cfg.items() if k != "logger"} if isinstance(cfg, dict) else cfg


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of every value, checked by the schema of its config group before anything is
    loaded or allocated (a value the schema converts, like a quoted number, is converted in `cfg`): a word
    where a count belongs, a negative seed or a billion-wide model ends here in one line, not in a traceback."""
    check_schema(RunSettings, cfg, "", skip=[key for key in cfg if key not in RunSettings.__dataclass_fields__])
    for group in (*GROUP_SCHEMAS, *CHOSEN_SCHEMAS, "task"):
        node = cfg.get(group)
        _require(isinstance(node, DictConfig), f"{group} must be a mapping of its settings, got {node!r}")
    for group in GROUP_SCHEMAS:
        check_schema(GROUP_SCHEMAS[group], cfg[group], group)
    for group, (chooser, _) in CHOSEN_SCHEMAS.items():
        check_schema(schema_of(cfg, group), cfg[group], group, what=f"{group}.{chooser}={cfg[group][chooser]}", skip=[chooser])
    task_family(cfg.task).check(cfg.task)  # its schema and rules
    steps = MAX_STEPS * cfg.train.batch_size  # the per-step log alone holds 16 bytes per step and run
    _require(cfg.train.sequences <= steps, f"train.sequences={cfg.train.sequences} must lie in [1, {steps}] "
                                           f"(at most {MAX_STEPS:,} steps of train.batch_size={cfg.train.batch_size})")
    if cfg.data.source == "gaussian":
        _check_gaussian_sizes(cfg.data)
    _check_device(cfg.device)


def schema_of(cfg: DictConfig, group: str) -> type | None:
    """The schema of a config group of `cfg`: chosen by a key of the group for optim and data, the task
    family's for task (None for a family that declares none)."""
    if group == "task":
        return task_family(cfg.task).schema
    if group not in CHOSEN_SCHEMAS:
        return GROUP_SCHEMAS[group]
    chooser, schemas = CHOSEN_SCHEMAS[group]
    choice = OmegaConf.select(cfg, f"{group}.{chooser}")
    _require(choice in schemas, f"{group}.{chooser} must be one of {', '.join(schemas)}, got {choice!r}")
    return schemas[choice]


def _check_gaussian_sizes(data: DictConfig) -> None:
    values = data.n_classes * data.n_exemplars * data.dim
    _require(values <= MAX_FEATURE_ELEMENTS, f"data.n_classes x n_exemplars x dim = {values:,} exemplar values is too many "
                                             f"(at most {MAX_FEATURE_ELEMENTS:,})")
    _require(data.latent_dim <= data.dim, f"data.latent_dim={data.latent_dim} must lie in [1, {data.dim}] "
                                          f"(a subspace of the data.dim={data.dim} exemplar space)")
    _require(data.n_groups <= data.n_classes, f"data.n_groups={data.n_groups} must lie in [0, {data.n_classes}] "
                                              f"(groups of the data.n_classes={data.n_classes} classes)")


def _check_device(device: str) -> None:
    _require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
             f"device must be auto, cpu, mps, cuda or cuda:N, got {device}")
    _require(not device.startswith("cuda") or torch.cuda.is_available(), f"device={device} but no CUDA device is available")
    _require(device != "mps" or torch.backends.mps.is_available(), "device=mps but MPS is not available")


def _check_number(key: str, value, kind: type, valid: Range) -> None:
    number = isinstance(value, int) or (kind is float and isinstance(value, float) and math.isfinite(value))
    _require(number and not isinstance(value, bool), f"{key} must be {'an integer' if kind is int else 'a finite number'}, "
                                                     f"got {value!r}")
    valid.check(key, value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
