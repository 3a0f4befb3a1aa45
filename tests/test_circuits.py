"""Head and circuit analyses of checkpoints, against direct computation on a tiny trained model."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from ihstudy.analysis import circuits
from ihstudy.cli import app
from ihstudy.model.transformer import cross_entropy, layer_norm, linear
from ihstudy.tasks.fsl import Batch
from ihstudy.training.train import evaluate_checkpoint

TINY = ["train.sequences=3200", "train.eval_every=1600", "train.ckpt_every=1600", "eval.n_sequences=200",
        "train.threads=1", "model.d_model=16", "model.n_heads=4", "data.n_classes=30", "data.dim=16",
        "data.latent_dim=4", "task.class_split=[10,10,10]", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IHSTUDY_OUTPUTS", str(root))
        result = CliRunner().invoke(app, ["train", "-q", f"hydra.run.dir={root}/run", *TINY])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def subject(run):
    return circuits.Subject(run)


def fsl_train(subject) -> Batch:
    n = subject.eval_batch.target.shape[1] // 4  # the first of the four evaluators
    return subject.eval_batch[0, :n]


def test_the_enumerated_distribution_is_everything_the_sampler_draws(subject):
    batch, enumerated = circuits.training_distribution(subject.task, 10_000)
    assert enumerated and len(batch.target) == 10 * 9 * 16 * 2  # ordered class pairs x ordered train pairs x order
    key = lambda b: {(tuple(x.flatten().round(decimals=5).tolist()), tuple(labels.tolist()), int(t))
                     for x, labels, t in zip(b.exemplars, b.labels, b.target)}
    everything = key(batch)
    assert len(everything) == len(batch.target)  # no duplicates
    sampled = subject.task.sampler().sample(2000, torch.Generator().manual_seed(3))
    assert key(sampled) <= everything
    assert (batch.labels == batch.target[:, None]).sum(1).eq(1).all()  # the query's label is in context once
    sample, enumerated = circuits.training_distribution(subject.task, 100)
    assert not enumerated and len(sample.target) == 100


def ablated_loss(run, clamp):
    rows = evaluate_checkpoint(run, None, clamp)
    return rows.set_index("evaluator").loc["fsl_train"]


def test_keep_one_and_remove_one_head_match_separate_evaluations(run, subject):
    tables = circuits.last_layer_heads(subject, fsl_train(subject))
    heads = tables["heads"].set_index("head")
    plain = ablated_loss(run, None)
    assert tables["full_model"]["loss"][0] == pytest.approx(plain["loss"], abs=1e-5)
    for h in ("1:0", "1:2"):
        removed = ablated_loss(run, {"x": {"kind": "ablate", "heads": [h]}})
        kept = ablated_loss(run, {"x": {"kind": "keep_only", "heads": [h]}})
        assert heads.loc[h, "remove_one_loss"] == pytest.approx(removed["loss"], abs=1e-5)
        assert heads.loc[h, "remove_one_acc"] == pytest.approx(removed["acc"], abs=1e-6)
        assert heads.loc[h, "keep_one_loss"] == pytest.approx(kept["loss"], abs=1e-5)
    strongest = heads.induction.sort_values(ascending=False, kind="stable").index
    added = tables["add_back"]
    assert list(added.added_head) == list(strongest)
    assert added["loss"].iloc[-1] == pytest.approx(plain["loss"], abs=1e-5)  # all heads back: the full model
    two = ablated_loss(run, {"x": {"kind": "keep_only", "heads": list(strongest[:2])}})
    assert added["loss"].iloc[1] == pytest.approx(two["loss"], abs=1e-5)
    eval_rows = evaluate_checkpoint(run).set_index("evaluator").loc["fsl_train"]
    for h in heads.index:  # the induction strengths are the eval table's
        assert heads.loc[h, "induction"] == pytest.approx(eval_rows[f"induction.L1H{h[-1]}"], abs=1e-5)


def test_complementarity_is_per_label_accuracy_with_one_head_kept(subject):
    batch = fsl_train(subject)
    tables = circuits.last_layer_heads(subject, batch)
    model = subject.model([subject.step])
    clamps = subject.clamp_set([{"keep": {"kind": "keep_only", "heads": ["1:1"]}}])
    logits = clamps.query_logits(model, circuits.expand_runs(batch, 1))[0]
    hit = (logits.argmax(-1) == batch.target).float()
    row = tables["complementarity"].set_index("head").loc["1:1"]
    for label in range(5):
        mine = batch.target == label
        if mine.any():
            assert row[f"label {label}"] == pytest.approx(hit[mine].mean().item(), abs=1e-6)
    matched = tables["complementarity_match"].set_index("head").loc["1:1"]
    assert not np.allclose(matched.to_numpy(), row.to_numpy())  # the perfect match changes what a head achieves


def test_first_layer_roles_and_wiring_match_separate_evaluations(run, subject):
    batch = fsl_train(subject)
    roles = circuits.first_layer_roles(subject, batch).set_index("heads")
    for keep, column in (("patterns", "pattern_preserved_loss"), ("values", "value_preserved_loss")):
        direct = ablated_loss(run, {"x": {"kind": "ablate", "heads": ["0:2"], "preserve": [keep]}})
        assert roles.loc["0:2", column] == pytest.approx(direct["loss"], abs=1e-5)
    eval_rows = evaluate_checkpoint(run).set_index("evaluator").loc["fsl_train"]
    assert roles.loc["0:1", "prev_token"] == pytest.approx(eval_rows["prev_token.L0H1"], abs=1e-5)
    singles = roles.iloc[:4]
    assert circuits.prev_token_threshold(5) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4 + 0.1)
    assert singles.prev_token_head.tolist() == (singles.prev_token > circuits.prev_token_threshold(5)).tolist()
    pt = [h for h in singles.index if singles.loc[h, "prev_token_head"]]
    others = [h for h in singles.index if h not in pt]
    group = roles.iloc[4 if not pt else 5]  # the group rows follow the single heads: PT heads (if any), then the others
    assert group.name == f"other heads ({' '.join(others)})"
    direct = ablated_loss(run, {"x": {"kind": "ablate", "heads": others, "preserve": ["patterns"]}})
    assert group.pattern_preserved_acc == pytest.approx(direct["acc"], abs=1e-6)
    grid = circuits.wiring_grid(subject, batch)
    direct = ablated_loss(run, {"x": {"kind": "keep_only", "heads": ["0:3", "1:1"]}})
    assert grid.shape == (4, 4) and grid.loc["0:3", "1:1"] == pytest.approx(direct["acc"], abs=1e-6)


def test_composition_scores_from_explicit_head_slices(subject):
    scores = circuits.composition_scores(subject)
    state = subject.files.load_checkpoint(subject.step)["model"]
    D, dh = 16, 4
    W0, O0 = state["blocks.0.attn.W_QKV"].double(), state["blocks.0.attn.W_O"].double()
    W1, O1 = state["blocks.1.attn.W_QKV"].double(), state["blocks.1.attn.W_O"].double()
    i, j = 2, 1
    cols = lambda part, h: slice(part * D + h * dh, part * D + (h + 1) * dh)
    ov_i = W0[:, cols(2, i)] @ O0[i * dh:(i + 1) * dh]
    qk_j = W1[:, cols(0, j)] @ W1[:, cols(1, j)].T
    ov_j = W1[:, cols(2, j)] @ O1[j * dh:(j + 1) * dh]
    score = lambda a, b: (a @ b).norm() / (a.norm() * b.norm())
    assert scores["Q"].loc["0:2", "1:1"] == pytest.approx(score(ov_i, qk_j).item())
    assert scores["K"].loc["0:2", "1:1"] == pytest.approx(score(qk_j, ov_i.T).item())
    assert scores["V"].loc["0:2", "1:1"] == pytest.approx(score(ov_i, ov_j).item())


def test_progress_measures_batched_over_checkpoints(subject):
    steps = subject.files.checkpoint_steps()
    assert len(steps) == 2
    progress = circuits.progress_measures(subject, sequences=300, batch_checkpoints=1)
    batched = circuits.progress_measures(subject, sequences=300, batch_checkpoints=2)
    pd.testing.assert_frame_equal(progress, batched, atol=1e-5)
    assert progress.step.tolist() == steps
    batch, _ = circuits.training_distribution(subject.task, 300)
    model = subject.model([steps[0]])
    x = circuits.expand_runs(batch, 1)
    _, cache = model.run_with_cache(x, ["blocks.1.hook_resid_pre", "blocks.0.hook_attn_out", "hook_logits"])
    p = model.params
    final = lambda resid: linear(layer_norm(resid, p["ln_final.w"], p["ln_final.b"]), p["unembed.W_U"], p["unembed.b_U"])
    loss = lambda logits: cross_entropy(logits[..., -1, :], x.target).mean().item()
    first = progress.iloc[0]
    assert first["loss"] == pytest.approx(loss(cache["hook_logits"]), abs=1e-5)
    # the last layer's direct path is all it writes: without it the logits read the residual before it
    assert first["direct_path_L1"] == pytest.approx(loss(final(cache["blocks.1.hook_resid_pre"])) - first["loss"], abs=1e-5)
    resid = model.run_with_cache(x, ["blocks.1.hook_resid_post"])[1]["blocks.1.hook_resid_post"]
    without_layer0 = loss(final(resid - cache["blocks.0.hook_attn_out"]))
    assert first["direct_path_L0"] == pytest.approx(without_layer0 - first["loss"], abs=1e-5)
    assert (progress.loss_perfect_match != progress["loss"]).all()


@pytest.mark.parametrize("what", ["heads", "wiring", "progress"])
def test_cli_checkpoint_analyses_write_reports(run, tmp_path, what):
    out = tmp_path / what
    result = CliRunner().invoke(app, ["analyze", what, str(run), "--report", str(out), "--sequences", "500"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert report.count("![") >= 1 and all((out / f"{line.split('(')[1][:-1]}").exists()
                                           for line in report.splitlines() if line.startswith("!["))


def test_cli_checkpoint_bad_input(run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("checkpoints"))
    result = CliRunner().invoke(app, ["analyze", "heads", str(bare), "--report", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no checkpoint" in result.output and not (tmp_path / "r").exists()
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = (other / "config.yaml").read_text().replace("d_model: 16", "d_model: 8")
    (other / "config.yaml").write_text(config)
    result = CliRunner().invoke(app, ["analyze", "wiring", str(other), "--report", str(tmp_path / "r")])
    assert result.exit_code == 2 and "shape" in result.output and "Traceback" not in result.output
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "config.yaml").write_text((old / "config.yaml").read_text().replace("  context_len:", "  not_context_len:"))
    for what in ("heads", "eval"):
        result = CliRunner().invoke(app, ["analyze", what, str(old)])
        assert result.exit_code == 2 and "does not fit this version" in result.output and "Traceback" not in result.output
    for what in ("eval", "progress"):
        result = CliRunner().invoke(app, ["analyze", what, str(tmp_path / "nowhere")])
        assert result.exit_code == 2 and "is not a run folder" in result.output
