"""Figures (matplotlib) and the markdown report of `ihstudy analyze`.

A report is a list of tables (name, DataFrame, one sentence saying what it shows) and figures
(name, matplotlib Figure, caption); `write_report` writes them as CSV, image files and report.md
into a fresh folder and swaps it in atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ihstudy.analysis import defaults
from ihstudy.errors import ConfigError
from ihstudy.run_files import REPORT_MARK, check_report_dir, first_line, with_umask
from ihstudy.training.evaluate import LN2, PHASE_CHANGE_THRESHOLD

FORMATS = ("png", "svg", "pdf")


@dataclass
class Report:
    title: str
    tables: list[tuple[str, pd.DataFrame, str]] = field(default_factory=list)
    figures: list[tuple[str, Figure, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, name: str, frame: pd.DataFrame, sentence: str) -> None:
        self.tables.append((name, frame, sentence))

    def figure(self, name: str, fig: Figure, caption: str) -> None:
        self.figures.append((name, fig, caption))


def subplots(*args, **kwargs):
    """pyplot.subplots without pyplot: an Agg figure outside pyplot's global state (no backend
    switch in the user's session, nothing to close)."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*args, **kwargs)


def write_report(report: Report, out_dir: Path, fmt: str = "png") -> Path:
    """Write report.md, one CSV per table and one image per figure into `out_dir`, replacing an
    earlier report there as a whole (built in a temporary sibling folder, then renamed). Only an
    earlier report is replaced (run_files.check_report_dir); a folder that cannot be written is a
    ConfigError (one line)."""
    out_dir = Path(out_dir)
    check_report_dir(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", suffix=".tmp", dir=out_dir.parent))
    except OSError as exc:  # a read-only or full filesystem, a file on the way
        raise ConfigError(f"cannot write the report folder {out_dir}: {first_line(exc)}") from None
    try:
        lines = [f"# {report.title}", "", *(f"- {note}" for note in report.notes), ""]
        for name, frame, sentence in report.tables:
            frame.to_csv(build / f"{name}.csv", index=False)
            lines += [f"## {name}", "", sentence, "", markdown_table(frame), "", f"([{name}.csv]({name}.csv))", ""]
        for name, fig, caption in report.figures:
            fig.savefig(build / f"{name}.{fmt}", dpi=120, bbox_inches="tight")
            lines += [f"## Figure: {name}", "", caption, "", f"![{name}]({name}.{fmt})", ""]
        (build / "report.md").write_text("\n".join(lines))
        files = sorted(p.name for p in build.iterdir())
        (build / REPORT_MARK).write_text(json.dumps({"written_by": "ihstudy", "files": files}) + "\n")
        os.chmod(build, with_umask(0o777))  # mkdtemp gives 0700
        check_report_dir(out_dir)  # again: the user may have put a file there meanwhile
        swap_in(build, out_dir)
    except OSError as exc:
        shutil.rmtree(build, ignore_errors=True)
        raise ConfigError(f"cannot write the report folder {out_dir}: {first_line(exc)}") from None
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out_dir


def swap_in(build: Path, out_dir: Path) -> None:
    """Replace out_dir by build with renames only, so readers see the old or the new report."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", suffix=".tmp", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
        build.rename(out_dir)
        shutil.rmtree(old)
    else:
        build.rename(out_dir)


def markdown_table(frame: pd.DataFrame, max_rows: int = 60) -> str:
    shown = frame.head(max_rows)
    cells = [[format_cell(v) for v in row] for row in shown.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, shown.columns)) + " |", "|" + " --- |" * len(shown.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if len(frame) > max_rows:
        lines.append(f"\n({len(frame) - max_rows} more rows in the CSV)")
    return "\n".join(lines)


def format_cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


# --- timing figures ---------------------------------------------------------------------------------


def loss_lines(ax) -> None:
    """The ln 2 plateau and the 0.4·ln 2 phase-change threshold, on a log loss axis."""
    ax.axhline(LN2, color="grey", ls="--", lw=0.8, label="ln 2")
    ax.axhline(PHASE_CHANGE_THRESHOLD, color="black", ls=":", lw=0.8, label="0.4·ln 2")
    ax.set_yscale("log")
    ax.set_xlabel("sequences seen")
    ax.set_ylabel("loss")


def group_colors(groups: list[str]) -> dict[str, tuple]:
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "viridis"]
    return {g: cmap(i if len(groups) <= 10 else i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}


def plot_timing(points: pd.DataFrame, summary: pd.DataFrame, by_label: str, metric: str) -> Figure:
    """Crossing time per group (ordered by median): one dot per run, a bar at the median, censored
    runs as open triangles at their last eval point. `points`: group, time, censored, last_sequences."""
    fig, ax = subplots(figsize=(max(4, 1.1 * len(summary) + 2), 3.6))
    order = list(summary["group"])
    for x, group in enumerate(order):
        mine = points[points.group == group]
        jitter = np.linspace(-0.12, 0.12, len(mine)) if len(mine) > 1 else np.zeros(1)
        crossed = ~mine.censored.to_numpy()
        ax.scatter(x + jitter[crossed], mine.time[crossed], color="C0", zorder=3, s=18)
        if not crossed.all():
            ax.scatter(x + jitter[~crossed], mine.last_sequences[~crossed], marker="^", facecolors="none",
                       edgecolors="C3", zorder=3, s=30, label="never crossed (at its last eval)")
        median = summary.loc[summary.group == group, "median"].iloc[0]
        if not np.isnan(median):
            ax.hlines(median, x - 0.3, x + 0.3, color="black", lw=1.5)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_xlabel(by_label)
    ax.set_ylabel(f"sequences to loss < {metric}")
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_curves(curves: list[tuple[str, pd.DataFrame]], order: list[str], by_label: str) -> Figure:
    """Loss curves of all runs [(group, frame with sequences, loss)], coloured by group (Fig 5b/6 style)."""
    fig, ax = subplots(figsize=(6.5, 4))
    colors = group_colors(order)
    seen = set()
    for group, curve in curves:
        ax.plot(curve.sequences, curve["loss"], color=colors[group], lw=1, alpha=0.85,
                label=None if group in seen else group)
        seen.add(group)
    loss_lines(ax)
    ax.legend(title=by_label, fontsize=8, title_fontsize=8, ncol=2)
    return fig


def plot_run(evals: pd.DataFrame, name: str, change: float | None, evaluator: str = "fsl_train") -> Figure:
    """One run (Fig 3a/3b): loss per evaluator; induction strength of every last-layer head and
    previous-token score of every first-layer head over training; the phase change marked."""
    heads = sorted(c for c in evals.columns if c.startswith("induction."))
    last_layer = max((c.split(".")[1][1:].split("H")[0] for c in heads), key=int, default=None)
    induction = [c for c in heads if c.startswith(f"induction.L{last_layer}H")]
    prev = sorted(c for c in evals.columns if c.startswith("prev_token.L0H"))
    panels = 1 + bool(induction) + bool(prev)
    fig, axes = subplots(1, panels, figsize=(4.6 * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    for e, curve in evals.groupby("evaluator", sort=False):
        ax.plot(curve.sequences, curve["loss"], label=e, lw=1)
    loss_lines(ax)
    ax.legend(fontsize=7)
    ax.set_title(name, fontsize=9)
    train = evals[evals.evaluator == evaluator].sort_values("sequences")
    for ax, columns, title in zip(axes[0, 1:], [c for c in (induction, prev) if c],
                                  [t for t, c in (("induction strength, last layer", induction),
                                                  ("previous-token score, first layer", prev)) if c]):
        for column in columns:
            ax.plot(train.sequences, train[column], lw=1, label=column.split(".")[1])
        ax.set_title(f"{title} ({evaluator})", fontsize=9)
        ax.set_xlabel("sequences seen")
        ax.legend(fontsize=6, ncol=2)
    for ax in axes[0]:
        if change is not None and not np.isnan(change):
            ax.axvline(change, color="red", lw=0.8, alpha=0.7)
    return fig


# --- circuit figures --------------------------------------------------------------------------------------


def plot_head_ablations(heads: pd.DataFrame) -> Figure:
    """Keep-one-head and remove-one-head accuracy against induction strength (Fig 4a / 13)."""
    fig, ax = subplots(figsize=(4.8, 3.6))
    ax.scatter(heads.induction, heads.keep_one_acc, label="only this head kept")
    ax.scatter(heads.induction, heads.remove_one_acc, marker="x", label="this head removed")
    for _, row in heads.iterrows():
        ax.annotate(row["head"], (row.induction, row.keep_one_acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("induction strength")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return fig


def plot_add_back(added: pd.DataFrame) -> Figure:
    """Loss as last-layer heads are added back in order of induction strength (Fig 14)."""
    fig, ax = subplots(figsize=(4.8, 3.6))
    ax.plot(added.n_heads, added["loss"], marker="o")
    ax.set_yscale("log")
    ax.set_xticks(added.n_heads, [f"{n}\n{h}" for n, h in zip(added.n_heads, added.added_head)], fontsize=7)
    ax.set_xlabel("heads kept (strongest first; head added)")
    ax.set_ylabel("loss")
    return fig


def plot_grid(grid: pd.DataFrame, title: str) -> Figure:
    """A heat map of a table of layer-1 heads (rows) x layer-2 heads (columns)."""
    fig, ax = subplots(figsize=(5, 4.2))
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), grid.columns, fontsize=7, rotation=90)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    return fig


def plot_progress(progress: pd.DataFrame, change: float | None) -> Figure:
    """Progress measures over checkpoints (Figs 10, 12): loss unclamped and under post-hoc clamps;
    direct-path ablation deltas."""
    fig, (ax, ax2) = subplots(1, 2, figsize=(10, 3.6))
    for column in [c for c in progress.columns if c.startswith("loss")]:
        ax.plot(progress.sequences, progress[column], label=column, lw=1)
    loss_lines(ax)
    ax.legend(fontsize=7)
    for column in [c for c in progress.columns if c.startswith("direct_path")]:
        ax2.plot(progress.sequences, progress[column], label=column, lw=1)
    ax2.set_xlabel("sequences seen")
    ax2.set_ylabel("loss change when ablated")
    ax2.legend(fontsize=7)
    for a in (ax, ax2):
        if change is not None and not np.isnan(change):
            a.axvline(change, color="red", lw=0.8, alpha=0.7)
    return fig


# --- the timing report ------------------------------------------------------------------------------------


def timing_report(runs, by: list[str] | str | None = None, evaluator: str = "fsl_train", metric: str = defaults.PHASE_CHANGE,
                  thresholds: dict | None = None, band: float | None = None) -> tuple[Report, pd.DataFrame, pd.DataFrame]:
    """The timing analysis of `runs` (timing.find_runs): the report, the per-run timing table and
    the group summary (empty without `by`)."""
    from ihstudy.analysis import timing

    thresholds = thresholds or timing.THRESHOLDS
    band = timing.PLATEAU_BAND if band is None else band
    table = timing.timing_table(runs, thresholds, band)
    report = Report("Phase-change timing")
    report.notes += [f"{run.name} ({run.status}): {note}" for run in runs for note in run.notes]
    report.notes += [f"{run.name} is {run.status}: analysed up to its last eval point" for run in runs
                     if run.status != "completed" and run.evals is not None]
    if table.empty:
        return report, table, pd.DataFrame()
    names = ", ".join(f"{n} = {v:.4g}" for n, v in thresholds.items())
    report.table("timing", per_run_columns(table, thresholds),
                 f"Per run and evaluator: first eval point and log-loss-interpolated time of each loss threshold "
                 f"({names}; '_censored': never crossed up to the last eval; '_recrossed': the loss later came back "
                 f"above it), the plateau within ln 2 ± {band:g}, the steepest descent and the final loss.")
    summary = pd.DataFrame()
    fields = timing.resolve_fields(table, by) if by else []
    train = table[table.evaluator == evaluator]
    if fields and not train.empty:
        summary = timing.group_summary(table, fields, metric, evaluator)
        if mixed := timing.mixed_tasks(table, fields):
            report.notes.append(f"runs of different tasks are grouped together (they differ in {', '.join(mixed)}); "
                                f"add them to --by to separate them")
        report.table("groups", summary,
                     f"Time to {evaluator} loss < {metric} per group of runs (by {', '.join(fields)}), ordered by "
                     f"median over the remaining fields (usually seeds); 'censored' runs never crossed and count as "
                     f"later than every crossing.")
    groups = train.apply(lambda row: timing.group_label(row, fields), axis=1) if fields else train.run
    order = list(summary.apply(lambda row: ", ".join(str(row[f]) if len(fields) == 1 else f"{f}={row[f]}" for f in fields),
                               axis=1)) if fields else list(train.run)
    label = ", ".join(fields) or "run"
    if not train.empty:
        points = pd.DataFrame({"group": groups, "time": train[f"{metric}_interp"], "censored": train[f"{metric}_censored"],
                               "last_sequences": train.last_sequences})
        medians = summary["median"] if fields else train[f"{metric}_interp"]
        order_summary = pd.DataFrame({"group": order, "median": medians.values})
        report.figure("timing", plot_timing(points, order_summary, label, metric),
                      f"Sequences until the {evaluator} loss falls below {metric} per {label}: dots are runs, bars the median.")
        by_run = {run.name: run for run in runs}
        curves = [(g, by_run[r].evals[by_run[r].evals.evaluator == evaluator].sort_values("sequences"))
                  for g, r in zip(groups, train.run)]
        report.figure("curves", plot_curves(curves, order, label),
                      f"{evaluator} loss of every run coloured by {label}, with the ln 2 and 0.4·ln 2 lines.")
    for run in runs:
        if run.evals is not None:
            row = table[(table.run == run.name) & (table.evaluator == evaluator)]
            change = float(row[f"{metric}_interp"].iloc[0]) if len(row) else None
            report.figure(f"run_{safe_name(run.name)}", plot_run(run.evals, run.name, change, evaluator),
                          f"{run.name}: loss per evaluator, last-layer induction strengths and first-layer previous-token "
                          f"scores over training; red line: {metric} crossing.")
    return report, table, summary


def per_run_columns(table: pd.DataFrame, thresholds: dict) -> pd.DataFrame:
    columns = ["run", "status", "evaluator"]
    for name in thresholds:
        columns += [f"{name}_eval", f"{name}_interp", f"{name}_censored", f"{name}_recrossed"]
    columns += ["plateau_start", "plateau_end", "plateau_length", "steepest_descent", "final_loss", "last_sequences"]
    return table[columns]


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=-_." else "_" for c in name)[:80]


# --- checkpoint reports -------------------------------------------------------------------------------------


def heads_report(subject, batch, enumerated: bool) -> tuple[Report, dict[str, pd.DataFrame]]:
    """Last-layer head ablations, complementarity and first-layer roles of one checkpoint."""
    from ihstudy.analysis import circuits

    tables = circuits.last_layer_heads(subject, batch) | {"layer1_roles": circuits.first_layer_roles(subject, batch)}
    report = Report(f"Heads of {subject.dir} at {subject.step * subject.batch_size:,} sequences")
    report.notes.append(sequences_note(batch, enumerated))
    sentences = {
        "full_model": "Loss and accuracy of the model as trained (its own clamps), for reference.",
        "heads": "Per last-layer head: induction strength, and loss/accuracy with only that head kept (the others' "
                 "values ablated) or only that head removed: redundancy shows as high remove-one accuracy.",
        "add_back": "Loss and accuracy with the strongest k last-layer heads kept, adding heads in order of induction strength.",
        "complementarity": "Accuracy per query label with only one last-layer head kept: which heads carry which labels.",
        "complementarity_match": "The same under a perfect match (strength-1 induction pattern on every last-layer head), "
                                 "isolating each head's copy circuit.",
        "layer1_roles": f"Per first-layer head (then the previous-token heads, score > "
                        f"{circuits.prev_token_threshold(subject.shape.n_tokens):.3f} = uniform attention's + "
                        f"{circuits.PREV_TOKEN_MARGIN}, and the others as groups): accuracy when ablated with patterns "
                        "preserved (its V-composition role removed) or values preserved (its Q/K-composition role removed).",
    }
    for name, sentence in sentences.items():
        report.table(name, tables[name], sentence)
    report.figure("head_ablations", plot_head_ablations(tables["heads"]),
                  "Keep-one-head and remove-one-head accuracy against induction strength (paper Fig 4a/13).")
    report.figure("add_back", plot_add_back(tables["add_back"]), "Loss as heads are added back, strongest first (paper Fig 14).")
    return report, tables


def wiring_report(subject, batch, enumerated: bool) -> tuple[Report, dict[str, pd.DataFrame]]:
    """The single-head wiring grid and the weight-based composition scores of one checkpoint."""
    from ihstudy.analysis import circuits

    grid = circuits.wiring_grid(subject, batch)
    composition = circuits.composition_scores(subject)
    report = Report(f"Wiring of {subject.dir} at {subject.step * subject.batch_size:,} sequences")
    report.notes.append(sequences_note(batch, enumerated))
    tables = {"wiring": grid.rename_axis("first layer").reset_index()}
    report.table("wiring", tables["wiring"], "Accuracy with one first-layer head (row) and one last-layer head (column) "
                                             "kept, all other heads of both layers value-ablated (paper Fig 11).")
    report.figure("wiring", plot_grid(grid, "accuracy, one head per layer kept"), "The wiring grid as a heat map.")
    for kind, table in composition.items():
        name = f"{kind.lower()}_composition"
        tables[name] = table.rename_axis("first layer").reset_index()
        report.table(name, tables[name], f"{kind}-composition score of each first-layer head's OV circuit with each "
                                         f"last-layer head (Elhage et al. 2021, from the weights).")
        report.figure(name, plot_grid(table, f"{kind}-composition"), f"{kind}-composition scores as a heat map.")
    return report, tables


def progress_report(subject, progress) -> tuple[Report, dict[str, pd.DataFrame]]:
    """Progress measures over every checkpoint of a run."""
    from ihstudy.analysis import circuits
    from ihstudy.training.train import phase_change_sequences

    table = circuits.progress_measures(subject, progress=progress)
    evals = subject.files.read_table("eval")
    change = phase_change_sequences(evals) if evals is not None and "loss" in evals else None
    report = Report(f"Progress measures of {subject.dir}")
    report.notes.append(f"{len(table)} checkpoints, {circuits.PROGRESS_SEQUENCES:,} fixed training sequences each")
    report.table("progress", table, "Per checkpoint: loss unclamped, under a post-hoc perfect match and a perfect "
                                    "previous-token pattern, and the loss change when each layer's direct path to the "
                                    "logits is ablated (paper Figs 10/12).")
    report.figure("progress", plot_progress(table, change), "Progress measures over training; red line: phase change.")
    return report, {"progress": table}


def sequences_note(batch, enumerated: bool) -> str:
    n = len(batch.target)
    return (f"computed on the whole training distribution ({n:,} sequences)" if enumerated
            else f"computed on a fixed sample of {n:,} training sequences")
