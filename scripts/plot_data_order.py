"""Which data property flips the copy / layer-1 order (docs/science.md §6): time to 0.4·ln 2 of the
`layer1` and `copy` conditions against the exemplar norm, from sweeps over the built-in data.

    python scripts/plot_data_order.py OUT.png SWEEP_DIR...

Runs are grouped by data.dim / data.latent_dim (one panel each) and coloured by clamp; a run that
never crossed is drawn as an open triangle at its last eval point.
"""

import sys
from pathlib import Path

from ihstudy.analysis import timing
from ihstudy.analysis.report import group_colors, subplots


def main(out: str, *sweeps: str) -> None:
    table = timing.timing_table(timing.find_runs(sweeps))
    table = table[table.evaluator == "fsl_train"]
    table = table.assign(geometry=[f"dim {d}, latent {latent}" for d, latent in zip(table["config.data.dim"],
                                                                                       table["config.data.latent_dim"])])
    geometries = sorted(table.geometry.unique())
    fig, axes = subplots(1, len(geometries), figsize=(4.2 * len(geometries), 3.6), squeeze=False, sharey=True)
    colors = group_colors(sorted(table["config.clamp"].unique()))
    for ax, geometry in zip(axes[0], geometries):
        for clamp, runs in table[table.geometry == geometry].groupby("config.clamp"):
            runs = runs.sort_values("config.data.norm")
            crossed = ~runs["0.4ln2_censored"]
            ax.plot(runs["config.data.norm"][crossed], runs["0.4ln2_interp"][crossed], "o", color=colors[clamp],
                    label=clamp, alpha=0.8)
            ax.plot(runs["config.data.norm"][~crossed], runs.last_sequences[~crossed], "^", mfc="none", color=colors[clamp])
            medians = runs[crossed].groupby("config.data.norm")["0.4ln2_interp"].median()
            ax.plot(medians.index, medians.values, "-", color=colors[clamp], lw=1)
        ax.set_xscale("log")
        norms = sorted(table["config.data.norm"].unique())
        ax.set_xticks(norms, [f"{n:g}" for n in norms])
        ax.minorticks_off()
        ax.set_xlabel("data.norm (length of every exemplar)")
        ax.set_title(geometry, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sequences to fsl_train loss < 0.4·ln 2")
    axes[0][0].legend(fontsize=8)
    fig.savefig(Path(out), dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main(*sys.argv[1:])
