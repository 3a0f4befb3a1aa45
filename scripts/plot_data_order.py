"""Which data property flips the copy / layer-1 order (docs/science.md §6): time to 0.4·ln 2 of the
`layer1` and `copy` conditions against one property of the data, from sweeps over it.

    python scripts/plot_data_order.py OUT.png SWEEP_DIR...                               # against data.norm
    python scripts/plot_data_order.py OUT.png --by data.within_class_std SWEEP_DIR...

`--by` names a numeric config field.
Runs are grouped by data.dim / data.latent_dim (one panel each) and coloured by clamp; a run that
never crossed is drawn as an open triangle at its last eval point.
"""

import argparse
from pathlib import Path

from ihstudy.analysis import timing
from ihstudy.analysis.report import group_colors, subplots

CROSSING = "0.4ln2"


def main(out: str, sweeps: list[str], by: str = "data.norm") -> None:
    table = timing.timing_table(timing.find_runs(sweeps))
    table = table[table.evaluator == "fsl_train"]
    column = f"config.{by}"
    if column not in table:
        raise SystemExit(f"error: the runs have no config field {by}")
    geometry = [f"dim {d}, latent {latent}" for d, latent in zip(table["config.data.dim"], table["config.data.latent_dim"])]
    table = table.assign(x=table[column].astype(float), geometry=geometry)
    geometries = sorted(table.geometry.unique())
    fig, axes = subplots(1, len(geometries), figsize=(4.2 * len(geometries), 3.6), squeeze=False, sharey=True)
    colors = group_colors(sorted(table["config.clamp"].unique()))
    for ax, geometry in zip(axes[0], geometries):
        for clamp, runs in table[table.geometry == geometry].groupby("config.clamp"):
            runs = runs.sort_values("x")
            crossed = ~runs[f"{CROSSING}_censored"]
            ax.plot(runs.x[crossed], runs[f"{CROSSING}_interp"][crossed], "o", color=colors[clamp], label=clamp, alpha=0.8)
            ax.plot(runs.x[~crossed], runs.last_sequences[~crossed], "^", mfc="none", color=colors[clamp])
            medians = runs[crossed].groupby("x")[f"{CROSSING}_interp"].median()
            ax.plot(medians.index, medians.values, "-", color=colors[clamp], lw=1)
        values = sorted(table.x.unique())
        if min(values) > 0:
            ax.set_xscale("log")
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(by)
        ax.set_title(geometry, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sequences to fsl_train loss < 0.4·ln 2")
    axes[0][0].legend(fontsize=8)
    fig.savefig(Path(out), dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("--by", default="data.norm", help="the config field on the x axis (default: data.norm)")
    args = parser.parse_args()
    main(args.out, args.sweeps, args.by)
