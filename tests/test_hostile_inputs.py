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
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.run_files import RunFiles, load_checkpoint_file
from ihstudy.tasks.fsl import load_feature_file

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
                  "hydra", "now", "python_version", "ihstudy.outputs"}


def test_configs_cannot_execute_code(tmp_path):
    compose_config([])
    assert set(BaseContainer._resolvers) <= SAFE_RESOLVERS
    assert_refused(train("data=features_file", "data.path=${eval:__import__('os').system('touch pwned')}", *SHORT),
                   "invalid config")
    marker = tmp_path / "pwned"
    tagged = f"!!python/object/apply:os.system ['touch {marker}']"
    cfg, _ = compose_config(["data=features_file", f'data.path="{tagged}"'])
    saved_and_read = OmegaConf.create(OmegaConf.to_yaml(cfg))  # as config.yaml is written and read back
    assert cfg.data.path == saved_and_read.data.path == tagged and not marker.exists()


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
    ("train.eval_at=[abc]", "train.eval_at must be a list of integers, got ['abc']"),
    ("train.chunk_batches=0", "train.chunk_batches=0 must lie in"),
    ("train.chunk_batches=2.5", "train.chunk_batches must be an integer"),
    ("device=cuda:x", "device must be auto, cpu, mps, cuda or cuda:N"),
    ("~model.n_layers", "missing config value: model.n_layers"),
    ("model.n_layers=null", "model.n_layers must be an integer, got None"),
    ("data.source=url", "data.source must be one of gaussian, file, got 'url'"),
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


# --- every command, every hostile input: one line, exit code 2, nothing touched (issue 13) ----------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IHSTUDY_OUTPUTS", str(run_dir.parent))
        assert train(f"hydra.run.dir={run_dir}", *SHORT).exit_code == 0
    return run_dir


@pytest.fixture
def hostile_world(outputs_root, trained_run, monkeypatch):
    """An outputs folder holding a file, a folder of the user's own files around a run, a run, runs
    with damaged configs and a feature file of the wrong rank; memory fixed at 16 GiB."""
    import shutil

    from ihstudy.training import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 16 * 2**30)
    (outputs_root / "afile").write_text("mine")
    (outputs_root / "precious").mkdir()
    (outputs_root / "precious" / "notes.txt").write_text("x")
    for name in ("precious/run-a", "run", "broken", "mistyped"):
        shutil.copytree(trained_run, outputs_root / name)
    (outputs_root / "broken" / "config.yaml").write_text("model: [")
    (outputs_root / "mistyped" / "config.yaml").write_text("model: 3\n")
    np.save(outputs_root / "rank2.npy", GOOD[0])
    return outputs_root


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


LONG_NAME, LONG_PATH = "a" * 300, "b" * 5000
CLAMP = "+clamp.c={kind: %s, heads: %s%s}"
HOSTILE = [  # (command line, what the one line says); {O} is the outputs folder
    # 1, 8: --overwrite and a plain run never take a folder holding anything but one run
    (["train", "--overwrite", "hydra.run.dir={O}/precious"], "is not empty and holds no run"),
    (["train", "hydra.run.dir={O}/precious"], "is not empty and holds no run"),
    (["train", "hydra.run.dir={O}/run"], "already holds a run; pass --resume"),
    # 2: analyze on what is not a run: the checkpoint analyses, and the timing analysis (the default)
    (["analyze", "eval", "/etc"], "is not a run folder (it needs run.json and config.yaml)"),
    (["analyze", "eval", "{O}/precious"], "is not a run folder (it needs run.json and config.yaml)"),
    (["analyze", "eval", "{O}/missing"], "is not a run folder (it needs run.json and config.yaml)"),
    (["analyze", "eval", "{O}/afile"], "is not a run folder (it needs run.json and config.yaml)"),
    (["analyze", "eval", "{O}/broken"], "cannot read"),
    (["analyze", "eval", "{O}/mistyped"], "cannot load the run in"),
    (["analyze", "heads", "{O}/broken"], "cannot read"),
    (["analyze", "/etc"], "no runs (folders with run.json and config.yaml) under /etc"),
    (["analyze", "{O}/missing"], "is not a folder"),
    (["analyze", "{O}/broken"], "broken/config.yaml"),
    # 4: sizes the validator lets through that would not fit in memory
    (["train", "task.context_len=1024", "task.burstiness=512", "model.positional=learned"], "eval attention"),
    (["train", "task.context_len=1024", "task.burstiness=512"], "lower eval.n_sequences or task.context_len"),
    (["train", "model.d_model=16384", "model.n_layers=64"], "lower model.d_model or model.n_layers"),
    (["train", "data.n_classes=1000000", "data.n_exemplars=20", "data.dim=100"], "lower data.n_classes"),
    (["train", "train.batch_size=1048576", "train.sequences=1048576"], "lower train.batch_size"),
    (["sweep", "seed=1,2", "model.d_model=16384", "model.n_layers=64"], "would need about"),
    # 6: paths that cannot be folders or files
    (["train", "hydra.run.dir={O}/afile"], "is a file, not a folder"),
    (["train", "hydra.run.dir={O}/afile/sub"], "is a file, not a folder"),
    (["train", "hydra.run.dir={O}/" + LONG_NAME], "300 bytes long"),
    (["train", "data=features_file", "data.path=" + LONG_PATH], "File name too long"),
    (["sweep", "seed=1,2", "hydra.sweep.dir={O}/afile"], "is a file, not a folder"),
    (["sweep", "seed=1,2", "hydra.sweep.dir={O}/precious"], "holds files no sweep wrote (notes.txt)"),
    # 7: clamp strengths, temperatures and head lists
    (["train", CLAMP % ("prev_token_pattern", "['0:1']", ", strength: 2")], "strength=2 must lie in [0, 1]"),
    (["train", CLAMP % ("induction_pattern", "['1:3']", ", strength: -0.5")], "strength=-0.5 must lie in [0, 1]"),
    (["train", CLAMP % ("head_temperature", "['0:1']", ", temperature: 0")], "temperature=0 must be above 0"),
    (["train", CLAMP % ("match_pattern", "['1:3']", ", temperature: -1")], "temperature=-1 must be at least 0"),
    (["train", CLAMP % ("ablate", "[]", "")], "heads is empty"),
    # 9: brackets in messages survive
    (["train", "data=features_file", "data.path={O}/rank2.npy"], "must hold a [classes, exemplars, dim] array"),
    # 10: keys nothing reads
    (["train", "+foo=1"], "unknown config key foo"),
    (["train", "+model.foo=1"], "unknown config key model.foo"),
    (["sweep", "seed=1,2", "+foo=1"], "unknown config key foo"),
]


@pytest.mark.parametrize("args,message", HOSTILE, ids=[" ".join(a)[:60] for a, _ in HOSTILE])
def test_hostile_input_is_refused_in_one_line_and_touches_nothing(hostile_world, args, message):
    before = snapshot(hostile_world)
    command = [a.replace("{O}", str(hostile_world)) for a in args]
    if command[0] != "analyze":  # short runs, unless the hostile part overrides that
        command[1:1] = ["-q", *SHORT]
    assert_refused(CliRunner().invoke(app, command), message)
    assert snapshot(hostile_world) == before


def test_an_outputs_folder_that_cannot_be_written_is_refused(outputs_root, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, where chmod is not enforced
    assert_refused(train(f"hydra.run.dir={outputs_root / 'new' / 'run'}", *SHORT), "permission denied")
    assert not any(outputs_root.iterdir())


def test_foreign_checkpoints_are_refused_by_analyze_resume_and_grafts(outputs_root, trained_run):
    """A checkpoint of a model with 4 heads of width 16 has the very tensor shapes of one with 8 of
    width 8: without the saved config it would be evaluated (and trained on) as the wrong model."""
    import shutil

    run, other = outputs_root / "run", outputs_root / "other"
    shutil.copytree(trained_run, run)
    assert train(f"hydra.run.dir={other}", *SHORT, "model.n_heads=4").exit_code == 0
    for checkpoint in (other / "checkpoints").iterdir():
        shutil.copy(checkpoint, run / "checkpoints" / checkpoint.name)
    assert_refused(CliRunner().invoke(app, ["analyze", "eval", str(run)]), "another shape (n_heads 4 vs 8")
    RunFiles(run).write_status(status="running")
    assert_refused(train(f"hydra.run.dir={run}", *SHORT, "--resume"), "was started with another config")
    graft = "+clamp.g={kind: graft_in, layer: 0, checkpoint: '%s'}" % (other / "checkpoints" / "step_00000030.pt")
    assert_refused(train(*SHORT, graft), "another shape (n_heads 4 vs 8")


def test_sweep_run_folders_pass_back_as_hydra_run_dir(outputs_root):
    """Sweep runs are named like `clamp=copy,seed=5`; docs/sweeps.md resumes them with hydra.run.dir=<folder>."""
    run_dir = outputs_root / "sweeps" / "s" / "lr=0.001,seed=5"
    assert train(f"hydra.run.dir={run_dir}", *SHORT).exit_code == 0
    assert (run_dir / "run.json").exists()
    again = train(f"hydra.run.dir={run_dir}", *SHORT, "--resume")
    assert again.exit_code == 0 and "already completed" in again.output, again.output
