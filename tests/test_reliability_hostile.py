"""Issue 22: reports never delete, configs never run code, files keep the user's permissions, nothing
hangs, interrupted workflows continue, and every refused input is one line (docs/reliability.md)."""

import errno
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy import cli
from ihstudy.cli import app
from ihstudy.config import compose_config
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.run_files import REPORT_MARK, RunFiles, atomic_write_text, load_checkpoint_file
from ihstudy.training import memory
from ihstudy.training.sweep import plan_sweep

SHORT = ["train.threads=1", "train.batch_size=8", "train.sequences=240", "train.ckpt_every=80",
         "train.eval_every=80", "eval.n_sequences=20"]


def run(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def assert_refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def snapshot(root: Path) -> dict:
    """Every path below root: its bytes (a small regular file), size and mode."""
    return {p: (p.read_bytes() if p.is_file() and p.lstat().st_size < 2**20 else p.lstat().st_size,
                stat.S_IMODE(p.lstat().st_mode)) for p in root.rglob("*")}


def assert_one_error_line(result, message: str) -> None:
    """Refused after printing its tables: exit 2 and one line on stderr."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A completed short run (checkpoints at 80, 160, 240 sequences)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IHSTUDY_OUTPUTS", str(run_dir.parent))
        result = run("train", "-q", f"hydra.run.dir={run_dir}", *SHORT)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture
def world(outputs_root, trained):
    """The outputs folder with a run in it, a folder of the user's documents and a file."""
    shutil.copytree(trained, outputs_root / "run")
    (outputs_root / "mydocs").mkdir()
    (outputs_root / "mydocs" / "thesis.txt").write_text("precious")
    (outputs_root / "afile.txt").write_text("mine")
    return outputs_root


# --- 1. a report replaces only a report ihstudy wrote -------------------------------------------------


@pytest.mark.parametrize("target", ["mydocs", "run", "afile.txt", "/", ".", "report_with_user_file", "link"])
def test_a_report_never_replaces_what_ihstudy_did_not_write(world, monkeypatch, target):
    monkeypatch.chdir(world)
    first = run("analyze", world / "run", "--report", world / "report_with_user_file")
    assert first.exit_code == 0, first.output
    (world / "report_with_user_file" / "my_notes.md").write_text("mine")
    (world / "link").symlink_to(world / "mydocs")
    before = snapshot(world)
    assert_refused(run("analyze", world / "run", "--report", target), "choose another report folder")
    assert snapshot(world) == before  # nothing deleted, replaced or left behind (no .-old- folder)


def test_a_report_replaces_an_earlier_report_and_takes_an_empty_folder(world):
    out = world / "empty"
    out.mkdir()
    for _ in range(2):
        result = run("analyze", world / "run", "--report", out)
        assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == set(json.loads((out / REPORT_MARK).read_text())["files"]) | {REPORT_MARK}
    assert [p.name for p in world.iterdir() if p.name.startswith(".")] == []


def test_reproduce_refuses_a_report_folder_holding_a_user_file_before_training(outputs_root):
    report = outputs_root / "reproduce" / "scale-0.002" / "report"
    report.mkdir(parents=True)
    (report / "mine.txt").write_text("x")
    before = snapshot(outputs_root)
    assert_refused(run("reproduce", "toy", "--scale", "0.002"), "holds files no ihstudy report wrote (mine.txt)")
    assert snapshot(outputs_root) == before


@pytest.mark.parametrize("analysis", ["timing", "heads"])
@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC])
def test_a_report_folder_that_cannot_be_written_is_one_line(world, monkeypatch, analysis, error):
    from matplotlib.figure import Figure

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(Figure, "savefig", fail)  # every report has figures
    args = ["analyze", world / "run"] if analysis == "timing" else ["analyze", "heads", world / "run", "--sequences", 64]
    assert_one_error_line(run(*args), f"cannot write the report folder {world / 'analysis'}")
    assert not (world / "analysis").exists() or not any((world / "analysis").iterdir())


# --- 2-4. hydra.* settings: only the launcher, its resources and the command's own folder --------------

FORBIDDEN = [  # (override, a launcher it needs)
    ("+hydra.callbacks.x._target_=builtins.open", ""),
    ("+hydra.callbacks.x._target_=pandas.read_pickle", ""),
    ("+hydra.callbacks.x={_target_: os.system, command: 'touch {O}/pwned'}", ""),
    ("hydra.output_subdir={O}/../elsewhere", ""),
    ("hydra.sweep.subdir=../../x", ""),
    ("hydra.job_logging.handlers.file.filename={O}/../x.log", ""),
    ("hydra/job_logging=disabled", ""),
    ("hydra/hydra_logging=disabled", ""),
    ("hydra.job.chdir=true", ""),
    ("hydra.searchpath=['file:///tmp']", ""),
    ("hydra.verbose=true", ""),
    ("~hydra.output_subdir=.hydra", ""),
    ("hydra.run.dir={O}/x", ""),  # train's folder; a sweep writes hydra.sweep.dir
    ("hydra.launcher._target_=builtins.print", "hydra/launcher=joblib"),
    ("hydra.launcher.submitit_folder={O}/../elsewhere", "hydra/launcher=submitit_local"),
    ("hydra.launcher.setup=['touch {O}/pwned']", "hydra/launcher=submitit_slurm"),
    ("hydra.launcher.additional_parameters={output: /tmp/x.log}", "hydra/launcher=submitit_slurm"),
    ("hydra.launcher.additional_parameters.chdir=/tmp", "hydra/launcher=submitit_slurm"),
]


@pytest.mark.parametrize("command", ["sweep", "reproduce"])
@pytest.mark.parametrize("override,launcher", FORBIDDEN, ids=[o for o, _ in FORBIDDEN])
def test_sweep_and_reproduce_refuse_hydra_settings_that_run_code_or_write_elsewhere(tmp_path, monkeypatch, command,
                                                                                     override, launcher):
    outputs = tmp_path / "outputs"  # {O}/.. is tmp_path: writes "elsewhere" would show in the snapshot
    outputs.mkdir()
    monkeypatch.setenv("IHSTUDY_OUTPUTS", str(outputs))
    (outputs / "victim.txt").write_text("keep me")
    before = snapshot(tmp_path)
    args = ["seed=1,2", *SHORT] if command == "sweep" else ["toy", "--scale", "0.002"]
    hydra = [a.replace("{O}", str(outputs)) for a in (launcher, override) if a]
    assert_refused(run(command, "-q", *args, *hydra), "cannot be set" if "launcher." in override else "ihstudy takes only")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("override", ["+hydra.callbacks.x._target_=builtins.open", "hydra.output_subdir=/tmp/x",
                                      "hydra/job_logging=disabled", "hydra.sweep.dir={O}/s", "hydra/launcher=joblib",
                                      "hydra.launcher.n_jobs=2"])
def test_train_takes_only_its_run_folder_among_hydra_settings(outputs_root, override):
    assert_refused(run("train", "-q", *SHORT, override.replace("{O}", str(outputs_root))), override.split("=")[0].lstrip("+"))
    assert not any(outputs_root.iterdir())


@pytest.fixture
def own_conf(tmp_path, monkeypatch):
    """A copy of ihstudy's config tree in IHSTUDY_CONF_DIR (the known-keys cache follows it)."""
    from ihstudy.config import conf_dir, known_keys

    tree = tmp_path / "conf"
    shutil.copytree(conf_dir(), tree)
    monkeypatch.setenv("IHSTUDY_CONF_DIR", str(tree))
    known_keys.cache_clear()
    yield tree
    known_keys.cache_clear()


CALLBACKS = {"read_pickle": "{_target_: pandas.read_pickle, filepath_or_buffer: '{victim}'}",
             "open": "{_target_: builtins.open, file: '{victim}', mode: w}",
             "log_job_return": "{_target_: hydra.experimental.callbacks.LogJobReturnCallback}"}


@pytest.mark.parametrize("name", CALLBACKS)
def test_callbacks_of_a_config_tree_run_only_with_allow_callbacks(outputs_root, own_conf, name):
    victim = outputs_root / "victim.txt"
    victim.write_text("keep me")
    with open(own_conf / "pack_job.yaml", "a") as f:
        f.write(f"  callbacks:\n    x: {CALLBACKS[name].replace('{victim}', str(victim))}\n")
    before = snapshot(outputs_root)
    assert_refused(run("sweep", "-q", "seed=1,2", *SHORT), "runs them only with --allow-callbacks")
    assert snapshot(outputs_root) == before
    if name == "log_job_return":  # a harmless callback: the flag lets it run
        result = run("sweep", "-q", "seed=1,2", *SHORT, "--allow-callbacks")
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("content,message", [
    ("model: [", "invalid config"),
    ("a: !!python/object/apply:os.system ['touch pwned']", "invalid config"),
    ("a: &x [1]\nb: *x\n  c: d", "invalid config"),
    ("\x00\x01", "invalid config"),
])
@pytest.mark.parametrize("where", ["config.yaml", "model/attn_only.yaml", "pack_job.yaml"])
def test_a_broken_config_tree_is_refused_in_one_line(outputs_root, own_conf, monkeypatch, content, message, where):
    monkeypatch.chdir(outputs_root)
    (own_conf / where).write_text(content)
    command = ["sweep", "seed=1,2"] if where == "pack_job.yaml" else ["train"]
    assert_refused(run(*command, "-q", *SHORT), message)
    assert not (outputs_root / "pwned").exists()


# --- "checked too late": launcher settings before anything is written --------------------------------------


@pytest.mark.parametrize("settings,message", [
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=0"], "hydra.launcher.n_jobs=0 starts no worker"),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=two"], "hydra.launcher.n_jobs"),
    (["hydra.sweeper.max_batch_size=-1"], "hydra.sweeper.max_batch_size=-1 must be at least 1"),
    (["hydra.sweeper.max_batch_size=0"], "hydra.sweeper.max_batch_size=0 must be at least 1"),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.mem_gb=-5"], "hydra.launcher.mem_gb=-5 must be at least 0"),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.mem_gb=0"], "hydra.launcher.mem_gb=0 must be positive"),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=0"], "hydra.launcher.cpus_per_task=0 must be positive"),
    (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=-1"], "hydra.launcher.timeout_min=-1 must be at least 0"),
])
def test_launcher_settings_are_checked_before_anything_is_written(outputs_root, settings, message):
    assert_refused(run("sweep", "-q", "seed=1,2", *SHORT, *settings), message)
    assert not any(outputs_root.iterdir())


# --- 5. files follow the user's umask ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o077, 0o027, 0o022, 0o002])
def test_run_files_and_reports_follow_the_umask(outputs_root, umask):
    previous = os.umask(umask)
    try:
        run_dir = outputs_root / "run"
        assert run("train", "-q", f"hydra.run.dir={run_dir}", *SHORT).exit_code == 0
        result = run("analyze", run_dir, "--report", outputs_root / "report")
        assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    files = [p for p in outputs_root.rglob("*") if p.is_file() and p.name != ".lock"]
    folders = [p for p in outputs_root.rglob("*") if p.is_dir()]
    assert {"run.json", "config.yaml", "step_00000030.pt", "report.md"} <= {p.name for p in files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o777 & ~umask}
    assert all(stat.S_IMODE(p.stat().st_mode) & umask == 0 for p in outputs_root.rglob(".lock"))  # filelock's 0644
    assert os.umask(previous) == previous  # the umask is as it was


# --- 6, 7. no reading without bounds: YAML aliases, devices, FIFOs, huge files ------------------------------------

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


def in_thread(function, timeout: float = 30):
    """function()'s result or exception, failing the test if it has not returned after `timeout` s."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} still running after {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def plant(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(2**40)  # sparse: a terabyte that takes no space
    else:
        path.write_bytes(kind.encode() if isinstance(kind, str) else kind)


CONFIG_SHAPES = {"alias_bomb": ALIAS_BOMB, "list": "- 1\n- 2\n", "scalar": "3\n", "empty": "", "python_tag":
                 "a: !!python/object/apply:os.system ['true']\n", "broken": "model: [", "binary": "\xff\xfe\x00",
                 "fifo": "fifo", "folder": "folder", "dev_zero": "dev_zero", "huge": "huge"}


@pytest.mark.parametrize("shape", CONFIG_SHAPES)
def test_a_run_config_of_any_shape_is_refused_at_once(world, shape):
    run_dir = world / "run"
    plant(run_dir / "config.yaml", CONFIG_SHAPES[shape])
    with pytest.raises(ConfigError):
        in_thread(RunFiles(run_dir).read_config)
    assert_refused(in_thread(lambda: run("analyze", run_dir)), "config.yaml")
    assert_refused(in_thread(lambda: run("analyze", "eval", run_dir)), "config.yaml")


STATUS_SHAPES = {"list": "[]", "string": '"completed"', "number": "3", "null": "null", "broken": "{\"status\": ",
                 "binary": "\xff", "fifo": "fifo", "folder": "folder", "dev_zero": "dev_zero", "huge": "huge"}


@pytest.mark.parametrize("shape", STATUS_SHAPES)
def test_a_run_status_of_any_shape_is_refused_at_once(world, shape):
    run_dir = world / "run"
    plant(run_dir / "run.json", STATUS_SHAPES[shape])
    with pytest.raises(ConfigError, match="run.json"):
        in_thread(RunFiles(run_dir).read_status)
    assert_refused(in_thread(lambda: run("analyze", run_dir)), "run.json")
    before = snapshot(world)
    assert_refused(in_thread(lambda: run("train", "-q", f"hydra.run.dir={run_dir}", *SHORT, "--resume")), "run.json")
    assert snapshot(world) == before


@pytest.mark.parametrize("columns", [{"loss": ["a", "b"]}, {"sequences": ["8", "16"]}, {"loss": [None, None]}])
def test_eval_tables_with_columns_of_the_wrong_kind_are_refused(world, columns):
    run_dir = world / "run"
    table = pd.DataFrame({"step": [1, 2], "sequences": [8, 16], "evaluator": ["fsl_train"] * 2, "loss": [0.5, 0.4]})
    table.assign(**columns).to_parquet(run_dir / "eval.parquet")
    assert_refused(run("analyze", run_dir), "eval.parquet")


@pytest.mark.parametrize("kind", ["fifo", "folder", "dev_zero", "huge", "/dev/zero", "/dev/null", "/dev/stdin"])
def test_only_regular_files_of_a_plausible_size_are_checkpoints(world, kind):
    path = world / "step_00000030.pt"
    if kind.startswith("/"):
        path = Path(kind)
    else:
        plant(path, kind)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        in_thread(lambda: load_checkpoint_file(path))
    graft = f"+clamp.g={{kind: graft_in, layer: 0, checkpoint: '{path}'}}"
    assert_refused(in_thread(lambda: run("analyze", "eval", world / "run", graft)), "cannot read checkpoint")


def test_a_checkpoint_larger_than_the_memory_available_is_not_read(trained, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    with pytest.raises(CheckpointError, match="more than the 1,000"):
        load_checkpoint_file(trained / "checkpoints" / "step_00000030.pt")


def test_a_checksum_sidecar_that_is_a_device_is_not_read(world):
    checkpoint = world / "run" / "checkpoints" / "step_00000030.pt"
    plant(checkpoint.with_suffix(".pt.sha256"), "dev_zero")
    with pytest.raises(CheckpointError):
        in_thread(lambda: load_checkpoint_file(checkpoint))


# --- 8, toy: every setting in range, one line --------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--iterations", "1000000000000"], "iterations=1000000000000 must lie in [1, 100,000]"),
    (["--iterations", "0"], "iterations=0 must lie in"),
    (["--seed", "99999999999999999999"], "seed=99999999999999999999 must lie in"),
    (["--seed", "-1"], "seed=-1 must lie in"),
    (["--lr", "inf"], "lr=inf must be a positive finite number"),
    (["--lr", "nan"], "lr=nan must be a positive finite number"),
    (["--lr", "-1"], "lr=-1.0 must be a positive finite number"),
    (["--dim", "nan"], "Invalid value for '--dim'"),
    (["--dim", "0"], "dim=0 must lie in"),
    (["--lr", "abc"], "Invalid value for '--lr'"),
    (["--conditions"], "requires an argument"),
])
def test_toy_settings_out_of_range_are_one_line(outputs_root, args, message):
    assert_refused(in_thread(lambda: run("toy", *args)), message)
    assert not any(outputs_root.iterdir())


# --- option values: one line, never a usage box ---------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["reproduce", "--scale", "abc"], "Invalid value for '--scale'"),
    (["reproduce", "--scale", "nan"], "--scale nan must lie in (0, 1]"),
    (["reproduce", "--max-pack-runs", "-1"], "Invalid value for '--max-pack-runs'"),
    (["sweep", "--max-pack-runs", "-1", "seed=1,2"], "Invalid value for '--max-pack-runs'"),
    (["sweep", "--max-pack-runs", "x", "seed=1,2"], "Invalid value for '--max-pack-runs'"),
    (["analyze", "{run}", "--band", "nan"], "--band nan must be a positive finite number"),
    (["analyze", "{run}", "--band", "-5"], "--band -5.0 must be a positive finite number"),
    (["analyze", "{run}", "--band", "inf"], "--band inf must be a positive finite number"),
    (["analyze", "{run}", "--band", "x"], "Invalid value for '--band'"),
    (["analyze", "{run}", "--thresholds", "inf"], "'inf' must be a positive finite number"),
    (["analyze", "{run}", "--thresholds", "nan"], "'nan' must be a positive finite number"),
    (["analyze", "{run}", "--thresholds", "0.1,infln2"], "'infln2' must be a positive finite number"),
    (["analyze", "heads", "{run}", "--sequences", "0"], "Invalid value for '--sequences'"),
    (["analyze", "heads", "{run}", "--step", "x"], "Invalid value for '--step'"),
])
def test_option_values_out_of_range_are_one_line(world, args, message):
    before = snapshot(world)
    assert_refused(run(*(a.replace("{run}", str(world / "run")) for a in args)), message)
    assert snapshot(world) == before


# --- paths: outputs folder empty, files on the way, PATH_MAX ----------------------------------------------------


def test_an_empty_outputs_setting_means_the_default_outputs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IHSTUDY_OUTPUTS", "")
    _, run_dir = compose_config([])
    assert run_dir.parts[0] == "outputs"
    result = run("train", "-q", *SHORT)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]


@pytest.mark.parametrize("setting", ["out", "outputs"])
@pytest.mark.parametrize("obstacle", ["a file", "read-only"])
def test_reproduce_toy_into_a_file_or_a_read_only_folder_is_one_line(outputs_root, monkeypatch, setting, obstacle):
    target = outputs_root / "target"
    if obstacle == "a file":
        target.write_text("mine")
    else:
        target.mkdir()
        monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root: chmod is not enforced
    before = snapshot(outputs_root)
    if setting == "outputs":
        monkeypatch.setenv("IHSTUDY_OUTPUTS", str(target))
        result = run("reproduce", "-q", "toy", "--scale", "0.002")
    else:
        result = run("reproduce", "-q", "toy", "--scale", "0.002", "--out", target / "r")
    assert_refused(result, "is a file, not a folder" if obstacle == "a file" else "permission denied")
    assert snapshot(outputs_root) == before


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_path_longer_than_path_max_is_refused_before_any_folder_is_made(outputs_root, command):
    deep = outputs_root / "/".join(["d" * 200] * 25)  # every name fits, the path does not
    key = "hydra.run.dir" if command == "train" else "hydra.sweep.dir"
    args = [f"{key}={deep}"] + (["seed=1,2"] if command == "sweep" else [])
    assert_refused(run(command, "-q", *SHORT, *args), "bytes long, the filesystem allows")
    assert not any(outputs_root.iterdir())


# --- 9. planning shows its progress ------------------------------------------------------------------------------


def test_planning_reports_every_run_it_composes(outputs_root):
    seen = []
    plan_sweep(["seed=range(1,6)", *SHORT], on_run=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(6)]


def test_a_long_plan_shows_a_progress_bar_on_a_terminal(outputs_root, monkeypatch):
    from io import StringIO

    from rich.console import Console

    screen = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=100))
    result = run("reproduce", "3", "--scale", "0.002", "seed=range(0,3)", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "planning" in screen.getvalue() and "3/3 runs" in screen.getvalue()


# --- 10. analysing a sweep never stops it from being continued ------------------------------------------------


def test_a_sweep_analysed_in_place_can_be_continued_and_extended(outputs_root):
    sweep_dir = outputs_root / "sw1"
    first = run("sweep", "-q", "seed=1,2", *SHORT, f"hydra.sweep.dir={sweep_dir}")
    assert first.exit_code == 0, first.output
    for analysis in (["analyze", sweep_dir], ["analyze", "heads", sweep_dir / "seed=1", "--sequences", 64]):
        result = run(*analysis)
        assert result.exit_code == 0, result.output
    assert {p.name for p in (sweep_dir / "analysis").iterdir()} == {"timing", "heads-seed=1"}
    for seeds in ("seed=1,2", "seed=1,2,3"):  # continued, then extended
        again = run("sweep", "-q", seeds, *SHORT, f"hydra.sweep.dir={sweep_dir}")
        assert again.exit_code == 0, again.output
    (sweep_dir / "analysis" / "timing" / "my_notes.md").write_text("mine")  # a user's file is still foreign
    assert_refused(run("sweep", "-q", "seed=1,2,3", *SHORT, f"hydra.sweep.dir={sweep_dir}"), "holds files no sweep wrote")


# --- 11. environmental failures resume, numerical ones stay failed unless --retry-failed --------------------------


def test_a_sweep_failed_by_a_full_disk_resumes_once_there_is_space(outputs_root, monkeypatch):
    sweep_dir, fsync, written = outputs_root / "sw", os.fsync, [0]

    def fsync_on_a_small_disk(fd):  # every run file is fsync'ed before its rename
        written[0] += os.fstat(fd).st_size
        if written[0] > 60_000 and os.fstat(fd).st_size > 4096:  # tables and checkpoints; run.json still fits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync_on_a_small_disk)
        full = run("sweep", "-q", "seed=1,2", *SHORT, f"hydra.sweep.dir={sweep_dir}")
    assert full.exit_code == 1 and "No space left on device" in full.output, full.output
    statuses = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/run.json"))]
    assert [(s["status"], s["failure"]) for s in statuses] == [("failed", "environment")] * 2
    again = run("sweep", "-q", "seed=1,2", *SHORT, f"hydra.sweep.dir={sweep_dir}")
    assert again.exit_code == 0, again.output
    assert "0 already finished, 2 to train" in again.output
    statuses = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/run.json"))]
    assert [(s["status"], s["failure"], s["error"]) for s in statuses] == [("completed", None, None)] * 2


def test_a_nan_run_stays_failed_unless_retry_failed(outputs_root):
    sweep_dir = outputs_root / "sw"
    args = ["sweep", "-q", "optim=sgd", "optim.lr=100,0.001", *SHORT, "train.sequences=800", f"hydra.sweep.dir={sweep_dir}"]
    first = run(*args)
    assert first.exit_code == 1 and "loss became NaN" in first.output, first.output
    failed = RunFiles(sweep_dir / "optim.lr=100")
    assert failed.read_status()["failure"] == "numerical"
    again = run(*args)
    assert again.exit_code == 1 and "2 already finished, 0 to train" in again.output, again.output
    retried = run(*args, "--retry-failed")
    assert retried.exit_code == 1 and "1 already finished, 1 to train" in retried.output, retried.output
    assert failed.read_status()["status"] == "failed" and failed.read_status()["failure"] == "numerical"


def test_which_runs_a_sweep_trains_again(tmp_path):
    from ihstudy.training.sweep import needs_training

    atomic_write_text(tmp_path / "run.json", json.dumps({"status": "failed", "error": "x", "failure": "environment"}))
    assert needs_training(RunFiles(tmp_path).read_status())
    assert not needs_training({"status": "failed", "failure": "numerical"})
    assert needs_training({"status": "failed", "failure": "numerical"}, retry_failed=True)
    assert not needs_training({"status": "failed"})  # written before failures had a kind: as numerical
    assert needs_training({"status": "running"}) and needs_training({"status": "interrupted"}) and needs_training({})
    assert not needs_training({"status": "completed"}, retry_failed=True)
