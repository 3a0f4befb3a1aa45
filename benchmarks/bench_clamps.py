"""Training-step time with each clamp preset, relative to no clamp (issue 3 targets: single-pass
clamps <= 1.3x, two-pass clamps <= 2.2x).

    .venv/bin/python benchmarks/bench_clamps.py [--steps 300] [--repeats 5] [--threads 1] [--compile]

--compile times the compiled steps that long runs take (train.compile=auto), after compiling each
preset once (~20 s each on a 2-core CPU).

Presets are timed round-robin, `repeats` times each, and the median is reported, which damps but
does not remove the noise of a shared machine. Nothing is written except to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

# preset name -> (extra overrides, passes per step)
CASES = {
    "none": ([], 1),
    # a clamp that changes nothing (scores / 1.0): an installed hook's cost, so that the "vs noop"
    # column is what the clamps' own computation adds (every case but the preserving one takes the
    # same path, steps.choose_path: autograd on the hooked model uncompiled, the fast path with --compile)
    "none+noop": (["+clamp.noop={kind:head_temperature,heads:['0:0'],temperature:1.0}"], 1),
    "only_l2h3": ([], 1),
    "pt_attention": ([], 1),
    "layer1": ([], 1),
    "match": ([], 1),
    "copy": ([], 1),
    "layer1_copy": ([], 1),
    "none+preserve_values": (["+clamp.preserving={kind:ablate,heads:['0:1','0:2','0:5'],preserve:[values]}"], 2),
}


def make_pack(case: str, folder: str, compile_steps: bool):
    from ihstudy.config import compose_config
    from ihstudy.training.train import Pack, RunSpec

    preset, extra = case.split("+")[0], CASES[case][0]
    cfg, _ = compose_config([f"clamp={preset}", *extra, f"hydra.run.dir={folder}/{case}"])
    pack = Pack([RunSpec(cfg, os.path.join(folder, case))])
    if compile_steps:
        pack.compile()
    return pack


def time_steps(pack, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        pack.train_step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="time compiled steps (as long runs train)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["IHSTUDY_OUTPUTS"] = folder
        packs = {case: make_pack(case, folder, args.compile) for case in CASES}
        for pack in packs.values():
            time_steps(pack, 20)  # warm up
        times = {case: [] for case in CASES}
        for _ in range(args.repeats):
            for case, pack in packs.items():
                times[case].append(time_steps(pack, args.steps))
    base, noop = statistics.median(times["none"]), statistics.median(times["none+noop"])
    print(f"{'preset':24} {'ms/step':>8} {'vs none':>8} {'vs noop':>8} {'target':>7}")
    for case, (_, passes) in CASES.items():
        ms = statistics.median(times[case])
        target = 2.2 if passes == 2 else 1.3
        flag = "" if ms / base <= target else "  OVER"
        print(f"{case:24} {ms * 1e3:8.2f} {ms / base:7.2f}x {ms / noop:7.2f}x {target:6.1f}x{flag}")
    print("vs none: against the unclamped run; vs noop: against the same model with a do-nothing clamp, i.e. "
          "what the clamps' computation adds to an installed hook; every case but preserve_values (always "
          "autograd) on one path: autograd on the hooked model uncompiled, the fast path (fast_path.py) with --compile")
    how = "compiled" if args.compile else "uncompiled"
    print(f"(median of {args.repeats} x {args.steps} {how} steps, batch 32, {args.threads} thread(s); shared machine: noisy)")


if __name__ == "__main__":
    main()
