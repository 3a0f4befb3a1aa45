"""End-to-end training: outputs layout, determinism, bad input."""

import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from ihstudy.cli import app

SHORT = ["train.sequences=3200", "train.eval_every=1600", "train.ckpt_every=1600", "eval.n_sequences=100",
         "train.threads=1"]


def train(run_dir, *overrides):
    return CliRunner().invoke(app, ["train", "-q", f"hydra.run.dir={run_dir}", *SHORT, *overrides])


def test_short_run_writes_the_documented_layout(tmp_path):
    result = train(tmp_path / "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["started"] and status["ended"]
    assert {"torch", "ihstudy", "python"} <= set(status["versions"])
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert list(metrics.columns) == ["step", "sequences", "loss", "grad_norm", "grad_batch_stddev", "lr"]
    assert metrics.step.tolist() == list(range(1, 101)) and metrics.sequences.iloc[-1] == 3200
    assert (metrics.lr == 1e-5).all() and (metrics.grad_norm > 0).all() and (metrics.grad_batch_stddev > 0).all()
    evals = pd.read_parquet(run / "eval.parquet")
    assert sorted(evals.evaluator.unique()) == ["fsl_test_class", "fsl_train", "fsl_train_valex", "fsl_val_rl"]
    assert sorted(evals.sequences.unique()) == [0, 1600, 3200]
    assert {"loss", "acc", "icl_acc", "icl_prob", "ooc_acc", "ooc_prob", "in_context_mass",
            "induction.L1H7", "prev_token.L0H0"} <= set(evals.columns)
    start = evals[(evals.sequences == 0) & (evals.evaluator == "fsl_train")].iloc[0]
    assert abs(start["loss"] - math.log(5)) < 0.5  # an untrained model is near chance over 5 labels
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step_00000050.pt", "step_00000100.pt"]
    config = (run / "config.yaml").read_text()
    assert "sequences: 3200" in config and "n_labels: 5" in config


def test_same_config_and_seeds_give_identical_outputs(tmp_path):
    for name in ("a", "b"):
        assert train(tmp_path / name).exit_code == 0
    for table in ("metrics", "eval"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "b" / f"{table}.parquet"))
    assert train(tmp_path / "c", "seed=6").exit_code == 0
    assert not pd.read_parquet(tmp_path / "a/metrics.parquet").equals(pd.read_parquet(tmp_path / "c/metrics.parquet"))


@pytest.mark.parametrize("override,message", [
    ("model.not_a_key=1", "not_a_key"),
    ("model.n_heads=5", "not divisible"),
    ("task.context_len=0", "context_len"),
    ("task.burstiness=2", "burstiness"),
    ("task.class_split=[50,1600,100]", "class_split"),
    ("task.exemplar_split=[1,4,1]", "exemplar_split"),
    ("task.n_labels=1", "n_labels"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("train.batch_size=0", "batch_size"),
    ("data=features_file", "data.path"),
    ("data=features_file data.path=/nonexistent/features.h5", "not found"),
    ("eval=sparse eval.evaluators=[fsl_val_rl]", "eval.dense names 'fsl_train'"),
    ("eval.dense=fsl_train", "eval.dense must be null or a list"),
    ("eval.sparse_every=0", "eval.sparse_every"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, override, message):
    result = train(tmp_path / "run", *override.split())
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()


def test_wrongly_shaped_feature_file_is_refused(tmp_path):
    import numpy as np

    np.save(tmp_path / "flat.npy", np.zeros((10, 8), dtype=np.float32))
    result = train(tmp_path / "run", "data=features_file", f"data.path={tmp_path / 'flat.npy'}")
    assert result.exit_code == 2 and "shape" in result.output


def test_feature_file_from_hdf5(tmp_path):
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "feat.h5", "w") as f:
        f.create_dataset("resnet18/224/feat", data=rng.normal(size=(40, 3, 12)).astype(np.float32))
    result = train(tmp_path / "run", "data=features_file", f"data.path={tmp_path / 'feat.h5'}",
                   "task.class_split=[20,10,10]", "task.exemplar_split=[1,2,0]")
    assert result.exit_code == 0, result.output
    too_big = train(tmp_path / "run2", "data=features_file", f"data.path={tmp_path / 'feat.h5'}")
    assert too_big.exit_code == 2 and "40" in too_big.output


def test_existing_run_is_never_overwritten_unless_asked(tmp_path):
    assert train(tmp_path / "run").exit_code == 0
    before = (tmp_path / "run" / "metrics.parquet").read_bytes()
    again = train(tmp_path / "run")
    assert again.exit_code == 2 and "already holds a run" in again.output
    assert (tmp_path / "run" / "metrics.parquet").read_bytes() == before
    assert train(tmp_path / "run", "seed=7", "--overwrite").exit_code == 0
    assert (tmp_path / "run" / "metrics.parquet").read_bytes() != before


def test_analyze_reevaluates_a_checkpoint_through_the_training_code_path(tmp_path):
    from ihstudy.training.train import evaluate_checkpoint

    assert train(tmp_path / "run").exit_code == 0
    saved = pd.read_parquet(tmp_path / "run" / "eval.parquet")
    final = saved[saved.step == saved.step.max()].reset_index(drop=True)
    again = evaluate_checkpoint(tmp_path / "run")
    pd.testing.assert_frame_equal(again[final.columns], final)  # identical: same model, data and code
    ablated = evaluate_checkpoint(tmp_path / "run", clamp={"all": {"kind": "ablate", "heads": [f"1:{h}" for h in range(8)]}})
    assert (ablated["induction.L1H0"] == final["induction.L1H0"]).all()  # value ablation leaves patterns alone
    assert not (ablated["loss"] == final["loss"]).any()
    for command in (["analyze", "eval"], ["analyze"]):  # the second: the syntax before analyze had sub-analyses
        result = CliRunner().invoke(app, [*command, str(tmp_path / "run"), "clamp=only_l2h3"])
        assert result.exit_code == 0 and "fsl_test_class" in result.output, result.output
    bad = CliRunner().invoke(app, ["analyze", "eval", str(tmp_path / "run"), "model.n_heads=4"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1

    # a run saved before keys were added to ihstudy (and with an optimizer key since removed) stays analysable
    config = tmp_path / "run" / "config.yaml"
    old = OmegaConf.load(config)
    del old.task["val_pairs"], old.train["chunk_batches"]
    old.optim.momentum = 0.0
    config.write_text(OmegaConf.to_yaml(old))
    pd.testing.assert_frame_equal(evaluate_checkpoint(tmp_path / "run")[final.columns], final)


# --- the loop's pieces, each alone ------------------------------------------------------------------


def small_task():
    from ihstudy.config import compose_config
    from ihstudy.tasks.fsl import FewShotTask, load_features

    cfg, _ = compose_config(["data.n_classes=200", "data.dim=16", "task.class_split=[50,100,50]", "eval.n_sequences=30"])
    return cfg, FewShotTask(cfg.task, load_features(cfg.data))


def test_eval_chunks_hold_at_most_5000_positions_of_all_runs():
    """A forward pass over the eval sets takes equal chunks of an evaluator's sequences: 1000 few-shot
    sequences of 5 tokens over all runs, 25 Markov chains of 100 per run for a pack of two."""
    import torch

    from ihstudy.config import compose_config
    from ihstudy.tasks.base import task_family
    from ihstudy.training.evaluate import EVAL_CHUNK_POSITIONS, Evaluator

    cfg, task = small_task()
    assert Evaluator([task] * 2, [cfg] * 2, torch.device("cpu"), n_tokens=5).chunk == 30  # an evaluator's all
    assert Evaluator([task] * 2, [cfg] * 2, torch.device("cpu"), n_tokens=1000).chunk == 2  # 2 x 2 x 1000 <= 5000
    cfg, _ = compose_config(["experiment=markov"])
    task = task_family(cfg.task).from_config(cfg, None)
    chunk = Evaluator([task] * 2, [cfg] * 2, torch.device("cpu"), n_tokens=cfg.task.length).chunk
    assert chunk == 25 and 2 * chunk * cfg.task.length == EVAL_CHUNK_POSITIONS


def test_evaluator_turns_a_forward_pass_into_eval_rows():
    """Evaluator alone, with a forward pass that is certain of the right label and attends from the
    query only to the label tokens carrying it: loss 0, accuracy 1, induction strength 1."""
    import torch

    from ihstudy.training.evaluate import Evaluator

    cfg, task = small_task()
    T, H = 2 * cfg.task.context_len + 1, 2
    evaluator = Evaluator([task, task], [cfg, cfg], torch.device("cpu"), T)

    def certain(batch, part):
        sub = batch[:, part]
        logits = torch.nn.functional.one_hot(sub.target, cfg.task.n_labels) * 100.0
        on_label = (sub.labels == sub.target.unsqueeze(-1)).float()  # [R, n, N]
        query_row = torch.zeros(*sub.target.shape, T)
        query_row[..., 1:-1:2] = on_label / on_label.sum(-1, keepdim=True)
        pattern = query_row[:, :, None, None, :].expand(-1, -1, H, T, -1)
        return logits, [pattern, pattern[..., -1:, :]]

    rows = evaluator.measure(certain, step=7, batch_size=32)
    assert len(rows) == 2 and [row["evaluator"] for row in rows[0]] == list(cfg.eval.evaluators)
    for row in rows[0] + rows[1]:
        assert row["step"] == 7 and row["sequences"] == 224
        assert row["loss"] < 1e-6 and row["acc"] == 1.0 and row["icl_acc"] == 1.0 and row["ooc_acc"] == 0.0
        assert abs(row["induction.L1H0"] - 1) < 1e-6 and abs(row["induction.L0H1"] - 1) < 1e-6
        assert "prev_token.L0H0" in row and "prev_token.L1H0" not in row

    def from_query(batch, part):  # logits that differ from sequence to sequence
        logits, patterns = certain(batch, part)
        return batch[:, part].exemplars[..., -1, :cfg.task.n_labels] * 10, patterns

    # one evaluator alone (eval.dense's sparse points): its rows as measured with all the others
    every = evaluator.measure(from_query, step=7, batch_size=32)
    alone = evaluator.measure(from_query, step=7, batch_size=32, names=["fsl_test_class"])
    assert alone == [[run_rows[3]] for run_rows in every] and len({row["loss"] for row in every[0]}) == 4


def test_run_recorder_writes_restores_and_fails_runs_alone(tmp_path):
    import torch

    from ihstudy.training.recorder import RunRecorder, RunSpec

    cfg, _ = small_task()
    specs = [RunSpec(cfg, tmp_path / "a", "a"), RunSpec(cfg, tmp_path / "b", "b")]
    recorder = RunRecorder(specs, n_steps=4, batch_size=32, device=torch.device("cpu"))
    recorder.start(0)
    recorder.step_log[:2] = torch.arange(16.0).view(2, 2, 4)
    recorder.add_evals([[{"step": 0, "sequences": 0, "evaluator": "fsl_train", "loss": 0.1, "acc": 1.0}]] * 2, step=2)
    recorder.checkpoint(2, lambda r: {"model": {"w": torch.full((3,), float(r))}})
    recorder.fail([1], "loss became NaN or infinite", step=2)
    assert recorder.live() == [0] and "failed" in (tmp_path / "b" / "run.json").read_text()

    again = RunRecorder(specs, n_steps=4, batch_size=32, device=torch.device("cpu"))
    assert again.checkpoint_steps() == [2]
    state = again.files[1].load_checkpoint(2)
    again.check_config(1, state)
    assert torch.equal(state["model"]["w"], torch.ones(3)) and state["sequences"] == 64
    for r in (0, 1):
        again.restore_rows(r, 2)
    assert torch.equal(again.step_log[:2], recorder.step_log[:2]) and again.eval_columns[1]["step"] == [0]
    results = again.finish("completed", 4)
    assert [r.status for r in results] == ["completed", "completed"]
    assert results[0].summary["fsl_train.loss"] == 0.1
