"""The settings every run of a pack shares: the one list of them, and the check that runs agree.

A Pack trains its runs as one stacked model with one schedule, so the settings below must be equal
across its runs; everything else (seeds, clamps, lr and its schedule, momentum, data settings that
keep the shapes) is per run. Pack building (train.Runs), the optimizer, the evaluator and the memory
estimate read these settings through `shared_settings` / `shared_group`, which refuse runs that
disagree in one line; the sweep packs only runs whose `shared_part` is equal (sweep.pack_key).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ihstudy.errors import ConfigError

ALL = None
# config group -> the keys runs of a pack must share (ALL: the whole group)
SHARED = {"model": ALL, "train": ALL, "eval": ALL, "device": ALL,
          "optim": ("name", "betas", "eps"),  # momentum, lr and its schedule are per run
          "task": ("n_labels", "context_len")}  # the tensor shapes; the rest of the task is per run


def group_part(group_cfg, group: str):
    """The shared part of one run's config group `group`, as plain Python values."""
    value = OmegaConf.to_container(group_cfg, resolve=True) if OmegaConf.is_config(group_cfg) else group_cfg
    keys = SHARED[group]
    return value if keys is ALL else {k: value[k] for k in keys if k in value}


def shared_part(cfg) -> dict:
    """The shared settings of one run config, as plain Python values."""
    return {group: group_part(cfg[group], group) for group in SHARED}


def shared_group(group_cfgs: list, group: str) -> DictConfig:
    """The shared part of config group `group` (e.g. every run's cfg.optim), checked equal across the runs."""
    parts = [group_part(c, group) for c in group_cfgs]
    for other in parts[1:]:
        if other != parts[0]:
            raise ConfigError(f"runs packed together must share {_first_difference(parts[0], other, group)}")
    return OmegaConf.create({group: parts[0]})[group]


def shared_settings(cfgs: list) -> DictConfig:
    """The settings of a pack of run configs: every shared group, checked equal across the runs."""
    return OmegaConf.create({group: shared_group([c[group] for c in cfgs], group) for group in SHARED})


def _first_difference(a, b, where: str) -> str:
    """`where.key` and both values, for the first key at which a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return f"{where} ({a} vs {b})"
