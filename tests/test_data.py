"""The sampler of docs/science.md §1: burstiness, distractor, label pairs, splits, streams."""


import pytest
import torch

from ihstudy.errors import ConfigError
from ihstudy.tasks.base import TrainStream, chunk_generator
from ihstudy.tasks.fsl import FewShotSampler, Items, gaussian_features, label_pair_split

N_CLASSES, N_EXEMPLARS = 60, 5


def id_features():
    """Exemplar (c, e) is the vector [c, e]: sequences then say which class and exemplar they hold."""
    c, e = torch.meshgrid(torch.arange(N_CLASSES), torch.arange(N_EXEMPLARS), indexing="ij")
    return torch.stack([c, e], -1).float()


def make_sampler(context_len=2, burstiness=1, n_labels=5, zipf_alpha=0.0, classes=range(50), exemplars=(0,)):
    train_pairs, _ = label_pair_split(n_labels, 0.2, 0)
    return FewShotSampler(id_features(), torch.tensor(list(classes)), torch.tensor(list(exemplars)), train_pairs,
                          n_labels, context_len, burstiness, zipf_alpha)


@pytest.mark.parametrize("n_labels,n_train,n_val", [(5, 8, 2), (10, 36, 9), (15, 84, 21)])
def test_label_pair_split_sizes_and_coverage(n_labels, n_train, n_val):
    train, val = label_pair_split(n_labels, 0.2, 0)
    assert (len(train), len(val)) == (n_train, n_val)
    assert set(train.flatten().tolist()) == set(range(n_labels))  # every label seen in training
    as_sets = lambda pairs: {tuple(p) for p in pairs.tolist()}
    assert not as_sets(train) & as_sets(val)
    assert all(i < j for i, j in train.tolist() + val.tolist())


def test_label_pair_split_is_seeded():
    assert torch.equal(label_pair_split(10, 0.2, 3)[0], label_pair_split(10, 0.2, 3)[0])
    assert not torch.equal(label_pair_split(10, 0.2, 3)[0], label_pair_split(10, 0.2, 4)[0])


def test_too_few_labels_for_a_split():
    with pytest.raises(ConfigError):
        label_pair_split(1, 0.2, 0)
    with pytest.raises(ConfigError):
        label_pair_split(3, 0.9, 0)  # every pair held out


@pytest.mark.parametrize("context_len,burstiness", [(2, 1), (4, 2), (6, 2), (5, 1)])
def test_burstiness_distractor_and_labels(context_len, burstiness):
    sampler = make_sampler(context_len, burstiness)
    batch = sampler.sample(2000, torch.Generator().manual_seed(0))
    classes = batch.exemplars[..., 0].long()  # [n, N+1]
    context, query = classes[:, :-1], classes[:, -1:]
    labels, target = batch.labels, batch.target
    same_as_query = context == query
    assert (same_as_query.sum(1) == burstiness).all()
    # Items of the query class carry the query's label; the distractor class carries the other pair label.
    assert (labels[same_as_query] == target.repeat_interleave(burstiness)).all()
    train_pairs = {tuple(p) for p in label_pair_split(5, 0.2, 0)[0].tolist()}
    for row in range(300):
        others, other_labels = context[row][~same_as_query[row]], labels[row][~same_as_query[row]]
        assert target[row].item() not in other_labels.tolist()
        # Some label b (the distractor's) is carried by exactly `burstiness` items of one class, forms a training
        # pair with the query's label, and every remaining (filler) item has a distinct class and a label outside the pair.
        assert any(_is_distractor_label(b, others, other_labels, target[row].item(), burstiness, train_pairs)
                   for b in other_labels.unique().tolist())


def _is_distractor_label(b, classes, labels, a, burstiness, train_pairs):
    carriers = labels == b
    if carriers.sum() != burstiness or len(classes[carriers].unique()) != 1 or tuple(sorted((a, b))) not in train_pairs:
        return False
    fillers = classes[~carriers]
    return len(fillers.unique()) == len(fillers) and classes[carriers][0].item() not in fillers.tolist()


def test_no_val_pair_in_training_and_all_pairs_used():
    sampler = make_sampler()
    batch = sampler.sample(5000, torch.Generator().manual_seed(1))
    classes = batch.exemplars[..., 0].long()
    other = torch.where(classes[:, 0] == classes[:, -1], batch.labels[:, 1], batch.labels[:, 0])
    seen = {tuple(sorted(p)) for p in zip(batch.target.tolist(), other.tolist())}
    train, val = label_pair_split(5, 0.2, 0)
    assert seen == {tuple(p) for p in train.tolist()}
    assert not seen & {tuple(p) for p in val.tolist()}
    # Both orders of a pair occur (query gets the first or the second label).
    assert {batch.target[(other == j) & (batch.target == i)].numel() > 0 for i, j in train.tolist()} == {True}


def test_query_position_is_uniform_and_classes_are_uniform():
    batch = make_sampler().sample(20000, torch.Generator().manual_seed(2))
    classes = batch.exemplars[..., 0].long()
    first_is_query = (classes[:, 0] == classes[:, -1]).float().mean().item()
    assert abs(first_is_query - 0.5) < 0.02
    counts = torch.bincount(classes[:, -1], minlength=50).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    assert set(classes.flatten().tolist()) <= set(range(50))


def test_zipf_class_frequencies():
    batch = make_sampler(zipf_alpha=1.0).sample(20000, torch.Generator().manual_seed(3))
    counts = torch.bincount(batch.exemplars[:, -1, 0].long(), minlength=50).float()
    expected = (1 / torch.arange(1, 51)) / (1 / torch.arange(1, 51)).sum() * 20000
    assert counts[0] > 5 * counts[20]
    assert torch.allclose(counts[:5], expected[:5], rtol=0.15)


def test_exemplar_split_is_respected():
    train_only = make_sampler(exemplars=(0,)).sample(1000, torch.Generator().manual_seed(4))
    assert (train_only.exemplars[..., 1] == 0).all()
    held_out = make_sampler(exemplars=(1, 2, 3, 4)).sample(1000, torch.Generator().manual_seed(4))
    assert set(held_out.exemplars[..., 1].long().unique().tolist()) == {1, 2, 3, 4}


def test_exemplar_noise():
    train_pairs, _ = label_pair_split(5, 0.2, 0)
    noisy = FewShotSampler(id_features(), torch.arange(50), torch.tensor([0]), train_pairs, 5, 2, 1, 0.0, 0.5)
    batch = noisy.sample(4000, torch.Generator().manual_seed(0))
    noise = batch.exemplars[..., 1]  # exemplar id 0 plus noise
    assert abs(noise.std().item() - 0.5) < 0.02 and abs(noise.mean().item()) < 0.02


def test_a_stream_keeps_its_chunk_compact_and_yields_the_batches_sampled_whole():
    """A chunk is kept as exemplar rows and their noise (fsl.Items) and each step's batch expanded
    from it: the same batches, noise included, as sampling the chunk's sequences at once."""
    train_pairs, _ = label_pair_split(5, 0.2, 0)
    noisy = FewShotSampler(id_features(), torch.arange(50), torch.tensor([0, 1]), train_pairs, 5, 2, 1, 0.0, 0.5)
    stream = TrainStream(noisy, 7, 32, chunk_batches=4)
    whole = noisy.sample(4 * 32, chunk_generator(7, 1))
    for k in range(4):
        batch, part = stream.batch(4 + k), slice(32 * k, 32 * (k + 1))
        assert torch.equal(batch.exemplars, whole.exemplars[part]) and torch.equal(batch.labels, whole.labels[part])
        assert torch.equal(batch.target, whole.target[part])
    chunk = stream.chunk(1)
    assert isinstance(chunk, Items) and chunk.rows.shape == (4, 32, 3) and chunk.noise.shape == (4, 32, 3, 2)
    assert make_sampler().sample_compact(8, torch.Generator()).noise.numel() == 0  # no noise, nothing kept


def test_train_stream_is_a_pure_function_of_seed_chunk_size_and_step():
    sampler = make_sampler()
    forward, backward = TrainStream(sampler, 7, 32, chunk_batches=4), TrainStream(sampler, 7, 32, chunk_batches=4)
    first = [forward.batch(k).exemplars for k in range(10)]
    second = [backward.batch(k).exemplars for k in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])
    other_seed = TrainStream(sampler, 8, 32, chunk_batches=4)
    assert not torch.equal(other_seed.batch(0).exemplars, first[0])
    other_chunks = TrainStream(sampler, 7, 32, chunk_batches=8)  # hence train.chunk_batches is recorded in the config
    assert not torch.equal(other_chunks.batch(5).exemplars, first[5])


def test_gaussian_features_shape_norm_and_structure():
    features = gaussian_features(100, 5, 64, 8, 0.3, 2.0, seed=0)
    assert features.shape == (100, 5, 64)
    assert torch.allclose(features.norm(dim=-1), torch.full((100, 5), 2.0), atol=1e-5)
    # Class centres span a low-dimensional subspace: the exemplar-averaged vectors have rank-8 structure.
    centres = features.mean(1)
    singular = torch.linalg.svdvals(centres - centres.mean(0))
    assert singular[7] > 4 * singular[8]
    assert torch.equal(features, gaussian_features(100, 5, 64, 8, 0.3, 2.0, seed=0))
    same_class = torch.cosine_similarity(features[:, 0], features[:, 1], dim=-1).mean()
    other_class = torch.cosine_similarity(features[:-1, 0], features[1:, 0], dim=-1).mean()
    assert same_class > other_class + 0.3


def test_omniglot_like_features_are_nonnegative_and_grouped_and_leave_the_default_unchanged():
    from ihstudy.config import compose_config
    from ihstudy.tasks.fsl import load_features

    cfg, _ = compose_config(["data=omniglot_like"])
    assert (cfg.data.dim, cfg.data.n_groups, cfg.data.nonnegative, cfg.data.latent_dim) == (512, 50, True, 16)
    features = load_features(cfg.data)
    assert features.shape == (1623, 5, 512) and (features >= 0).all() and (features == 0).float().mean() > 0.4
    assert torch.allclose(features.norm(dim=-1), torch.ones(1623, 5), atol=1e-5)
    # alphabets: classes 0-32 share one centre, 33-64 the next; characters of one alphabet are closer
    grouped = gaussian_features(1623, 5, 512, 16, 0.3, 1.0, seed=0, n_groups=50)
    centred = torch.nn.functional.normalize(grouped[:, 0] - grouped[:, 0].mean(0), dim=-1)
    cos = centred @ centred.T
    assert cos[:33, :33].mean() > cos[:33, 33:65].mean() + 0.3
    plain = gaussian_features(1623, 5, 512, 16, 0.3, 1.0, seed=0)
    assert torch.equal(plain, gaussian_features(1623, 5, 512, 16, 0.3, 1.0, seed=0, n_groups=0, nonnegative=False))
    default, _ = compose_config([])
    assert default.data.n_groups == 0 and torch.equal(load_features(default.data), gaussian_features(
        1623, 5, 64, 16, 0.3, 1.0, seed=0))
    with pytest.raises(ConfigError, match="data.n_groups=2000 must lie in"):
        compose_config(["data=omniglot_like", "data.n_groups=2000"])
    with pytest.raises(ConfigError, match="data.nonnegative must be true or false"):
        compose_config(["data=omniglot_like", "data.nonnegative=maybe"])


def test_explicit_val_pairs_give_the_authors_split():
    train, val = label_pair_split(5, 0.2, 0, val_pairs=[[3, 1], [0, 2]])
    assert sorted(map(tuple, val.tolist())) == [(0, 2), (1, 3)]
    assert len(train) == 8 and not {(0, 2), (1, 3)} & set(map(tuple, train.tolist()))
    with pytest.raises(ConfigError, match="leaves some label"):
        label_pair_split(3, 0.2, 0, val_pairs=[[0, 1], [0, 2]])
    with pytest.raises(ConfigError, match="not pairs of distinct labels"):
        label_pair_split(5, 0.2, 0, val_pairs=[[1, 1]])


def test_evaluators_draw_classes_uniformly_under_zipf():
    from omegaconf import OmegaConf

    from ihstudy.config import compose_config
    from ihstudy.tasks.fsl import FewShotTask

    cfg, _ = compose_config(["task.zipf_alpha=1.0", "data.n_classes=200", "data.dim=8", "data.latent_dim=4",
                             "task.class_split=[50,50,100]"])
    task = FewShotTask(cfg.task, torch.randn(200, 5, 8))
    queries = task.eval_set("fsl_train", 5000, 1).exemplars[:, -1]
    first_class = (queries == task.features[0, 0]).all(-1).float().mean().item()
    assert first_class < 0.05  # uniform: 1/50; Zipf(1) over 50 classes would give ~0.22
    training = task.sampler().sample(5000, torch.Generator().manual_seed(0)).exemplars[:, -1]
    assert (training == task.features[0, 0]).all(-1).float().mean().item() > 0.15
    assert OmegaConf.select(cfg, "task.val_pairs") is None
