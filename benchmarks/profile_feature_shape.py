"""Where a run's time goes on the paper's data shape (1623 x 5 x 512 features), by torch.profiler.

    .venv/bin/python benchmarks/profile_feature_shape.py [--runs 1] [--steps 300] [overrides ...]

Builds the pack `ihstudy train data=features_file ...` would train (a generated feature file of the
paper's shape, as benchmarks/bench_authors.py uses; 3.2e5 sequences, eval every 5000), compiles it
as train.compile decides, and reports: the fixed cost of a process phase by phase (imports, config,
data, compilation), the training step and one eval point (min of three timings), the whole run's
estimate from them, and the profiler's split of the steps' and an eval's CPU time into matrix
products, the compiled graph's fused kernels, drawing training data, the optimizer and the rest.
For that split Inductor's kernel profiling is switched on after the timings (a recompilation: the
C++ wrapper calls kernels the profiler does not otherwise see). Nothing is written except to a
temporary folder.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the imports below: they are part of a process's fixed cost
# ruff: noqa: E402 (imports after START)
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_authors import write_features

GROUPS = {  # a part of a profiler event's name -> what the event is
    "aten::bmm": "matrix products", "aten::mm": "matrix products", "aten::addmm": "matrix products",
    "aoti_torch_cpu_bmm": "matrix products", "aoti_torch_cpu_mm": "matrix products", "aoti_torch_cpu_addmm": "matrix products",
    "cpp_fused": "compiled graph: fused elementwise kernels",
    "## Call CompiledFxGraph": "compiled graph: its C++ wrapper (allocation, views, kernel calls)",
    "aten::index": "drawing training data", "aten::cat": "drawing training data", "aten::stack": "drawing training data",
    "aten::exponential_": "drawing training data", "aten::topk": "drawing training data",
    "aten::multinomial": "drawing training data", "aten::randint": "drawing training data",
    "aten::_fused_adam_": "optimizer",
}


def split(events) -> dict[str, float]:
    """Self CPU seconds per group of profiler events."""
    totals: dict[str, float] = {}
    for event in events:
        group = next((g for part, g in GROUPS.items() if part in event.key), "other (dispatch, guards, small ops)")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


class Phases:
    """Wall seconds since the previous mark, printed as one line at the end."""

    def __init__(self):
        self.last, self.seconds = START, {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now

    def report(self) -> None:
        parts = "; ".join(f"{name} {seconds:.2f} s" for name, seconds in self.seconds.items())
        print(f"fixed cost {sum(self.seconds.values()):.1f} s: {parts}")


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="runs in the pack (seeds 5, 6, ...)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    phases = Phases()
    with tempfile.TemporaryDirectory(prefix="profile_feature_shape_") as tmp:
        os.environ["IHSTUDY_OUTPUTS"] = tmp
        features = Path(tmp) / "features.h5"
        write_features(features)
        from ihstudy.config import compose_config
        from ihstudy.training.compiled import use_compile
        from ihstudy.training.train import Pack, RunSpec

        phases.mark("imports (torch, ihstudy, Hydra, pandas) and the feature file")
        overrides = ["data=features_file", f"data.path={features}", "train.sequences=320000", *args.overrides]
        specs = [RunSpec(*compose_config([f"hydra.run.dir={tmp}/run{r}", f"seed={5 + r}", *overrides])) for r in range(args.runs)]
        phases.mark("composing the config")
        pack = Pack(specs)
        phases.mark("building the pack (data)")
        if use_compile(specs[0].cfg.train.compile, pack.n_steps, pack.device):
            pack.compile()
            phases.mark("torch.compile (importing Dynamo and Inductor)")
        pack.train_step()
        phases.mark("first step (Dynamo's trace, the compiled graph from the cache)")
        pack.evaluate()
        phases.mark("first eval")
        phases.report()
        for _ in range(50):
            pack.train_step()
        step = timed(lambda: [pack.train_step() for _ in range(args.steps)]) / args.steps
        evaluation = timed(pack.evaluate)
        n_evals = len(pack.eval_plan)
        print(f"training step {step * 1e3:.2f} ms ({args.runs * pack.batch_size / step:,.0f} sequences/s); "
              f"eval point {evaluation * 1e3:.1f} ms; {pack.n_steps:,} steps + {n_evals} evals = "
              f"{step * pack.n_steps + evaluation * n_evals:.1f} s")
        steps = lambda: [pack.train_step() for _ in range(1024)]  # noqa: E731 - four chunks of training data
        torch._inductor.config.cpp.enable_kernel_profile = True
        torch._dynamo.reset()  # recompiles with the kernels named to the profiler
        pack.train_step()
        pack.evaluate()
        for name, work in (("training steps", steps), ("one eval point", pack.evaluate)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                work()
            groups = split(prof.key_averages())
            total = sum(groups.values())
            print(f"{name}: " + "; ".join(f"{g} {100 * t / total:.0f}%" for g, t in groups.items()))


if __name__ == "__main__":
    main()
