"""Clamps act on the activations themselves: patterns, zeros, logits, gradients and run masks."""

import math

import pytest
import torch
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.model.clamps import (
    AblateEmbedding,
    AblateHeads,
    ClampSet,
    HeadTemperature,
    InductionPattern,
    Layer1Input,
    MatchPattern,
    NoPrevToken,
    PerfectCopy,
    PrevTokenPattern,
    SilenceNonLabel,
    build_clamps,
)
from ihstudy.model.transformer import ModelShape, Transformer, query_loss
from ihstudy.run_files import RunFiles
from ihstudy.tasks.fsl import Batch
from ihstudy.training.steps import FastPath, HookedPath, choose_path
from tests.test_fast_path import OneBatch

SHAPE = ModelShape(n_layers=2, n_heads=4, d_model=16, n_features=8, n_labels=5, context_len=2)
PATTERN = "blocks.{}.attn.hook_pattern"
SCORES = "blocks.{}.attn.hook_attn_scores"


def make_model(n_runs=1, shape=SHAPE, seed=0):
    return Transformer(shape, n_runs).init_([seed + r for r in range(n_runs)])


def make_batch(n_runs=1, n=16, shape=SHAPE, seed=0):
    """Random sequences whose query repeats context item 0 (exemplar and label)."""
    g = torch.Generator().manual_seed(seed)
    N = shape.context_len
    exemplars = torch.randn(n_runs, n, N + 1, shape.n_features, generator=g)
    exemplars[..., -1, :] = exemplars[..., 0, :]
    labels = torch.randint(shape.n_labels, (n_runs, n, N), generator=g)
    return Batch(exemplars, labels, labels[..., 0].clone())


def cache_of(clamps, names, model=None, batch=None, per_run=None):
    model, batch = model or make_model(), batch or make_batch()
    return ClampSet(per_run or [clamps]).run_with_cache(model, batch, names)


def grads(clamps, model, batch):
    model.flat_grad.zero_()
    query_loss(ClampSet([clamps]).forward(model, batch), batch.target).sum().backward()
    return {name: p.grad.clone() for name, p in model.params.items()}


# --- patterns and scores --------------------------------------------------------------------------


@pytest.mark.parametrize("label_rows_only", [False, True])
def test_prev_token_pattern_is_the_prescribed_matrix(label_rows_only):
    s = 0.7
    clamp = PrevTokenPattern(heads=((0, 1), (1, 2)), strength=s, label_rows_only=label_rows_only)
    _, clean = cache_of([], [PATTERN.format(0)])
    _, cache = cache_of([clamp], [PATTERN.format(0), PATTERN.format(1)])
    expected = torch.tensor([[1, 0, 0, 0, 0], [s, 1 - s, 0, 0, 0], [0, s, 1 - s, 0, 0],
                             [0, 0, s, 1 - s, 0], [0, 0, 0, s, 1 - s]])
    got = cache[PATTERN.format(0)][0, :, 1]
    rows = [1, 3] if label_rows_only else range(5)
    for t in range(5):
        want = expected[t] if t in rows else clean[PATTERN.format(0)][0, :, 1, t]
        torch.testing.assert_close(got[:, t], want.expand_as(got[:, t]), rtol=0, atol=0)
    torch.testing.assert_close(cache[PATTERN.format(1)][0, :, 2, 1:4:2], expected[1:4:2].expand(16, 2, 5))
    torch.testing.assert_close(cache[PATTERN.format(0)][0, :, 0], clean[PATTERN.format(0)][0, :, 0])


def test_no_prev_token_scores_and_pattern():
    _, cache = cache_of([NoPrevToken(heads=((0, 3),))], [SCORES.format(0), PATTERN.format(0)])
    scores, pattern = cache[SCORES.format(0)][0, :, 3], cache[PATTERN.format(0)][0, :, 3]
    for t in range(1, 5):
        assert (scores[:, t, t - 1] == -1e9).all() and (pattern[:, t, t - 1] == 0).all()
    assert (pattern[:, 2, 0] > 0).all()  # other keys stay reachable


def test_induction_pattern_splits_strength_among_label_tokens():
    shape = ModelShape(n_layers=2, n_heads=4, d_model=16, n_features=8, n_labels=5, context_len=4)
    batch = make_batch(shape=shape)
    batch.labels[0, 0] = torch.tensor([2, 2, 4, 1])  # two tokens carry the true label 2
    batch.target[0, 0] = 2
    s = 0.8
    _, cache = cache_of([InductionPattern(heads=((1, 0),), strength=s)], [PATTERN.format(1)],
                        model=make_model(shape=shape), batch=batch)
    query_row = cache[PATTERN.format(1)][0, 0, 0, -1]
    expected = torch.zeros(9)
    expected[[1, 3]] = s / 2
    expected[[5, 7]] = (1 - s) / 2
    torch.testing.assert_close(query_row, expected)


def test_match_pattern_hardmax_splits_ties_and_softmax_uses_cosine():
    batch = make_batch()
    batch.exemplars[0, 1, 1] = 3 * batch.exemplars[0, 1, 0]  # same direction as the query: a tie
    _, cache = cache_of([MatchPattern(heads=((1, 1),), temperature=0.0)], [PATTERN.format(1)], batch=batch)
    rows = cache[PATTERN.format(1)][0, :, 1, -1]
    torch.testing.assert_close(rows[1], torch.tensor([0, 0.5, 0, 0.5, 0]))
    torch.testing.assert_close(rows[0, [1, 3]].sum(), torch.tensor(1.0))
    assert rows[:, 1].min() >= 0.5  # item 0 is the query's own exemplar

    T = 0.5
    _, cache = cache_of([MatchPattern(heads=((1, 1),), temperature=T)], [PATTERN.format(1)])
    x = make_batch().exemplars[0, 2]
    sims = torch.nn.functional.cosine_similarity(x[-1:], x[:-1], dim=-1)
    torch.testing.assert_close(cache[PATTERN.format(1)][0, 2, 1, -1, [1, 3]], torch.softmax(sims / T, 0))


def test_head_temperature_and_silence():
    T = 3.0
    _, clean = cache_of([], [SCORES.format(1)])
    _, cache = cache_of([HeadTemperature(heads=((1, 0),), temperature=T)], [SCORES.format(1), PATTERN.format(1)])
    torch.testing.assert_close(cache[PATTERN.format(1)][0, :, 0], torch.softmax(clean[SCORES.format(1)][0, :, 0] / T, -1))
    _, cache = cache_of([SilenceNonLabel(heads=((1, 2),))], [PATTERN.format(1)])
    pattern = cache[PATTERN.format(1)][0, :, 2]
    assert (pattern[:, 1:, 0::2] == 0).all() and (pattern[:, 0, 0] == 1).all()
    torch.testing.assert_close(pattern[:, 1:, 1::2].sum(-1), torch.ones(16, 4))


# --- ablation, preservation, copy, layer 1 --------------------------------------------------------


def test_ablated_head_writes_exactly_zero():
    names = ["blocks.0.attn.hook_result", "blocks.0.attn.hook_z"]
    _, cache = cache_of([AblateHeads(heads=((0, 1), (0, 3)))], names)
    for name in names:
        assert (cache[name][..., [1, 3], :] == 0).all()
        assert (cache[name][..., [0, 2], :] != 0).any()


def test_preserving_everything_while_ablating_nothing_reproduces_the_clean_pass():
    everything = ("patterns", "values", "queries", "keys")
    clean_logits, clean = cache_of([], [PATTERN.format(1)])
    logits, cache = cache_of([AblateHeads(heads=(), preserve=everything)], [PATTERN.format(1)])
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=0)
    torch.testing.assert_close(cache[PATTERN.format(1)], clean[PATTERN.format(1)], rtol=0, atol=0)


def test_value_preserving_ablation_keeps_later_values_and_changes_patterns():
    names = ["blocks.1.attn.hook_v", PATTERN.format(1)]
    _, clean = cache_of([], names)
    _, cache = cache_of([AblateHeads(heads=((0, 0), (0, 1)), preserve=("values",))], names)
    torch.testing.assert_close(cache[names[0]], clean[names[0]], rtol=0, atol=0)
    assert not torch.allclose(cache[names[1]], clean[names[1]])


def test_perfect_copy_logits_are_the_head_scores_at_label_ids():
    batch = make_batch()
    batch.labels[0, :, 1] = (batch.labels[0, :, 0] + 1) % 5  # distinct labels ...
    batch.labels[0, 0] = torch.tensor([3, 3])  # ... except one repeated label: logsumexp of both scores
    logits, cache = cache_of([PerfectCopy(head=(1, 2))], [SCORES.format(1)], batch=batch)
    scores = cache[SCORES.format(1)][0, :, 2, -1, [1, 3]]  # [B, 2]
    query = logits[0, :, -1]
    for b in range(1, 16):
        a, c = batch.labels[0, b].tolist()
        expected = torch.full((5,), -1e9)
        expected[a], expected[c] = scores[b, 0], scores[b, 1]
        torch.testing.assert_close(query[b], expected, rtol=0, atol=0)
    torch.testing.assert_close(query[0, 3], scores[0].logsumexp(0))
    assert (query[0, [0, 1, 2, 4]] == -1e9).all()


def test_layer1_input_replaces_the_residual_by_raw_embeddings():
    names = ["hook_embed", "blocks.1.hook_resid_pre", "blocks.1.hook_qk_input"]
    _, cache = cache_of([Layer1Input()], names)
    embed = cache["hook_embed"]
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], embed, rtol=0, atol=0)
    torch.testing.assert_close(cache["blocks.1.hook_qk_input"], embed[:, :, [0, 0, 1, 2, 4]], rtol=0, atol=0)


def test_ablate_embedding_leaves_only_the_attention_outputs():
    names = ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post"]
    _, cache = cache_of([AblateEmbedding()], names)
    torch.testing.assert_close(cache[names[2]], cache[names[0]] + cache[names[1]])


# --- gradients ----------------------------------------------------------------------------------------


def qk_and_v(grad):
    D = SHAPE.d_model
    return grad[..., : 2 * D], grad[..., 2 * D:]


def test_fixed_patterns_carry_no_gradient_into_query_key_weights():
    model, batch = make_model(), make_batch()
    g = grads([PrevTokenPattern(heads=tuple((0, h) for h in range(4)))], model, batch)
    qk, v = qk_and_v(g["blocks.0.attn.W_QKV"])
    assert (qk == 0).all() and (v != 0).any()


def test_a_fully_ablated_block_gets_no_gradient():
    model, batch = make_model(), make_batch()
    g = grads([AblateHeads(heads=tuple((0, h) for h in range(4)))], model, batch)
    assert all((g[n] == 0).all() for n in g if n.startswith("blocks.0."))
    assert (g["blocks.1.attn.W_QKV"] != 0).any()


def test_perfect_copy_gradient_reaches_only_the_head_scores():
    model, batch = make_model(), make_batch()
    g = grads([PerfectCopy(head=(1, 2))], model, batch)
    for name in ("unembed.W_U", "unembed.b_U", "ln_final.w", "blocks.1.attn.W_O"):
        assert (g[name] == 0).all(), name
    qk, v = qk_and_v(g["blocks.1.attn.W_QKV"])
    assert (v == 0).all()
    head = slice(2 * SHAPE.d_head, 3 * SHAPE.d_head)
    assert (qk[..., head] != 0).any() and (qk[..., :SHAPE.d_head] == 0).all()


def test_layer1_clamp_takes_block_0_out_of_the_gradient():
    model, batch = make_model(), make_batch()
    g = grads([Layer1Input()], model, batch)
    assert all((g[n] == 0).all() for n in g if n.startswith("blocks.0."))
    assert (g["embed.W_x"] != 0).any() and (g["embed.W_y"] != 0).any()


# --- runs of a pack ----------------------------------------------------------------------------------


@pytest.mark.parametrize("clamp", [PerfectCopy(head=(1, 0)), AblateHeads(heads=((0, 0),), preserve=("patterns",)),
                                   Layer1Input(), MatchPattern(heads=((1, 1),))])
def test_a_clamp_on_run_0_leaves_run_1_unclamped(clamp):
    pack, batch = make_model(2), make_batch(2)
    logits = ClampSet([[clamp], []]).forward(pack, batch)
    for run, clamps in ((0, [clamp]), (1, [])):
        alone = make_model(1, seed=run)
        torch.testing.assert_close(logits[run], ClampSet([clamps]).forward(alone, batch[run:run + 1])[0])


def test_no_clamp_is_the_plain_model():
    model, batch = make_model(), make_batch()
    assert ClampSet([[]]).forward(model, batch).equal(model(batch))


# --- grafts ------------------------------------------------------------------------------------------


def saved_config(shape: ModelShape) -> dict:
    """The parts of a run config that define a model of `shape`, as a checkpoint stores them."""
    return {"model": {"n_layers": shape.n_layers, "n_heads": shape.n_heads, "d_model": shape.d_model,
                      "positional": shape.positional, "rotary_base": shape.rotary_base, "mlp_ratio": shape.mlp_ratio},
            "task": {"n_labels": shape.n_labels, "context_len": shape.context_len}}


@pytest.fixture
def checkpoint(tmp_path):
    files = RunFiles(tmp_path / "donor")
    return str(files.save_checkpoint(1, {"model": make_model(seed=7).state_dict(0), "config": saved_config(SHAPE)}))


def test_graft_in_takes_the_donor_residual_and_blocks_gradient(checkpoint):
    site = "blocks.0.hook_resid_post"
    (clamp,) = build_clamps({"g": {"kind": "graft_in", "layer": 0, "checkpoint": checkpoint}}, SHAPE)
    model, batch = make_model(), make_batch()
    _, cache = ClampSet([[clamp]]).run_with_cache(model, batch, [site])
    _, donor = make_model(seed=7).run_with_cache(batch, [site])
    torch.testing.assert_close(cache[site], donor[site])
    g = grads([clamp], model, batch)
    assert all((g[n] == 0).all() for n in g if n.startswith(("blocks.0.", "embed.")))


def test_grafted_layers_stay_frozen_during_training(checkpoint, tmp_path):
    from ihstudy.config import compose_config
    from ihstudy.training.train import Pack, RunSpec

    cfg, _ = compose_config(["model.d_model=16", "model.n_heads=4", "data.n_classes=80", "data.dim=8", "data.latent_dim=4",
                             "task.class_split=[50,20,10]", "train.sequences=96", "eval.n_sequences=8",
                             "+clamp.out={kind:graft_out,layer:0,checkpoint:'" + checkpoint + "'}"])
    pack = Pack([RunSpec(cfg, tmp_path / "run")])
    (clamp,) = pack.clamps.per_run[0]
    donor = {n: p.clone() for n, p in clamp.frozen(torch.device("cpu")).params.items()}
    before = pack.model.state_dict(0)
    for _ in range(3):
        pack.train_step()
    after = pack.model.state_dict(0)
    for name, value in clamp.frozen(torch.device("cpu")).params.items():
        assert value.equal(donor[name]) and not value.requires_grad
    assert all(after[n].equal(before[n]) for n in after if n.startswith(("blocks.1.", "ln_final", "unembed")))
    assert not after["blocks.0.attn.W_QKV"].equal(before["blocks.0.attn.W_QKV"])


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ({"a": {"kind": "ablate", "heads": ["2:0"]}}, "outside the model"),
    ({"a": {"kind": "ablate", "heads": [63]}}, "quote it"),
    ({"a": {"kind": "prev_token_pattern", "heads": ["1:1"]}, "b": {"kind": "induction_pattern", "heads": "1:1"}},
     "two attention patterns"),
    ({"a": {"kind": "perfect_copy", "head": "0:1"}}, "layer 1 or above"),
    ({"a": {"kind": "teleport"}}, "unknown kind"),
    ({"a": {"kind": "ablate", "heads": ["1:1"], "strength": 2}}, "unknown field"),
    ({"a": {"kind": "head_temperature", "heads": ["1:1"]}}, "missing temperature"),
    ({"a": {"kind": "ablate", "heads": ["1:1"], "preserve": ["logits"]}}, "preserve"),
])
def test_bad_clamp_specs_raise_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_clamps(spec, SHAPE)
    assert "\n" not in str(info.value)


def test_depth_and_graft_shape_are_checked(tmp_path, checkpoint):
    one_layer = ModelShape(n_layers=1, n_heads=4, d_model=16, n_features=8, n_labels=5, context_len=2)
    with pytest.raises(ConfigError, match="at least 2 layers"):
        build_clamps({"l1": {"kind": "layer1_input"}}, one_layer)
    wider = ModelShape(n_layers=2, n_heads=4, d_model=32, n_features=8, n_labels=5, context_len=2)
    with pytest.raises(ConfigError, match="another shape"):
        build_clamps({"g": {"kind": "graft_out", "layer": 0, "checkpoint": checkpoint}}, wider)
    two_heads = ModelShape(n_layers=2, n_heads=2, d_model=16, n_features=8, n_labels=5, context_len=2)  # same tensors
    with pytest.raises(ConfigError, match=r"another shape \(n_heads 4 vs 2: saved vs wanted\)"):
        build_clamps({"g": {"kind": "graft_out", "layer": 0, "checkpoint": checkpoint}}, two_heads)
    no_config = RunFiles(tmp_path / "other").save_checkpoint(1, {"model": make_model().state_dict(0)})
    with pytest.raises(ConfigError, match="holds no model and config of an ihstudy run"):
        build_clamps({"g": {"kind": "graft_in", "layer": 0, "checkpoint": str(no_config)}}, SHAPE)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build_clamps({"g": {"kind": "graft_in", "layer": 0, "checkpoint": str(tmp_path / "nope.pt")}}, SHAPE)


@pytest.mark.parametrize("override", ["clamp.keep.heads=1:9", "+clamp.x={kind:induction_pattern,heads:[1:3]}"])
def test_cli_rejects_bad_clamps_with_exit_2(tmp_path, override):
    run_dir = tmp_path / "run"
    args = ["train", "-q", "clamp=match", override, f"hydra.run.dir={run_dir}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "clamp" in result.output.replace(str(tmp_path), "")
    assert not run_dir.exists()


def test_presets_build_the_fig5b_conditions():
    from ihstudy.config import compose_config

    shape = ModelShape(n_layers=2, n_heads=8, d_model=64, n_features=64, n_labels=5, context_len=2)
    kinds = {}
    for preset in ("none", "only_l2h3", "pt_attention", "layer1", "match", "copy", "layer1_copy", "match_similarity"):
        cfg, _ = compose_config([f"clamp={preset}"])
        kinds[preset] = sorted(type(c).__name__ for c in build_clamps(cfg.clamp, shape))
    assert kinds == {"none": [], "only_l2h3": ["AblateHeads"], "pt_attention": ["AblateHeads", "PrevTokenPattern"],
                     "layer1": ["AblateHeads", "Layer1Input"], "match": ["AblateHeads", "InductionPattern"],
                     "copy": ["PerfectCopy"], "layer1_copy": ["Layer1Input", "PerfectCopy"],
                     "match_similarity": ["AblateHeads", "MatchPattern"]}
    cfg, _ = compose_config(["clamp=only_l2h3"])
    assert build_clamps(cfg.clamp, shape)[0].heads == tuple((1, h) for h in range(8) if h != 3)
    assert math.isclose(build_clamps(compose_config(["clamp=pt_attention"])[0].clamp, shape)[1].strength, 1.0)
    match = build_clamps(compose_config(["clamp=match"])[0].clamp, shape)[1]  # the paper's --opto_induction_heads 1:3
    assert match.heads == ((1, 3),) and match.strength == 1.0


# --- query-only passes (training and evaluation) --------------------------------------------------------


def every_kind(checkpoint):
    """One clamp set per kind, aimed at the last layer where a kind can act there."""
    graft = {"kind": "graft_in", "checkpoint": checkpoint}
    specs = [{"kind": "ablate", "heads": ["1:0", "0:2"]},
             {"kind": "ablate", "heads": ["0:1"], "preserve": ["values", "patterns"]},
             {"kind": "keep_only", "heads": "1:3"}, {"kind": "prev_token_pattern", "heads": ["0:2", "1:1"], "strength": 0.7},
             {"kind": "no_prev_token", "heads": ["1:2"]}, {"kind": "induction_pattern", "heads": ["1:1"], "strength": 0.8},
             {"kind": "match_pattern", "heads": ["1:3"]}, {"kind": "perfect_copy", "head": "1:3"}, {"kind": "layer1_input"},
             {"kind": "head_temperature", "heads": ["1:0"], "temperature": 0.5}, {"kind": "silence_non_label", "heads": ["1:2"]},
             {"kind": "ablate_embedding"}, graft | {"layer": 0}, graft | {"layer": 1},
             {"kind": "graft_out", "checkpoint": checkpoint, "layer": 0}]
    return [build_clamps({"c": spec}, SHAPE) for spec in specs]


def test_query_only_passes_equal_the_full_pass_at_the_query(checkpoint):
    """Training and evaluation compute the last block's query row alone; every clamp must give the
    same logits, last-layer pattern row and gradients as in the full pass."""
    batch, site = make_batch(2), PATTERN.format(1)
    for clamps in every_kind(checkpoint):
        full_model, query_model = make_model(2), make_model(2)
        clamp_set = ClampSet([clamps, []])  # run 1 unclamped: run masks must hold in query-only passes too
        full, full_cache = clamp_set.run_with_cache(full_model, batch, [site])
        query, query_cache = clamp_set.run_with_cache(query_model, batch, [site], query_only=True)
        torch.testing.assert_close(query[:, :, -1], full[:, :, -1], msg=str(clamps))
        torch.testing.assert_close(query_cache[site], full_cache[site][..., -1:, :], msg=str(clamps))
        query_loss(clamp_set.forward(full_model, batch), batch.target).sum().backward()
        query_loss(clamp_set.query_logits(query_model, batch).unsqueeze(2), batch.target).sum().backward()
        torch.testing.assert_close(query_model.flat_grad, full_model.flat_grad, msg=str(clamps))


def test_the_fast_path_takes_the_hooked_paths_step_under_every_clamp(checkpoint):
    """Compiled clamped packs train through the fast path (torch.func, fast_path.train_step) unless
    their clamps read the model's own parameters (a preserving ablation's clean pass): the same
    losses and gradients as autograd through the hooked model, exactly zero wherever those are."""
    batch, weight, lr = make_batch(2), torch.full((2, 1, 1), 1 / 16), torch.full((2,), 0.1)
    blocking = 0
    for clamps in every_kind(checkpoint):
        clamp_set = ClampSet([clamps, []])  # run 1 unclamped: run masks must hold in the fast path too
        if not clamp_set.functional:
            assert type(choose_path(make_model(2), clamp_set, compiled=True)) is HookedPath
            continue
        assert type(choose_path(make_model(2), clamp_set, compiled=True)) is FastPath
        steps = []
        for path_type in (FastPath, HookedPath):
            model, log_row = make_model(2), torch.empty(2, 4)
            assert path_type(model, clamp_set).step(OneBatch(batch), 0, weight, lr, log_row)
            steps.append((log_row, model.flat_grad.clone()))
        (fast_log, fast_grad), (hooked_log, hooked_grad) = steps
        torch.testing.assert_close(fast_log, hooked_log, msg=str(clamps))
        torch.testing.assert_close(fast_grad, hooked_grad, msg=str(clamps))
        assert torch.equal(fast_grad == 0, hooked_grad == 0), str(clamps)
        blocking += bool((hooked_grad[0] == 0).any())
    assert blocking >= 10  # most kinds take some weights out of the gradient: the zeros were compared


# --- clamps that make others do nothing -------------------------------------------------------------


def assert_same_training_signal(clamps, more, model=None, batch=None):
    """`clamps` and `clamps + more` give the same query logits (the only ones trained and evaluated) and
    the same gradient: `more` does nothing."""
    model, batch = model or make_model(), batch or make_batch()
    torch.testing.assert_close(ClampSet([clamps + more]).forward(model, batch)[..., -1, :],
                               ClampSet([clamps]).forward(model, batch)[..., -1, :], rtol=0, atol=0)
    with_more, without = grads(clamps + more, model, batch), grads(clamps, model, batch)
    for name in without:
        torch.testing.assert_close(with_more[name], without[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("clamps, inert", [
    ([PerfectCopy(head=(1, 2))], [InductionPattern(heads=((1, 2),), strength=1.0)]),
    ([Layer1Input()], [PrevTokenPattern(heads=((0, 1),), strength=1.0)]),
    ([Layer1Input()], [AblateHeads(heads=((0, 0), (0, 3)))]),
])
def test_inert_combinations_change_nothing_and_are_refused(clamps, inert):
    assert_same_training_signal(clamps, inert)
    specs = {f"c{i}": spec for i, spec in enumerate(SPEC_OF[type(c)] for c in clamps + inert)}
    with pytest.raises(ConfigError, match="would do nothing"):
        build_clamps(specs, SHAPE)


SPEC_OF = {PerfectCopy: {"kind": "perfect_copy", "head": "1:2"},
           InductionPattern: {"kind": "induction_pattern", "heads": ["1:2"], "strength": 1.0},
           Layer1Input: {"kind": "layer1_input"},
           PrevTokenPattern: {"kind": "prev_token_pattern", "heads": ["0:1"], "strength": 1.0},
           AblateHeads: {"kind": "ablate", "heads": ["0:0", "0:3"]}}


def test_keeping_only_the_copied_head_changes_nothing_under_perfect_copy():
    """Why a subset sweep may add keep_only 1:2 to the copy clamp (docs/subsets.md): the other layer-2
    heads' outputs reach only the query logits, which the copy overwrites."""
    kept = build_clamps({"keep": {"kind": "keep_only", "heads": "1:2"}}, SHAPE)
    assert_same_training_signal([PerfectCopy(head=(1, 2))], kept)
    assert not ClampSet([kept]).forward(make_model(), make_batch()).equal(make_model()(make_batch()))  # not a no-op alone
