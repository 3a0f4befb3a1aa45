"""Compose the Hydra config of a run from overrides, and validate it before any work starts."""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import re
import shlex
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ihstudy.errors import ConfigError
from ihstudy.model.transformer import INIT_SCHEMES, POSITIONALS
from ihstudy.run_files import check_folder_path, outputs_setting
from ihstudy.tasks.base import task_family
from ihstudy.tasks.fsl import MAX_FEATURE_ELEMENTS, FewShotTask
from ihstudy.training.trackers import check_trackers

CONF_DIR_ENV = "IHSTUDY_CONF_DIR"  # a config tree of the user's own, in place of ihstudy's
CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"  # conf/ beside the code in a source checkout
CONF_MODULE = "ihstudy.conf"  # where an installed wheel holds the same tree (pyproject.toml maps conf/ there)
OPTIMIZER_KEYS = {"adam": ("betas", "eps"), "sgd": ("momentum",)}  # besides name, lr and the schedule's keys
SCHEDULE_KEYS = ("schedule", "warmup_sequences", "min_lr_fraction")
SCHEDULES = ("constant", "warmup_decay", "cosine")
MAX_SEED = 2**63 - 1
MAX_STEPS = 10**8  # the per-step log alone holds 16 bytes per step and run
OmegaConf.register_new_resolver("ihstudy.outputs", outputs_setting, replace=True)  # conf/config.yaml's run folder


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
        _check_number("hydra.sweeper.max_batch_size", batch, int, 1, math.inf)
    launcher = job_cfg.hydra.launcher
    if "n_jobs" in launcher:
        _check_number("hydra.launcher.n_jobs", launcher.n_jobs, int, -1024, 1024)
        _require(launcher.n_jobs != 0, "hydra.launcher.n_jobs=0 starts no worker (use N > 0, or -1 for one per core)")
    for key, kind in (("mem_gb", float), ("timeout_min", float), ("cpus_per_task", int), ("nodes", int),
                      ("tasks_per_node", int), ("array_parallelism", int), ("gpus_per_node", int)):
        value = launcher.get(key)
        if value is not None:
            _check_number(f"hydra.launcher.{key}", value, kind, 0, math.inf)
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
    m, o, tr, ev = cfg.model, cfg.optim, cfg.train, cfg.eval
    _require(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require(m.positional in POSITIONALS, f"model.positional must be one of {', '.join(POSITIONALS)}")
    _require(m.init in INIT_SCHEMES, f"model.init must be one of {', '.join(INIT_SCHEMES)}")
    _require(m.positional != "rotary" or (m.d_model // m.n_heads) % 2 == 0, "rotary positions need an even head dimension")
    _require(o.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}")
    _require(o.lr > 0, f"optim.lr={o.lr} must be positive")
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
    else:
        family.check(cfg.task)


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
    if isinstance(optim, DictConfig) and optim.get("name") in OPTIMIZER_KEYS:
        kept = {"name", "lr", *SCHEDULE_KEYS, *OPTIMIZER_KEYS[optim.name]}
        completed.optim = {k: v for k, v in optim.items() if k in kept}
    return completed


def run_identity(cfg):
    """A run config (DictConfig or dict) without `logger`, which says where copies of its rows go, not
    what the run is: what must match to resume a run or to find it again in a sweep."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg)
    return {k: v for k, v in cfg.items() if k != "logger"} if isinstance(cfg, dict) else cfg


def check_values(cfg: DictConfig) -> None:
    """Types and sane ranges of every value, checked before anything is loaded or allocated: a word
    where a count belongs, a negative seed or a billion-wide model ends here in one line, not in a traceback."""
    for key in ("seed", "data_seed", "eval_seed"):
        _number(cfg, key, int, 0, MAX_SEED)
    _number(cfg, "model.n_layers", int, 1, 64)
    _number(cfg, "model.n_heads", int, 1, 1024)
    _number(cfg, "model.d_model", int, 1, 16384)
    _number(cfg, "model.rotary_base", float, 1, 1e12)
    _number(cfg, "model.mlp_ratio", float, 0, 64)
    if task_family(cfg.task) is FewShotTask:
        _check_fsl_values(cfg)
    _check_optim(cfg)
    _number(cfg, "train.batch_size", int, 1, 2**20)
    _number(cfg, "train.sequences", int, 1, MAX_STEPS * cfg.train.batch_size)
    _number(cfg, "train.eval_every", int, 1)
    _number(cfg, "train.ckpt_every", int, 1)
    _numbers(cfg, "train.eval_at", int, 0)
    _numbers(cfg, "train.ckpt_at", int, 0)
    _number(cfg, "train.threads", int, 0, 1024)
    _number(cfg, "train.chunk_batches", int, 1, 2**16)
    compile_setting = OmegaConf.select(cfg, "train.compile")
    _require(compile_setting in (True, False, "auto"), f"train.compile must be true, false or auto, got {compile_setting!r}")
    _number(cfg, "eval.n_sequences", int, 1, 100_000)
    evaluators = OmegaConf.select(cfg, "eval.evaluators")
    _require(isinstance(evaluators, ListConfig) and len(evaluators) > 0 and all(isinstance(e, str) for e in evaluators),
             f"eval.evaluators must be a non-empty list of names, got {evaluators!r}")
    dense = OmegaConf.select(cfg, "eval.dense")
    _require(dense is None or (isinstance(dense, ListConfig) and all(isinstance(e, str) for e in dense)),
             f"eval.dense must be null or a list of evaluator names, got {dense!r}")
    _number(cfg, "eval.sparse_every", int, 1)
    _check_device(str(OmegaConf.select(cfg, "device")))
    _check_data(cfg)


def _check_fsl_values(cfg: DictConfig) -> None:
    _number(cfg, "task.pair_seed", int, 0, MAX_SEED)
    _number(cfg, "task.n_labels", int, 2, 1000)  # the label pairs are enumerated
    _number(cfg, "task.context_len", int, 1, 1024)
    _number(cfg, "task.burstiness", int, 1, 1024)
    _number(cfg, "task.zipf_alpha", float, 0, 100)
    _number(cfg, "task.exemplar_noise", float, 0)
    _number(cfg, "task.val_pair_fraction", float, 0, 1)
    val_pairs = OmegaConf.select(cfg, "task.val_pairs")
    if val_pairs is not None:
        _require(isinstance(val_pairs, ListConfig), f"task.val_pairs must be null or a list of label pairs, got {val_pairs!r}")
        for i in range(len(val_pairs)):
            _numbers(cfg, f"task.val_pairs.{i}", int, 0, cfg.task.n_labels - 1, length=2)
    _numbers(cfg, "task.class_split", int, 0, MAX_FEATURE_ELEMENTS, length=3)
    _numbers(cfg, "task.exemplar_split", int, 0, MAX_FEATURE_ELEMENTS, length=3)


def _check_optim(cfg: DictConfig) -> None:
    """Each optimizer takes its own keys (conf/optim/NAME.yaml) plus the schedule's; any other key is refused."""
    name = OmegaConf.select(cfg, "optim.name")
    _require(name in OPTIMIZER_KEYS, f"optim.name must be one of {', '.join(OPTIMIZER_KEYS)}, got {name!r}")
    foreign = sorted(set(cfg.optim) - {"name", "lr", *SCHEDULE_KEYS, *OPTIMIZER_KEYS[name]})
    _require(not foreign, f"optim.{foreign[0] if foreign else ''} is not a setting of {name} "
                          f"(its settings: lr, {', '.join([*OPTIMIZER_KEYS[name], *SCHEDULE_KEYS])})")
    for key in ("optim.lr", "optim.warmup_sequences"):
        _number(cfg, key, float, 0)
    _number(cfg, "optim.min_lr_fraction", float, 0, 1)
    if name == "adam":
        _numbers(cfg, "optim.betas", float, 0, 1, length=2)
        _number(cfg, "optim.eps", float, 0)
    else:
        _number(cfg, "optim.momentum", float, 0, 1)


def _check_data(cfg: DictConfig) -> None:
    source = OmegaConf.select(cfg, "data.source")
    _require(source in ("gaussian", "file"), f"data.source must be gaussian or file, got {source!r}")
    if source == "file":
        _require(isinstance(cfg.data.get("path"), str), "data.path must name a feature file")
        return
    sizes = [_number(cfg, f"data.{key}", int, 1, MAX_FEATURE_ELEMENTS) for key in ("n_classes", "n_exemplars", "dim")]
    _require(math.prod(sizes) <= MAX_FEATURE_ELEMENTS, f"data.n_classes x n_exemplars x dim = {math.prod(sizes):,} "
                                                      f"exemplar values is too many (at most {MAX_FEATURE_ELEMENTS:,})")
    _number(cfg, "data.latent_dim", int, 1, sizes[2])  # a subspace of the exemplar space
    _number(cfg, "data.within_class_std", float, 0)
    _number(cfg, "data.norm", float, 0)
    _number(cfg, "data.seed", int, 0, MAX_SEED)
    if "n_groups" in cfg.data:
        _number(cfg, "data.n_groups", int, 0, sizes[0])
    _require(isinstance(cfg.data.get("nonnegative", False), bool), "data.nonnegative must be true or false")


def _check_device(device: str) -> None:
    _require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
             f"device must be auto, cpu, mps, cuda or cuda:N, got {device}")
    _require(not device.startswith("cuda") or torch.cuda.is_available(), f"device={device} but no CUDA device is available")
    _require(device != "mps" or torch.backends.mps.is_available(), "device=mps but MPS is not available")


def _number(cfg: DictConfig, key: str, kind: type, low: float, high: float = math.inf):
    """The value at `key`, which must be a `kind` (int, or float which also takes ints) in [low, high]."""
    return _check_number(key, OmegaConf.select(cfg, key), kind, low, high)


def _numbers(cfg: DictConfig, key: str, kind: type, low: float, high: float = math.inf, length: int | None = None) -> None:
    values = OmegaConf.select(cfg, key)
    _require(isinstance(values, ListConfig) and (length is None or len(values) == length),
             f"{key} must be a list of {length or 'any number of'} numbers, got {values!r}")
    for i, value in enumerate(values):
        _check_number(f"{key}[{i}]", value, kind, low, high)


def _check_number(key: str, value, kind: type, low: float, high: float):
    number = isinstance(value, int) or (kind is float and isinstance(value, float) and math.isfinite(value))
    _require(number and not isinstance(value, bool), f"{key} must be {'an integer' if kind is int else 'a finite number'}, "
                                                     f"got {value!r}")
    _require(low <= value <= high, f"{key}={value} must be at least {low}" if high == math.inf
             else f"{key}={value} must lie in [{low}, {high}]")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
