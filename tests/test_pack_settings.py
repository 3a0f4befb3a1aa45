"""The settings runs of a pack share (training/pack_settings.py): one list, read by packing and by Pack."""

import pytest

from ihstudy.config import compose_config
from ihstudy.errors import ConfigError
from ihstudy.training.pack_settings import SHARED, shared_settings
from ihstudy.training.sweep import Run, pack_key
from ihstudy.training.train import Pack, RunSpec

# One override per shared group, and settings each run may have its own of.
SHARED_CHANGES = {"model": "model.n_heads=4", "train": "train.batch_size=16", "eval": "eval.n_sequences=50",
                  "device": "device=cpu", "optim": "optim.eps=1e-7", "task": "task.context_len=3"}
PER_RUN_CHANGES = ["seed=7", "data_seed=3", "optim.lr=0.001", "clamp=copy", "task.burstiness=1"]


def run_of(tmp_path, overrides: list[str]) -> Run:
    cfg, _ = compose_config(overrides)
    return Run("run", overrides, cfg, tmp_path / "run", (cfg.data.n_classes, cfg.data.n_exemplars, cfg.data.dim))


def test_every_shared_group_is_tested():
    assert SHARED_CHANGES.keys() == SHARED.keys()


@pytest.mark.parametrize("group", SHARED)
def test_runs_that_differ_in_a_shared_setting_neither_pack_nor_build_a_pack(tmp_path, group):
    override = SHARED_CHANGES[group]
    assert pack_key(run_of(tmp_path, [])) != pack_key(run_of(tmp_path, [override]))
    specs = [RunSpec(compose_config(o)[0], tmp_path / str(i)) for i, o in enumerate(([], [override]))]
    with pytest.raises(ConfigError, match=rf"^runs packed together must share {override.split('=')[0]} \(.* vs .*\)$"):
        Pack(specs)


def test_runs_that_differ_only_in_per_run_settings_pack_together(tmp_path):
    assert len({pack_key(run_of(tmp_path, overrides)) for overrides in [[], *([o] for o in PER_RUN_CHANGES)]}) == 1
    cfgs = [compose_config([o])[0] for o in PER_RUN_CHANGES]
    assert shared_settings(cfgs).train.batch_size == cfgs[0].train.batch_size
