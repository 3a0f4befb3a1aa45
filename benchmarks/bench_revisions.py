"""Training-step speed of this checkout against another git revision, measured in turns.

    .venv/bin/python benchmarks/bench_revisions.py --base REV [--steps 1000] [--rounds 8]
        [--pack PRESET:I] [--threads N] [overrides ...]

Two worker processes, one importing ihstudy from this checkout and one from `git archive REV`, each
build the pack of the default run (plus the Hydra overrides given, e.g. clamp=pt_attention for a
clamped Fig-5b run) or, with --pack, pack I of a sweep preset (`ihstudy sweep experiment=PRESET
--dry-run --max-pack-runs 0` lists them), on --threads torch threads (default: torch's, one per
core; `reproduce` trains its packs on one each), compile it as `train.compile` decides, warm up, and then time `--steps` training
steps whenever asked. The parent asks them in turns (base, this; this, base; ...), so the load of a
shared machine falls on both alike, and reports the ratio of step times per round (its median) and
the ratio of each side's fastest timing (the least disturbed by other load) and of CPU time (less
sensitive to waiting for a core than wall-clock time): ratios, not speeds.
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

ROOT = Path(__file__).resolve().parents[1]


def worker(preset_pack: str, threads: int, overrides: list[str]) -> None:
    """Serve timing requests on stdin: each line is a number of steps, answered with their wall-clock
    and CPU seconds (of all this process's threads)."""
    import torch

    import ihstudy
    from ihstudy.config import compose_config
    from ihstudy.training.compiled import use_compile
    from ihstudy.training.sweep import plan_sweep
    from ihstudy.training.train import Pack, RunSpec

    if threads:
        torch.set_num_threads(threads)
    folder = Path(os.environ["IHSTUDY_OUTPUTS"], str(os.getpid()))
    if preset_pack:
        preset, index = preset_pack.rsplit(":", 1)
        runs = plan_sweep([f"experiment={preset}", *overrides], max_pack_runs=0).packs[int(index)]
        specs = [RunSpec(run.cfg, folder / run.name, run.name) for run in runs]
    else:
        cfg, run_dir = compose_config([f"hydra.run.dir={folder}", *overrides])
        specs = [RunSpec(cfg, run_dir)]
    pack = Pack(specs)
    if use_compile(specs[0].cfg.train.compile, pack.n_steps, pack.device):
        pack.compile()
    start = time.perf_counter()
    for _ in range(100):  # compiles on the first step, then warms up
        pack.train_step()
    print(f"ready {Path(ihstudy.__file__).parent} {time.perf_counter() - start:.1f}", flush=True)
    for line in sys.stdin:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(int(line)):
            pack.train_step()
        print(time.perf_counter() - start, time.process_time() - cpu, flush=True)


def start_worker(source: Path, args: argparse.Namespace, outputs: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(source), "IHSTUDY_OUTPUTS": outputs}
    command = [sys.executable, __file__, "--worker", args.pack, str(args.threads), *args.overrides]
    return subprocess.Popen(command, cwd=source, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def ask(process: subprocess.Popen, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` training steps."""
    process.stdin.write(f"{steps}\n")
    process.stdin.flush()
    wall, cpu = process.stdout.readline().split()
    return float(wall), float(cpu)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare this checkout against")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per timing")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pack", default="", help="PRESET:I, pack I of sweep preset PRESET (default: one run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both, e.g. clamp=pt_attention")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_revisions_") as tmp:
        base = Path(tmp, "base")
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        workers = {"base": start_worker(base, args, tmp), "this": start_worker(ROOT, args, tmp)}
        for name, process in workers.items():
            _, source, seconds = process.stdout.readline().split()
            print(f"{name}: ihstudy from {source}, compile and warm-up {float(seconds):.0f} s")
        ratios, cpu_ratios, best = [], [], {"base": float("inf"), "this": float("inf")}
        for round_ in range(args.rounds):
            order = ["base", "this"] if round_ % 2 == 0 else ["this", "base"]
            (wall, cpu) = zip(*(ask(workers[name], args.steps) for name in order))
            seconds, cpu = dict(zip(order, wall)), dict(zip(order, cpu))
            ratios.append(seconds["base"] / seconds["this"])
            cpu_ratios.append(cpu["base"] / cpu["this"])
            best = {name: min(best[name], seconds[name]) for name in best}
            print(f"round {round_}: base {seconds['base'] / args.steps * 1e3:.2f} ms/step, "
                  f"this {seconds['this'] / args.steps * 1e3:.2f} ms/step, base/this {ratios[-1]:.2f} "
                  f"(CPU time {cpu_ratios[-1]:.2f})", flush=True)
        for process in workers.values():
            process.stdin.close()
            process.wait()
    what = " ".join([args.pack, *args.overrides]).strip() or "default run"
    print(f"step time base/this ({args.base} / this checkout, {what}): "
          f"median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f} over {args.rounds} rounds; "
          f"of the fastest timings {best['base'] / best['this']:.2f}; of CPU time: median {statistics.median(cpu_ratios):.2f}")


if __name__ == "__main__":
    main()
