"""Sweep benchmark: the six Fig-5b clamp conditions x 6e5 sequences, eval every 1000 sequences on
the four evaluators, as one `ihstudy sweep` versus the same runs one after another (`ihstudy train`).

    .venv/bin/python benchmarks/bench_sweep.py                          # in-process, one pack of 6
    .venv/bin/python benchmarks/bench_sweep.py --launcher joblib --max-pack-runs 3
    .venv/bin/python benchmarks/bench_sweep.py --full-baseline          # time the serial runs in full

The serial baseline is by default extrapolated from short runs of every condition: the wall time of
a one-step run (process start-up, eval set construction, compilation) plus the per-sequence cost
measured over --baseline-sequences (less a second one-step run, which finds the compilation
cached), all compiled as the full-length run would be. Target: the sweep in at most 6 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from ihstudy.training.compiled import MIN_STEPS

CONDITIONS = ["only_l2h3", "pt_attention", "layer1", "match", "copy", "layer1_copy"]
IHSTUDY = str(Path(sys.executable).with_name("ihstudy"))


def timed(args: list[str], outputs: Path, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([IHSTUDY, *args, f"train.threads={threads}"], check=True, env=os.environ | {"IHSTUDY_OUTPUTS": str(outputs)},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def serial_seconds(condition: str, sequences: int, baseline_sequences: int, full: bool, outputs: Path, threads: int) -> float:
    """Wall time of `ihstudy train clamp=<condition>` over `sequences` (measured or extrapolated)."""
    # The short runs compile as the full-length run would (train.compile=auto decides by length).
    compile_setting = f"train.compile={sequences // 32 >= MIN_STEPS}"

    def train(n: int, name: str) -> float:
        return timed(["train", "-q", f"clamp={condition}", "train.eval_every=1000", f"train.sequences={n}",
                      compile_setting, f"hydra.run.dir={outputs}/serial/{condition}-{name}"], outputs, threads)

    if full:
        return train(sequences, "full")
    fixed = train(32, "one-step")  # with compilation, as a full run's start
    warm_fixed = train(32, "one-step-again")  # compilation now cached, as in the short run
    return fixed + (train(baseline_sequences, "short") - warm_fixed) * sequences / baseline_sequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=600_000)
    parser.add_argument("--baseline-sequences", type=int, default=20_000)
    parser.add_argument("--full-baseline", action="store_true")
    parser.add_argument("--launcher", default="basic", help="basic | joblib | submitit_local")
    parser.add_argument("--max-pack-runs", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="train.threads of every run (0: by cores and launcher); "
                        "1 on a machine busy with other work, where 2 threads per process thrash")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    outputs = (args.out or Path(tempfile.mkdtemp(prefix="bench_sweep_"))).resolve()
    total = len(CONDITIONS) * args.sequences
    print(f"{len(CONDITIONS)} Fig-5b conditions x {args.sequences:,} sequences, eval every 1000, on {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}; runs under {outputs}", flush=True)

    sweep_dir = outputs / "sweep"
    seconds = timed(["sweep", "-q", "experiment=fig5b", f"train.sequences={args.sequences}",
                     f"--max-pack-runs={args.max_pack_runs}", f"hydra/launcher={args.launcher}",
                     f"hydra.sweep.dir={sweep_dir}"], outputs, args.threads)
    print(f"sweep ({args.launcher}, max {args.max_pack_runs or 'all'} runs per pack): {seconds:.0f} s, "
          f"{total / seconds:,.0f} sequences/s", flush=True)
    index = pd.read_parquet(sweep_dir / "sweep.parquet")
    print(index[["run", "status", "phase_change_sequences", "fsl_train.loss", "fsl_test_class.loss"]].to_string(index=False))

    if args.skip_baseline:
        return
    serial = sum(serial_seconds(c, args.sequences, args.baseline_sequences, args.full_baseline, outputs, args.threads)
                 for c in CONDITIONS)
    how = "measured" if args.full_baseline else f"extrapolated from {args.baseline_sequences:,} sequences per run"
    print(f"one after another ({how}): {serial:.0f} s, {total / serial:,.0f} sequences/s")
    print(f"sweep speed-up: {serial / seconds:.2f}x")


if __name__ == "__main__":
    main()
