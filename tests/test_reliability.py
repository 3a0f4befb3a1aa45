"""Killed, interrupted, failing and concurrent runs: resume is exact and nothing written is lost."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.config import compose_config
from ihstudy.errors import UserError
from ihstudy.run_files import RunFiles, claim_run_dir, load_checkpoint_file, lock_run_dir
from ihstudy.training import recorder
from ihstudy.training.train import Pack, RunSpec

# ~500 steps of a small model with frequent evals and checkpoints: long enough to kill mid-run.
RUN = ["train.threads=1", "train.batch_size=8", "train.sequences=4000", "train.eval_every=400",
       "train.ckpt_every=240", "eval.n_sequences=20", "model.d_model=32", "model.n_heads=4"]
IHSTUDY = [sys.executable, "-m", "ihstudy.cli"]


def train(run_dir, *args):
    return CliRunner().invoke(app, ["train", "-q", f"hydra.run.dir={run_dir}", *RUN, *args])


def tables(run_dir) -> dict:
    return {name: pd.read_parquet(Path(run_dir) / f"{name}.parquet") for name in ("metrics", "eval")}


def assert_same_tables(run_dir, reference: dict) -> None:
    for name, frame in tables(run_dir).items():
        pd.testing.assert_frame_equal(frame, reference[name], check_exact=True, obj=name)
    assert status(run_dir)["status"] == "completed"


def status(run_dir) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The folder and tables of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IHSTUDY_OUTPUTS", str(run_dir.parent))
        result = train(run_dir)
    assert result.exit_code == 0, result.output
    return {"dir": run_dir, **tables(run_dir)}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_run_killed_at_a_random_moment_resumes_to_identical_tables(tmp_path, reference):
    run_dir = tmp_path / "run"
    env = os.environ | {"IHSTUDY_OUTPUTS": str(tmp_path)}
    process = subprocess.Popen([*IHSTUDY, "train", "-q", f"hydra.run.dir={run_dir}", *RUN], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "run.json", process)
    second = train(run_dir, "--resume")  # a second process may not touch the run while the first trains
    assert second.exit_code == 2 and "in use by another ihstudy process" in second.output, second.output
    seed = int(os.environ.get("IHSTUDY_KILL_SEED", random.randrange(2**32)))  # a new moment each time, reproducible
    choice = random.Random(seed)
    checkpoints, delay = choice.randint(0, 12), choice.uniform(0, 0.2)  # of 16 checkpoints, 30 steps apart
    if checkpoints:
        wait_for(run_dir / "checkpoints" / f"step_{30 * checkpoints:08d}.pt", process)
    time.sleep(delay)
    when = f"killed {delay:.2f}s after checkpoint {checkpoints}; repeat with IHSTUDY_KILL_SEED={seed}"
    assert process.poll() is None, f"the run ended before it was {when}: make RUN longer"
    process.kill()
    process.wait()
    assert status(run_dir)["status"] == "running"
    resumed = train(run_dir, "--resume")
    assert resumed.exit_code == 0, f"{resumed.output} ({when})"
    assert_same_tables(run_dir, reference)


def test_ctrl_c_stops_at_a_step_boundary_and_the_run_resumes_exactly(tmp_path, reference, monkeypatch):
    step_once = Pack.train_step

    def step_then_ctrl_c(pack):
        step_once(pack)
        if pack.step == 77:  # not a checkpoint step: the interrupt saves its own
            signal.raise_signal(signal.SIGINT)

    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a process started in the background
    with monkeypatch.context() as patch:
        patch.setattr(Pack, "train_step", step_then_ctrl_c)
        result = train(run_dir)
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output and f"hydra.run.dir={run_dir}" in result.output
    assert status(run_dir)["status"] == "interrupted" and status(run_dir)["step"] == 77
    assert RunFiles(run_dir).checkpoint_steps() == [30, 60, 77]
    assert len(pd.read_parquet(run_dir / "metrics.parquet")) == 77
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C works as it did before the run
    resumed = train(run_dir, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_tables(run_dir, reference)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "truncate_without_checksum"])
def test_damaged_newest_checkpoints_are_reported_and_the_previous_one_used(tmp_path, reference, damage, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    for step in (500, 480):  # back to 450, where the run had also evaluated: that eval must not be doubled
        newest = run_dir / "checkpoints" / f"step_{step:08d}.pt"
        data = newest.read_bytes()
        if damage == "flip_a_byte":
            newest.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
        else:
            newest.write_bytes(data[: len(data) // 2])
        if damage == "truncate_without_checksum":
            newest.with_suffix(".pt.sha256").unlink()
    pack = Pack([RunSpec(compose_config(RUN)[0], run_dir)])
    assert pack.restore() == 450
    assert "step_00000500.pt" in caplog.text and "step_00000480.pt" in caplog.text
    assert "trying an older checkpoint" in caplog.text
    pack.train()
    assert_same_tables(run_dir, reference)


@pytest.mark.parametrize("watch_seconds", [0.0, 1e9])
def test_metrics_are_on_disk_at_evals_every_watch_seconds_and_at_the_end(tmp_path, monkeypatch, watch_seconds):
    monkeypatch.setattr(recorder, "WATCH_SECONDS", watch_seconds)
    cfg, _ = compose_config([*RUN, "train.sequences=800", "train.eval_every=160", "train.ckpt_every=480"])
    pack = Pack([RunSpec(cfg, tmp_path / "run")])
    on_disk = []
    evaluate = pack.evaluate

    def evaluate_and_look():
        evaluate()
        files = [tmp_path / "run" / f"{table}.parquet" for table in ("metrics", "eval")]
        on_disk.append((pack.step, *(len(pd.read_parquet(f)) if f.exists() else None for f in files)))

    pack.evaluate = evaluate_and_look
    pack.train()
    every_eval = [(step, step, (step // 20 + 1) * 4) for step in range(0, 101, 20)]
    # never due: the tables are written at the checkpoints (steps 60, 100) and after the last eval
    assert on_disk == every_eval if watch_seconds == 0 else [(0, None, None), (20, None, None), (40, None, None),
                                                             (60, 60, 12), (80, 60, 12), (100, 100, 24)]


def test_nan_loss_fails_the_run_visibly_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, "optim=sgd", "optim.lr=1", "train.ckpt_every=40")  # diverges after ~20 steps
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "loss became NaN or infinite at step" in result.output, result.output
    run = status(run_dir)
    assert run["status"] == "failed" and "NaN" in run["error"]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    failed_at = len(metrics) + 1
    assert f"at step {failed_at}" in run["error"] and metrics.loss.notna().all()
    steps = RunFiles(run_dir).checkpoint_steps()
    assert steps and max(steps) < failed_at
    last = load_checkpoint_file(run_dir / "checkpoints" / f"step_{max(steps):08d}.pt")
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_full_disk_fails_cleanly_and_the_run_resumes_once_there_is_space(tmp_path, reference, monkeypatch):
    run_dir = tmp_path / "run"
    written, fsync = [0], os.fsync

    def fsync_on_a_small_disk(fd):  # every run file is fsync'ed before its rename
        written[0] += os.fstat(fd).st_size
        if written[0] > 1_500_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync_on_a_small_disk)
        result = train(run_dir)
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    for step in RunFiles(run_dir).checkpoint_steps():  # every file on disk is whole
        path = run_dir / "checkpoints" / f"step_{step:08d}.pt"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.with_suffix(".pt.sha256").read_text().strip()
        load_checkpoint_file(path)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert 0 < len(metrics) < 500
    pd.testing.assert_frame_equal(metrics, reference["metrics"].iloc[: len(metrics)])
    resumed = train(run_dir, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_tables(run_dir, reference)


def test_resume_refuses_another_config(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "train.sequences=480").exit_code == 0
    RunFiles(run_dir).write_status(status="running")
    other = train(run_dir, "train.sequences=480", "optim.lr=1e-3", "--resume")
    assert other.exit_code == 2 and "differs in optim.lr" in other.output, other.output
    other_data = train(run_dir, "train.sequences=480", "train.chunk_batches=64", "--resume")  # other sequences per data_seed
    assert other_data.exit_code == 2 and "differs in train.chunk_batches" in other_data.output, other_data.output
    assert train(run_dir, "--resume").exit_code == 2  # train.sequences differs too
    done = train(run_dir, "train.sequences=480", "--resume")
    assert done.exit_code == 0


def test_resuming_a_completed_run_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "train.sequences=480").exit_code == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = train(run_dir, "train.sequences=480", "--resume")
    assert again.exit_code == 0 and "already completed" in again.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def claim_default_folder(run_dir: str) -> str:
    claimed, lock = claim_run_dir(Path(run_dir), rename_on_collision=True)
    RunFiles(claimed).write_status(status="running", pid=os.getpid())
    time.sleep(0.02)  # busy for a moment, so that every worker gets tasks
    lock.release()
    return str(claimed)


def claim_named_folder(run_dir: str) -> str:
    try:
        claimed, lock = claim_run_dir(Path(run_dir))
    except UserError as exc:
        return f"refused: {exc}"
    RunFiles(claimed).write_status(status="running", pid=os.getpid())
    time.sleep(0.05)
    lock.release()
    return "claimed"


def test_processes_starting_in_the_same_second_get_separate_folders(tmp_path):
    same_second = str(tmp_path / "2026-01-01" / "12-00-00")
    with ProcessPoolExecutor(4, mp_context=get_context("fork")) as pool:
        folders = list(pool.map(claim_default_folder, [same_second] * 24))
    assert len(set(folders)) == 24
    owners = {json.loads((Path(f) / "run.json").read_text())["pid"] for f in folders}
    assert len(owners) > 1  # really concurrent
    with ProcessPoolExecutor(4, mp_context=get_context("fork")) as pool:
        outcomes = list(pool.map(claim_named_folder, [str(tmp_path / "named")] * 8))
    assert outcomes.count("claimed") == 1, outcomes


@pytest.mark.slow  # torch.compile: ~35 s of CPU with a cold compile cache (a fresh CI machine)
def test_compiled_runs_are_reproducible_and_resume_exactly(tmp_path, reference, monkeypatch):
    """train.compile=true (what long runs use): the same tables twice, and after an interruption."""
    step_once = Pack.train_step
    compiled = ["train.compile=true"]
    assert train(tmp_path / "first", *compiled).exit_code == 0

    def step_then_ctrl_c(pack):
        step_once(pack)
        if pack.step == 77:
            signal.raise_signal(signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(Pack, "train_step", step_then_ctrl_c)
        assert train(tmp_path / "second", *compiled).exit_code == 130
    assert train(tmp_path / "second", *compiled, "--resume").exit_code == 0
    first = tables(tmp_path / "first")
    assert_same_tables(tmp_path / "second", first)
    for name, table in first.items():  # compiled and uncompiled steps agree up to float rounding
        pd.testing.assert_frame_equal(table, reference[name], check_exact=False, rtol=1e-3, atol=1e-4)


# --- --overwrite never deletes what is not one run; a crash never leaves a run "running" (issue 13) ----


def files_under(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def test_overwrite_refuses_a_folder_holding_more_than_one_run(tmp_path, reference):
    """The user's notes beside a run, runs nested in a folder, a sweep: --overwrite deletes none of it."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    shutil.copytree(reference["dir"], precious / "run-a")
    run_and_notes = tmp_path / "run-and-notes"
    shutil.copytree(reference["dir"], run_and_notes)
    (run_and_notes / "checkpoints" / "notes.txt").write_text("mine")
    sweep_dir = tmp_path / "sweep"
    for name in ("seed=1", "seed=2"):
        shutil.copytree(reference["dir"], sweep_dir / name)
    (sweep_dir / "plan.json").write_text("{}")
    before = files_under(tmp_path)
    for folder, message in [(precious, "is not empty and holds no run"), (sweep_dir, "is not empty and holds no run"),
                            (run_and_notes, "holds a run and other files (checkpoints/notes.txt)")]:
        result = train(folder, "train.sequences=480", "--overwrite")
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert files_under(tmp_path) == before  # not even a lock file


def test_overwrite_replaces_a_folder_holding_exactly_one_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    (run_dir / ".eval.parquet.x1y2.tmp").write_text("left by a crash")
    assert train(run_dir, "train.sequences=480", "--overwrite").exit_code == 0
    assert pd.read_parquet(run_dir / "metrics.parquet").step.max() == 60  # the new run, not the old one
    assert not (run_dir / ".eval.parquet.x1y2.tmp").exists()
    assert RunFiles(run_dir).checkpoint_steps() == [30, 60]  # the old run had 16, up to step 500


def lock_is_free(run_dir: Path) -> bool:
    from filelock import FileLock, Timeout

    try:
        FileLock(run_dir / ".lock", timeout=0).acquire().lock.release()
    except Timeout:
        return False
    return True


@pytest.mark.parametrize("where", ["train_step", "restore"])
def test_a_crash_marks_the_run_failed_and_frees_it(tmp_path, monkeypatch, where):
    """Any error once the run folder exists: status failed with the error, lock released, exit 1,
    one line; the run resumes once the cause is gone."""
    run_dir, real = tmp_path / "run", getattr(Pack, where)
    args = ["train.sequences=480", "--resume"] if where == "restore" else []

    def crash(pack, *args):
        if where == "restore" or pack.step == 100:
            raise RuntimeError("boom\nsecond line")
        return real(pack, *args)

    if where == "restore":
        assert train(run_dir, "train.sequences=480").exit_code == 0
        RunFiles(run_dir).write_status(status="interrupted")
    with monkeypatch.context() as patch:
        patch.setattr(Pack, where, crash)
        result = train(run_dir, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    step = 101 if where == "train_step" else 1
    assert result.output.strip().splitlines() == [f"error: {run_dir}: stopped by RuntimeError: boom at step {step}"]
    assert status(run_dir)["status"] == "failed" and "RuntimeError: boom" in status(run_dir)["error"]
    assert lock_is_free(run_dir)
    assert train(run_dir, *args[:1], "--resume").exit_code == 0


def test_sigterm_stops_a_parallel_sweep_with_its_workers(tmp_path):
    """`kill` on a sweep whose packs train in joblib workers ends the workers too (exit 130), so the
    same command can continue at once; left alone they would train on, holding their run folders."""
    args = [*IHSTUDY, "sweep", "-q", "seed=5,6", "--max-pack-runs", "1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path}/s", *RUN[:2], "train.sequences=400000", "train.eval_every=40000",
            "train.ckpt_every=800", "eval.n_sequences=20"]
    env = os.environ | {"IHSTUDY_OUTPUTS": str(tmp_path)}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for seed in (5, 6):
        wait_for(tmp_path / "s" / f"seed={seed}" / "checkpoints" / f"step_{100:08d}.pt", process)
    process.send_signal(signal.SIGTERM)  # to the sweep's own process only, as `kill <pid>` does
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "interrupted" in err, err
    for seed in (5, 6):  # no worker trains on: each run folder is free (within a few seconds)
        run_dir = tmp_path / "s" / f"seed={seed}"
        deadline = time.monotonic() + 10
        while True:
            try:
                lock_run_dir(run_dir).release()
                break
            except UserError:
                assert time.monotonic() < deadline, f"{run_dir} is still in use"
                time.sleep(0.2)
        assert status(run_dir)["status"] in ("running", "interrupted")
