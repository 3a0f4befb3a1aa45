"""How long `ihstudy analyze` takes on a run with dense checkpoints (not a test).

    python benchmarks/bench_analyze.py RUN_DIR [--threads N] [--skip heads,wiring] [--sequences N]

RUN_DIR: a run trained with dense checkpoints, e.g.
    ihstudy train train.sequences=200000 train.ckpt_every=1000 hydra.run.dir=outputs/dense
Prints the wall and CPU time of each analysis; the progress measures also per checkpoint and
extrapolated to 1,000 checkpoints (a 1e6-sequence run with a checkpoint every 1000 sequences).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ihstudy.analysis import circuits, timing
from ihstudy.analysis.report import timing_report


def timed(label: str, fn):
    """Run fn; print wall time and CPU time (all threads: on a shared machine, CPU time / cores
    estimates the wall time the machine would take alone). Returns (result, wall seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{label}: {seconds:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated: timing, progress, heads, wiring")
    parser.add_argument("--sequences", type=int, default=circuits.DISTRIBUTION_LIMIT,
                        help="heads/wiring: below the distribution's size, a sample (cost is linear in sequences)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    print(f"torch threads: {torch.get_num_threads()}")
    if "timing" not in skip:
        runs = timing.find_runs([args.run_dir])
        timed("timing analysis (tables and figures)", lambda: timing_report(runs, "seed"))
    subject = circuits.Subject(args.run_dir)
    n = len(subject.files.checkpoint_steps())
    if "progress" not in skip:
        _, seconds = timed(f"progress measures, {n} checkpoints x {circuits.PROGRESS_SEQUENCES} sequences",
                           lambda: circuits.progress_measures(subject))
        print(f"  {seconds / n * 1000:.1f} ms per checkpoint; 1,000 checkpoints: {seconds / n * 1000:.0f} s")
    batch, enumerated = circuits.training_distribution(subject.task, args.sequences)
    print(f"sequences: {len(batch.target):,} ({'whole training distribution' if enumerated else 'sample'})")
    if "heads" not in skip:
        timed("heads (last-layer ablations, add-back, complementarity)", lambda: circuits.last_layer_heads(subject, batch))
        timed("layer-1 roles", lambda: circuits.first_layer_roles(subject, batch))
    if "wiring" not in skip:
        timed("wiring grid", lambda: circuits.wiring_grid(subject, batch))
        timed("composition scores", lambda: circuits.composition_scores(subject))


if __name__ == "__main__":
    main()
