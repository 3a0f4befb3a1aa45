"""The toy model of the paper's Figs. 5a and 9 (docs/science.md §5.7): three interacting
vectors fit a rank-1 3-tensor, and clamping some of them shortens or removes the loss plateau.

The target is T* = a* ⊗ b* ⊗ c* (dimension `dim` each, entries standard normal); the model a ⊗ b ⊗ c
starts from standard-normal vectors and follows plain gradient descent on

    loss = ½ · mean over the dim³ entries of (T* - a ⊗ b ⊗ c)²

A condition names the vectors clamped to their true values, at the start and after every update
(`c`: reset c each step; `bc`: reset b and c). Unclamped, the loss falls quickly onto a plateau,
sits there for hundreds of steps, then drops suddenly: all three vectors must align together.
Clamping c leaves two to co-align (a shorter plateau); clamping b and c makes the problem linear
least squares in a, which decays geometrically from the first step (no plateau).

Per iteration (before its update, as the authors record it) the loss and two progress measures of a:
    a_cos_error        1 - cos²(a, a*)
    a_loss_true_bc     the loss with b, c set to their true values (and a or -a, whichever fits better)

    ihstudy toy                                  # conditions none, c, bc; dim 20, lr 1, 1000 iterations
    ihstudy toy --conditions none,bc             # the paper's Fig. 9 pair
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ihstudy.errors import ConfigError
from ihstudy.run_files import atomic_write_bytes, atomic_write_parquet, atomic_write_text, claim_run_dir, outputs_root
from ihstudy.schema import MAX_SEED

VECTORS = "abc"
MAX_DIM = 200  # dim³ entries per loss evaluation
MAX_ITERATIONS = 100_000  # a row per iteration and condition is kept in memory (the paper's runs take 1000)
FIT_FRACTION = 0.01  # fitted: loss below 1% of the loss of predicting zero (a scale-free criterion)


@dataclass
class ToyProblem:
    true: torch.Tensor  # [3, dim]: a*, b*, c*
    init: torch.Tensor  # [3, dim]: the starting a, b, c

    @classmethod
    def sample(cls, dim: int, seed: int) -> ToyProblem:
        g = torch.Generator().manual_seed(seed)
        true = torch.randn(3, dim, generator=g, dtype=torch.float64)
        return cls(true, torch.randn(3, dim, generator=g, dtype=torch.float64))

    @functools.cached_property
    def target(self) -> torch.Tensor:
        return outer(self.true)

    def zero_loss(self) -> float:
        """The loss of predicting zero everywhere, ½·mean(T*²)."""
        return 0.5 * self.target.pow(2).mean().item()


def outer(vectors: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i,j,k->ijk", *vectors)


def loss(vectors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (target - outer(vectors)).pow(2).mean()


def parse_condition(name: str) -> list[int]:
    """`none` or the clamped vectors' letters (`c`, `bc`, ...) -> their indices."""
    if name == "none":
        return []
    if not name or any(ch not in VECTORS for ch in name) or len(set(name)) != len(name):
        raise ConfigError(f"toy condition '{name}' must be 'none' or distinct letters of a, b, c (e.g. c, bc)")
    return sorted(VECTORS.index(ch) for ch in name)


def train(problem: ToyProblem, clamped: list[int], lr: float, iterations: int) -> pd.DataFrame:
    """Gradient descent from problem.init with the `clamped` vectors reset to their true values
    after every update; one row per iteration, measured before its update."""
    target, true = problem.target, problem.true
    vectors = problem.init.clone()
    vectors[clamped] = true[clamped]
    rows = []
    for iteration in range(iterations):
        vectors.requires_grad_(True)
        value = loss(vectors, target)
        (gradient,) = torch.autograd.grad(value, vectors)
        vectors = vectors.detach()
        rows.append({"iteration": iteration, "loss": value.item(), **progress_measures(vectors, problem)})
        vectors = vectors - lr * gradient
        vectors[clamped] = true[clamped]
    return pd.DataFrame(rows)


def progress_measures(vectors: torch.Tensor, problem: ToyProblem) -> dict:
    a, a_true = vectors[0], problem.true[0]
    cos = torch.dot(a, a_true) / (a.norm() * a_true.norm()).clamp_min(1e-300)
    with_true_bc = [loss(torch.stack([sign * a, *problem.true[1:]]), problem.target).item() for sign in (1, -1)]
    return {"a_cos_error": (1 - cos**2).item(), "a_loss_true_bc": min(with_true_bc)}


def run_conditions(conditions: list[str], dim: int, lr: float, iterations: int, seed: int) -> pd.DataFrame:
    """All conditions on the same problem (same true and initial vectors), stacked with a `condition` column."""
    check_settings(dim, lr, iterations, seed)
    clamps = {name: parse_condition(name) for name in conditions}
    if len(clamps) != len(conditions):
        raise ConfigError("toy conditions repeat")
    problem = ToyProblem.sample(dim, seed)
    frames = [train(problem, clamped, lr, iterations).assign(condition=name) for name, clamped in clamps.items()]
    table = pd.concat(frames, ignore_index=True)
    return table.assign(fitted=table.loss < FIT_FRACTION * problem.zero_loss())


def check_settings(dim: int, lr: float, iterations: int, seed: int) -> None:
    if not 1 <= dim <= MAX_DIM:
        raise ConfigError(f"toy dim={dim} must lie in [1, {MAX_DIM}]")
    if not 0 < lr < math.inf:
        raise ConfigError(f"toy lr={lr} must be a positive finite number")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ConfigError(f"toy iterations={iterations} must lie in [1, {MAX_ITERATIONS:,}]")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"toy seed={seed} must lie in [0, {MAX_SEED}]")


def fit_iterations(table: pd.DataFrame) -> dict[str, int | None]:
    """Per condition, the first iteration whose loss is below 1% of the zero-prediction loss (None: never)."""
    first = table[table.fitted].groupby("condition", sort=False).iteration.min()
    return {name: (int(first[name]) if name in first.index else None) for name in table.condition.unique()}


def figure_png(table: pd.DataFrame, title: str) -> bytes:
    """Loss and both progress measures per condition, as PNG bytes (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("loss", "loss"), ("a_cos_error", "1 - cos²(a, a*)"), ("a_loss_true_bc", "loss with b = b*, c = c*")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for condition, rows in table.groupby("condition", sort=False):
        label = "none" if condition == "none" else ", ".join(condition)
        for ax, (column, _) in zip(axes, columns):
            ax.plot(rows.iteration, rows[column], label=label, lw=2)
    for ax, (_, name) in zip(axes, columns):
        ax.set_xlabel("iteration")
        ax.set_title(name)
    axes[0].legend(title="clamped")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_toy(table: pd.DataFrame, folder: Path | None, settings: dict) -> tuple[Path, dict[str, int | None]]:
    """toy.parquet (one row per condition and iteration), toy.png and toy.json (settings, fit
    iterations) into a new `folder` inside the outputs folder (None: outputs/toy/<date>_<time>, with a
    suffix if taken); returns the folder and the fit iterations."""
    fits = fit_iterations(table)
    if folder is not None and folder.is_dir() and any(folder.iterdir()):  # before the lock file lands there
        raise ConfigError(f"{folder} is not empty; choose a new output folder")
    default = outputs_root() / "toy" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder, lock = claim_run_dir(folder or default, rename_on_collision=folder is None)
    try:
        atomic_write_parquet(folder / "toy.parquet", table)
        title = f"rank-1 3-tensor, dim {settings['dim']}, lr {settings['lr']}, seed {settings['seed']}"
        atomic_write_bytes(folder / "toy.png", figure_png(table, title))
        atomic_write_text(folder / "toy.json", json.dumps(settings | {"fit_iteration": fits}, indent=2) + "\n")
    finally:
        lock.release()
    return folder, fits
