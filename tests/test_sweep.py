"""Sweeps: packing, pack-vs-solo equivalence, failure isolation, re-runs, launchers, bad input."""

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.config import compose_config
from ihstudy.training import sweep as sweeps
from ihstudy.training.sweep import PARALLEL_LAUNCHER, available_cores, makespan, plan_sweep, run_sweeps
from ihstudy.training.train import Pack, RunSpec, phase_change_sequences

# 300 steps at lr 1e-3: the fsl_train loss crosses 0.4 ln 2 at ~8000 sequences (seed 5).
CROSSING = ["optim.lr=1e-3", "train.sequences=9600", "train.eval_every=800", "eval.n_sequences=100", "train.threads=1"]
TINY = ["train.sequences=640", "train.eval_every=320", "train.ckpt_every=320", "eval.n_sequences=50", "train.threads=1"]


def sweep(*args):
    return CliRunner().invoke(app, ["sweep", "-q", *args])


def run_dirs(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").exists())


@pytest.fixture(scope="module")
def pack_and_solo(tmp_path_factory):
    """The same run trained alone, and inside a pack with a run of other seeds, lr and clamp and
    a clamped run that turns NaN."""
    root = tmp_path_factory.mktemp("pack")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IHSTUDY_OUTPUTS", str(root))
        mates = [[], ["seed=6", "data_seed=3", "eval_seed=4", "optim.lr=2e-3", "clamp=copy"],
                 ["clamp=pt_attention", "optim.lr=1e30"]]
        specs = [RunSpec(compose_config([*CROSSING, *extra])[0], root / f"packed{i}", str(i)) for i, extra in enumerate(mates)]
        packed = Pack(specs).train()
        solo = Pack([RunSpec(specs[0].cfg, root / "solo", "solo")]).train()
    return root, packed, solo


def test_run_in_a_pack_matches_the_same_run_alone(pack_and_solo):
    root, packed, solo = pack_and_solo
    alone, inside = (pd.read_parquet(root / name / "eval.parquet") for name in ("solo", "packed0"))
    assert phase_change_sequences(alone) is not None  # the check needs a real phase change
    assert phase_change_sequences(inside) == phase_change_sequences(alone)
    assert inside[["step", "evaluator"]].equals(alone[["step", "evaluator"]])
    numeric = alone.columns.drop(["step", "sequences", "evaluator"])
    assert (inside[numeric] - alone[numeric]).abs().max().max() < 1e-4
    assert solo[0].summary["fsl_train.loss"] == pytest.approx(packed[0].summary["fsl_train.loss"], abs=1e-4)
    # the pack-mates really are different runs
    assert abs(packed[1].summary["fsl_train.loss"] - packed[0].summary["fsl_train.loss"]) > 1e-3


def test_failing_run_stops_alone(pack_and_solo):
    root, packed, _ = pack_and_solo
    assert [r.status for r in packed] == ["completed", "completed", "failed"]
    status = json.loads((root / "packed2" / "run.json").read_text())
    assert status["status"] == "failed" and "NaN" in status["error"]
    assert pd.read_parquet(root / "packed1" / "metrics.parquet").step.max() == 300


SPARSE = ["eval=sparse", "eval.sparse_every=480", "train.sequences=960", "train.eval_every=160", "train.ckpt_every=224",
          "eval.n_sequences=50", "model.d_model=32", "model.n_heads=4", "optim.lr=1e-3", "train.threads=1"]


def test_sparse_evaluators_skip_their_points_alike_alone_in_a_pack_and_resumed(tmp_path):
    """eval=sparse: fsl_train at every eval point, the other evaluators every eval.sparse_every
    sequences and at the end; the same rows in a pack, and exactly the same after resuming from a
    checkpoint between two sparse points."""
    cfg = compose_config(SPARSE)[0]
    solo = tmp_path / "solo"
    [result] = Pack([RunSpec(cfg, solo)]).train()
    evals = pd.read_parquet(solo / "eval.parquet")
    others = ["fsl_val_rl", "fsl_train_valex", "fsl_test_class"]
    assert evals.groupby("evaluator").sequences.apply(list).to_dict() == {"fsl_train": list(range(0, 961, 160)),
                                                                         **dict.fromkeys(others, [0, 480, 960])}
    assert result.summary["fsl_test_class.loss"] == evals.loss.iloc[-1]  # final losses: every evaluator at the end

    mate = compose_config([*SPARSE, "seed=6", "clamp=copy"])[0]
    Pack([RunSpec(mate, tmp_path / "mate"), RunSpec(cfg, tmp_path / "packed")]).train()
    packed = pd.read_parquet(tmp_path / "packed" / "eval.parquet")
    assert packed[["step", "evaluator"]].equals(evals[["step", "evaluator"]])
    numeric = evals.columns.drop(["step", "sequences", "evaluator"])
    assert (packed[numeric] - evals[numeric]).abs().max().max() < 1e-4

    dense = compose_config([*SPARSE, "eval=default"])[0]  # the same run, every evaluator at every point
    Pack([RunSpec(dense, tmp_path / "dense")]).train()
    every = pd.read_parquet(tmp_path / "dense" / "eval.parquet")
    assert len(every) == 4 * 7 and every.merge(evals).shape == evals.shape  # the sparse rows: a subset, bit for bit
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dense" / "metrics.parquet"),
                                  pd.read_parquet(solo / "metrics.parquet"), check_exact=True)

    resumed = tmp_path / "resumed"  # as if killed after its checkpoint at step 7 (224 sequences)
    shutil.copytree(solo, resumed)
    for checkpoint in resumed.glob("checkpoints/step_*.pt*"):
        if int(checkpoint.name.split("_")[1].split(".")[0]) > 7:
            checkpoint.unlink()
    pack = Pack([RunSpec(cfg, resumed)])
    assert pack.restore() == 7
    pack.train()
    pd.testing.assert_frame_equal(pd.read_parquet(resumed / "eval.parquet"), evals, check_exact=True)


def test_sweep_marks_the_failed_run_and_finishes_the_rest(tmp_path):
    result = sweep("optim.lr=1e-3,1e30", *TINY, f"hydra.sweep.dir={tmp_path}/s")
    assert result.exit_code == 1, result.output
    assert "failed: optim.lr=1e+30: loss became NaN" in result.output
    index = pd.read_parquet(tmp_path / "s" / "sweep.parquet").set_index("run")
    assert index.status.to_dict() == {"optim.lr=0.001": "completed", "optim.lr=1e+30": "failed"}
    assert (index.pack == 0).all()  # one pack
    assert index.loc["optim.lr=0.001", "fsl_train.loss"] > 0 and "NaN" in index.loc["optim.lr=1e+30", "error"]


def test_runs_pack_by_shape_and_schedule_only():
    plan = plan_sweep(["seed=5,6", "task.n_labels=5,10", "clamp=none,copy", "optim.lr=1e-3", "data.seed=1,2"])
    assert len(plan.runs) == 16 and len(plan.packs) == 2
    for pack in plan.packs:
        assert len(pack) == 8 and len({run.cfg.task.n_labels for run in pack}) == 1
    assert plan.runs[0].name == "seed=5,task.n_labels=5,clamp=none,data.seed=1"
    schedules = plan_sweep(["train.sequences=640,1280", "optim=adam,sgd"])
    assert len(schedules.packs) == 4


def test_experiment_preset_expands_and_command_line_wins():
    plan = plan_sweep(["experiment=fig5b"], max_pack_runs=0)
    assert [run.name for run in plan.runs] == ["clamp=only_l2h3", "clamp=pt_attention", "clamp=layer1",
                                               "clamp=match", "clamp=copy", "clamp=layer1_copy"]
    assert len(plan.packs) == 1 and plan.runs[0].cfg.train.eval_every == 1000
    narrowed = plan_sweep(["experiment=fig5b", "clamp=none,copy", "seed=5,6"])
    assert len(narrowed.runs) == 4 and narrowed.runs[0].name == "clamp=none,seed=5"


def test_rerun_skips_finished_runs_and_resumes_the_others(tmp_path):
    args = ["seed=5,6", *TINY, "train.ckpt_every=160", f"hydra.sweep.dir={tmp_path}/s"]
    assert sweep(*args).exit_code == 0
    done, killed = tmp_path / "s" / "seed=5", tmp_path / "s" / "seed=6"
    reference = pd.read_parquet(killed / "eval.parquet")
    # seed=6 as if killed after its checkpoint at step 10 (320 sequences)
    for step in (15, 20):
        for checkpoint in killed.glob(f"checkpoints/step_{step:08d}.pt*"):
            checkpoint.unlink()
    status = json.loads((killed / "run.json").read_text())
    (killed / "run.json").write_text(json.dumps(status | {"status": "running"}))
    kept = (killed / "checkpoints" / "step_00000010.pt").stat().st_mtime_ns
    finished = (done / "run.json").stat().st_mtime_ns

    result = CliRunner().invoke(app, ["sweep", *args])
    assert result.exit_code == 0, result.output
    assert "1 already finished, 1 to train" in result.output
    assert (done / "run.json").stat().st_mtime_ns == finished  # not touched
    assert (killed / "checkpoints" / "step_00000010.pt").stat().st_mtime_ns == kept  # resumed, not restarted
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "eval.parquet"), reference)
    assert set(pd.read_parquet(tmp_path / "s" / "sweep.parquet").status) == {"completed"}


TWO_PACKS = ["task.n_labels=5,10", *TINY]


@pytest.fixture(scope="module")
def in_process_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("basic")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IHSTUDY_OUTPUTS", str(root))
        assert sweep(*TWO_PACKS, f"hydra.sweep.dir={root}/s").exit_code == 0
    return root / "s"


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_run_one_job_per_pack(tmp_path, launcher, in_process_sweep):
    result = sweep(*TWO_PACKS, f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}/{launcher}")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / launcher / "plan.json").read_text())["jobs_per_machine"] == min(2, available_cores())
    assert sorted(pd.read_parquet(tmp_path / launcher / "sweep.parquet").pack) == [0, 1]
    for basic, launched in zip(run_dirs(in_process_sweep), run_dirs(tmp_path / launcher), strict=True):
        pd.testing.assert_frame_equal(pd.read_parquet(launched / "eval.parquet"), pd.read_parquet(basic / "eval.parquet"))


def test_packs_of_several_sweeps_train_as_one_launch(tmp_path, in_process_sweep):
    """ihstudy reproduce's way: the packs of two sweeps as one joblib multirun in a third folder."""
    sweeps = [plan_sweep([f"task.n_labels={n}", *TINY, "hydra/launcher=joblib", f"hydra.sweep.dir={tmp_path}/{n}"])
              for n in (5, 10)]
    results = run_sweeps(sweeps, tmp_path / "launch")
    assert [[r.status for r in rs] for rs in results] == [["completed"], ["completed"]]
    plan = json.loads((tmp_path / "launch" / "plan.json").read_text())
    assert [pack["runs"][0]["dir"] for pack in plan["packs"]] == [str(s.runs[0].dir) for s in sweeps]
    assert plan["jobs_per_machine"] == min(2, available_cores())
    assert sorted(p.name for p in (tmp_path / "launch" / "packs").iterdir()) == ["0", "1"]
    for sweep, basic in zip(sweeps, run_dirs(in_process_sweep)[::-1], strict=True):  # n_labels=10 sorts first
        assert (sweep.dir / "sweep.parquet").exists() and not (sweep.dir / "plan.json").exists()
        pd.testing.assert_frame_equal(pd.read_parquet(sweep.runs[0].dir / "eval.parquet"),
                                      pd.read_parquet(basic / "eval.parquet"))


@pytest.mark.parametrize("seeds,cores,sizes,side_by_side", [
    ("5,6", 2, [1, 1], True),  # each run on a core: 0.78 of the time of one two-thread pack (docs/sweeps.md)
    ("5,6,7", 2, [3], False),  # the model's margin: packs of 2 and 1 wait for the pack of 2
    ("5,6,7,8,9,10", 2, [3, 3], True),
    ("5,6,7,8", 4, [1, 1, 1, 1], True),
    ("5,6", 1, [2], False),
])
def test_a_sweep_chooses_its_packs_by_the_machine(monkeypatch, seeds, cores, sizes, side_by_side):
    monkeypatch.setattr(sweeps, "available_cores", lambda: cores)
    plan = plan_sweep([f"seed={seeds}", "train.sequences=2000000"])
    assert [len(pack) for pack in plan.packs] == sizes
    assert plan.launcher_overrides == (PARALLEL_LAUNCHER if side_by_side else [])


@pytest.mark.parametrize("preset,cost", [
    ("experiment=fig3", 1.0),  # the basis: 1 full layer x 5 positions + the query, of width 64
    ("experiment=fig6_long", 1.0),  # more labels, the same positions
    ("experiment=markov", 2 * 100 * 16 / 384),  # next-token loss: 2 layers x 100 positions of width 16
    ("experiment=repeat", 2 * 48 * 32 / 384),
])
def test_a_sequence_costs_its_positions_times_width(monkeypatch, preset, cost):
    """The cost model (pack_seconds) weighs a sequence by the positions its layers compute times the
    model's width, against the few-shot model it was measured on."""
    pack = plan_sweep([preset, "seed=5,6"]).runs[:1]
    assert sweeps.sequence_cost(pack[0]) == pytest.approx(cost)
    seconds = sweeps.pack_seconds(pack)
    monkeypatch.setattr(sweeps, "BASIS_ACTIVATIONS", 10**9)  # every sequence as cheap as the basis
    assert seconds == pytest.approx(cost * sweeps.pack_seconds(pack))


@pytest.mark.parametrize("args,max_pack_runs,sizes", [
    (["train.sequences=64000"], None, [2]),  # too short to pay for starting workers
    (["train.sequences=64000", "task.n_labels=5,10"], None, [2, 2]),  # and not split in this process either
    (["train.threads=1"], None, [2]),  # the user chose the threads
    (["hydra/launcher=basic"], None, [2]),  # ... or the launcher
    ([], 0, [2]),  # ... or the packs
])
def test_the_machine_chooses_nothing_the_user_chose(monkeypatch, args, max_pack_runs, sizes):
    monkeypatch.setattr(sweeps, "available_cores", lambda: 2)
    plan = plan_sweep(["seed=5,6", *args], max_pack_runs)
    assert [len(pack) for pack in plan.packs] == sizes and plan.launcher_overrides == [a for a in args if "hydra" in a]


def test_packs_the_machine_puts_side_by_side_train_as_in_one_process(tmp_path, monkeypatch, in_process_sweep):
    """Free workers (WORKER_START_SECONDS=0) put even tiny packs side by side, one thread each."""
    monkeypatch.setattr(sweeps, "WORKER_START_SECONDS", 0.0)
    monkeypatch.setattr(sweeps, "available_cores", lambda: 2)
    threads_chosen = [a for a in TWO_PACKS if a != "train.threads=1"]
    result = CliRunner().invoke(app, ["sweep", *threads_chosen, f"hydra.sweep.dir={tmp_path}/s"])
    assert result.exit_code == 0, result.output
    assert "2 pack(s), side by side in one worker process per core" in result.output
    assert json.loads((tmp_path / "s" / "plan.json").read_text())["jobs_per_machine"] == 2  # one thread each on 2 cores
    for basic, launched in zip(run_dirs(in_process_sweep), run_dirs(tmp_path / "s"), strict=True):  # more cores: rounding
        pd.testing.assert_frame_equal(pd.read_parquet(launched / "eval.parquet"), pd.read_parquet(basic / "eval.parquet"),
                                      rtol=1e-4)


def test_makespan_gives_each_job_to_the_first_free_worker():
    assert makespan([5, 4, 3], 2) == 7 and makespan([2, 2, 2], 1) == 6 and makespan([1], 4) == 1


@pytest.mark.parametrize("args,message", [
    ([], "nothing to sweep"),
    (["seed=5,5"], "repeats a run"),
    (["seed=range(5,5)"], "has no runs"),
    (["seed=5,6", "hydra/launcher=nope"], "hydra/launcher/nope"),
    (["model.n_heads=8,5", "seed=5,6"], "2 of 4 runs fail validation, none was run: model.n_heads=5,seed=5: "),
    (["experiment=fig5b,n_labels"], "one experiment per sweep"),
    (["seed=5,6", "hydra.sweep.dir=/elsewhere"], "not inside the outputs folder"),
])
def test_bad_sweep_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    result = sweep(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert list(tmp_path.iterdir()) == []
