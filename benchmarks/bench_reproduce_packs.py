"""Where the time of a reproduction goes: every pack the figure presets form, timed by part and
extrapolated to the presets' full lengths (the `ihstudy reproduce` target: figures 3, 4b, 5b, 6
in at most 25 minutes on a 2-core CPU).

    .venv/bin/python benchmarks/bench_reproduce_packs.py                      # fig3 fig4b fig5b fig6_long fig6_clamps
    .venv/bin/python benchmarks/bench_reproduce_packs.py fig6_clamps --compile true --threads 1

For each pack of each preset (`ihstudy sweep experiment=X --dry-run --max-pack-runs 0` shows the
same grouping), a `Pack` of the full-length configs is built in a temporary folder and timed: construction (eval
sets, model), the first steps (compilation, as train.compile decides for the full length),
steady training steps, one eval with its table writes, and one checkpoint with its durable table
writes, both at the table sizes of mid-training (the tables are rewritten whole, so their cost
grows with the run). The estimate is construction + compilation + steps x step time + evals x
eval time + checkpoints x checkpoint time, from the process's CPU time (one torch thread: what an
idle core would take; the wall times, which on a shared machine also count waiting for the other
processes, are printed too). Compilation and construction are wall times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def timed(function, repeats: int = 1) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeats` calls. The CPU time of this process is what the work
    costs on an idle core; the wall time also counts waiting for other processes and the disk."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def measure_pack(pack, steps: int, compile_setting: str) -> dict:
    from ihstudy.training.compiled import use_compile

    compiled = use_compile(compile_setting, pack.n_steps, pack.device)
    if compiled:
        pack.compile()
    first_eval, _ = timed(pack.evaluate)  # compiles the eval chunk of a compiled clamped pack
    first, _ = timed(lambda: [pack.train_step() for _ in range(5)])
    step_wall, step = (t / steps for t in timed(lambda: [pack.train_step() for _ in range(steps)]))
    pack.step = pack.n_steps // 2  # mid-training table sizes
    n_evals = sum(map(len, pack.eval_plan.values())) / len(pack.evaluators)  # in full evals (eval.dense: fewer)
    n_ckpts = len(pack.ckpt_steps)
    for columns in pack.recorder.eval_columns:
        for key in columns:
            columns[key] = columns[key] * max(1, int(n_evals) // 2)
    (eval_wall, evaluate), (ckpt_wall, checkpoint) = timed(pack.evaluate, 3), timed(pack.checkpoint, 3)
    return {"compiled": compiled, "first_steps": first - 5 * step_wall + first_eval - eval_wall,
            "step": step, "eval": evaluate, "ckpt": checkpoint,
            "wall": {"step": step_wall, "eval": eval_wall, "ckpt": ckpt_wall},
            "n_steps": pack.n_steps, "n_evals": n_evals, "n_ckpts": n_ckpts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["fig3", "fig4b", "fig5b", "fig6_long", "fig6_clamps"])
    parser.add_argument("--steps", type=int, default=300, help="steady steps timed per pack")
    parser.add_argument("--compile", default=None, help="train.compile for every pack: auto | true | false "
                        "(default: each preset's own, as reproduce trains it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: two pack jobs share 2 cores)")
    args = parser.parse_args()
    compile_setting = {"true": True, "false": False}.get(args.compile, args.compile)

    with tempfile.TemporaryDirectory(prefix="bench_reproduce_") as tmp:
        os.environ["IHSTUDY_OUTPUTS"] = tmp
        import torch

        from ihstudy.training.sweep import plan_sweep
        from ihstudy.training.train import Pack, RunSpec

        torch.set_num_threads(args.threads)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {args.threads} torch thread(s)")
        header = ("preset", "pack", "runs", "sequences", "compiled", "build s", "compile s", "ms/step", "seq/s",
                  "ms/eval", "ms/ckpt", "steps s", "evals s", "ckpts s", "total s", "wall ms/step,eval,ckpt")
        print("\t".join(header))
        grand = 0.0
        for preset in args.presets:
            plan = plan_sweep([f"experiment={preset}"], max_pack_runs=0)
            for i, runs in enumerate(plan.packs):
                specs = [RunSpec(run.cfg, Path(tmp) / preset / str(i) / run.name, run.name) for run in runs]
                start = time.perf_counter()
                pack = Pack(specs)
                build = time.perf_counter() - start
                m = measure_pack(pack, args.steps, runs[0].cfg.train.compile if compile_setting is None else compile_setting)
                parts = [m["n_steps"] * m["step"], m["n_evals"] * m["eval"], m["n_ckpts"] * m["ckpt"]]
                total = build + max(m["first_steps"], 0) + sum(parts)
                grand += total
                rate = len(runs) * 32 / m["step"]
                row = (preset, i, len(runs), f"{len(runs) * m['n_steps'] * 32:,}", m["compiled"], f"{build:.1f}",
                       f"{max(m['first_steps'], 0):.1f}", f"{m['step'] * 1e3:.2f}", f"{rate:,.0f}", f"{m['eval'] * 1e3:.0f}",
                       f"{m['ckpt'] * 1e3:.0f}", *(f"{p:.0f}" for p in parts), f"{total:.0f}",
                       ",".join(f"{v * 1e3:.1f}" for v in m["wall"].values()))
                print("\t".join(map(str, row)), flush=True)
        print(f"estimated total, packs one after another: {grand:.0f} s ({grand / 60:.1f} min)")


if __name__ == "__main__":
    main()
