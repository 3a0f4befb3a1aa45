"""The transformer of docs/science.md §2: causality, named sites, stacked runs, gradient blocking."""

import math

import pytest
import torch

from ihstudy.model import transformer
from ihstudy.model.transformer import OPT_IN_SITES, ModelShape, Transformer, query_loss
from ihstudy.tasks.fsl import Batch

SHAPE = ModelShape(n_layers=2, n_heads=8, d_model=64, n_features=16, n_labels=5, context_len=3)


def random_batch(runs=1, n=6, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(runs, n, shape.context_len + 1, shape.n_features, generator=g),
                 torch.randint(shape.n_labels, (runs, n, shape.context_len), generator=g),
                 torch.randint(shape.n_labels, (runs, n), generator=g))


def model(shape=SHAPE, seeds=(0,)):
    return Transformer(shape, len(seeds)).init_(list(seeds))


def test_paper_setup_has_about_67k_parameters():
    paper = ModelShape(n_layers=2, n_heads=8, d_model=64, n_features=512, n_labels=5, context_len=2)
    assert 66_000 < Transformer(paper).n_params < 68_000


@pytest.mark.parametrize("positional,mlp_ratio", [("rotary", 0.0), ("learned", 0.0), ("sinusoidal", 0.0), ("rotary", 2.0)])
def test_causality_later_tokens_never_change_earlier_outputs(positional, mlp_ratio):
    shape = ModelShape(2, 4, 32, 16, 5, 3, positional=positional, mlp_ratio=mlp_ratio)
    net = model(shape)
    batch = random_batch(shape=shape)
    _, cache = net.run_with_cache(batch)
    changed = Batch(batch.exemplars.clone(), batch.labels.clone(), batch.target)
    changed.exemplars[:, :, 2] += 1.0  # exemplar 2 sits at token 4
    changed.labels[:, :, 2] = (changed.labels[:, :, 2] + 1) % 5  # its label at token 5
    logits_changed, cache_changed = net.run_with_cache(changed)
    for name, value in cache.items():
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            assert torch.equal(value[..., :4, :], cache_changed[name][..., :4, :]), name
        elif name != "hook_pos_embed":
            assert torch.equal(value[:, :, :4], cache_changed[name][:, :, :4]), name
    assert not torch.allclose(cache["hook_logits"][:, :, 4:], logits_changed[:, :, 4:])


def test_recording_every_site_leaves_the_output_unchanged():
    net, batch = model(), random_batch()
    logits, cache = net.run_with_cache(batch)
    assert torch.equal(logits, net(batch))
    expected = {n for n in net.site_names() if not n.endswith(OPT_IN_SITES)}
    assert set(cache) == expected
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, 6, 8, 7, 7)
    assert cache["blocks.0.attn.hook_q"].shape == (1, 6, 7, 8, 8)
    assert torch.equal(cache["hook_logits"], logits)


@pytest.mark.parametrize("site", Transformer(SHAPE).site_names())
def test_overwriting_a_site_with_its_recorded_value_changes_nothing(site):
    net, batch = model(), random_batch()
    reference, cache = net.run_with_cache(batch, names_filter=[site])
    recorded = cache[site].detach().clone()
    calls = []

    def overwrite(tensor, hook):
        calls.append(hook.name)
        return recorded.clone()

    logits = net.run_with_hooks(batch, [(site, overwrite)])
    assert calls == [site]
    assert torch.equal(logits, reference)
    if not site.endswith(OPT_IN_SITES):
        assert torch.equal(logits, net(batch))  # always-on sites: identical to the plain forward
    else:
        assert torch.allclose(logits, net(batch), atol=1e-5)


def test_overwriting_a_site_changes_the_output_and_blocks_gradient_upstream():
    net, batch = model(), random_batch()
    site = "blocks.1.hook_resid_pre"
    constant = torch.randn(1, 6, 7, 64, generator=torch.Generator().manual_seed(1))
    logits = net.run_with_hooks(batch, [(site, lambda x, hook: constant)])
    assert not torch.allclose(logits, net(batch))
    query_loss(logits, batch.target).sum().backward()
    upstream = [n for n in net.params if n.startswith(("embed.", "blocks.0."))]
    downstream = [n for n in net.params if n.startswith(("blocks.1.", "unembed."))]
    assert all(net.params[n].grad.abs().sum() == 0 for n in upstream)
    assert all(net.params[n].grad.abs().sum() > 0 for n in downstream if not n.endswith(".b"))


def test_unknown_site_is_refused():
    with pytest.raises(KeyError):
        model().run_with_hooks(random_batch(), [("blocks.9.attn.hook_pattern", lambda x, h: None)])


def test_patterns_are_causal_distributions():
    _, cache = model().run_with_cache(random_batch())
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()))
    assert (pattern.triu(1) == 0).all()


def test_each_run_of_a_stack_equals_the_same_model_alone():
    stacked = model(seeds=(3, 4, 5))
    batch = random_batch(runs=3)
    logits = stacked(batch)
    for r, seed in enumerate((3, 4, 5)):
        alone = model(seeds=(seed,))(batch[r:r + 1])
        assert torch.allclose(logits[r:r + 1], alone, atol=1e-6)
    assert not torch.allclose(logits[0], logits[1])


def test_runs_have_independent_gradients():
    stacked = model(seeds=(3, 4))
    batch = random_batch(runs=2)
    query_loss(stacked(batch), batch.target)[0].sum().backward()
    assert stacked.flat_grad[0].abs().sum() > 0 and stacked.flat_grad[1].abs().sum() == 0


def test_state_dict_round_trip():
    source, target = model(seeds=(1,)), model(seeds=(2,))
    target.load_state_dict(source.state_dict(0), 0)
    batch = random_batch()
    assert torch.equal(source(batch), target(batch))
    with pytest.raises(ValueError):
        model(ModelShape(2, 4, 32, 16, 5, 3)).load_state_dict(source.state_dict(0), 0)


WIDE = ModelShape(n_layers=2, n_heads=8, d_model=256, n_features=512, n_labels=64, context_len=2)
WEIGHTS = ("embed.W_x", "blocks.0.attn.W_QKV", "blocks.1.attn.W_O", "unembed.W_U")


def test_lecun_normal_init_has_variance_one_over_fan_in_and_stays_within_two_std():
    params = Transformer(WIDE).init_([0], "lecun_normal").params
    for name in WEIGHTS:
        w = params[name][0]
        fan_in = w.shape[0]
        assert abs(w.std().item() * math.sqrt(fan_in) - 1) < 0.03, name
        bound = 2 / math.sqrt(fan_in) / 0.87962566103423978
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name  # truncated, not clipped
        assert abs(w.mean().item()) * math.sqrt(fan_in) < 0.05, name
    labels = params["embed.W_y"][0]
    assert labels.abs().max() <= 0.04 and abs(labels.std().item() / (0.02 * 0.8796) - 1) < 0.05
    for name, p in params.items():
        if name.endswith((".b", ".b_x", ".b_U")):
            assert torch.all(p == 0), name
        if name.endswith(".w"):
            assert torch.all(p == 1), name


def test_uniform_init_keeps_the_earlier_scheme():
    params = Transformer(WIDE).init_([0], "uniform").params
    for name in WEIGHTS[1:]:
        w = params[name][0]
        fan_in = w.shape[0]
        assert w.abs().max() <= 1 / math.sqrt(fan_in)
        assert abs(w.std().item() * math.sqrt(3 * fan_in) - 1) < 0.03, name  # uniform: variance bound²/3
    w_x = params["embed.W_x"][0]
    assert abs(w_x.std().item() * math.sqrt(512) - 1) < 0.03 and w_x.abs().max() * math.sqrt(512) > 3  # untruncated


def test_default_config_uses_the_authors_init():
    from ihstudy.config import compose_config

    cfg, _ = compose_config([])
    assert cfg.model.init == "lecun_normal"


def test_site_names_are_every_site_the_forward_code_reaches_in_order():
    names = Transformer(ModelShape(2, 4, 32, 16, 5, 3, positional="learned", mlp_ratio=2.0)).site_names()
    assert names[:3] == ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"]
    assert names[-2:] == ["ln_final.hook_normalized", "hook_logits"]
    block = [n.removeprefix("blocks.1.") for n in names if n.startswith("blocks.1.")]
    assert block == ["hook_resid_pre", "hook_qk_input", "hook_v_input", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                     "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
                     "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    rotary = Transformer(ModelShape(1, 4, 32, 16, 5, 3)).site_names()
    assert "hook_pos_embed" not in rotary and rotary.index("blocks.0.attn.hook_rot_q") == rotary.index("blocks.0.attn.hook_v") + 1


def test_compiled_graphs_written_out_matmul_is_bitwise_atens(monkeypatch):
    """What a compiled graph runs for attention's small per-head products (transformer.head_matmul:
    ATen's plain loop written out, in the backward too unless aten_backward_products) against `@`:
    the same bits in every attention activation, the logits and every gradient. Run eager here, as
    if compiling (test_fast_path checks both paths compiled)."""
    shape = ModelShape(2, 8, 64, 16, 5, 2)  # the paper's 5-token sequences: 5 x 8 by 8 x 5 per head
    net, batch = model(shape, seeds=(1, 2)), random_batch(runs=2, n=8, shape=shape)
    sites = [f"blocks.{layer}.attn.{name}" for layer in range(2) for name in ("hook_attn_scores", "hook_pattern", "hook_z")]

    def activations_and_gradient():
        net.flat_grad.zero_()
        logits, cache = net.run_with_cache(batch, sites)
        query_loss(logits, batch.target).sum().backward()
        return [logits, *(cache[s] for s in sites), net.flat_grad.clone()]

    by_matmul = activations_and_gradient()
    written_out, plain_loop = [], transformer.compiled_matmul
    monkeypatch.setattr(transformer, "compiled_matmul", lambda a, b: written_out.append(a.shape) or plain_loop(a, b))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    by_plain_loop = activations_and_gradient()
    assert len(written_out) == 2 * 2 * 3  # scores and z of both layers, each forward and two gradients
    assert by_matmul[-1].abs().sum() > 0
    for expected, value in zip(by_matmul, by_plain_loop):
        assert torch.equal(value, expected)
    written_out.clear()
    with transformer.aten_backward_products():  # as the hooked path traces its graphs
        forward_written_out = activations_and_gradient()
    assert len(written_out) == 2 * 2 and transformer.WRITTEN_OUT_BACKWARD
    for expected, value in zip(by_matmul, forward_written_out):
        assert torch.equal(value, expected)
