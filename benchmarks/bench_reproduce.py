"""End-to-end time of `ihstudy reproduce`, per figure, and its training throughput (the targets:
figures 3, 4b, 5b and 6 in at most 12 minutes on a 2-core CPU, the paper's figures in 18).

    .venv/bin/python benchmarks/bench_reproduce.py                     # ihstudy reproduce 3 4b 5b 6, full length
    .venv/bin/python benchmarks/bench_reproduce.py 3 5b --scale 0.1    # any figures, scale and overrides
    .venv/bin/python benchmarks/bench_reproduce.py --out outputs/reproduce/bench --keep

Runs the command as a new user would (a fresh process, a new reproduction folder: a temporary one
unless --out), then reads every run's start and end (run.json) to split the wall time: per figure
the span from its first run's start to its last run's end, its pack time (runs of a pack train
together, so a pack's time is its runs' common span), its sequences and their rate; training as a
whole; and the toy model, analyses and report after the last run. `benchmarks/bench_reproduce_packs.py`
times the parts of each pack (steps, evals, checkpoints) when this shows where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from ihstudy.analysis.reproduce import FIGURES

IHSTUDY = str(Path(sys.executable).with_name("ihstudy"))
FIGURE_OF = {preset: figure for figure, presets in FIGURES.items() for preset in presets}


def run_table(folder: Path) -> pd.DataFrame:
    """One row per run of the reproduction folder: preset, pack job (plan.json), start, end, sequences trained."""
    plan = json.loads((folder / "plan.json").read_text())
    pack_of = {run["dir"]: i for i, pack in enumerate(plan["packs"]) for run in pack["runs"]}
    rows = []
    for run_dir, pack in pack_of.items():
        status_file = Path(run_dir) / "run.json"
        status = json.loads(status_file.read_text())
        train = OmegaConf.load(status_file.with_name("config.yaml")).train
        rows.append({"preset": status_file.parent.parent.name, "pack": pack,
                     "status": status["status"], "sequences": status["step"] * train.batch_size,
                     "start": datetime.fromisoformat(status["started"]).timestamp(),
                     "end": datetime.fromisoformat(status["ended"]).timestamp()})
    return pd.DataFrame(rows)


def breakdown(runs: pd.DataFrame, wall: float, started: float) -> pd.DataFrame:
    rows = []
    for preset, group in runs.groupby("preset", sort=False):
        packs = group.groupby("pack")
        pack_seconds = (packs.end.max() - packs.start.min()).sum()
        span = group.end.max() - group.start.min()
        rows.append({"figure": FIGURE_OF.get(preset, preset), "preset": preset, "runs": len(group), "packs": len(packs),
                     "sequences": group.sequences.sum(), "pack min": pack_seconds / 60,
                     "from min": (group.start.min() - started) / 60, "to min": (group.end.max() - started) / 60,
                     "seq/s of its packs": group.sequences.sum() / pack_seconds if pack_seconds else float("nan"),
                     "span min": span / 60})
    table = pd.DataFrame(rows).sort_values("from min")
    training = runs.end.max() - started
    total = {"figure": "all", "preset": "training", "runs": len(runs), "packs": int(table.packs.sum()),
             "sequences": runs.sequences.sum(), "pack min": table["pack min"].sum(), "from min": 0.0,
             "to min": training / 60, "seq/s of its packs": runs.sequences.sum() / training, "span min": training / 60}
    after = {"figure": "-", "preset": "toy, analyses, report", "runs": 0, "packs": 0, "sequences": 0,
             "pack min": float("nan"), "from min": training / 60, "to min": wall / 60,
             "seq/s of its packs": float("nan"), "span min": (wall - training) / 60}
    return pd.concat([table, pd.DataFrame([total, after])], ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", default=["3", "4b", "5b", "6"], help="figures and overrides for ihstudy reproduce")
    parser.add_argument("--scale", default="1")
    parser.add_argument("--out", type=Path, help="reproduction folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary outputs folder")
    options = parser.parse_args()
    outputs = Path(tempfile.mkdtemp(prefix="bench_reproduce_"))
    out = options.out.resolve() if options.out else outputs / "reproduce"
    env = os.environ | ({} if options.out else {"IHSTUDY_OUTPUTS": str(outputs)})
    command = [IHSTUDY, "reproduce", *options.args, "--scale", options.scale, "--out", str(out), "--quiet"]
    print(f"{' '.join(command[1:])}\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    started = time.time()
    finished = subprocess.run(command, env=env)
    wall = time.time() - started
    if not out.is_dir():
        sys.exit(f"ihstudy reproduce exited with {finished.returncode} and wrote nothing to {out}")
    folder = next(out.iterdir())  # <out>/<full|scale-F>[_overrides]
    table = breakdown(run_table(folder), wall, started)
    print(f"exit {finished.returncode}, {wall / 60:.1f} min in all; report: {folder / 'report' / 'report.md'}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    if not (options.keep or options.out):
        shutil.rmtree(outputs)


if __name__ == "__main__":
    main()
