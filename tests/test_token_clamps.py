"""The clamps on token families (docs/tasks.md, "Clamps on every family"): each one writes exactly its
values at its site, from the family's pieces, and leaves every other site and head as it was."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.config import compose_config
from ihstudy.errors import ConfigError
from ihstudy.model.clamps import ClampSet, build_clamps
from ihstudy.model.transformer import ModelShape, Transformer, cross_entropy
from ihstudy.tasks.markov import MarkovTask
from ihstudy.tasks.repeat import RepeatTask
from ihstudy.training.sweep import expand

QUICK = ["train.sequences=640", "train.batch_size=32", "train.eval_every=320", "train.ckpt_every=320",
         "eval.n_sequences=20", "train.threads=1"]
PATTERN, SCORES = "blocks.{}.attn.hook_pattern", "blocks.{}.attn.hook_attn_scores"
TASKS = {"markov": lambda: MarkovTask(OmegaConf.create({"vocab": 3, "length": 12, "prior": "dirichlet", "concentration": 1.0})),
         "repeat": lambda: RepeatTask(OmegaConf.create({"vocab": 8, "length": 12, "min_segment": 3, "max_segment": 5}))}


def setup(family: str, n_heads: int = 2):
    task = TASKS[family]()
    vocab = task.k if family == "markov" else task.vocab
    shape = ModelShape(n_layers=2, n_heads=n_heads, d_model=16, n_features=0, n_labels=vocab, context_len=task.length,
                       input="tokens")
    batch = task.sample(16, torch.Generator().manual_seed(0)).map(lambda t: t.unsqueeze(0))  # one run
    return task, shape, Transformer(shape, 1).init_([0]), batch


def clamped(specs, task, shape, model, batch, names):
    clamps = build_clamps(specs, shape, task)
    return ClampSet([clamps]).run_with_cache(model, batch, names)


def head_columns(shape: ModelShape, which: str, head: int) -> slice:
    """The columns of W_QKV that make head `head`'s q, k or v."""
    D, dh = shape.d_model, shape.d_head
    start = "qkv".index(which) * D + head * dh
    return slice(start, start + dh)


def loss_grads(model, logits, batch, rows=None):
    model.flat_grad.zero_()
    loss = cross_entropy(logits, batch.target)
    (loss if rows is None else loss * rows).sum().backward()
    return {name: p.grad.clone() for name, p in model.params.items()}


@pytest.mark.parametrize("family", ["markov", "repeat"])
def test_induction_pattern_writes_the_family_target_on_rows_that_have_one(family):
    task, shape, model, batch = setup(family)
    s = 0.75
    spec = {"i": {"kind": "induction_pattern", "heads": ["1:0"], "strength": s}}
    names = [PATTERN.format(0), PATTERN.format(1)]
    _, clean = ClampSet([[]]).run_with_cache(model, batch, names)
    logits, cache = clamped(spec, task, shape, model, batch, names)
    target, rows = task.induction_target(batch), task.induction_rows(batch)  # [1, B, T, T], [1, B, T]
    T = batch.tokens.shape[-1]
    visible_other = torch.ones(T, T).tril().bool() & (target == 0)
    expected = s * target + (1 - s) * visible_other / visible_other.sum(-1, keepdim=True)
    got = cache[PATTERN.format(1)][:, :, 0]
    assert rows.any() and not rows.all()
    torch.testing.assert_close(got[rows], expected[rows])
    assert torch.equal(got[~rows], clean[PATTERN.format(1)][:, :, 0][~rows])  # rows without a target: the head's own
    assert torch.equal(cache[PATTERN.format(1)][:, :, 1], clean[PATTERN.format(1)][:, :, 1])  # the other head
    assert torch.equal(cache[PATTERN.format(0)], clean[PATTERN.format(0)])  # the layer below
    # the clamped rows give the head's Q/K no gradient; the other head's Q/K get some
    grads = loss_grads(model, logits, batch, rows.float())["blocks.1.attn.W_QKV"]
    for which in "qk":
        assert torch.equal(grads[..., head_columns(shape, which, 0)], torch.zeros_like(grads[..., head_columns(shape, which, 0)]))
        assert grads[..., head_columns(shape, which, 1)].abs().sum() > 0


def copy_logits_by_loop(scores, tokens, V):
    """[B, T, V]: logsumexp of scores[b, t, s] over s <= t with tokens[b, s] == v; -1e9 where none."""
    B, T = tokens.shape
    out = torch.full((B, T, V), -1e9)
    for b in range(B):
        for t in range(T):
            for v in tokens[b, :t + 1].unique():
                out[b, t, v] = scores[b, t, :t + 1][tokens[b, :t + 1] == v].logsumexp(0)
    return out


@pytest.mark.parametrize("family", ["markov", "repeat"])
def test_perfect_copy_adds_the_heads_attention_per_copied_token_to_the_logits(family):
    task, shape, model, batch = setup(family)
    names = [SCORES.format(1), PATTERN.format(1), "blocks.1.attn.hook_z", PATTERN.format(0)]
    _, clean = ClampSet([[]]).run_with_cache(model, batch, names)
    silent, _ = clamped({"a": {"kind": "ablate", "heads": ["1:0"]}}, task, shape, model, batch, [])
    logits, cache = clamped({"c": {"kind": "perfect_copy", "head": "1:0"}}, task, shape, model, batch, names)
    copy = copy_logits_by_loop(clean[SCORES.format(1)][0, :, 0], task.copy_token(batch)[0], shape.n_labels)
    torch.testing.assert_close(logits[0], torch.logaddexp(silent[0], copy))
    # softmax of the copy logits is the head's attention mass on each copied token
    copied = batch.tokens[0].unsqueeze(1).expand(-1, batch.tokens.shape[-1], -1)  # [B, t, s]: the token at s
    mass = torch.zeros_like(copy).scatter_add_(-1, copied, clean[PATTERN.format(1)][0, :, 0])
    torch.testing.assert_close(copy.softmax(-1), mass)
    z = cache["blocks.1.attn.hook_z"]
    assert torch.equal(z[:, :, :, 0], torch.zeros_like(z[:, :, :, 0]))  # the head writes nothing else
    assert torch.equal(z[:, :, :, 1], clean["blocks.1.attn.hook_z"][:, :, :, 1])
    assert all(torch.equal(cache[site], clean[site]) for site in (SCORES.format(1), PATTERN.format(1), PATTERN.format(0)))
    grads = loss_grads(model, logits, batch)
    qkv, W_O = grads["blocks.1.attn.W_QKV"], grads["blocks.1.attn.W_O"]
    v, own_rows = head_columns(shape, "v", 0), slice(0, shape.d_head)
    assert not qkv[..., v].any() and not W_O[:, own_rows].any()  # the head's V and W_O: none
    assert all(qkv[..., head_columns(shape, which, 0)].abs().sum() > 0 for which in "qk")  # the copy trains its Q/K
    assert grads["unembed.W_U"].abs().sum() > 0  # and the rest of the model its own logits


class EveryOtherMarkov(MarkovTask):
    """A family whose previous-token head reads two positions back (to check layer1_input follows the piece)."""

    def previous_position(self, n_tokens):
        return torch.arange(n_tokens) - 2


@pytest.mark.parametrize("family", ["markov", "repeat", "two_back"])
def test_layer1_input_reads_the_embedding_of_the_family_previous_position(family):
    task, shape, model, batch = setup("markov" if family == "two_back" else family)
    if family == "two_back":
        task = EveryOtherMarkov(OmegaConf.create({"vocab": 3, "length": 12, "prior": "dirichlet", "concentration": 1.0}))
    names = ["hook_embed", "blocks.1.hook_resid_pre", "blocks.1.hook_qk_input", "blocks.1.hook_v_input"]
    logits, cache = clamped({"l1": {"kind": "layer1_input"}}, task, shape, model, batch, names)
    embed, T = cache["hook_embed"], batch.tokens.shape[-1]
    back = 2 if family == "two_back" else 1
    source = [t - back if t >= back else t for t in range(T)]
    assert torch.equal(cache["blocks.1.hook_qk_input"], embed[:, :, source])
    assert torch.equal(cache["blocks.1.hook_resid_pre"], embed) and torch.equal(cache["blocks.1.hook_v_input"], embed)
    grads = loss_grads(model, logits, batch)
    assert all(g.abs().sum() == 0 for name, g in grads.items() if name.startswith("blocks.0."))  # layer 0 taken out
    assert grads["embed.W_E"].abs().sum() > 0


@pytest.mark.parametrize("spec", [{"kind": "match_pattern", "heads": ["1:0"]}, {"kind": "silence_non_label", "heads": ["1:0"]},
                                  {"kind": "prev_token_pattern", "heads": ["0:0"], "label_rows_only": True}])
def test_few_shot_notions_are_refused_on_token_families(spec):
    task, shape, _, _ = setup("markov")
    with pytest.raises(ConfigError, match="exemplar-label layout"):
        build_clamps({"c": spec}, shape, task)


def test_a_family_without_a_piece_is_refused_in_one_line(outputs_root):
    examples = str(Path(__file__).resolve().parent.parent / "docs" / "examples")
    sys.path.insert(0, examples)
    try:
        from cycle_task import CycleTask  # defines induction_target, not copy_token

        shape = ModelShape(n_layers=2, n_heads=2, d_model=16, n_features=0, n_labels=16, context_len=32, input="tokens")
        assert build_clamps({"i": {"kind": "induction_pattern", "heads": ["1:0"]}}, shape, CycleTask)
        with pytest.raises(ConfigError, match=r"needs copy_token \(the token a copy writes\); task family CycleTask does not"):
            build_clamps({"c": {"kind": "perfect_copy", "head": "1:0"}}, shape, CycleTask)
        with pytest.raises(ConfigError, match="no task family was given"):
            build_clamps({"c": {"kind": "perfect_copy", "head": "1:0"}}, shape)
    finally:
        sys.path.remove(examples)


@pytest.mark.parametrize("family", ["markov", "repeat"])
def test_every_condition_of_the_clamp_preset_changes_the_logits(family):
    """Each condition of experiment=<family>_clamps builds on the family's model and changes its logits."""
    task, shape, model, batch = setup(family, n_heads=1)
    runs = expand([f"experiment={family}_clamps"])
    conditions = [item.removeprefix("clamp=") for run in runs for item in run if item.startswith("clamp=")]
    assert conditions == ["none", "prev_token_first", "induction_second", "copy_second", "layer1_input"]
    clean = model(batch)
    for condition in conditions[1:]:
        clamps = build_clamps(compose_config([f"clamp={condition}"])[0].clamp, shape, task)
        assert (ClampSet([clamps]).forward(model, batch) - clean).abs().max() > 1e-3, condition


def test_the_markov_clamp_sweep_trains_every_condition(outputs_root):
    sweep = outputs_root / "markov_clamps"
    result = CliRunner().invoke(app, ["sweep", "-q", "experiment=markov_clamps", *QUICK, "train.sequences=320",
                                      f"hydra.sweep.dir={sweep}"])
    assert result.exit_code == 0, result.output
    assert sum((run / "eval.parquet").exists() for run in sweep.iterdir()) == 5
