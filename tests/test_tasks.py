"""Task families (docs/tasks.md): the protocol, markov and repeat, token models, and a user's own family."""

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from ihstudy.cli import app
from ihstudy.config import compose_config, conf_dir
from ihstudy.errors import ConfigError
from ihstudy.run_files import RunFiles
from ihstudy.tasks.base import TokenBatch, attention_on, earlier_occurrence_successors, task_family
from ihstudy.tasks.markov import MarkovTask, stationary_distribution, uniform_doubly_stochastic
from ihstudy.tasks.repeat import RepeatTask
from ihstudy.training.steps import HookedPath
from ihstudy.training.train import Pack, RunSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
QUICK = ["train.sequences=640", "train.batch_size=32", "train.eval_every=320", "train.ckpt_every=320",
         "eval.n_sequences=20", "train.threads=1"]


def markov(**changes) -> MarkovTask:
    return MarkovTask(OmegaConf.create({"vocab": 3, "length": 12, "prior": "dirichlet", "concentration": 1.0} | changes))


# --- the protocol ---------------------------------------------------------------------------------------


def test_target_must_name_a_task_family():
    with pytest.raises(ConfigError, match="not a task family"):
        task_family({"_target_": "os.system"})
    with pytest.raises(ConfigError, match="cannot import"):
        task_family({"_target_": "no_such_module.Task"})
    assert task_family({}).__name__ == "FewShotTask"  # runs saved before families had a _target_


def test_a_foreign_target_is_refused_in_one_line():
    result = CliRunner().invoke(app, ["train", "task=markov", "task._target_=subprocess.call", *QUICK])
    assert result.exit_code == 2 and "not a task family" in result.output and "Traceback" not in result.output


def test_attention_on_counts_mass_on_target_cells_over_rows_that_have_one():
    pattern = torch.zeros(1, 1, 1, 3, 3)
    pattern[..., 0, 0], pattern[..., 1, :2], pattern[..., 2, :] = 1.0, 0.5, torch.tensor([0.2, 0.3, 0.5])
    where = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 0.5, 0.5]])  # row 0 has no target: not counted
    assert attention_on(pattern, where).item() == pytest.approx((0.5 + 0.8) / 2)


def test_earlier_occurrence_successors_point_after_earlier_copies_of_the_current_token():
    tokens = torch.tensor([0, 1, 0, 0])
    target = earlier_occurrence_successors(tokens)
    assert target[2].tolist() == [0, 1, 0, 0]  # token 0 at position 0: look at 1
    assert target[3].tolist() == [0, 0.5, 0, 0.5]  # copies at 0 and 2: look at 1 and 3
    assert target[0].sum() == 0 and target[1].sum() == 0


# --- markov -------------------------------------------------------------------------------------------


def test_stationary_distribution_and_doubly_stochastic_matrices():
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(3), size=(50, 3))
    pi = stationary_distribution(P)
    assert np.allclose(np.einsum("nk,nkj->nj", pi, P), pi) and np.allclose(pi.sum(-1), 1)
    D = uniform_doubly_stochastic(200, 3, rng)
    assert D.shape == (200, 3, 3) and (D > 0).all()
    assert np.allclose(D.sum(1), 1) and np.allclose(D.sum(2), 1)


def test_markov_sequences_follow_their_chain_and_the_stream_is_seeded():
    task = markov(vocab=2, length=400)
    one, two = (task.sample(64, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.tokens[:, 1:], one.target[:, :-1])
    fixed = np.array([[0.9, 0.1], [0.3, 0.7]])
    task.transition_matrices = lambda n, rng: np.broadcast_to(fixed, (n, 2, 2))
    chains = task.sample(64, torch.Generator().manual_seed(4))
    pairs = torch.stack([chains.tokens, chains.target], -1).view(-1, 2)
    counts = torch.zeros(2, 2).index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(pairs)), accumulate=True)
    assert np.allclose((counts / counts.sum(1, keepdim=True)).numpy(), fixed, atol=0.02)
    first = chains.tokens[:, 0].float().mean().item()  # started from the stationary distribution (0.75, 0.25)
    assert abs(first - 0.25) < 0.15


def test_references_are_the_in_context_count_estimators():
    task = markov()
    tokens = torch.tensor([[0, 2, 0, 0, 1, 0, 2, 2, 1, 0, 0, 2]])
    refs = task.references(tokens)
    t = 9  # current token 0; states 0..9: counts 0:5, 1:2, 2:3
    assert refs["unigram"][0, t].tolist() == pytest.approx([(5 + 1) / 13, (2 + 1) / 13, (3 + 1) / 13])
    # transitions from 0 among positions 0..9: 0->2, 0->0, 0->1, 0->2, (9 is the current): 2 to state 2
    assert refs["bigram"][0, t].tolist() == pytest.approx([(1 + 1) / 7, (1 + 1) / 7, (2 + 1) / 7])
    assert refs["uniform"][0, t].tolist() == pytest.approx([1 / 3] * 3)


def test_markov_metrics_are_zero_kl_for_the_reference_itself():
    task = markov()
    batch = task.sample(8, torch.Generator().manual_seed(0))
    batch = TokenBatch(batch.tokens[None], batch.target[None])
    logits = task.references(batch.tokens)["bigram"].log()
    metrics = task.metrics(logits, batch)
    assert metrics["kl_bigram"].item() == pytest.approx(0, abs=1e-6)
    assert metrics["kl_uniform"].item() > 0 and metrics["kl_unigram"].item() > 0
    uniform = task.metrics(torch.zeros_like(logits), batch)
    assert uniform["loss"].item() == pytest.approx(math.log(3), abs=1e-6)


def test_markov_checks_its_config():
    with pytest.raises(ConfigError, match="task.prior"):
        MarkovTask.check(OmegaConf.create({"vocab": 2, "length": 10, "prior": "zipf", "concentration": 1.0}))
    with pytest.raises(ConfigError, match="vocab <= 4"):
        MarkovTask.check(OmegaConf.create({"vocab": 5, "length": 10, "prior": "doubly_stochastic", "concentration": 1.0}))


# --- repeat -------------------------------------------------------------------------------------------


def repeat_task(**changes) -> RepeatTask:
    return RepeatTask(OmegaConf.create({"vocab": 20, "length": 24, "min_segment": 4, "max_segment": 8} | changes))


def test_repeat_sequences_repeat_their_segment_and_the_induction_target_points_after_the_first_copy():
    task = repeat_task()
    batch = task.sample(100, torch.Generator().manual_seed(1))
    tokens, target = batch.tokens, task.induction_target(batch)
    for b in range(100):
        o, L = int(batch.offset[b]), int(batch.segment[b])
        assert 4 <= L <= 8 and o + 2 * L <= 24
        assert torch.equal(tokens[b, o + L:o + 2 * L], tokens[b, o:o + L])
        rows = target[b].sum(-1).nonzero().flatten()
        assert rows.tolist() == list(range(o + L, o + 2 * L))
        for t in rows.tolist():
            s = int(target[b, t].argmax())
            assert tokens[b, s - 1] == tokens[b, t] and target[b, t, s] == 1  # the token after the earlier copy
    assert len(set(batch.offset.tolist())) > 5 and len(set(batch.segment.tolist())) == 5  # random offsets and lengths


def test_repeat_metrics_separate_the_repeat_from_its_first_occurrence():
    task = repeat_task()
    batch = task.sample(50, torch.Generator().manual_seed(2))
    batch = batch.map(lambda t: t[None])
    perfect = torch.nn.functional.one_hot(batch.target, 20).float() * 50  # knows every next token
    repeat_only = torch.where(task.parts(batch)["repeat"].unsqueeze(-1), perfect, 0.0)
    m = task.metrics(repeat_only, batch)
    assert m["loss_repeat"].item() < 1e-6 and m["loss_first"].item() == pytest.approx(math.log(20), abs=1e-5)
    assert m["icl_score"].item() == pytest.approx(math.log(20), abs=1e-5) and m["repeat_acc"].item() == 1.0


def test_head_scores_of_an_ideal_induction_pattern():
    task = repeat_task()
    batch = task.sample(10, torch.Generator().manual_seed(3))
    batch = batch.map(lambda t: t[None])
    target = task.induction_target(batch)  # [1, B, T, T]
    T = target.shape[-1]
    previous = torch.eye(T).roll(-1, 1).tril()  # row t on t-1
    previous[0, 0] = 1
    patterns = [previous.expand(1, 10, 2, T, T),
                torch.where(target.sum(-1, keepdim=True) > 0, target, torch.eye(T)).unsqueeze(2).expand(-1, -1, 2, -1, -1)]
    scores = task.head_scores(patterns, batch)
    assert scores["prev_token.L0H1"].item() == pytest.approx(1) and scores["induction.L1H0"].item() == pytest.approx(1)
    assert "induction.L0H0" not in scores and "prev_token.L1H0" not in scores


@pytest.mark.parametrize("family", ["markov", "repeat"])
def test_head_scores_are_the_masked_sums_over_the_whole_batch_to_the_bit(family):
    """The default head_scores reads the previous-token cell directly and sums the induction score in
    chunks of SCORE_SEQUENCES sequences: the very numbers of attention_on over the whole batch and
    both runs at once (61 sequences: a last chunk shorter than the others)."""
    cfg, _ = compose_config([f"experiment={family}"])
    task = task_family(cfg.task).from_config(cfg, None)
    generator = torch.Generator().manual_seed(0)
    runs = [task.sample(61, generator), task.sample(61, generator)]
    batch = type(runs[0]).stack(runs)
    T = batch.target.shape[-1]
    patterns = [torch.rand(2, 61, 3, T, T, generator=generator).softmax(-1) for _ in range(3)]
    scores = task.head_scores(patterns, batch)
    previous = torch.zeros(T, T)
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    target = task.induction_target(batch)
    for layer in range(3):
        for h in range(3):
            if layer < 2:
                assert torch.equal(scores[f"prev_token.L{layer}H{h}"], attention_on(patterns[layer], previous)[:, h])
            if layer > 0:
                assert torch.equal(scores[f"induction.L{layer}H{h}"], attention_on(patterns[layer], target)[:, h])
    assert list(scores) == [f"{kind}.L{layer}H{h}" for layer, kind in
                            [(0, "prev_token"), (1, "prev_token"), (1, "induction"), (2, "induction")] for h in range(3)]


# --- token models through training -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["markov", "repeat"])
def test_token_families_train_deterministically_with_a_loss_at_every_position(preset, tmp_path):
    cfg, _ = compose_config([f"experiment={preset}", *QUICK])
    pack = Pack([RunSpec(cfg, tmp_path / "a")])
    assert isinstance(pack.path, HookedPath) and pack.path.every_position
    assert pack.shape.input == "tokens" and "embed.W_E" in pack.model.params
    logits = pack.clamps.all_logits(pack.model, pack.stream.batch(0))
    assert logits.shape == (1, 32, pack.shape.n_tokens, pack.shape.n_labels)
    first = pack.train()
    Pack([RunSpec(cfg, tmp_path / "b")]).train()
    assert first[0].status == "completed"
    a, b = (pd.read_parquet(tmp_path / d / "eval.parquet") for d in "ab")
    assert a.equals(b) and set(a.evaluator) == {preset}


def test_a_token_run_resumes_exactly(tmp_path):
    """A copy of a finished run without its last checkpoint resumes from the one before and rewrites
    the same tables."""
    cfg, _ = compose_config(["experiment=markov", *QUICK])
    Pack([RunSpec(cfg, tmp_path / "whole")]).train()
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    last = RunFiles(tmp_path / "resumed").checkpoint_steps()[-1]
    for path in (tmp_path / "resumed" / "checkpoints").glob(f"step_{last:08d}.pt*"):
        path.unlink()
    pack = Pack([RunSpec(cfg, tmp_path / "resumed")])
    assert pack.restore() == 10
    pack.train()
    whole, resumed = (pd.read_parquet(tmp_path / d / "eval.parquet") for d in ("whole", "resumed"))
    assert whole.equals(resumed)


# --- a user's own family: docs/tasks.md's worked example ----------------------------------------------------


def test_the_worked_example_family_trains_sweeps_and_is_analysed(tmp_path, monkeypatch):
    """As docs/tasks.md says: the class where Python finds it, the YAML in the config tree's task/."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    shutil.copytree(conf_dir(), tmp_path / "conf")
    shutil.copy(EXAMPLES / "cycle.yaml", tmp_path / "conf" / "task" / "cycle.yaml")
    monkeypatch.setenv("IHSTUDY_CONF_DIR", str(tmp_path / "conf"))
    small = ["model.n_heads=2", "model.d_model=16", "optim.lr=3e-3", *QUICK]
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "task=cycle", *small, f"hydra.run.dir={tmp_path / 'run'}"])
    assert trained.exit_code == 0, trained.output
    evals = pd.read_parquet(tmp_path / "run" / "eval.parquet")
    assert set(evals.evaluator) == {"cycle"} and {"loss_after_first_cycle", "induction.L1H0"} <= set(evals.columns)
    swept = runner.invoke(app, ["sweep", "-q", "task=cycle", "seed=1,2", *small,
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert swept.exit_code == 0, swept.output
    analysed = runner.invoke(app, ["analyze", str(tmp_path / "sweep"), "--by", "seed", "--thresholds", "3,2",
                                   "--metric", "2", "--report", str(tmp_path / "report")])
    assert analysed.exit_code == 0, analysed.output
    table = pd.read_csv(tmp_path / "report" / "timing.csv")
    assert set(table.evaluator) == {"cycle"} and len(table) == 2


def test_analyze_times_the_family_s_own_column(tmp_path):
    result = CliRunner().invoke(app, ["train", "experiment=markov", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    analysed = CliRunner().invoke(app, ["analyze", str(tmp_path / "run"), "--report", str(tmp_path / "report")])
    assert analysed.exit_code == 0, analysed.output
    assert "markov kl_bigram" in analysed.output
    table = pd.read_csv(tmp_path / "report" / "timing.csv")
    assert "0.04_eval" in table.columns and set(table.evaluator) == {"markov"}
    evaluated = CliRunner().invoke(app, ["analyze", "eval", str(tmp_path / "run")])
    assert evaluated.exit_code == 0 and "kl_bigram" in evaluated.output, evaluated.output
    heads = CliRunner().invoke(app, ["analyze", "heads", str(tmp_path / "run")])
    assert heads.exit_code == 2 and "few-shot task only" in heads.output


# --- judging Edelman et al.'s findings --------------------------------------------------------------------------


def markov_evals(kls, prev=(0.04, 0.5), induction=(0.6, 0.85)) -> pd.DataFrame:
    """An eval table whose rows carry the KL triples `kls` (uniform, unigram, bigram) and head scores
    moving linearly between the given start and end values."""
    n = len(kls)
    ramp = lambda a, b: np.linspace(a, b, n)  # noqa: E731
    return pd.DataFrame({"sequences": np.arange(n) * 1000, "evaluator": "markov",
                         "kl_uniform": [k[0] for k in kls], "kl_unigram": [k[1] for k in kls], "kl_bigram": [k[2] for k in kls],
                         "prev_token.L0H0": ramp(*prev), "induction.L1H0": ramp(*induction)})


def test_markov_findings_judge_phases_heads_and_the_prior():
    from ihstudy.analysis import markov_findings as findings

    three = markov_evals([(0.0, 0.1, 0.2), (0.1, 0.02, 0.06), (0.15, 0.03, 0.05), (0.2, 0.06, 0.02)])
    holds, what = findings.three_phases_in_order(three)
    assert holds and what == "uniform from 0; unigram from 1,000; bigram from 3,000"
    assert not findings.three_phases_in_order(markov_evals([(0.0, 0.1, 0.2), (0.1, 0.05, 0.02)]))[0]  # no unigram phase
    assert findings.statistical_induction_head(three)[0]
    assert not findings.statistical_induction_head(markov_evals(three.iloc[:, 2:5].to_numpy(), induction=(0.6, 0.62)))[0]
    late = markov_evals([(0.0, 0.1, 0.2), (0.1, 0.02, 0.06), (0.15, 0.03, 0.05), (0.15, 0.03, 0.05), (0.2, 0.06, 0.02)])
    assert findings.bigram_time(three) == 3000 and findings.bigram_time(late) == 4000
    assert findings.doubly_stochastic_sooner([late, late], [three, three])[0]
    assert not findings.doubly_stochastic_sooner([three], [late])[0]


# --- clamps on token families ------------------------------------------------------------------------------


def test_clamps_act_on_a_token_model_where_they_should_and_nowhere_else(tmp_path):
    from ihstudy.model.clamps import ClampSet, build_clamps

    cfg, _ = compose_config(["experiment=repeat", *QUICK])
    pack = Pack([RunSpec(cfg, tmp_path / "run")])
    batch = pack.stream.batch(0)
    sites = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"]
    _, clean = pack.clamps.run_with_cache(pack.model, batch, sites)
    specs = {"pt": {"kind": "prev_token_pattern", "heads": ["0:1"]}, "off": {"kind": "ablate", "heads": ["0:2"]}}
    clamped = ClampSet([build_clamps(specs, pack.shape)])
    _, cache = clamped.run_with_cache(pack.model, batch, sites)
    T = pack.shape.n_tokens
    previous = torch.eye(T).roll(-1, 1).tril()
    previous[0, 0] = 1
    assert torch.equal(cache["blocks.0.attn.hook_pattern"][:, :, 1], previous.expand(1, 32, T, T))
    assert torch.equal(cache["blocks.0.attn.hook_z"][:, :, :, 2], torch.zeros_like(cache["blocks.0.attn.hook_z"][:, :, :, 2]))
    untouched = [0, 3]
    assert torch.equal(cache["blocks.0.attn.hook_pattern"][:, :, untouched], clean["blocks.0.attn.hook_pattern"][:, :, untouched])
    assert torch.equal(cache["blocks.0.attn.hook_z"][:, :, :, untouched], clean["blocks.0.attn.hook_z"][:, :, :, untouched])
    assert torch.equal(cache["hook_embed"], clean["hook_embed"])


@pytest.mark.parametrize("clamp", ["match_pattern", "silence_non_label"])
def test_clamps_that_read_the_few_shot_layout_are_refused_on_token_families(clamp):
    spec = f'+clamp.c={{kind: {clamp}, heads: ["1:0"]}}'
    result = CliRunner().invoke(app, ["train", "experiment=markov", spec, *QUICK])
    assert result.exit_code == 2 and "exemplar-label layout" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_token_run_in_a_pack_matches_the_same_run_alone(tmp_path):
    cfg, _ = compose_config(["experiment=markov", *QUICK])
    mate, _ = compose_config(["experiment=markov", "seed=6", "data_seed=3", "clamp=prev_token_first", *QUICK])
    Pack([RunSpec(cfg, tmp_path / "packed"), RunSpec(mate, tmp_path / "mate")]).train()
    Pack([RunSpec(cfg, tmp_path / "solo")]).train()
    alone, inside, other = (pd.read_parquet(tmp_path / d / "eval.parquet") for d in ("solo", "packed", "mate"))
    numeric = alone.columns.drop(["step", "sequences", "evaluator"])
    assert (inside[numeric] - alone[numeric]).abs().max().max() < 1e-4
    assert (other[numeric] - alone[numeric]).abs().max().max() > 1e-3


def test_notebook_timing_of_a_token_run_reads_its_family(outputs_root):
    """run.timing() and load_sweep(...).timing() time the family's own evaluator and column, as `analyze` does."""
    import ihstudy

    tiny = ["experiment=markov", "train.sequences=640", "train.eval_every=320", "eval.n_sequences=20", "train.threads=1"]
    run = ihstudy.train([*tiny, f"hydra.run.dir={outputs_root / 'm'}"])
    assert set(run.timing().evaluator) == {"markov"}
    assert CliRunner().invoke(app, ["sweep", "-q", *tiny, "seed=1,2", f"hydra.sweep.dir={outputs_root / 's'}"]).exit_code == 0
    table, _ = ihstudy.load_sweep(outputs_root / "s").timing()
    assert set(table.evaluator) == {"markov"} and len(table) == 2
