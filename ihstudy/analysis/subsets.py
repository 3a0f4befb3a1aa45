"""What a subset sweep shows (`ihstudy analyze subsets SWEEP`, docs/subsets.md): which clamp shortens
the phase change most, which pairs act together, and whether simple rules predict a subset's time
from the others'.

Conventions (tested in tests/test_subsets.py on tables with known answers):
  - a subset's time is the interpolated crossing of the phase-change threshold (timing.py), in log
    sequences; the seeds are replicates, paired across subsets (seed s of every subset shares its
    initialisation), so the bootstrap resamples seeds, not runs.
  - censoring: a run that never crossed enters at its last eval point, a lower bound on its time.
    A difference that contains such a term is then a bound, not a value: the `bound` column says
    which way ("at most": the true value is this or lower; "at least": this or higher). Comparisons
    with bounds both ways are left out and counted (`undetermined`). Censored runs are never dropped.
  - effect of clamp c: log T(S+c) - log T(S), over every context S where both subsets ran, averaged
    over contexts (equal weights) and seeds. Negative: supplying c shortens formation.
  - interaction of a, b in context S: log T(S+a+b) - log T(S+a) - log T(S+b) + log T(S). Negative:
    synergy (together they shorten formation more than the sum of their separate effects);
    positive: redundancy (they overlap).
  - composition rules, fitted per seed on the crossed subsets but one and judged on that one:
    additive in log time (log T = b0 + sum of b_c over the clamps supplied), slowest sets the pace
    (T = max(t0, largest t_c over the clamps not supplied)), rates add (1/T = r0 + sum of r_c over
    the clamps supplied). Error: |log predicted - log observed|; for a censored run, how far the
    prediction falls below its bound (0 if above).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ihstudy.analysis import timing
from ihstudy.analysis.report import Report, group_colors, subplots
from ihstudy.errors import ConfigError
from ihstudy.training.lattice import LATTICE, label

N_BOOTSTRAP = 2000
LEVEL = 0.95
BOUNDS = {0: "exact", 1: "at least", -1: "at most"}  # the true value is >= (1) or <= (-1) the estimate


@dataclass
class Lattice:
    """A subset sweep's times: `times` has one row per run: subset (its label), seed, time (log-interpolated
    crossing, NaN if censored), censored, bound (last eval point)."""

    clamps: list[str]
    times: pd.DataFrame
    skipped: dict[tuple[str, ...], str]
    metric: str = timing.PHASE_CHANGE

    def log_time(self) -> pd.DataFrame:
        """[subset x seed] log time (the bound if censored) and [subset x seed] censored flags."""
        value = np.log(self.times.time.where(~self.times.censored, self.times.bound))
        frame = self.times.assign(value=value)
        return (frame.pivot_table(index="subset", columns="seed", values="value", aggfunc="first"),
                frame.pivot_table(index="subset", columns="seed", values="censored", aggfunc="first").astype(bool))


def load(sweep_dir: Path, evaluator: str = "", metric: str = "") -> Lattice:
    """The lattice of a subset sweep folder (its subsets.json) with every run's crossing time of `metric`
    on `evaluator` (empty: the task family's main evaluator and phase-change threshold)."""
    path = Path(sweep_dir) / LATTICE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} has no {LATTICE}: analyze subsets takes the folder of an `ihstudy sweep --subsets` sweep")
    spec = json.loads(path.read_text())
    subset_of = {run: s["label"] for s in spec["subsets"] for run in s["runs"]}
    runs = [run for run in timing.find_runs([sweep_dir]) if run.name in subset_of]
    if not runs:
        raise ConfigError(f"no run of {sweep_dir} has eval rows yet")
    family, evaluator, limits, metric = timing.timed(runs[0], evaluator, "", metric)
    table = timing.timing_table(runs, limits, column=family.timed_column)
    if table.empty:
        raise ConfigError(f"no run of {sweep_dir} has eval rows yet")
    rows = table[table.evaluator == evaluator]
    varying = [c.removeprefix("config.") for c in rows.columns if c.startswith("config.") and c != "config.clamp"
               and c.removeprefix("config.") not in timing.SEED_FIELDS and rows[c].astype(str).nunique() > 1]
    if varying:
        raise ConfigError(f"the sweep varies {', '.join(varying)} besides the subsets and seeds: give each setting its own "
                          f"subset sweep")
    seeds = rows[[f"config.{f}" for f in timing.SEED_FIELDS]].astype(str).agg("/".join, axis=1)
    times = pd.DataFrame({"subset": rows.run.map(subset_of), "seed": seeds.values, "time": rows[f"{metric}_interp"],
                          "censored": rows[f"{metric}_censored"].astype(bool), "bound": rows.last_sequences})
    skipped = {tuple(s["clamps"]): s["skipped"] for s in spec["subsets"] if s["skipped"]}
    return Lattice(spec["clamps"], times.reset_index(drop=True), skipped, metric)


# --- effects and interactions -------------------------------------------------------------------------


def contrasts(lattice: Lattice, terms) -> pd.DataFrame:
    """Per context and seed, sum of sign * log T(subset) over `terms(context) -> [(subset, sign)]` (None:
    not defined there), with the direction the censored terms bound it (BOUNDS; NaN: both ways)."""
    values, censored = lattice.log_time()
    rows = []
    for context in values.index:
        parts = terms(context)
        if parts is None or any(s not in values.index for s, _ in parts):
            continue
        for seed in values.columns:
            if any(np.isnan(values.at[s, seed]) for s, _ in parts):
                continue
            directions = {sign for s, sign in parts if censored.at[s, seed]}  # a censored term is a lower bound
            bound = 0 if not directions else (next(iter(directions)) if len(directions) == 1 else np.nan)
            rows.append({"context": context, "seed": seed, "value": sum(sign * values.at[s, seed] for s, sign in parts),
                         "bound": bound})
    return pd.DataFrame(rows, columns=["context", "seed", "value", "bound"])


def members(subset: str) -> tuple[str, ...]:
    """The clamps of a subset label (training/lattice.py: label)."""
    return () if subset == label(()) else tuple(subset.split("+"))


def with_clamp(subset: str, clamp: str, order: list[str]) -> str:
    """The label of `subset` plus `clamp`, in the lattice's order."""
    return label(tuple(c for c in order if c in members(subset) or c == clamp))


def effect_terms(lattice: Lattice, clamp: str):
    return lambda s: None if clamp in members(s) else [(with_clamp(s, clamp, lattice.clamps), 1), (s, -1)]


def interaction_terms(lattice: Lattice, a: str, b: str):
    def terms(s):
        if a in members(s) or b in members(s):
            return None
        sa, sb = with_clamp(s, a, lattice.clamps), with_clamp(s, b, lattice.clamps)
        return [(with_clamp(sa, b, lattice.clamps), 1), (sa, -1), (sb, -1), (s, 1)]
    return terms


def summarise(per_seed: pd.DataFrame, rng: np.random.Generator, n_boot: int = N_BOOTSTRAP) -> dict:
    """Mean over contexts of the mean over seeds, its bootstrap interval over seeds (resampled with
    replacement, the same draw for every context) and the direction of its censoring bound."""
    known = per_seed[per_seed.bound.notna()]
    out = {"contexts": known.context.nunique(), "comparisons": len(known), "censored": int((known.bound != 0).sum()),
           "undetermined": int(per_seed.bound.isna().sum())}
    if known.empty:  # no context where all the subsets ran, or only comparisons bounded both ways
        return out | {"estimate": np.nan, "low": np.nan, "high": np.nan, "bound": "undetermined" if len(per_seed) else "not run"}
    table = known.pivot_table(index="context", columns="seed", values="value", aggfunc="first")
    seeds = table.columns.to_numpy()
    draws = rng.integers(len(seeds), size=(n_boot, len(seeds)))
    boot = [np.nanmean(np.nanmean(table.to_numpy()[:, d], axis=1)) for d in draws]
    low, high = np.nanquantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    directions = set(known.bound) - {0}
    bound = BOUNDS[int(next(iter(directions)))] if len(directions) == 1 else ("exact" if not directions else "mixed")
    return out | {"estimate": float(np.nanmean(table.mean(axis=1))), "low": float(low), "high": float(high), "bound": bound}


def verdict(row, negative: str, positive: str) -> str:
    """negative / positive / 'unclear' from the interval, unless a censoring bound forbids the claim."""
    if row["bound"] == "not run":
        return "not measured (its subsets did not run)"
    if row["bound"] in ("undetermined", "mixed") or np.isnan(row["estimate"]):
        return "undetermined (censored)"
    if row["high"] < 0 and row["bound"] != "at least":
        return negative
    if row["low"] > 0 and row["bound"] != "at most":
        return positive
    return "unclear" if row["bound"] == "exact" else "undetermined (censored)"


def effects(lattice: Lattice, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per clamp: its effect when added (summary) and every context's value per seed."""
    rng = np.random.default_rng(seed)
    rows, detail = [], []
    for clamp in lattice.clamps:
        per_seed = contrasts(lattice, effect_terms(lattice, clamp))
        detail.append(per_seed.assign(clamp=clamp))
        rows.append({"clamp": clamp, **summarise(per_seed, rng)})
    table = pd.DataFrame(rows)
    table["factor"] = np.exp(table.estimate)
    table["verdict"] = table.apply(verdict, axis=1, negative="shortens", positive="lengthens")
    return table.sort_values("estimate", na_position="last").reset_index(drop=True), pd.concat(detail, ignore_index=True)


def interactions(lattice: Lattice, seed: int = 0) -> pd.DataFrame:
    """Per pair of clamps: the interaction over every context where all four subsets ran."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, a in enumerate(lattice.clamps):
        for b in lattice.clamps[i + 1:]:
            per_seed = contrasts(lattice, interaction_terms(lattice, a, b))
            rows.append({"pair": f"{a} & {b}", **summarise(per_seed, rng)})
    table = pd.DataFrame(rows)
    if not table.empty:
        table["verdict"] = table.apply(verdict, axis=1, negative="synergy", positive="redundancy")
    return table


# --- composition rules --------------------------------------------------------------------------------


def design(subsets: list[str], clamps: list[str]) -> np.ndarray:
    """[subsets, 1 + k]: an intercept and one indicator per clamp supplied."""
    return np.array([[1.0, *(c in members(s) for c in clamps)] for s in subsets])


def in_row_space(rows: np.ndarray, row: np.ndarray) -> bool:
    return np.linalg.matrix_rank(np.vstack([rows, row])) == np.linalg.matrix_rank(rows)


def fit_log_additive(subsets, log_t, clamps):
    x = design(subsets, clamps)
    coef = np.linalg.lstsq(x, log_t, rcond=None)[0]
    return lambda s: float(design([s], clamps)[0] @ coef) if in_row_space(x, design([s], clamps)[0]) else np.nan


def fit_rates_add(subsets, log_t, clamps):
    """1/T = r0 + sum r_c, least squares on relative error (each row scaled by its T)."""
    x, t = design(subsets, clamps), np.exp(log_t)
    coef = np.linalg.lstsq(x * t[:, None], np.ones(len(t)), rcond=None)[0]

    def predict(s):
        rate = float(design([s], clamps)[0] @ coef)
        return np.log(1 / rate) if in_row_space(x, design([s], clamps)[0]) and rate > 0 else np.nan
    return predict


def fit_slowest(subsets, log_t, clamps, sweeps: int = 30):
    """T = max(t0, max over clamps not supplied of t_c), by coordinate descent on squared log error
    over a grid of candidate log times (the observed ones and a fine grid between them)."""
    grid = np.unique(np.concatenate([log_t, np.linspace(log_t.min() - 1, log_t.max() + 1, 200)]))
    params = np.full(len(clamps) + 1, np.median(log_t))  # [log t0, log t_c...]
    free = np.array([[c not in members(s) for c in clamps] for s in subsets])

    def predict_all(p):
        return np.maximum(p[0], np.where(free, p[1:], -np.inf).max(axis=1))

    for _ in range(sweeps):
        before = params.copy()
        for j in range(len(params)):
            trial = np.repeat(params[None], len(grid), axis=0)
            trial[:, j] = grid
            errors = [((predict_all(p) - log_t) ** 2).sum() for p in trial]
            params[j] = grid[int(np.argmin(errors))]
        if (params == before).all():
            break
    return lambda s: float(max([params[0], *(params[1 + i] for i, c in enumerate(clamps) if c not in members(s))]))


RULES = {"additive in log time": fit_log_additive, "slowest sets the pace": fit_slowest, "rates add": fit_rates_add}


def composition(lattice: Lattice) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-subset-out prediction per seed and rule: every prediction, and per rule the median
    and mean error over held-out subsets (as factors) and the error on the empty subset."""
    values, censored = lattice.log_time()
    rows = []
    for seed in values.columns:
        present = [s for s in values.index if not np.isnan(values.at[s, seed])]
        for held in present:
            train = [s for s in present if s != held and not censored.at[s, seed]]
            if len(train) < 2:
                continue
            log_t = np.array([values.at[s, seed] for s in train])
            for rule, fit in RULES.items():
                predicted = fit(train, log_t, lattice.clamps)(held)
                observed, is_censored = values.at[held, seed], bool(censored.at[held, seed])
                error = (max(0.0, observed - predicted) if is_censored else abs(predicted - observed)) \
                    if not np.isnan(predicted) else np.nan
                rows.append({"rule": rule, "seed": seed, "held_out": held, "observed": np.exp(observed),
                             "censored": is_censored, "predicted": np.exp(predicted), "log_error": error})
    predictions = pd.DataFrame(rows, columns=["rule", "seed", "held_out", "observed", "censored", "predicted", "log_error"])
    summary = []
    for rule in RULES:
        mine = predictions[predictions.rule == rule]
        judged = mine.log_error.dropna()
        empty = mine[(mine.held_out == label(())) & mine.log_error.notna()]
        summary.append({"rule": rule, "held_out": len(judged), "not_identifiable": int(mine.log_error.isna().sum()),
                        "median_factor": float(np.exp(judged.median())) if len(judged) else np.nan,
                        "mean_factor": float(np.exp(judged.mean())) if len(judged) else np.nan,
                        "empty_subset_factor": float(np.exp(empty.log_error.mean())) if len(empty) else np.nan,
                        "empty_subset_censored": bool(empty.censored.any())})
    return pd.DataFrame(summary).sort_values("median_factor", na_position="last").reset_index(drop=True), predictions


# --- nodes, figure and report -------------------------------------------------------------------------


def nodes(lattice: Lattice) -> pd.DataFrame:
    """Per subset: runs, censored runs, median (censored runs count as later than every crossing),
    min and max over seeds of the crossing time, and the latest censoring bound."""
    rows = []
    for subset, runs in lattice.times.groupby("subset", sort=False):
        t = runs.time.where(~runs.censored, np.inf)
        rows.append({"subset": subset, "size": len(members(subset)), "runs": len(runs), "censored": int(runs.censored.sum()),
                     "median": float(t.median()), "min": float(t.min()), "max": float(t.max()),
                     "bound": float(runs.bound[runs.censored].max()) if runs.censored.any() else np.nan})
    table = pd.DataFrame(rows).replace(np.inf, np.nan)
    return table.sort_values(["size", "median"], na_position="last").reset_index(drop=True)


def plot_lattice(lattice: Lattice, table: pd.DataFrame):
    """Subsets by size (x) and time (y, log): a dot per seed, a bar at the median, edges coloured by
    the clamp added; censored runs as open triangles at their last eval point."""
    fig, ax = subplots(figsize=(2.2 * (len(lattice.clamps) + 1) + 2, 5))
    colors = group_colors(lattice.clamps)
    where = {}
    for size, group in table.groupby("size"):
        offsets = np.linspace(-0.3, 0.3, len(group)) if len(group) > 1 else [0.0]
        for offset, (_, row) in zip(offsets, group.iterrows()):
            runs = lattice.times[lattice.times.subset == row.subset]
            y = runs.time.where(~runs.censored, runs.bound)
            where[row.subset] = (size + offset, row["median"] if not np.isnan(row["median"]) else y.max())
            x, crossed = np.full(len(runs), size + offset), ~runs.censored.to_numpy()
            ax.scatter(x[crossed], y[crossed], s=14, color="black", zorder=4)
            ax.scatter(x[~crossed], y[~crossed], s=40, marker="^", facecolors="none", edgecolors="C3", zorder=4)
            ax.vlines(size + offset, y.min(), y.max(), color="grey", lw=1, zorder=3)
            ax.annotate(row.subset.replace("+", "\n+"), where[row.subset], xytext=(6, 0), textcoords="offset points",
                        fontsize=7, va="center")
    for subset in table.subset:
        for clamp in lattice.clamps:
            if clamp not in members(subset) and (bigger := with_clamp(subset, clamp, lattice.clamps)) in where:
                (x0, y0), (x1, y1) = where[subset], where[bigger]
                ax.plot([x0, x1], [y0, y1], color=colors[clamp], lw=1.5, alpha=0.7, zorder=2)
    for clamp in lattice.clamps:
        ax.plot([], [], color=colors[clamp], lw=2, label=f"adding {clamp}")
    ax.scatter([], [], marker="^", facecolors="none", edgecolors="C3", label="never crossed (at its last eval)")
    ax.set_yscale("log")
    ax.set_xticks(range(int(table["size"].max()) + 1))  # sizes whose subsets were all skipped are left out
    ax.set_xlabel("clamps supplied (subset size)")
    ax.set_ylabel(f"sequences to fsl_train loss < {lattice.metric}")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3, which="both")
    return fig


def plot_effects(effect_table: pd.DataFrame, interaction_table: pd.DataFrame):
    """Effects of each clamp and interactions of each pair (change in log time, bootstrap interval)."""
    fig, axes = subplots(1, 2, figsize=(11, 0.45 * max(len(effect_table), len(interaction_table), 3) + 1.5),
                         gridspec_kw={"wspace": 0.7})
    for ax, table, key, title in ((axes[0], effect_table, "clamp", "effect of adding the clamp"),
                                  (axes[1], interaction_table, "pair", "interaction (<0 synergy, >0 redundancy)")):
        shown = table.dropna(subset=["estimate"]) if not table.empty else table
        y = np.arange(len(shown))
        if len(shown):
            ax.errorbar(shown.estimate, y, xerr=[shown.estimate - shown.low, shown.high - shown.estimate], fmt="o", color="black")
            ax.set_yticks(y, [f"{k} ({b})" if b != "exact" else k for k, b in zip(shown[key], shown.bound)], fontsize=8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("change in log sequences to the phase change")
        ax.set_title(title, fontsize=9)
    return fig


def ranking_words(effect_table: pd.DataFrame, interaction_table: pd.DataFrame) -> list[str]:
    """The bottleneck ranking and the clear interactions, in plain words."""
    lines = []
    for rank, row in enumerate(effect_table.itertuples()):
        if np.isnan(row.estimate):
            lines.append(f"{row.clamp}: {row.verdict}")
            continue
        how = {"exact": "", "at most": " at least", "at least": " at most", "mixed": ""}.get(row.bound, "")
        shorter = row.estimate < 0
        lead = "Giving the model " if rank == 0 else "Then "
        most = " - the largest effect, the main bottleneck" if rank == 0 and shorter and row.verdict == "shortens" else ""
        verb = "shortens" if shorter else "lengthens"
        lines.append(f"{lead}{row.clamp} {verb} formation{how} {np.exp(abs(row.estimate)):.2f}-fold on average over "
                     f"{row.contexts} context(s) (time x{np.exp(row.estimate):.2f}, {LEVEL:.0%} bootstrap interval over seeds "
                     f"x{np.exp(row.low):.2f} to x{np.exp(row.high):.2f}; {row.verdict}){most}.")
    for row in interaction_table.itertuples() if not interaction_table.empty else []:
        a, b = row.pair.split(" & ")
        if row.verdict == "synergy":
            lines.append(f"{a} and {b} together do more than apart (synergy: {np.exp(-row.estimate):.2f}-fold shorter than "
                         f"their separate effects predict).")
        elif row.verdict == "redundancy":
            lines.append(f"{a} and {b} overlap (redundancy: together {np.exp(row.estimate):.2f}-fold less shortening than "
                         f"their separate effects add up to).")
    return lines


def subsets_report(lattice: Lattice) -> tuple[Report, dict[str, pd.DataFrame]]:
    node_table = nodes(lattice)
    effect_table, effect_detail = effects(lattice)
    interaction_table = interactions(lattice)
    rules, predictions = composition(lattice)
    report = Report(f"Subset lattice of {', '.join(lattice.clamps)}: what holds the phase change back")
    report.notes += ranking_words(effect_table, interaction_table)
    if not rules.empty and not np.isnan(rules.median_factor.iloc[0]):
        best = rules.iloc[0]
        empty = ("the unclamped subset never crossed: judged against its bound, the error factor is "
                 if best.empty_subset_censored else "the unclamped subset within a factor ") + f"{best.empty_subset_factor:.2f}"
        report.notes.append(f"Composition: '{best['rule']}' predicts a held-out subset's time best, within a factor "
                            f"{best.median_factor:.2f} (median; mean {best.mean_factor:.2f}) over {best.held_out} held-out "
                            f"(subset, seed) pairs; {empty}. Every rule: the composition table.")
    if lattice.skipped:
        report.notes.append(f"{len(lattice.skipped)} of {2 ** len(lattice.clamps)} subsets skipped: their clamps cannot act "
                            f"together (the skipped table says why)")
    report.notes.append(f"Intervals: {LEVEL:.0%} bootstrap over seeds ({lattice.times.seed.nunique()} seeds; with few seeds "
                        f"they are rough). Censored runs enter at their last eval point as lower bounds (module docstring).")
    report.table("nodes", node_table,
                 f"Per subset: runs, runs that never crossed {lattice.metric} (censored), median, min, max time over seeds "
                 f"(censored runs count as later than every crossing), the latest censoring bound.")
    report.table("effects", effect_table, "Per clamp: mean change in log time when it is added, over every context where "
                                          "both subsets ran (factor = exp; <1 shortens), bootstrap interval, censoring bound.")
    report.table("interactions", interaction_table, "Per pair: log T(S+a+b) - log T(S+a) - log T(S+b) + log T(S), averaged "
                                                    "over contexts S: <0 synergy, >0 redundancy.")
    report.table("composition", rules, "Per rule: held-out (subset, seed) pairs judged, median and mean error factor "
                                       "(exp |log predicted - log observed|), and the error on the unclamped subset.")
    report.table("predictions", predictions, "Every leave-one-subset-out prediction.")
    if lattice.skipped:
        skipped = pd.DataFrame({"subset": [label(s) for s in lattice.skipped], "reason": list(lattice.skipped.values())})
        report.table("skipped", skipped, "Subsets not trained: clamps that cannot act together (training/lattice.py).")
    report.table("effect_contexts", effect_detail, "Every context's change in log time per clamp and seed.")
    report.figure("lattice", plot_lattice(lattice, node_table),
                  "Subsets by size; dots: seeds, grey bars: their range; edges coloured by the clamp added.")
    report.figure("effects", plot_effects(effect_table, interaction_table),
                  f"Effects and pair interactions (change in log time, {LEVEL:.0%} bootstrap intervals over seeds).")
    return report, {"nodes": node_table, "effects": effect_table, "interactions": interaction_table, "composition": rules}
