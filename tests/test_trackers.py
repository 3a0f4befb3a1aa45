"""Experiment trackers (logger=...): what a run logged, read back with each library's own reader,
equals the run's eval.parquet; a missing library and a failing tracker (ihstudy/training/trackers.py)."""

import csv
import json
import struct
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ihstudy.cli import app

SHORT = ["train.sequences=3200", "train.eval_every=1600", "train.ckpt_every=1600", "eval.n_sequences=100", "train.threads=1"]


def train(run_dir, *overrides):
    return CliRunner().invoke(app, ["train", "-q", f"hydra.run.dir={run_dir}", *SHORT, *overrides])


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One run logged to all four trackers; (outputs folder, run folder, eval.parquet, metrics.parquet)."""
    for library in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(library)
    root = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IHSTUDY_OUTPUTS", str(root))
        result = train(root / "runs" / "a", "logger=[tensorboard,mlflow,wandb,csv]")
    assert result.exit_code == 0, result.output
    run = root / "runs" / "a"
    return root, run, pd.read_parquet(run / "eval.parquet"), pd.read_parquet(run / "metrics.parquet")


def expected(evals: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(tag, sequences) -> value of every eval.parquet cell, tagged <evaluator>/<column>."""
    values = evals.drop(columns=["step"]).melt(id_vars=["evaluator", "sequences"])
    return {(f"{r.evaluator}/{r.variable}", int(r.sequences)): float(r.value) for r in values.itertuples()}


def train_means(metrics: pd.DataFrame, evals: pd.DataFrame) -> dict[int, float]:
    """sequences -> mean training loss of the steps since the previous eval point."""
    points = sorted(evals.sequences.unique())
    return {b: metrics[(metrics.sequences > a) & (metrics.sequences <= b)]["loss"].mean() for a, b in zip(points, points[1:])}


def test_tensorboard_events_hold_the_eval_table(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, evals, metrics = logged
    events = EventAccumulator(str(root / "tensorboard" / "runs" / "a"), size_guidance={"scalars": 0}).Reload()
    read = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = expected(evals)
    assert want.keys() <= read.keys()
    assert all(read[k] == pytest.approx(v, rel=1e-6, abs=1e-7) for k, v in want.items())  # float32 in the event file
    assert {s: read[("train/loss", s)] for s in train_means(metrics, evals)} == pytest.approx(train_means(metrics, evals))
    assert "n_heads: 8" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_mlflow_file_store_holds_the_eval_table_config_and_summary(logged, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, run_dir, evals, _ = logged
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("ihstudy").experiment_id])
    assert run.info.run_name == "runs/a" and run.info.status == "FINISHED"
    assert run.data.params["model.n_heads"] == "8" and run.data.params["seed"] == "5"
    for (tag, sequences), value in expected(evals).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag.replace("/", "."))}
        assert history[sequences] == pytest.approx(value, rel=1e-12)
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json")).read_text())
    assert summary == json.loads((run_dir / "run.json").read_text())["summary"]


def wandb_records(path: Path):
    """The records of a wandb transaction log (.wandb): LevelDB's log format (32 KiB blocks, records
    of a 7-byte header: crc, length, type full/first/middle/last) after wandb's 7-byte file header,
    each record one of wandb's own protobuf Records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    offset, pending = 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
        elif kind == 0:
            break


def test_wandb_offline_run_holds_the_eval_table_config_and_summary(logged):
    root, run_dir, evals, _ = logged
    [log_file] = (root / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, summary = {}, {}, {}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history |= {(k, row["sequences"]): v for k, v in row.items()}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
        elif kind == "run":
            assert record.run.display_name == "runs/a"
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
    for key, value in expected(evals).items():
        assert history[key] == pytest.approx(value, rel=1e-12)
    assert config["model"]["n_heads"] == 8 and config["seed"] == 5
    final = json.loads((run_dir / "run.json").read_text())["summary"]
    assert summary["status"] == "completed" and summary["final/fsl_train.loss"] == pytest.approx(final["fsl_train.loss"])


def test_csv_holds_the_eval_table(logged):
    root, _, evals, metrics = logged
    with (root / "csv" / "runs" / "a" / "metrics.csv").open(newline="") as f:
        rows = {int(r["sequences"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(evals.sequences.unique())
    for (tag, sequences), value in expected(evals).items():
        assert float(rows[sequences][tag]) == value  # repr of a float is exact
    assert rows[0]["train/loss"] == ""
    assert {s: float(rows[s]["train/loss"]) for s in train_means(metrics, evals)} == pytest.approx(train_means(metrics, evals))


def test_every_run_of_a_pack_is_logged_and_the_logger_does_not_define_the_runs(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "-q", "seed=5,6", "logger=csv", *SHORT])
    assert result.exit_code == 0, result.output
    [sweep] = (tmp_path / "sweeps").iterdir()
    assert "logger" not in sweep.name
    for seed in (5, 6):
        evals = pd.read_parquet(sweep / f"seed={seed}" / "eval.parquet")
        logged = pd.read_csv(tmp_path / "csv" / "sweeps" / sweep.name / f"seed={seed}" / "metrics.csv")
        train_rows = evals[evals.evaluator == "fsl_train"]
        assert logged["fsl_train/loss"].tolist() == train_rows["loss"].tolist()
    again = CliRunner().invoke(app, ["sweep", "-q", "seed=5,6", *SHORT])  # the same runs, without a tracker
    assert again.exit_code == 0 and "2 runs, 2 already finished, 0 to train" in again.output, again.output


def test_a_missing_library_is_one_line_naming_the_extra_and_nothing_runs(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = train(tmp_path / "run", "logger=[csv,wandb]")
    assert result.exit_code == 2
    assert result.output.strip() == "error: logger=wandb needs the wandb library: pip install -e '.[wandb]'"
    assert not (tmp_path / "run").exists() and not (tmp_path / "csv").exists()


def test_a_failing_tracker_warns_and_the_run_goes_on_unchanged(tmp_path, monkeypatch, caplog):
    from ihstudy.training import trackers

    def disk_full(self, values, sequences):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.CSVTracker, "log", disk_full)
    result = train(tmp_path / "logged", "logger=csv")
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in caplog.records] == [
        "logger=csv stopped for logged (No space left on device); the run goes on, its folder holds every row"]
    assert train(tmp_path / "plain").exit_code == 0
    for table in ("eval", "metrics"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "logged" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "plain" / f"{table}.parquet"))
    assert json.loads((tmp_path / "logged" / "run.json").read_text())["status"] == "completed"


def test_a_run_resumes_under_another_logger(tmp_path):
    from ihstudy.config import compose_config
    from ihstudy.training.train import Pack, RunSpec

    assert train(tmp_path / "run").exit_code == 0
    cfg, _ = compose_config([*SHORT, "logger=csv"])
    assert Pack([RunSpec(cfg, tmp_path / "run")]).restore() == 100  # the checkpoint's config differs only in logger
    cfg, _ = compose_config([*SHORT, "seed=6"])
    with pytest.raises(Exception, match="differs in seed"):
        Pack([RunSpec(cfg, tmp_path / "run")]).restore()


def test_csv_takes_the_columns_of_an_evaluator_first_measured_after_a_resume(tmp_path):
    """eval=sparse resumed at a point where only fsl_train is measured: the file gains the other
    evaluators' columns at their next point, the earlier rows kept (blank there)."""
    from ihstudy.training.trackers import CSVTracker

    tracker = CSVTracker({"dir": str(tmp_path)}, "run", {}, sequences=320)  # resumed, no metrics.csv yet
    tracker.log({"fsl_train/loss": 0.5, "train/loss": 0.6}, 320)
    tracker.log({"fsl_train/loss": 0.4, "fsl_val_rl/loss": 0.9, "train/loss": 0.45}, 480)
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"sequences": "320", "fsl_train/loss": "0.5", "train/loss": "0.6", "train/grad_norm": "",
                     "train/grad_batch_stddev": "", "train/lr": "", "fsl_val_rl/loss": ""},
                    {"sequences": "480", "fsl_train/loss": "0.4", "train/loss": "0.45", "train/grad_norm": "",
                     "train/grad_batch_stddev": "", "train/lr": "", "fsl_val_rl/loss": "0.9"}]
