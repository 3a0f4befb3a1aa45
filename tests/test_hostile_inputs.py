"""Malformed or hostile inputs are refused in one line, before anything runs or is written."""

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.basecontainer import BaseContainer
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.config import compose_config
from ihstudy.data import load_feature_file
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.run_files import RunFiles, load_checkpoint_file

SHORT = ["train.threads=1", "train.batch_size=8", "train.sequences=240", "train.ckpt_every=80",
         "train.eval_every=240", "eval.n_sequences=20"]


def train(*args):
    return CliRunner().invoke(app, ["train", "-q", *args])


def assert_refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# --- checkpoints ------------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_code_running_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint with a valid checksum whose unpickling would run a shell command."""
    torch.save({"format": 1, "step": 30, "model": RunsCode(marker)}, path)
    path.with_suffix(".pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "step_00000030.pt"
    plant_code_running_checkpoint(path, marker)
    torch.load(path, weights_only=False)  # the payload is real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_resume_skips_a_planted_checkpoint_without_running_it(tmp_path, caplog):
    marker, run_dir = tmp_path / "pwned", tmp_path / "run"
    assert train(f"hydra.run.dir={run_dir}", *SHORT).exit_code == 0
    RunFiles(run_dir).write_status(status="running")  # as if killed
    plant_code_running_checkpoint(run_dir / "checkpoints" / "step_00000030.pt", marker)
    result = train(f"hydra.run.dir={run_dir}", *SHORT, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "step_00000030.pt" in caplog.text
    assert not marker.exists()


# --- where runs are written -----------------------------------------------------------------------


@pytest.mark.parametrize("run_dir", ["/etc/ihstudy-run", "{root}/../escaped", "{root}", "{root}/link/run", "../up"])
def test_run_folders_cannot_escape_the_outputs_folder(tmp_path, outputs_root, monkeypatch, run_dir):
    root = outputs_root / "outputs"
    root.mkdir()
    monkeypatch.setenv("IHSTUDY_OUTPUTS", str(root))
    monkeypatch.chdir(root)
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert_refused(train(f"hydra.run.dir={run_dir.format(root=root)}", *SHORT), "is not inside the outputs folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link", "outputs"]


def test_default_run_folders_lie_in_the_outputs_folder(outputs_root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert train(*SHORT).exit_code == 0
    (run,) = [p.parent for p in outputs_root.rglob("run.json")]
    assert run.parent.parent == outputs_root  # outputs/DATE/TIME


# --- configs ----------------------------------------------------------------------------------------

# Resolvers OmegaConf and Hydra register: they read config values, the date, environment variables;
# none evaluates code. A new one (from a plugin or dependency) must be checked before it joins this list.
SAFE_RESOLVERS = {"oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys", "oc.dict.values", "oc.env", "oc.select",
                  "hydra", "now", "python_version"}


def test_configs_cannot_execute_code(tmp_path):
    compose_config([])
    assert set(BaseContainer._resolvers) <= SAFE_RESOLVERS
    assert_refused(train("+x=${eval:__import__('os').system('touch pwned')}", *SHORT), "invalid config")
    marker = tmp_path / "pwned"
    tagged = f"!!python/object/apply:os.system ['touch {marker}']"
    cfg, _ = compose_config([f'+x="{tagged}"'])
    saved_and_read = OmegaConf.create(OmegaConf.to_yaml(cfg))  # as config.yaml is written and read back
    assert cfg.x == saved_and_read.x == tagged and not marker.exists()


@pytest.mark.parametrize("override,message", [
    ("model.n_heads=abc", "model.n_heads must be an integer, got 'abc'"),
    ("train.sequences=1e20", "train.sequences must be an integer"),
    ("train.sequences=100000000000", "train.sequences=100000000000 must lie in"),
    ("model.d_model=1000000000", "model.d_model=1000000000 must lie in"),
    ("task.n_labels=100000", "task.n_labels=100000 must lie in"),
    ("data.dim=10000000", "exemplar values is too many"),
    ("data_seed=-1", "data_seed=-1 must lie in"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers"),
    ("eval.evaluators=[]", "eval.evaluators must be a non-empty list"),
    ("train.eval_at=[abc]", "train.eval_at[0] must be an integer"),
    ("device=cuda:x", "device must be auto, cpu, mps, cuda or cuda:N"),
    ("~model.n_layers", "model.n_layers must be an integer, got None"),
    ("data.source=url", "data.source must be gaussian or file"),
])
def test_absurd_or_mistyped_values_are_refused(tmp_path, override, message):
    assert_refused(train(f"hydra.run.dir={tmp_path / 'run'}", *SHORT, override), message)
    assert not (tmp_path / "run").exists()


# --- feature files ---------------------------------------------------------------------------------

GOOD = np.random.default_rng(0).normal(size=(20, 3, 8)).astype(np.float32)


def with_nan(array):
    array = array.copy()
    array[3, 1, 2] = np.nan
    return array


HOSTILE_ARRAYS = {
    "nan": (with_nan(GOOD), "NaN, infinite"),
    "beyond_float32": (GOOD.astype(np.float64) * 1e300, "float32-overflowing"),
    "rank_2": (GOOD[0], "must hold a [classes, exemplars, dim] array"),
    "rank_4": (GOOD[None], "must hold a [classes, exemplars, dim] array"),
    "bool": (GOOD > 0, "non-numeric dtype"),
    "complex": (GOOD.astype(np.complex64), "non-numeric dtype"),
    "strings": (np.full((2, 2, 2), "x"), "non-numeric dtype"),
    "empty": (np.zeros((0, 3, 8), np.float32), "unusable shape"),
}


@pytest.mark.parametrize("name", HOSTILE_ARRAYS)
@pytest.mark.parametrize("fmt", ["npy", "h5"])
def test_malformed_feature_files_are_refused(tmp_path, name, fmt):
    array, message = HOSTILE_ARRAYS[name]
    path = tmp_path / f"features.{fmt}"
    if fmt == "npy":
        np.save(path, array)
    else:
        with h5py.File(path, "w") as f:
            f["feat"] = array.astype("S1") if array.dtype.kind == "U" else array
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_feature_file(str(path), "feat")


def test_absurd_or_foreign_feature_files_are_refused_unread(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "huge.h5", "w") as f:  # 4e11 declared values, none stored
        f.create_dataset("feat", shape=(100_000, 4_000, 1_000), dtype="f4", chunks=(1, 10, 10))
    np.save(tmp_path / "objects.npy", np.array([[[{"a": 1}]]], dtype=object), allow_pickle=True)
    with open(tmp_path / "header_only.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**5, 10**3, 10**3)})
    (tmp_path / "text.h5").write_text("not hdf5")
    for name, message in [("huge.h5", "unusable shape"), ("objects.npy", "cannot read"),
                          ("header_only.npy", "cannot read"), ("text.h5", "cannot read")]:
        with pytest.raises(ConfigError, match=message):
            load_feature_file(str(tmp_path / name), "feat")


def test_a_feature_file_with_nan_stops_training_before_anything_is_written(tmp_path):
    np.save(tmp_path / "nan.npy", with_nan(GOOD))
    result = train(f"hydra.run.dir={tmp_path / 'run'}", *SHORT, "data=features_file", f"data.path={tmp_path / 'nan.npy'}",
                   "task.class_split=[10,5,5]", "task.exemplar_split=[1,2,0]")
    assert_refused(result, "NaN")
    assert not (tmp_path / "run").exists()


# --- property: any malformed override set ------------------------------------------------------------


def numeric_keys() -> list[str]:
    """Every number in the default config (lists excluded): each must be type- and range-checked."""
    flat = OmegaConf.to_container(compose_config([])[0])
    keys, stack = [], [("", flat)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.append(prefix + key)
    return sorted(keys)


# Every number in the config is non-negative, so a negative one is malformed wherever it goes.
NOT_A_NUMBER = ["abc", "true", "null", "[1,2]", "{a: 1}", "nan", "inf", "-1", "-0.5", "-1e9", "''"]
MALFORMED = st.one_of(
    st.tuples(st.sampled_from(numeric_keys()), st.sampled_from(NOT_A_NUMBER)).map("=".join),
    st.sampled_from(["model.no_such_key=1", "no_such_key=1", "model=no_such_model", "optim=adamw", "model.n_heads",
                     "=3", "model.n_heads=[", "model..n_heads=1", "hydra.run.dir=/", "hydra.run.dir=..",
                     "task.class_split=[1,2]", "optim.betas=abc", "train.eval_at=[-5]", "eval.evaluators=[nope]",
                     "device=tpu", "data=features_file", "data.source=url", "+x=${eval:1}"]),
)
VALID = st.sampled_from(["seed=3", "train.batch_size=16", "model.n_heads=4", "task.n_labels=10", "optim=sgd"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(malformed=st.lists(MALFORMED, min_size=1, max_size=3), valid=st.lists(VALID, max_size=2), data=st.data())
def test_any_malformed_override_set_is_refused_in_one_line_and_writes_nothing(malformed, valid, data, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    malformed_keys = {m.split("=")[0] for m in malformed}
    valid = [v for v in valid if v.split("=")[0] not in malformed_keys]  # a later valid value would win
    overrides = data.draw(st.permutations(malformed + valid))
    result = train(*overrides)
    assert result.exit_code == 2, (overrides, result.output)
    assert result.output.startswith("error: ") and "Traceback" not in result.output, (overrides, result.output)
    assert len(result.output.strip().splitlines()) == 1, (overrides, result.output)
    assert not any(tmp_path.iterdir()), (overrides, list(tmp_path.rglob("*")))
