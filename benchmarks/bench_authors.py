"""Side by side with the authors' JAX code on the paper's data shape: one run, and two runs at once.

    .venv/bin/python benchmarks/bench_authors.py --authors ../icl-dynamics --authors-python ../jaxvenv/bin/python
    .venv/bin/python benchmarks/bench_authors.py ... --repeats 5 --only two

The data: a feature file of the paper's shape (1623 classes x 5 exemplars x 512, at
resnet18/224/feat, standard normal, seed 0; --features FILE to use another one). Both sides train the
paper's main run (docs/fidelity.md: 50 train classes, one train exemplar each, five labels, context
of two pairs, lr 1e-5, batch 32), --sequences long, evaluating the four evaluators on 1000 sequences
every 5000 sequences. Each side runs as a fresh process timed by `/usr/bin/time -v` (wall time, CPU
time, peak resident memory), start-up included; ihstudy's compile cache is warmed first by a short
untimed run of each pack shape (as after a machine's first run).

  one   one run: `ihstudy train` against one `python main.py`
  two   two runs (seeds 5 and 6) as one pack: `ihstudy sweep --max-pack-runs 0 ... seed=5,6` (one process,
        both cores) against two
        `python main.py` processes started together (the authors' code uses about one core each, so
        two processes are how it uses a 2-core machine); the wall time is the later of the two ends
  split the same two runs as two one-thread packs at once, like the authors' two processes (what
        `ihstudy sweep ... seed=5,6` chooses on a 2-core machine, docs/sweeps.md):
        `ihstudy sweep --max-pack-runs 1 hydra/launcher=joblib ... seed=5,6`

Turns alternate (ihstudy, authors, ihstudy, ...) so that a machine's drift falls on both sides; the
report gives every repeat and the medians. Setting up the authors' side (their setup guide's versions):

    python3 -m venv ../jaxvenv
    ../jaxvenv/bin/pip install "jax[cpu]==0.4.26" "numpy<2" equinox optax h5py nptyping
    # their code: a clone or snapshot of github.com/aadityasingh/icl-dynamics at ../icl-dynamics
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPE = (1623, 5, 512)
DATASET = "resnet18/224/feat"
IHSTUDY = str(Path(sys.executable).with_name("ihstudy"))
EVALUATORS = ["fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class"]


def authors_command(python: str, data: Path, sequences: int, seed: int, folder: Path) -> list[str]:
    """The paper's main run (their ih_paper_runs.sh, Figure 3) at `sequences`, without checkpoints."""
    return [python, "main.py", "--data_file", str(data), "--data_path_in_file", DATASET, "--mixing_coeffs", "1.0",
            "--pt_burstiness", "1", "--train_context_len", "2", "--fs_relabel", "5", "--fs_relabel_split", "8", "2", "0",
            "--exemplar_split", "1", "4", "0", "--pe_names", *EVALUATORS, "--pe_classes", "train", "train", "train", "test",
            "--pe_exemplars", "train", "train", "val", "train", "--pe_fs_relabel_scheme", "train", "val", "train", "train",
            "--pe_burstiness", "1", "1", "1", "1", "--train_iters", str(sequences), "--train_bs", "32",
            "--eval_every", "5000", "--eval_iters", "1000", "--lr", "0.00001", "--d_model", "64",
            "--class_split", "50", "1473", "100", "--init_seed", str(seed), "--run", f"seed{seed}",
            "--base_folder", str(folder), "--raw_name", "--suppress_output"]


def ihstudy_overrides(data: Path, sequences: int) -> list[str]:
    return ["data=features_file", f"data.path={data}", f"train.sequences={sequences}", "train.eval_every=5000"]


def ihstudy_command(comparison: str, overrides: list[str], folder: Path) -> list[str]:
    """ihstudy's side of a comparison: one `ihstudy train`, or one `ihstudy sweep` of seeds 5 and 6 (two:
    one pack in the sweep's process; split: one pack per run, both at once in joblib's processes, each
    taking one core)."""
    if comparison == "one":
        return [IHSTUDY, "train", "-q", *overrides, f"hydra.run.dir={folder}"]
    packs = ["--max-pack-runs", "1", "hydra/launcher=joblib"] if comparison == "split" else ["--max-pack-runs", "0"]
    return [IHSTUDY, "sweep", "-q", *packs, *overrides, "seed=5,6", f"hydra.sweep.dir={folder}"]


def start_timed(command: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["/usr/bin/time", "-v", "-o", str(log), *command], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_time_log(log: Path) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + sys) and peak memory (GB) from a `/usr/bin/time -v` report."""
    text = log.read_text()

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()

    clock = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60 ** i for i, value in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall": wall, "cpu": cpu, "peak_gb": int(field("Maximum resident set size (kbytes)")) / 1e6}


def run_side(commands: list[list[str]], cwd: Path, env: dict, logs: Path, name: str) -> dict[str, float]:
    """Start the commands together and wait for all; wall = the latest end, CPU summed, peak the largest."""
    files = [logs / f"{name}-{i}.time" for i in range(len(commands))]
    processes = [start_timed(command, cwd, env, file) for command, file in zip(commands, files)]
    for process, command in zip(processes, commands):
        if process.wait() != 0:
            raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    results = [read_time_log(file) for file in files]
    return {"wall": max(r["wall"] for r in results), "cpu": sum(r["cpu"] for r in results),
            "peak_gb": max(r["peak_gb"] for r in results)}


def write_features(path: Path) -> None:
    import h5py

    features = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with h5py.File(path, "w") as h5:
        h5.create_dataset(DATASET, data=features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", type=Path, required=True, help="the authors' code (a folder holding main.py)")
    parser.add_argument("--authors-python", required=True, help="the python of a venv with their dependencies")
    parser.add_argument("--features", type=Path, help="a feature file to use (default: a generated one of the paper's shape)")
    parser.add_argument("--sequences", type=int, default=320_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["one", "two", "split"], help="run one of the comparisons")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for ihstudy, e.g. train.compile=false")
    args = parser.parse_args()
    authors = args.authors.resolve()
    if not (authors / "main.py").is_file():
        raise SystemExit(f"{authors}/main.py not found: --authors names a checkout of aadityasingh/icl-dynamics")

    with tempfile.TemporaryDirectory(prefix="bench_authors_") as tmp_name:
        tmp = Path(tmp_name)
        data = args.features.resolve() if args.features else tmp / "features.h5"
        if not args.features:
            write_features(data)
        env = os.environ | {"IHSTUDY_OUTPUTS": str(tmp / "outputs")}
        overrides = [*ihstudy_overrides(data, args.sequences), *args.overrides]
        authors_seeds = {"one": (5,), "two": (5, 6), "split": (5, 6)}  # the authors' side: one process per seed
        names = [args.only] if args.only else list(authors_seeds)
        # Untimed: one short compiled run of each pack shape, so that PyTorch's on-disk compile cache holds
        # its graphs, as on any machine after the first run (the cold compile: docs/performance.md).
        warm = [*ihstudy_overrides(data, 3200), "train.compile=true", *args.overrides]
        for name in names:
            subprocess.run(ihstudy_command(name, warm, tmp / f"outputs/warm-{name}"), env=env, check=True,
                           stdout=subprocess.DEVNULL)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.sequences:,} sequences per run, "
              f"feature file {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}", flush=True)
        for name in names:
            results = {"ihstudy": [], "authors": []}
            for i in range(args.repeats):
                ours = [ihstudy_command(name, overrides, tmp / f"outputs/{name}-{i}")]
                results["ihstudy"].append(run_side(ours, Path.cwd(), env, tmp, f"{name}-ihstudy-{i}"))
                theirs = [authors_command(args.authors_python, data, args.sequences, seed, tmp / f"authors-{name}-{i}")
                          for seed in authors_seeds[name]]
                results["authors"].append(run_side(theirs, authors, env, tmp, f"{name}-authors-{i}"))
                print(f"  {name} #{i + 1}: " + "; ".join(f"{side} {r[-1]['wall']:.1f} s wall, {r[-1]['cpu']:.1f} s CPU, "
                                                       f"{r[-1]['peak_gb']:.2f} GB" for side, r in results.items()), flush=True)
            medians = {side: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for side, rows in results.items()}
            print(f"{name}: median wall ihstudy {medians['ihstudy']['wall']:.1f} s, authors {medians['authors']['wall']:.1f} s: "
                  f"{medians['authors']['wall'] / medians['ihstudy']['wall']:.2f}x; peak memory "
                  f"{medians['ihstudy']['peak_gb']:.2f} GB vs {medians['authors']['peak_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
