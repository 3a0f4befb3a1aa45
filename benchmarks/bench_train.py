"""Training speed of the default setup (issue 2 target: the default 1e6-sequence run, eval every
5000 sequences, in <= 90 s on a 2-core CPU including start-up).

    .venv/bin/python benchmarks/bench_train.py [--steps 2000] [--repeats 5] [--threads 1] [--skip-full]
    .venv/bin/python benchmarks/bench_train.py train.compile=false     # the uncompiled step

Reports the compilation time of the step (train.compile, as `ihstudy train` decides it),
training throughput (sequences/s, from `Pack.train_step`), the cost of one full eval (4 evaluators
x 1000 sequences, with head scores and the file flush), and the wall time of `ihstudy train -q`
with the default config as a fresh process: once with an empty torch.compile cache (a fresh
machine: compilation included) and once with the cache it left (every later run). Timings repeat
and report min and median, which damps but does not remove the noise of a shared machine.
Nothing is written except to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def summary(values: list[float], unit: str, scale: float = 1.0) -> str:
    return f"min {min(values) * scale:.3g} {unit}, median {statistics.median(values) * scale:.3g} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per throughput repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the config default)")
    parser.add_argument("--skip-full", action="store_true", help="skip the two full default runs (~2.5 min)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. train.compile=true")
    args = parser.parse_args()
    threads = [f"train.threads={args.threads}"] if args.threads else []

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        os.environ["IHSTUDY_OUTPUTS"] = tmp
        from ihstudy.config import compose_config
        from ihstudy.training.compiled import use_compile
        from ihstudy.training.train import Pack, RunSpec

        cfg, run_dir = compose_config([f"hydra.run.dir={tmp}/steps", *threads, *args.overrides])
        pack = Pack([RunSpec(cfg, run_dir)])
        if use_compile(cfg.train.compile, pack.n_steps, pack.device):
            pack.compile()
        start = time.perf_counter()
        pack.train_step()
        print(f"first step (compiles if train.compile applies): {time.perf_counter() - start:.1f} s")
        for _ in range(50):  # warm-up
            pack.train_step()
        step_times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):
                pack.train_step()
            step_times.append((time.perf_counter() - start) / args.steps)
        rates = [pack.batch_size / t for t in step_times]
        print(f"train step:  {summary(step_times, 'ms', 1e3)}  ({summary(rates, 'sequences/s')}, "
              f"max {max(rates):.0f})")

        eval_times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            pack.evaluate()
            eval_times.append(time.perf_counter() - start)
        print(f"full eval ({len(pack.evaluators)} x {cfg.eval.n_sequences} sequences): "
              f"{summary(eval_times[1:], 'ms', 1e3)}")
        n_evals = sum(map(len, pack.eval_plan.values())) / len(pack.evaluators)  # in full evals (eval.dense: fewer)
        estimate = pack.n_steps * min(step_times) + n_evals * min(eval_times[1:])
        print(f"default run estimate without start-up: {pack.n_steps} steps + {n_evals:g} evals = {estimate:.1f} s")

        if not args.skip_full:
            cache = {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/compile-cache"}  # empty at first, like a fresh machine's
            for which in ("empty compile cache", "warm compile cache"):
                command = [str(Path(sys.executable).with_name("ihstudy")), "train", "-q", f"hydra.run.dir={tmp}/{which}",
                           *threads, *args.overrides]
                start = time.perf_counter()
                subprocess.run(command, check=True, env=os.environ | cache)
                print(f"default `ihstudy train` (1e6 sequences, eval every 5000), {which}, wall incl. start-up: "
                      f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
