"""Edelman et al.'s findings on in-context Markov chains, judged on eval tables (docs/tasks.md).

Each judge takes `eval.parquet` frames of `task=markov` runs and returns (holds, what ihstudy
measured): small self-contained functions for `ihstudy reproduce`'s registry of findings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ihstudy.tasks.markov import REFERENCES

EVALUATOR = "markov"
BIGRAM_KL = 0.04  # nats: the bigram phase (MarkovTask.phase_change)
HEAD_RISE = 0.1  # a head score counts as formed when it rose this much over training


def curve(evals: pd.DataFrame) -> pd.DataFrame:
    return evals[evals.evaluator == EVALUATOR].sort_values("sequences").reset_index(drop=True)


def closest_strategy(evals: pd.DataFrame) -> pd.Series:
    """Per eval point, the reference strategy the model's predictions are closest to (smallest KL)."""
    c = curve(evals)
    kl = c[[f"kl_{name}" for name in REFERENCES]].to_numpy()
    return pd.Series(np.array(REFERENCES)[kl.argmin(1)], index=c.sequences)


def phases(evals: pd.DataFrame) -> list[tuple[str, float]]:
    """The run of closest strategies collapsed into phases: (strategy, first eval point)."""
    closest = closest_strategy(evals)
    changes = closest.ne(closest.shift())
    return [(name, float(at)) for at, name in closest[changes].items()]


def three_phases_in_order(evals: pd.DataFrame) -> tuple[bool, str]:
    """Uniform first, unigram next, bigram last, each the closest strategy at some eval point, in that order."""
    found = phases(evals)
    names = [name for name, _ in found]
    holds = len(names) >= 3 and names[0] == "uniform" and names[-1] == "bigram" and "unigram" in names[1:-1]
    return holds, "; ".join(f"{name} from {at:,.0f}" for name, at in found)


def bigram_time(evals: pd.DataFrame, threshold: float = BIGRAM_KL) -> float:
    """First eval point (sequences) with kl_bigram below `threshold`; NaN if never."""
    c = curve(evals)
    below = c.sequences[c.kl_bigram < threshold]
    return float(below.iloc[0]) if len(below) else np.nan


def statistical_induction_head(evals: pd.DataFrame, rise: float = HEAD_RISE) -> tuple[bool, str]:
    """In the bigram phase the first layer has become a previous-token head and the second layer attends
    to the positions after earlier occurrences of the current state: both scores rose by `rise` from
    the first eval point to the last, which lies in the bigram phase."""
    c = curve(evals)
    start, bigram = c.iloc[0], c.iloc[-1]
    if not bigram.kl_bigram < BIGRAM_KL:
        return False, f"not in the bigram phase at the last eval point (kl_bigram {bigram.kl_bigram:.3f})"
    at = bigram.sequences
    prev = max((k for k in c.columns if k.startswith("prev_token.L0H")), key=lambda k: bigram[k])
    induction = max((k for k in c.columns if k.startswith("induction.L1H")), key=lambda k: bigram[k])
    gains = {prev: bigram[prev] - start[prev], induction: bigram[induction] - start[induction]}
    holds = all(g >= rise for g in gains.values())
    return holds, ", ".join(f"{k} {start[k]:.2f} -> {bigram[k]:.2f}" for k in gains) + f" (at {at:,.0f} sequences)"


def doubly_stochastic_sooner(dirichlet: list[pd.DataFrame], doubly_stochastic: list[pd.DataFrame]) -> tuple[bool, str]:
    """The doubly stochastic prior reaches the bigram phase sooner: median time to kl_bigram < 0.04 over
    runs (a run that never gets there counts as later than any that does)."""
    times = {name: np.array([bigram_time(e) for e in runs]) for name, runs in
             (("dirichlet", dirichlet), ("doubly stochastic", doubly_stochastic))}
    medians = {name: float(np.median(np.where(np.isnan(t), np.inf, t))) for name, t in times.items()}
    holds = medians["doubly stochastic"] < medians["dirichlet"]
    return holds, ", ".join(f"{name}: median {m:,.0f} over {len(times[name])} runs" for name, m in medians.items())
