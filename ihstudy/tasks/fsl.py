"""The few-shot task of docs/science.md §1: exemplar sources, label-pair split and the batched sampler.

A sequence is [x1, y1, ..., xN, yN, xq]. The sampler draws whole batches with tensor ops; the
training stream is counter-based (chunk c of run seed s always holds the same sequences), so a
resumed run or a run inside a batched sweep sees exactly the data it would have seen alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ihstudy.errors import ConfigError
from ihstudy.schema import MAX_SEED, within
from ihstudy.tasks.base import TaskFamily, TensorBatch, chunk_generator

MAX_FEATURE_ELEMENTS = 2_000_000_000  # refuse absurd files before reading them
GAUSSIAN_OPTIONS = ("n_groups", "nonnegative")  # data keys added after runs were saved without them (defaults: none)


@dataclass
class Batch(TensorBatch):
    """Sequences of one or more runs. Leading axes: [runs, batch] (the run axis may be absent)."""

    exemplars: torch.Tensor  # [..., N+1, dim] float: context exemplars then the query exemplar
    labels: torch.Tensor  # [..., N] long: context labels
    target: torch.Tensor  # [...] long: the query's label

    @property
    def context_len(self) -> int:
        return self.labels.shape[-1]


@dataclass
class Items(TensorBatch):
    """A Batch in the training stream's compact form: rows of the exemplar table instead of the exemplars."""

    rows: torch.Tensor  # [..., N+1] long: rows of the exemplar array flattened to [classes * exemplars, dim]
    noise: torch.Tensor  # [..., N+1, dim] float: the exemplar noise drawn for them ([..., N+1, 0] without noise)
    labels: torch.Tensor  # [..., N] long
    target: torch.Tensor  # [...] long


# --- exemplar sources ---------------------------------------------------------------------------


@dataclass
class GaussianData:
    """conf/data/gaussian.yaml: the arguments of gaussian_features."""

    n_classes: int = within(1, MAX_FEATURE_ELEMENTS)  # n_classes x n_exemplars x dim at most MAX_FEATURE_ELEMENTS
    n_exemplars: int = within(1, MAX_FEATURE_ELEMENTS)
    dim: int = within(1, MAX_FEATURE_ELEMENTS)
    latent_dim: int = within(1, MAX_FEATURE_ELEMENTS)  # at most dim
    within_class_std: float = within(0)
    norm: float = within(0)
    seed: int = within(0, MAX_SEED)
    n_groups: int = within(0, MAX_FEATURE_ELEMENTS)  # 0: no alphabets; at most n_classes
    nonnegative: bool


@dataclass
class FeatureFile:
    """conf/data/features_file.yaml: the arguments of load_feature_file."""

    path: str
    dataset: str | None


DATA_SOURCES = {"gaussian": GaussianData, "file": FeatureFile}  # data.source chooses


def gaussian_features(n_classes: int, n_exemplars: int, dim: int, latent_dim: int, within_class_std: float,
                      norm: float, seed: int, n_groups: int = 0, nonnegative: bool = False) -> torch.Tensor:
    """Built-in exemplars [classes, exemplars, dim] with shared low-dimensional structure.

    Class centres lie in a random `latent_dim`-dimensional subspace (docs/science.md §6: isotropic
    class vectors never let held-out classes generalise); exemplars scatter isotropically around
    them. `n_groups` > 0 groups the classes, in order, into that many equal runs of consecutive
    classes (Omniglot's characters grouped in alphabets), each class centre then being the mean of
    its group's centre and its own, both unit vectors of the subspace. `nonnegative`: every
    coordinate below 0 set to 0 (as ReLU features are). Every exemplar is scaled to the same norm.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(latent_dim, dim, generator=g) / math.sqrt(latent_dim)
    centres = torch.randn(n_classes, 1, latent_dim, generator=g) @ basis
    centres = centres / centres.norm(dim=-1, keepdim=True)
    spread = torch.randn(n_classes, n_exemplars, dim, generator=g) * (within_class_std / math.sqrt(dim))
    if n_groups:  # drawn last: without groups the array is the one drawn before groups existed
        groups = torch.randn(n_groups, 1, latent_dim, generator=g) @ basis
        group_of = torch.arange(n_classes) * n_groups // n_classes
        centres = (centres + groups[group_of] / groups[group_of].norm(dim=-1, keepdim=True)) / 2
        centres = centres / centres.norm(dim=-1, keepdim=True)
    features = centres + spread
    if nonnegative:
        features = features.clamp(min=0)
    return features * (norm / features.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(features.dtype).tiny))


def load_feature_file(path: str, dataset: str | None = None) -> torch.Tensor:
    """Features [classes, exemplars, dim] from an HDF5 file (dataset path inside it) or a .npy file."""
    file = Path(path).expanduser()
    try:
        found = file.is_file()
    except OSError as exc:  # a name too long for the filesystem, a file on the way
        shown = str(file) if len(str(file)) <= 100 else f"{str(file)[:100]}... ({len(str(file))} characters)"
        raise ConfigError(f"cannot use feature file {shown}: {exc.strerror}") from None
    if not found:
        raise ConfigError(f"feature file not found: {file}")
    try:
        if file.suffix == ".npy":
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            _check_feature_array(file, array.shape, array.dtype)
        else:
            import h5py

            with h5py.File(file, "r") as h5:
                if not dataset or dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
                    raise ConfigError(f"feature file {file} has no dataset '{dataset}'")
                _check_feature_array(file, h5[dataset].shape, h5[dataset].dtype)
                array = h5[dataset][()]
    except ConfigError:
        raise
    except Exception as exc:  # unreadable or not the format its name says
        raise ConfigError(f"cannot read feature file {file}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused just below
        features = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the file may be memory-mapped
    bad = (~torch.isfinite(features)).nonzero()
    if len(bad):
        raise ConfigError(f"feature file {file} holds {len(bad)} NaN, infinite or float32-overflowing values "
                          f"(first at index {bad[0].tolist()})")
    return features


def _check_feature_array(file: Path, shape: tuple, dtype: np.dtype) -> None:
    if len(shape) != 3:
        raise ConfigError(f"feature file {file} must hold a [classes, exemplars, dim] array, got shape {tuple(shape)}")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise ConfigError(f"feature file {file} has non-numeric dtype {dtype}")
    if min(shape) < 1 or math.prod(shape) > MAX_FEATURE_ELEMENTS:
        raise ConfigError(f"feature file {file} has an unusable shape {tuple(shape)}")


# --- labels ---------------------------------------------------------------------------------------


def label_pair_split(n_labels: int, val_fraction: float, seed: int, val_pairs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the unordered label pairs {i<j} into train and val pairs ([P, 2] long tensors).

    val_pairs: the held-out pairs given explicitly (e.g. the authors' split); otherwise a seeded
    permutation holds out val_fraction of them, and if some label would never occur in a train
    pair, the next seed is tried, so every label is seen in training.
    """
    pairs = torch.tensor([(i, j) for i in range(n_labels) for j in range(i + 1, n_labels)], dtype=torch.long)
    if val_pairs is not None:
        return _explicit_split(pairs, n_labels, val_pairs)
    n_val = round(len(pairs) * val_fraction)
    if n_labels < 2 or len(pairs) - n_val < math.ceil(n_labels / 2):
        raise ConfigError(f"task.n_labels={n_labels} gives too few label pairs for a train/val split")
    for attempt in range(1000):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + attempt))
        train, val = pairs[order[n_val:]], pairs[order[:n_val]]
        if len(train.unique()) == n_labels:
            return train, val
    raise ConfigError(f"no label-pair split with every label in training for n_labels={n_labels}")


def _explicit_split(pairs: torch.Tensor, n_labels: int, val_pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Train pairs = every pair but the given held-out ones (in the order of the enumeration)."""
    try:
        held_out = {tuple(sorted((int(i), int(j)))) for i, j in val_pairs}
    except (TypeError, ValueError):
        raise ConfigError(f"task.val_pairs must be a list of label pairs [i, j], got {val_pairs}") from None
    known = {tuple(p) for p in pairs.tolist()}
    if not held_out <= known:
        raise ConfigError(f"task.val_pairs holds {sorted(held_out - known)}: not pairs of distinct labels below {n_labels}")
    is_val = torch.tensor([tuple(p) in held_out for p in pairs.tolist()])
    train, val = pairs[~is_val], pairs[is_val]
    if len(train.unique()) != n_labels:
        raise ConfigError("task.val_pairs leaves some label out of every training pair")
    return train, val


# --- the sampler ----------------------------------------------------------------------------------


class FewShotSampler:
    """Draws few-shot sequences from one choice of classes, exemplars and label pairs."""

    def __init__(self, features: torch.Tensor, classes: torch.Tensor, exemplars: torch.Tensor,
                 pairs: torch.Tensor, n_labels: int, context_len: int, burstiness: int,
                 zipf_alpha: float = 0.0, exemplar_noise: float = 0.0):
        self.features, self.classes, self.exemplars, self.pairs = features, classes, exemplars, pairs
        self.table = features.reshape(-1, features.shape[-1])  # [classes * exemplars, dim]: a row per exemplar
        self.n_labels, self.context_len, self.burstiness = n_labels, context_len, burstiness
        self.n_fillers = context_len - 2 * burstiness
        self.exemplar_noise = exemplar_noise
        ranks = torch.arange(1, len(classes) + 1, dtype=torch.float64)
        self.class_probs = (ranks ** -zipf_alpha).float()

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        return self.expand(self.sample_compact(n, generator))

    def sample_compact(self, n: int, generator: torch.Generator) -> Items:
        b, fillers = self.burstiness, self.n_fillers
        g = generator
        # Query class first, then a distinct distractor, then distinct filler classes.
        drawn = torch.multinomial(self.class_probs.expand(n, -1), 2 + fillers, replacement=False, generator=g)
        query_class, distractor = drawn[:, :1], drawn[:, 1:2]
        pair = self.pairs[torch.randint(len(self.pairs), (n,), generator=g)]
        flip = torch.randint(2, (n, 1), generator=g)
        label_a, label_b = pair.gather(1, flip), pair.gather(1, 1 - flip)
        context_classes = torch.cat([query_class.expand(n, b), distractor.expand(n, b), drawn[:, 2:]], 1)
        context_labels = torch.cat([label_a.expand(n, b), label_b.expand(n, b),
                                    self._filler_labels(label_a, label_b, n, g)], 1)
        order = torch.rand(n, self.context_len, generator=g).argsort(1)
        context_classes, context_labels = context_classes.gather(1, order), context_labels.gather(1, order)
        item_classes = self.classes[torch.cat([context_classes, query_class], 1)]
        item_exemplars = self.exemplars[torch.randint(len(self.exemplars), item_classes.shape, generator=g)]
        rows = item_classes * self.features.shape[1] + item_exemplars
        if self.exemplar_noise:
            noise = self.exemplar_noise * torch.randn((*rows.shape, self.table.shape[1]), generator=g)
        else:
            noise = torch.empty((*rows.shape, 0))  # nothing drawn, nothing kept
        return Items(rows, noise, context_labels, label_a.squeeze(1))

    def expand(self, items: Items) -> Batch:
        x = self.table[items.rows]
        if self.exemplar_noise:
            x = x + items.noise
        return Batch(x, items.labels, items.target)

    def _filler_labels(self, label_a, label_b, n, g):
        """Fillers get labels outside the sequence's pair, so the pair stays unambiguous."""
        if self.n_fillers == 0:
            return label_a[:, :0]
        labels = torch.randint(self.n_labels - 2, (n, self.n_fillers), generator=g)
        low, high = torch.minimum(label_a, label_b), torch.maximum(label_a, label_b)
        labels = labels + (labels >= low)
        return labels + (labels >= high)


# --- the task: splits, training sampler and evaluators ---------------------------------------------

# evaluator name -> (class split, exemplar split, label-pair split)
EVALUATORS = {
    "fsl_train": ("train", "train", "train"),
    "fsl_val_rl": ("train", "train", "val"),
    "fsl_train_valex": ("train", "val", "train"),
    "fsl_test_class": ("test", "train", "train"),
}
SPLITS = ("train", "val", "test")


@dataclass
class FewShotConfig:
    """conf/task/fsl.yaml."""

    n_labels: int = within(2, 1000)  # the label pairs are enumerated
    class_split: list[int] = within(0, MAX_FEATURE_ELEMENTS, length=3)  # fitting the data: config.validate
    exemplar_split: list[int] = within(0, MAX_FEATURE_ELEMENTS, length=3)
    context_len: int = within(1, 1024)
    burstiness: int = within(1, 1024)
    zipf_alpha: float = within(0, 100)
    exemplar_noise: float = within(0)
    val_pair_fraction: float = within(0, 1)  # below 1: config.validate
    pair_seed: int = within(0, MAX_SEED)
    val_pairs: list[list[int]] | None = within(0)  # pairs of labels: check


class FewShotTask(TaskFamily):
    """The few-shot family: splits the exemplar array by class and exemplar counts and builds the
    samplers of one task config. The loss and every metric are read at the query."""

    schema = FewShotConfig
    evaluators = tuple(EVALUATORS)
    main_evaluator = "fsl_train"
    model_input = "exemplar_label"
    loss_at_every_position = False

    def __init__(self, task_cfg, features: torch.Tensor):
        self.cfg, self.features = task_cfg, features
        self.class_ids = _split_ranges(task_cfg.class_split)
        self.exemplar_ids = _split_ranges(task_cfg.exemplar_split)
        train_pairs, val_pairs = label_pair_split(task_cfg.n_labels, task_cfg.val_pair_fraction, task_cfg.pair_seed,
                                                  task_cfg.get("val_pairs"))
        self.pairs = {"train": train_pairs, "val": val_pairs}
        self.train_sampler = self.sampler()

    @classmethod
    def check(cls, task_cfg) -> None:
        super().check(task_cfg)
        pairs, n = task_cfg.val_pairs, task_cfg.n_labels
        if pairs is not None and not all(len(pair) == 2 and max(pair) < n for pair in pairs):
            raise ConfigError(f"task.val_pairs must be null or a list of label pairs [i, j] below task.n_labels={n}, "
                              f"got {OmegaConf.to_container(pairs)}")

    @classmethod
    def from_config(cls, cfg, data) -> FewShotTask:
        return cls(cfg.task, data(cfg.data))

    @classmethod
    def model_dims(cls, task_cfg) -> tuple[int, int]:
        return int(task_cfg["n_labels"]), int(task_cfg["context_len"])

    def sampler(self, classes: str = "train", exemplars: str = "train", pairs: str = "train",
                zipf_alpha: float | None = None) -> FewShotSampler:
        c = self.cfg
        alpha = c.zipf_alpha if zipf_alpha is None else zipf_alpha
        return FewShotSampler(self.features, self.class_ids[classes], self.exemplar_ids[exemplars], self.pairs[pairs],
                              c.n_labels, c.context_len, c.burstiness, alpha, c.exemplar_noise)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        return self.train_sampler.sample(n, generator)

    def sample_compact(self, n: int, generator: torch.Generator) -> Items:
        return self.train_sampler.sample_compact(n, generator)

    def expand(self, compact: Items) -> Batch:
        return self.train_sampler.expand(compact)

    def eval_set(self, name: str, n_sequences: int, eval_seed: int) -> Batch:
        """The fixed sequences of evaluator `name`, drawn once from the eval seed. Classes are drawn
        uniformly whatever task.zipf_alpha says (as the authors' evaluators do): Zipf shapes training only."""
        index = list(EVALUATORS).index(name)
        return self.sampler(*EVALUATORS[name], zipf_alpha=0.0).sample(n_sequences, chunk_generator(eval_seed, index))

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        from ihstudy.training.evaluate import query_metrics

        return query_metrics(logits, batch)

    def head_scores(self, patterns: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Induction strength in every layer, previous-token score in every layer but the last (whose
        pattern is kept at the query row only): docs/science.md §3."""
        from ihstudy.training.evaluate import induction_strength, previous_token_score

        scores = {}
        for layer, pattern in enumerate(patterns):
            for h, score in enumerate(induction_strength(pattern, batch).T):
                scores[f"induction.L{layer}H{h}"] = score
            if layer < len(patterns) - 1:
                for h, score in enumerate(previous_token_score(pattern).T):
                    scores[f"prev_token.L{layer}H{h}"] = score
        return scores


def _split_ranges(counts) -> dict[str, torch.Tensor]:
    """Consecutive index ranges for the train/val/test counts, e.g. [50, 1473, 100]."""
    bounds = np.cumsum([0, *counts])
    return {name: torch.arange(int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(SPLITS)}


def load_features(data_cfg) -> torch.Tensor:
    """The exemplar array [classes, exemplars, dim] named by the `data` config group."""
    if data_cfg.source == "gaussian":
        return gaussian_features(data_cfg.n_classes, data_cfg.n_exemplars, data_cfg.dim, data_cfg.latent_dim,
                                 data_cfg.within_class_std, data_cfg.norm, data_cfg.seed,
                                 **{key: data_cfg[key] for key in GAUSSIAN_OPTIONS if key in data_cfg})
    return load_feature_file(data_cfg.path, data_cfg.get("dataset"))
