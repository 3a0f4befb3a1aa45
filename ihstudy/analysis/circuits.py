"""Head and circuit analyses of saved checkpoints (docs/science.md §5, findings 2-5 and 9).

Every analysis is a set of *conditions* (extra clamp configs, applied with the run's own clamps
through the same `ClampSet` code as training) evaluated on a set of sequences. Conditions and
checkpoints are batched as the run axis of one stacked `Transformer`: run k*C + c holds checkpoint
k under condition c, and one clamped forward pass evaluates them all.

Sequences: the whole training distribution when it is small enough (with one train exemplar per
class, context length 2 and burstiness 1: every ordered (query class, distractor class) pair x
ordered train label pair x context order, 78,400 sequences for 50 classes and 5 labels), otherwise
a fixed sample of the training sampler (seeded, `limit` sequences).

Head names are "layer:head", 0-based (the paper's layer 1 is layer 0 here).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ihstudy.analysis.timing import is_run_dir
from ihstudy.errors import CheckpointError, ConfigError
from ihstudy.model.clamps import ClampSet, build_clamps
from ihstudy.model.transformer import ModelShape, Transformer, cross_entropy
from ihstudy.run_files import RunFiles
from ihstudy.tasks.fsl import Batch, FewShotTask
from ihstudy.training.evaluate import induction_strength, previous_token_score
from ihstudy.training.train import pack_from_checkpoint

DISTRIBUTION_LIMIT = 100_000  # enumerate the training distribution up to this size, else sample this many
PROGRESS_SEQUENCES = 1_000  # fixed sample per checkpoint for the progress measures (as many as an evaluator)
CHUNK_ELEMENTS = 16_384  # runs x sequences per forward pass: keeps activations small
PREV_TOKEN_MARGIN = 0.1  # a PT head's previous-token score exceeds uniform attention's by at least this


# --- sequences ------------------------------------------------------------------------------------------


def training_distribution(task: FewShotTask, limit: int = DISTRIBUTION_LIMIT, seed: int = 0) -> tuple[Batch, bool]:
    """(sequences, enumerated): every sequence the training sampler can produce when they are few
    and equally likely, else `limit` sequences drawn from it with a fixed seed."""
    c = task.cfg
    classes, exemplars, pairs = task.class_ids["train"], task.exemplar_ids["train"], task.pairs["train"]
    size = len(classes) * (len(classes) - 1) * 2 * len(pairs) * 2
    if (c.context_len, c.burstiness, len(exemplars)) == (2, 1, 1) and not c.zipf_alpha and not c.exemplar_noise \
            and size <= limit:
        return enumerate_distribution(task.features, classes, int(exemplars[0]), pairs), True
    return task.sampler().sample(limit, torch.Generator().manual_seed(seed)), False


def enumerate_distribution(features: torch.Tensor, classes: torch.Tensor, exemplar: int, pairs: torch.Tensor) -> Batch:
    """All (query class, distractor class) x ordered label pair x context order sequences of a
    context of two pairs: the query's class and label a, the distractor's and label b."""
    n = len(classes)
    q, d = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    distinct = q != d
    q, d = q[distinct], d[distinct]  # [n(n-1)]
    ordered = torch.cat([pairs, pairs.flip(1)])  # [2P, 2]: label a (query), label b (distractor)
    Q = q[:, None, None].expand(-1, len(ordered), 2).reshape(-1)
    D = d[:, None, None].expand(-1, len(ordered), 2).reshape(-1)
    A = ordered[None, :, None, 0].expand(len(q), -1, 2).reshape(-1)
    B = ordered[None, :, None, 1].expand(len(q), -1, 2).reshape(-1)
    query_first = torch.tensor([True, False]).repeat(len(q) * len(ordered))
    first, second = torch.where(query_first, Q, D), torch.where(query_first, D, Q)
    items = classes[torch.stack([first, second, Q], 1)]
    labels = torch.stack([torch.where(query_first, A, B), torch.where(query_first, B, A)], 1)
    return Batch(features[items, exemplar], labels, A)


# --- stacked checkpoints under conditions -----------------------------------------------------------------


class Subject:
    """A run's model shape, task, config and checkpoints, for analyses of one or many checkpoints."""

    def __init__(self, run_dir: Path, step: int | None = None):
        with loading_errors(run_dir):
            pack = pack_from_checkpoint(run_dir, step)  # validates the config and loads one checkpoint
        self.dir, self.files = Path(run_dir), RunFiles(run_dir)
        if not isinstance(pack.tasks[0], FewShotTask):  # the circuit analyses read label tokens and the query
            raise ConfigError(f"{run_dir} is a run of {type(pack.tasks[0]).__name__}: the checkpoint analyses "
                              f"(heads, wiring, progress) are defined for the few-shot task only; use analyze eval or timing")
        self.shape: ModelShape = pack.shape
        self.task: FewShotTask = pack.tasks[0]
        self.cfg = pack.specs[0].cfg
        self.step = pack.step
        self.batch_size = pack.batch_size
        self.run_clamps = OmegaConf.to_container(self.cfg.clamp, resolve=True) or {}
        self.eval_batch = pack.eval_batch

    @property
    def last(self) -> int:
        return self.shape.n_layers - 1

    def heads(self, layer: int) -> list[str]:
        return [f"{layer}:{h}" for h in range(self.shape.n_heads)]

    def model(self, steps: list[int], copies: int = 1) -> Transformer:
        """Checkpoints `steps` stacked, each repeated `copies` times (run k*copies + c holds steps[k])."""
        model = Transformer(self.shape, len(steps) * copies)
        for k, step in enumerate(steps):
            state = self.files.load_checkpoint(step)["model"]
            try:
                for c in range(copies):
                    model.load_state_dict(state, k * copies + c)
            except ValueError:
                raise CheckpointError(f"{self.dir}: checkpoint step {step} holds a model of another shape "
                                      "than config.yaml") from None
        return model

    def clamp_set(self, conditions: list[dict], n_checkpoints: int = 1) -> ClampSet:
        """The run's own clamps plus each condition's, repeated for every checkpoint."""
        per_condition = []
        for extra in conditions:
            merged = self.run_clamps | {f"analysis_{name}": spec for name, spec in extra.items()}
            per_condition.append(build_clamps(merged, self.shape, self.task))
        return ClampSet(per_condition * n_checkpoints)


@contextmanager
def loading_errors(run_dir: Path):
    """Loading a saved run (pack_from_checkpoint), with its failures as one-line user errors."""
    if not is_run_dir(Path(run_dir)):
        raise ConfigError(f"{run_dir} is not a run folder (it needs run.json and config.yaml)")
    try:
        yield
    except ValueError:  # the checkpoint's tensors do not fit the model config.yaml describes
        raise CheckpointError(f"{run_dir}: the checkpoint holds a model of another shape than config.yaml") from None
    except OmegaConfBaseException as exc:  # e.g. a key this version of ihstudy added since the run
        raise ConfigError(f"{run_dir}: its config.yaml does not fit this version of ihstudy "
                          f"({str(exc).splitlines()[0]})") from None


def expand_runs(batch: Batch, runs: int) -> Batch:
    return Batch(*(t.expand(runs, *t.shape) for t in (batch.exemplars, batch.labels, batch.target)))


@torch.no_grad()
def evaluate(model: Transformer, clamps: ClampSet, batch: Batch, n_labels: int, extra_hooks=()) -> dict[str, np.ndarray]:
    """Per run of `model`: mean loss and accuracy at the query, and accuracy per query label [R, L],
    over the sequences `batch` (no run axis), in chunks."""
    R, n = model.n_runs, len(batch.target)
    chunk = max(1, CHUNK_ELEMENTS // R)
    loss, correct = torch.zeros(R), torch.zeros(R)
    per_label, count = torch.zeros(R, n_labels), torch.bincount(batch.target, minlength=n_labels).float()
    for start in range(0, n, chunk):
        part = expand_runs(batch[start:start + chunk], R)
        hooks = (clamps.hooks(model, part, query_only=True) if clamps.groups else []) + list(extra_hooks)
        logits = model.run_with_hooks(part, hooks, query_only=True)[..., -1, :]
        loss += cross_entropy(logits, part.target).sum(1)
        hit = (logits.argmax(-1) == part.target).float()
        correct += hit.sum(1)
        per_label.index_add_(1, part.target[0], hit)
    return {"loss": (loss / n).numpy(), "acc": (correct / n).numpy(),
            "label_acc": (per_label / count.clamp(min=1)).numpy()}


@torch.no_grad()
def head_scores(subject: Subject, model: Transformer, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Induction strength of every last-layer head and previous-token score of every first-layer
    head [R, H], under the run's own clamps, over `batch`."""
    clamps = subject.clamp_set([{}], model.n_runs)
    sites = ["blocks.0.attn.hook_pattern", f"blocks.{subject.last}.attn.hook_pattern"]
    chunk = max(1, CHUNK_ELEMENTS // model.n_runs)
    induction, prev, n = 0.0, 0.0, len(batch.target)
    for start in range(0, n, chunk):
        part = expand_runs(batch[start:start + chunk], model.n_runs)
        _, cache = clamps.run_with_cache(model, part, sites, query_only=True)
        weight = len(part.target[0]) / n
        induction = induction + weight * induction_strength(cache[sites[1]], part)
        prev = prev + weight * previous_token_score(cache[sites[0]])
    return induction.numpy(), prev.numpy()


# --- last-layer heads (findings 2-3, Figs 4a/13/14, Tables 2/3) ----------------------------------------------


def perfect_match(subject: Subject) -> dict:
    """A perfect match: strength-1 induction pattern on every last-layer head (docs/science.md §4)."""
    return {"perfect_match": {"kind": "induction_pattern", "heads": subject.heads(subject.last), "strength": 1.0}}


def last_layer_heads(subject: Subject, batch: Batch) -> dict[str, pd.DataFrame]:
    """Keep-one-head and remove-one-head loss/accuracy of every last-layer head against its
    induction strength; heads added back strongest first; per-label accuracy with one head kept
    (complementarity), also under a perfect match."""
    heads, L = subject.heads(subject.last), subject.shape.n_labels
    model = subject.model([subject.step])
    strength = head_scores(subject, model, batch)[0][0]
    order = list(np.argsort(-strength, kind="stable"))
    match = perfect_match(subject)
    conditions = ([{}] + [{"keep": {"kind": "keep_only", "heads": [h]}} for h in heads]
                  + [{"remove": {"kind": "ablate", "heads": [h]}} for h in heads]
                  + [{"keep": {"kind": "keep_only", "heads": [heads[i] for i in order[:k]]}} for k in range(1, len(heads) + 1)]
                  + [{"keep": {"kind": "keep_only", "heads": [h]}} | match for h in heads])
    result = evaluate(subject.model([subject.step], len(conditions)), subject.clamp_set(conditions), batch, L)
    H = len(heads)
    keep, remove, added, matched = (slice(1 + i * H, 1 + (i + 1) * H) for i in range(4))
    table = pd.DataFrame({"head": heads, "induction": strength,
                          "keep_one_loss": result["loss"][keep], "keep_one_acc": result["acc"][keep],
                          "remove_one_loss": result["loss"][remove], "remove_one_acc": result["acc"][remove]})
    add_back = pd.DataFrame({"n_heads": range(1, H + 1), "added_head": [heads[i] for i in order],
                             "loss": result["loss"][added], "acc": result["acc"][added]})
    labels = [f"label {label}" for label in range(L)]
    complementarity = pd.DataFrame(result["label_acc"][keep], columns=labels).assign(head=heads)
    complementarity_match = pd.DataFrame(result["label_acc"][matched], columns=labels).assign(head=heads)
    full = pd.DataFrame({"condition": ["all heads"], "loss": result["loss"][:1], "acc": result["acc"][:1]})
    return {"heads": table, "add_back": add_back, "full_model": full,
            "complementarity": complementarity[["head", *labels]],
            "complementarity_match": complementarity_match[["head", *labels]]}


# --- first-layer heads (finding 5, Table 1, Fig 11) -----------------------------------------------------


def prev_token_threshold(n_tokens: int) -> float:
    """The previous-token score of uniform causal attention (row t spreads 1/(t+1) over its keys),
    plus PREV_TOKEN_MARGIN: a head above it attends to the previous token more than by chance."""
    return float(np.mean([1 / (t + 1) for t in range(1, n_tokens)])) + PREV_TOKEN_MARGIN


def first_layer_roles(subject: Subject, batch: Batch) -> pd.DataFrame:
    """Per first-layer head: previous-token score, and accuracy/loss with the head ablated while its
    attention patterns are preserved (what it writes through V-composition is removed) or while its
    values are preserved (only its Q/K-composition role is removed); then the same for the group of
    previous-token heads (prev_token_threshold) and the group of the others (docs/science.md §5
    finding 5)."""
    heads = subject.heads(0)
    model = subject.model([subject.step])
    prev = head_scores(subject, model, batch)[1][0]
    pt = [h for h, s in zip(heads, prev) if s > prev_token_threshold(subject.shape.n_tokens)]
    other = [h for h in heads if h not in pt]
    groups = [(h, [h]) for h in heads] + [(f"PT heads ({' '.join(pt) or 'none'})", pt),
                                          (f"other heads ({' '.join(other) or 'none'})", other)]
    groups = [(name, members) for name, members in groups if members]
    conditions = [{"ablate": {"kind": "ablate", "heads": members, "preserve": [keep]}}
                  for _, members in groups for keep in ("patterns", "values")]
    result = evaluate(subject.model([subject.step], len(conditions)), subject.clamp_set(conditions), batch,
                      subject.shape.n_labels)
    score = dict(zip(heads, prev))
    return pd.DataFrame({
        "heads": [name for name, _ in groups],
        "prev_token": [score.get(name, np.nan) for name, _ in groups],
        "prev_token_head": [name in pt for name, _ in groups],
        "pattern_preserved_acc": result["acc"][0::2], "pattern_preserved_loss": result["loss"][0::2],
        "value_preserved_acc": result["acc"][1::2], "value_preserved_loss": result["loss"][1::2]})


def wiring_grid(subject: Subject, batch: Batch) -> pd.DataFrame:
    """Accuracy with a single first-layer head and a single last-layer head kept (Fig 11):
    rows first-layer heads, columns last-layer heads."""
    first, last = subject.heads(0), subject.heads(subject.last)
    conditions = [{"keep": {"kind": "keep_only", "heads": [i, j]}} for i in first for j in last]
    result = evaluate(subject.model([subject.step], len(conditions)), subject.clamp_set(conditions), batch,
                      subject.shape.n_labels)
    return pd.DataFrame(result["acc"].reshape(len(first), len(last)), index=first, columns=last)


def composition_scores(subject: Subject) -> dict[str, pd.DataFrame]:
    """Q-, K- and V-composition (Elhage et al. 2021) of every first-layer head's OV circuit with
    every last-layer head, from the weights: |A B|_F / (|A|_F |B|_F), with
    Q: OV_i QK_j, K: QK_j OV_i^T, V: OV_i OV_j (row-vector convention; LayerNorm and rotary ignored)."""
    state = subject.files.load_checkpoint(subject.step)["model"]
    D, H, dh = subject.shape.d_model, subject.shape.n_heads, subject.shape.d_head

    def circuits(layer):
        W = state[f"blocks.{layer}.attn.W_QKV"].double().view(D, 3, H, dh)
        W_O = state[f"blocks.{layer}.attn.W_O"].double().view(H, dh, D)
        Q, K, V = W.unbind(1)  # [D, H, dh]
        qk = torch.einsum("dhe,fhe->hdf", Q, K)
        ov = torch.einsum("dhe,hef->hdf", V, W_O)
        return qk, ov

    _, ov0 = circuits(0)
    qk1, ov1 = circuits(subject.last)
    products = {"Q": ov0[:, None] @ qk1[None], "K": qk1[None] @ ov0[:, None].transpose(-1, -2),
                "V": ov0[:, None] @ ov1[None]}
    norms = {"Q": (ov0, qk1), "K": (ov0, qk1), "V": (ov0, ov1)}
    tables = {}
    for kind, product in products.items():
        a, b = norms[kind]
        score = product.norm(dim=(-2, -1)) / (a.norm(dim=(-2, -1))[:, None] * b.norm(dim=(-2, -1))[None])
        tables[kind] = pd.DataFrame(score.numpy(), index=subject.heads(0), columns=subject.heads(subject.last))
    return tables


# --- progress measures over checkpoints (finding 9, Figs 10/12) -------------------------------------------


def direct_path_hooks(layer: int, last: int, runs: torch.Tensor) -> list:
    """For the runs where `runs` [R] is true: remove `layer`'s attention output from the final
    residual only (its effect through later layers stays), the direct-path ablation."""
    recorded = {}

    def record(attn_out, _):
        recorded["out"] = attn_out[..., -1:, :]

    def remove(resid, _):  # a query-only pass: the last residual holds the query row
        return resid - recorded["out"] * runs.view(-1, 1, 1, 1)

    return [(f"blocks.{layer}.hook_attn_out", record), (f"blocks.{last}.hook_resid_post", remove)]


def progress_measures(subject: Subject, sequences: int = PROGRESS_SEQUENCES, batch_checkpoints: int = 32,
                      progress=None) -> pd.DataFrame:
    """Per checkpoint: loss and accuracy unclamped (the run's own clamps), loss with a post-hoc
    perfect match (all last-layer heads) and a perfect previous-token pattern (all first-layer
    heads), and the loss change when each layer's direct path to the logits is ablated. All
    conditions of `batch_checkpoints` checkpoints run as one stacked model."""
    steps = subject.files.checkpoint_steps()
    if not steps:
        raise ConfigError(f"{subject.dir} has no checkpoints")
    batch, _ = training_distribution(subject.task, sequences)
    layers = range(subject.shape.n_layers)
    conditions = [{}, perfect_match(subject),
                  {"perfect_pt": {"kind": "prev_token_pattern", "heads": subject.heads(0), "strength": 1.0}}]
    conditions += [{} for _ in layers]  # direct-path ablations: the run's own clamps plus the hooks below
    C, L, rows = len(conditions), subject.shape.n_labels, []
    for start in range(0, len(steps), batch_checkpoints):
        chunk = steps[start:start + batch_checkpoints]
        model = subject.model(chunk, C)
        condition = torch.arange(model.n_runs) % C
        hooks = [h for layer in layers for h in direct_path_hooks(layer, subject.last, (condition == 3 + layer).float())]
        result = evaluate(model, subject.clamp_set(conditions, len(chunk)), batch, L, hooks)
        for k, step in enumerate(chunk):
            loss = result["loss"][k * C:(k + 1) * C]
            rows.append({"step": step, "sequences": step * subject.batch_size, "loss": loss[0],
                         "acc": result["acc"][k * C], "loss_perfect_match": loss[1], "loss_perfect_prev_token": loss[2],
                         **{f"direct_path_L{layer}": loss[3 + layer] - loss[0] for layer in layers}})
        if progress is not None:
            progress(start + len(chunk), len(steps))
    return pd.DataFrame(rows)
