"""Attention's small products in compiled graphs, three ways, on one preset pack in one process.

    .venv/bin/python benchmarks/bench_plain_loop.py fig5b [--pack 0] [--threads 2] [--rounds 16] [--steps 20]

The pack (`ihstudy sweep experiment=X --dry-run --max-pack-runs 0` shows the packs) is built and
compiled three times (transformer.head_matmul):
  aten          `@` throughout (ATEN_PLAIN_LOOP_MAX = 0): ATen's plain loop, as before the change
  written out   the loop written out in the forward and in the backward (the fast path's choice)
  as shipped    what ihstudy runs: the hooked path (next-token tasks, preserving ablations)
                keeps ATen's loop for the backward (aten_backward_products); for every other
                pack, clamped or not (the fast path), the same as written out
All three compute the same bits. Each keeps its own compiled graphs (Dynamo guards on the settings,
which are set before each call), then `--steps` training steps and one eval of each are timed in
turn for `--rounds` rounds, so the load of a shared machine falls on all three alike. Printed: the
median of each round's step-time ratio to `aten`, and each variant's median and fastest step and
eval. Nothing is written except to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--pack", type=int, default=0, help="which of the preset's packs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="training steps per variant and round")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_plain_loop_") as tmp:
        os.environ["IHSTUDY_OUTPUTS"] = tmp
        import torch

        from ihstudy.model import transformer
        from ihstudy.training import steps
        from ihstudy.training.sweep import plan_sweep
        from ihstudy.training.train import Pack, RunSpec

        torch.set_num_threads(args.threads)
        as_shipped = (transformer.ATEN_PLAIN_LOOP_MAX, steps.aten_backward_products)
        variants = {"aten": (0, as_shipped[1]), "written out": (as_shipped[0], contextlib.nullcontext),
                    "as shipped": as_shipped}

        def use(variant: str) -> None:
            transformer.ATEN_PLAIN_LOOP_MAX, steps.aten_backward_products = variants[variant]

        runs = plan_sweep([f"experiment={args.preset}"], max_pack_runs=0).packs[args.pack]
        packs = {}
        for variant in variants:
            use(variant)
            packs[variant] = Pack([RunSpec(run.cfg, Path(tmp) / variant / run.name, run.name) for run in runs])
            packs[variant].compile()
            for _ in range(args.steps):
                packs[variant].train_step()
            packs[variant].evaluate()
        step_ms, eval_ms = ({variant: [] for variant in variants} for _ in range(2))
        for _ in range(args.rounds):
            for variant, pack in packs.items():
                use(variant)
                start = time.perf_counter()
                for _ in range(args.steps):
                    pack.train_step()
                step_ms[variant].append((time.perf_counter() - start) / args.steps * 1e3)
                start = time.perf_counter()
                pack.evaluate()
                eval_ms[variant].append((time.perf_counter() - start) * 1e3)

    print(f"{args.preset} pack {args.pack} ({len(runs)} runs, {type(packs['aten'].path).__name__}), "
          f"{args.threads} thread(s), {args.rounds} rounds x {args.steps} steps:")
    for variant in variants:
        ratio = statistics.median(mine / aten for mine, aten in zip(step_ms[variant], step_ms["aten"]))
        print(f"  {variant:12s} step time / aten's {ratio:.3f}   step {statistics.median(step_ms[variant]):.2f} ms "
              f"(fastest {min(step_ms[variant]):.2f})   eval {statistics.median(eval_ms[variant]):.0f} ms "
              f"(fastest {min(eval_ms[variant]):.0f})")


if __name__ == "__main__":
    main()
