"""The command line follows Hydra's conventions (--help lists config groups, --cfg prints the composed
config and runs nothing), plans sweeps without training (--dry-run, --max-pack-runs), and refuses the
silent surprises: a sweep preset given to train, optimizer keys its optimizer does not use."""

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.config import CHECKOUT_CONF, CONF_DIR_ENV
from ihstudy.errors import RunInUseError, UserError
from ihstudy.run_files import lock_run_dir
from ihstudy.training.sweep import plan_sweep

SMALL = ["train.sequences=640", "data.n_classes=200", "task.class_split=[50,50,100]", "data.dim=16"]


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def test_help_lists_config_groups_and_their_options():
    train_help = invoke("train", "--help").output
    assert "clamp: copy, copy_second, induction_second, keep_only, layer1, layer1_copy," in train_help
    assert "experiment: fig15, fig17, fig3, fig4b, fig5b," in train_help and "n_labels" in train_help
    assert "optim: adam, sgd" in train_help
    assert "hydra/launcher" not in train_help
    assert "hydra/launcher: basic, joblib, submitit_local, submitit_slurm" in invoke("sweep", "--help").output


def test_cfg_job_prints_the_resolved_run_config_and_writes_nothing(outputs_root):
    result = invoke("train", "--cfg", "job", "optim=sgd", "seed=7", *SMALL)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["seed"] == 7 and cfg["optim"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant",
                                                  "warmup_sequences": 0, "min_lr_fraction": 0.0}
    assert "hydra" not in cfg
    assert yaml.safe_load(invoke("train", "--cfg", "hydra").stdout)["hydra"]["job"]["chdir"] is False
    assert not any(outputs_root.iterdir())


def test_sweep_cfg_prints_every_run_and_the_first_config(outputs_root):
    result = invoke("sweep", "--cfg", "job", "seed=5,6", *SMALL)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)  # the plan's summary line goes to stderr
    assert list(printed["runs"]) == ["seed=5", "seed=6"] and printed["first_run"]["seed"] == 5
    assert not any(outputs_root.iterdir())


def test_sweep_dry_run_lists_runs_and_packs_and_trains_nothing(outputs_root):
    result = CliRunner().invoke(app, ["sweep", "--dry-run", "seed=5,6,7", "task.n_labels=5,10", *SMALL],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "6 runs, 0 already finished, 6 to train in 2 pack(s)" in result.output
    assert "seed=5,task.n_labels=10" in result.output
    assert not any(outputs_root.iterdir())
    limited = CliRunner().invoke(app, ["sweep", "--dry-run", "--max-pack-runs", "2", "seed=5,6,7", *SMALL])
    assert "3 runs, 0 already finished, 3 to train in 2 pack(s)" in limited.output


def test_max_pack_runs_splits_packs():
    sizes = [len(pack) for pack in plan_sweep(["seed=5,6,7,8,9", *SMALL], max_pack_runs=2).packs]
    assert sizes == [2, 2, 1]


def test_train_refuses_sweeps_and_sweep_presets_unless_their_swept_keys_are_chosen(outputs_root):
    result = invoke("train", "experiment=fig5b", *SMALL)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "experiment=fig5b is a sweep over clamp: run it with `ihstudy sweep experiment=fig5b`" in result.output
    assert not any(outputs_root.iterdir())
    several = invoke("train", "seed=5,6")
    assert several.exit_code == 2 and "seed=5,6 gives several values: run a sweep with `ihstudy sweep seed=5,6`" in several.output
    one_run = invoke("train", "--cfg", "job", "experiment=fig5b", "clamp=copy")
    assert one_run.exit_code == 0 and yaml.safe_load(one_run.stdout)["train"]["eval_every"] == 1000


@pytest.mark.parametrize("override,message", [
    ("+optim.momentum=0.5", "optim.momentum is not a setting of optim.name=adam"),
    ("+optim.betas=[0.9,0.9]", "optim.betas is not a setting of optim.name=sgd"),
    ("optim.name=adamw", "optim.name must be one of adam, sgd"),
])
def test_each_optimizer_takes_only_its_own_keys(override, message, outputs_root):
    args = ["optim=sgd", override] if "sgd" in message else [override]
    result = invoke("train", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_sgd_momentum_is_per_run_and_does_not_split_packs():
    plan = plan_sweep(["optim=sgd", "optim.momentum=0.5,0.9", "optim.lr=1e-2,1e-3", *SMALL])
    assert len(plan.runs) == 4 and len(plan.packs) == 1


def test_a_held_lock_is_its_own_user_error(tmp_path):
    lock = lock_run_dir(tmp_path)
    try:
        with pytest.raises(RunInUseError, match="in use by another ihstudy process") as info:
            lock_run_dir(tmp_path)
        assert isinstance(info.value, UserError)
    finally:
        lock.release()


def test_a_config_tree_of_ones_own_replaces_ihstudys(tmp_path, monkeypatch):
    own = tmp_path / "my-conf"
    shutil.copytree(CHECKOUT_CONF, own)
    (own / "clamp" / "mine.yaml").write_text('mine:\n  kind: ablate\n  heads: ["0:1"]\n')
    monkeypatch.setenv(CONF_DIR_ENV, str(own))
    assert "match_similarity, mine, none" in " ".join(invoke("train", "--help").output.split())
    result = invoke("train", "--cfg", "job", "clamp=mine")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["clamp"]["mine"]["heads"] == ["0:1"], result.output
