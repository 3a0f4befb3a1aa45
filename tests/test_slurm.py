"""Sweeps on a real Slurm with a node on this machine (CI starts one: .ci/run, scripts/start-local-slurm.sh): pack
jobs cancelled or warned of their time limit mid-run make the sweep command fail with one line, and
the same command run again finishes every run with the tables of an uninterrupted sweep."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import ihstudy

# Two runs, one pack job each (a Slurm array of two tasks): 500 steps, a checkpoint every 100.
RUNS = ["seed=1,2", "train.sequences=16000", "train.eval_every=1600", "train.ckpt_every=3200", "eval.n_sequences=100",
        "train.threads=1", "--max-pack-runs", "1", "-q"]
RUN_NAMES = ("seed=1", "seed=2")
SWEEP_TIMEOUT_S = 300  # a sweep takes ~25 s here; generous for a loaded machine


def slurm_answers() -> bool:
    try:  # with a slurm.conf but no controller, sinfo gives up after ~10 s
        return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True,
                                                                    timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def partition() -> str:
    """The default partition of a Slurm that is up, with a node on this machine. The test starts
    none itself (a user's `make test` installs and leaves nothing): .ci/run starts one for CI."""
    if not slurm_answers():
        pytest.skip("no Slurm is up here (sinfo); scripts/start-local-slurm.sh starts one, as .ci/run does")
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    if socket.gethostname().split(".")[0] not in nodes:
        pytest.skip("this Slurm has no node on this machine, and the test's files are local")
    default = [p for p in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
               if p.endswith("*")]
    return default[0].rstrip("*") if default else "local"


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ihstudy.cli", "sweep", *RUNS, *args]


def job_env(outputs: Path) -> dict:
    """The environment of the sweep command, which sbatch passes on to its jobs: they import the
    same ihstudy as this test (sys.executable runs them) and write into the same outputs folder."""
    source = str(Path(ihstudy.__file__).resolve().parents[1])
    return os.environ | {"PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
                         "IHSTUDY_OUTPUTS": str(outputs)}


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def array_jobs(sweep_dir: Path) -> list[str]:
    """The Slurm array jobs a sweep submitted (submitit keeps one folder per job id)."""
    folder = sweep_dir / ".submitit"
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def finish(command: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = command.communicate(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        command.kill()
        pytest.fail(f"the sweep command did not end within {SWEEP_TIMEOUT_S} s")
    return command.returncode, err


def test_stopped_pack_jobs_resume_when_the_sweep_runs_again(partition, tmp_path):
    """seed=1's job is cancelled (scancel: SIGTERM), seed=2's gets the warning Slurm sends before a
    time limit (SIGUSR2, submitit's --signal); both stop at a step with a checkpoint."""
    env, sweep_dir, reference_dir = job_env(tmp_path), tmp_path / "slurm", tmp_path / "reference"
    on_slurm = sweep_command("hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}",
                             "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5",
                             f"+hydra.launcher.additional_parameters.nodelist={socket.gethostname().split('.')[0]}",
                             f"hydra.sweep.dir={sweep_dir}")
    # The same runs, uninterrupted and in this machine's process, alongside.
    reference = subprocess.Popen(sweep_command(f"hydra.sweep.dir={reference_dir}"), env=env, text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = subprocess.Popen(on_slurm, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        signals = {"seed=1": [], "seed=2": ["--signal=USR2"]}

        def signal_runs_with_a_checkpoint() -> bool:  # each as soon as it has one (the jobs may run one by one)
            for run in [run for run in signals if list((sweep_dir / run / "checkpoints").glob("*.pt"))]:
                pack = next(i for i, p in enumerate(json.loads((sweep_dir / "plan.json").read_text())["packs"])
                            if p["runs"][0]["name"] == run)
                subprocess.run(["scancel", *signals.pop(run), f"{array_jobs(sweep_dir)[0]}_{pack}"], check=True)
            return not signals

        wait_for(signal_runs_with_a_checkpoint, SWEEP_TIMEOUT_S, "a checkpoint of every run")
        code, err = finish(first)
        assert code == 1, err
        assert "a pack job failed: pack " in err and "was stopped by a signal" in err, err
        for run in RUN_NAMES:
            status = json.loads((sweep_dir / run / "run.json").read_text())
            assert status["status"] == "interrupted" and 0 < status["step"] < 500, run  # really cut short

        again = subprocess.Popen(on_slurm, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        code, err = finish(again)
        assert code == 0, err
        assert "0 already finished, 2 to train" in err, err
        assert finish(reference)[0] == 0
    finally:
        for proc in (first, reference):
            if proc.poll() is None:
                proc.kill()
        for job in array_jobs(sweep_dir):  # nothing of ours stays queued or running
            subprocess.run(["scancel", job], capture_output=True)

    assert (pd.read_parquet(sweep_dir / "sweep.parquet").status == "completed").all()
    for run in RUN_NAMES:
        for table in ("metrics.parquet", "eval.parquet"):
            resumed, uninterrupted = (pd.read_parquet(d / run / table) for d in (sweep_dir, reference_dir))
            assert len(resumed) > 0 and resumed.equals(uninterrupted), f"{run}/{table}"
