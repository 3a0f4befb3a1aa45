"""`ihstudy reproduce`: train the paper's figure presets and judge every finding of docs/science.md §5.

    ihstudy reproduce                          # figures 3 4b 5b 6 8 15 17 and the toy model
    ihstudy reproduce 3 5b --scale 0.1         # a quick look: every run 10x shorter
    ihstudy reproduce lattice seed=5,6,7       # what needs to go right: every subset of the Fig-5b clamps
    ihstudy reproduce seed=5,6,7               # medians and spreads over seeds
    ihstudy reproduce data=features_file data.path=omniglot.h5
    ihstudy reproduce hydra/launcher=submitit_slurm hydra.launcher.partition=cpu

Each figure preset (conf/experiment/) is one sweep (ihstudy.training.sweep: packs, launchers, skipping
finished runs and resuming the others) in its own folder under the reproduction folder; the packs
of all of them train as one launch (sweep.run_sweeps), two at a time on two cores (PARALLEL_LAUNCHER):

    <out>/<full|scale-F>[_<overrides>]/   one reproduction: a scale and a set of overrides
        fig3/, fig5b/, ...                sweep folders (layout: ihstudy/training/sweep.py)
        plan.json, packs/<i>/             the pack jobs of the latest invocation, their logs
        toy/                              the toy model (ihstudy/analysis/toy.py)
        report/report.md                  the findings table, details as CSV, figures

Every verdict is computed from the runs' tables and checkpoints by the findings registered below,
one small function each; the thresholds they judge by are the named constants. To add a finding:

    @finding("9", "9 short title", "the paper's claim, in words",
             paper={"what the paper reports": "its number"},  # data: the report's "paper" column
             needs=("fig9",),            # presets (or "toy") whose results it reads: else "not run"
             appendix=False)             # True: judged only when its presets were chosen
    def my_finding(r: Results, f: Finding) -> None:
        t = r.timing("fig9")             # Results: the runs' timing, final losses, configs, checkpoints
        f.ihstudy = "what these runs give"
        f.holds = verdict(...)           # "yes" / "no"
        f.details = a_table              # optional: report/finding_9.csv

FINDINGS (key -> FindingSpec, in registration order) is the report's table; `key` names the
details file. Each judge is tested on synthetic results with one case that holds and one that
does not (tests/test_reproduce.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ihstudy.analysis import circuits, defaults, markov_findings, report, subsets, timing, toy
from ihstudy.config import check_hydra_overrides, compose_config, quote
from ihstudy.errors import ConfigError, UserError
from ihstudy.run_files import RunFiles, check_folder_path, check_report_dir, outputs_root
from ihstudy.training.evaluate import LN2, PHASE_CHANGE_THRESHOLD
from ihstudy.training.lattice import GROUP
from ihstudy.training.sweep import (
    PARALLEL_LAUNCHER,
    SWEEP_DIR,
    Sweep,
    available_cores,
    compose_pack_job,
    folder_name,
    jobs_per_machine,
    makespan,
    pack_jobs,
    pack_seconds,
    parse,
    plan_sweep,
)

FIGURES = {"3": ["fig3"], "4b": ["fig4b"], "5b": ["fig5b"], "6": ["fig6_long", "fig6_clamps"], "8": ["fig8"],
           "15": ["fig15"], "17": ["fig17"], "toy": [], "markov": ["markov_prior"], "lattice": ["fig5b_lattice"]}
MIN_TOY_ITERATIONS = 300  # enough for the clamped conditions to fit
QUICK_CHECKPOINTS = 20
# --quick (docs/reproduce.md#quick-mode): the paper's presets with their time compressed QUICK_SPEEDUP
# times, a learning rate that many times higher and runs that many times shorter (Adam's steps grow
# with the learning rate: the phase changes come about that much sooner). QUICK_AS_IS: presets already
# at a fast-learning setting, run as they are.
QUICK_SPEEDUP = 30
QUICK_AS_IS = ("markov_prior",)
# --scale and --quick: eval points per run at most about this many (plus train.eval_at's; the full
# runs have 120-600), every evaluator at most every SPARSE_EVAL_SPACING of them (eval=sparse): an
# eval point costs as much as training ~1,600 sequences (sweep.EVAL_SECONDS), so shortened runs would otherwise spend
# most of their time evaluating; and each evaluator at most SCALED_EVAL_SEQUENCES sequences (at 50
# points, 1,000 would still cost as much as the training between them: docs/reproduce.md)
SCALED_EVAL_POINTS = 50
SPARSE_EVAL_SPACING = 10
SCALED_EVAL_SEQUENCES = 500
# Sequences of the training distribution for the checkpoint analyses of findings 3 and 5 (fewer
# than `ihstudy analyze`'s circuits.DISTRIBUTION_LIMIT: a standard error of at most 0.0035 on an
# accuracy, far below the judging thresholds, in a fifth of the time), and at small scales.
ANALYSIS_SEQUENCES = 20_000
MIN_ANALYSIS_SEQUENCES = 256
CROSSING = defaults.PHASE_CHANGE

# Judging thresholds
PLATEAU_FRACTION = 0.25  # a plateau: within ln 2 ± 0.1 for at least this fraction of the time to the phase change
INDUCTION_HEAD = 0.3  # a last-layer head with a final induction strength above this is an induction head
REDUNDANT_ACC_DROP = 0.02  # redundancy: removing any one last-layer head costs at most this much accuracy
DIRECT_PATH_ACC = 0.01  # layer 1 acts only through layer 2: its direct path changes accuracy by at most this
LABEL_SPECIFIC = 0.2  # a head's copy circuit is label-specific if its accuracy differs this much between labels
PREDICTS_WITHIN = 1.25  # a composition rule predicts if its median held-out error is at most this factor
COMPLEMENTARY_GAIN = 0.05  # two heads are complementary if each label's better head beats the better head overall by this
ROLE_ACC_DROP = 0.05  # a group of layer-1 heads matters through a path if ablating that path costs this much accuracy



@dataclass(frozen=True)
class SubsetLattice:
    """A "what needs to go right" section (docs/subsets.md): every subset of `clamps` on top of the
    `base` clamp preset, trained as `experiment` with `settings` (scaled by --scale like the preset's own)."""

    experiment: str
    clamps: tuple[str, ...]
    base: str = ""
    settings: tuple[str, ...] = ()

    def base_override(self) -> list[str]:
        return [f"{GROUP}={self.base}"] if self.base else []

    @property
    def subsets(self) -> str:
        return f"{GROUP}={','.join(self.clamps)}"


# preset (a folder of the reproduction, listed in FIGURES["lattice"]) -> its subset sweep. The token
# families (docs/tasks.md) join with one entry each once their clamps exist in conf/clamp/, e.g.
#     "repeat_lattice": SubsetLattice("repeat", ("prev_token_first", "induction", "copy")),
# and a register_lattice_findings("repeat_lattice", ...) call below: the judges take any lattice.
# The Fig-5b lattice evaluates every 2000 sequences, half as often as fig5b: it reads only the
# interpolated crossing times, and evals are most of a fig5b run's cost (docs/reproduce.md).
LATTICES = {"fig5b_lattice": SubsetLattice("fig5b", ("pt_attention", "layer1", "match", "copy"), "only_l2h3",
                                           ("train.eval_every=2000",))}


# --- planning ---------------------------------------------------------------------------------------------


@dataclass
class Reproduction:
    folder: Path
    scale: float  # --quick: 1 / QUICK_SPEEDUP
    figures: list[str]
    sweeps: dict[str, Sweep]  # preset -> its planned sweep
    toy_iterations: int
    analysis_sequences: int
    workers: int = 1  # pack jobs running at once on this machine
    quick: bool = False

    @property
    def presets(self) -> list[str]:
        return list(self.sweeps)


def plan_reproduction(args: list[str], scale: float = 1.0, out: Path | None = None, max_pack_runs: int = 0,
                      allow_callbacks: bool = False, on_run=None, retry_failed: bool = False,
                      quick: bool = False) -> Reproduction:
    """Figures and overrides from the command line -> every preset's sweep, planned and validated
    (nothing written). `args`: figure names (3 4b 5b 6 8 15 17 toy) and Hydra overrides (with =);
    `allow_callbacks`, `on_run` and `retry_failed` as sweep.plan_sweep takes them; `quick`: the quick
    mode (QUICK_SPEEDUP) instead of a scale."""
    figures = [a for a in args if "=" not in a] or list(FIGURES)
    overrides = [a for a in args if "=" in a]
    if unknown := [f for f in figures if f not in FIGURES]:
        raise ConfigError(f"unknown figure(s) {', '.join(unknown)}: choose from {' '.join(FIGURES)}")
    if not 0 < scale <= 1:  # also NaN
        raise ConfigError(f"--scale {scale:g} must lie in (0, 1]")
    if quick and scale != 1:
        raise ConfigError("--quick sets its own scale: give --quick or --scale, not both")
    scale, lr_factor = (1 / QUICK_SPEEDUP, QUICK_SPEEDUP) if quick else (scale, 1)
    if any(o.lstrip("+~").split("=", 1)[0] in ("experiment", SWEEP_DIR) for o in overrides):
        raise ConfigError("reproduce chooses experiment= and hydra.sweep.dir itself (use --out for the folder)")
    check_hydra_overrides(overrides, SWEEP_DIR, launches=True)  # also when only the toy model runs
    parsed = parse(overrides)
    run_args = [o.input_line for o in parsed if not o.is_hydra_override()]
    fixed = [o.input_line for o in parsed if not o.is_hydra_override() and not o.is_sweep_override()]
    given = {o.key_or_group.lstrip("+~") for o in parsed}
    root = Path(out) if out else outputs_root() / "reproduce"
    kind = "quick" if quick else "full" if scale == 1 else f"scale-{scale:g}"
    folder = root / (kind + (f"_{folder_name(','.join(run_args))}" if run_args else ""))
    check_folder_path(folder, "--out")
    check_report_dir(folder / "report")  # now, not after hours of training
    presets = list(dict.fromkeys(p for f in figures for p in FIGURES[f]))
    sweeps = {}
    for preset in presets:
        lattice = LATTICES.get(preset)
        experiment, settings = (lattice.experiment, list(lattice.settings)) if lattice else (preset, [])
        as_is = scale == 1 or (quick and preset in QUICK_AS_IS)
        scaled = [] if as_is else scaled_overrides(experiment, [*settings, *fixed], scale, given, lr_factor)
        sweeps[preset] = plan_sweep([f"experiment={experiment}", *settings, *scaled, *overrides,
                                     *(lattice.base_override() if lattice else []), f"{SWEEP_DIR}={quote(str(folder / preset))}"],
                                    max_pack_runs, allow_callbacks, on_run, retry_failed, lattice.subsets if lattice else None)
    n_jobs = sum(len(sweep.packs) for sweep in sweeps.values())
    if "hydra/launcher" not in given and min(n_jobs, available_cores()) > 1:  # its packs are long: side by side
        for sweep in sweeps.values():
            sweep.launcher_overrides = [*PARALLEL_LAUNCHER, *sweep.launcher_overrides]
    workers = jobs_per_machine(compose_pack_job(next(iter(sweeps.values())).launcher_overrides), n_jobs) if sweeps else 1
    toy_iterations = defaults.TOY["iterations"] if quick else max(MIN_TOY_ITERATIONS, round(defaults.TOY["iterations"] * scale))
    return Reproduction(folder.resolve(), scale, figures, sweeps, toy_iterations,
                        max(MIN_ANALYSIS_SEQUENCES, round(ANALYSIS_SEQUENCES * scale)), workers, quick)


def scaled_overrides(preset: str, fixed: list[str], scale: float, given: set[str], lr_factor: float = 1) -> list[str]:
    """train.* (and eval.sparse_every, eval.n_sequences) overrides shortening `preset` by `scale`,
    and optim.lr times `lr_factor` (keys the user set stay theirs). Minimums: a run and an eval
    interval of at least one batch; at most about SCALED_EVAL_POINTS regular eval points of at most
    SCALED_EVAL_SEQUENCES sequences per evaluator, and at most QUICK_CHECKPOINTS checkpoints per run
    (the report reads only the final one), checkpoints no denser than evals. torch.compile as
    train.compile=auto decides for the shorter runs."""
    cfg, _ = compose_config([f"experiment={preset}", *fixed])
    train, batch = cfg.train, cfg.train.batch_size
    sequences = max(batch, round(train.sequences * scale / batch) * batch)
    eval_every = max(batch, round(train.eval_every * scale), math.ceil(sequences / SCALED_EVAL_POINTS / batch) * batch)
    values = {"optim.lr": f"{cfg.optim.lr * lr_factor:.6g}", "train.compile": "auto",
              "train.sequences": sequences, "train.eval_every": eval_every,
              "eval.sparse_every": max(SPARSE_EVAL_SPACING * eval_every, round(cfg.eval.sparse_every * scale)),
              "eval.n_sequences": min(cfg.eval.n_sequences, SCALED_EVAL_SEQUENCES),
              "train.ckpt_every": max(eval_every, sequences // QUICK_CHECKPOINTS, round(train.ckpt_every * scale)),
              "train.eval_at": sorted({min(sequences, round(s * scale)) for s in train.eval_at}),
              "train.ckpt_at": sorted({min(sequences, round(s * scale)) for s in train.ckpt_at})}
    return [f"{key}={value}".replace(" ", "") for key, value in values.items()
            if key not in given and (key != "optim.lr" or lr_factor != 1)]


def estimate_seconds(sweep: Sweep) -> float:
    """Training time of a sweep's packs one after another (sweep.pack_seconds)."""
    return sum(map(pack_seconds, sweep.packs))


def estimate_wall_seconds(repro: Reproduction) -> float:
    """Training time of every pack job on `repro.workers` workers, the longest first (pack_jobs)."""
    return makespan([pack_seconds(sweep.packs[i]) for sweep, i in pack_jobs(list(repro.sweeps.values()))], repro.workers)


# --- the data of a reproduction ------------------------------------------------------------------------------


class Results:
    """Runs, timing tables and checkpoints of the presets that ran (lazily loaded, cached)."""

    def __init__(self, repro: Reproduction):
        self.repro = repro

    @functools.cache  # noqa: B019 (a Results lives for one report)
    def runs(self, preset: str) -> list[timing.Run] | None:
        folder = self.repro.folder / preset
        if preset not in self.repro.sweeps or not folder.is_dir():
            return None
        try:
            runs = [r for r in timing.find_runs([folder]) if r.evals is not None]
        except UserError:
            return None
        return sorted(runs, key=lambda r: r.name) or None

    @functools.cache  # noqa: B019
    def timing(self, preset: str) -> pd.DataFrame | None:
        """fsl_train timing per run (timing.crossings), with a `plateau_fraction` column."""
        runs = self.runs(preset)
        if runs is None:
            return None
        table = timing.timing_table(runs)
        train = table[table.evaluator == "fsl_train"].reset_index(drop=True)
        return train.assign(crossing=crossing_times(train), plateau_fraction=plateau_fraction(train))

    def final(self, preset: str, evaluator: str) -> pd.Series:
        """Final loss of every run of `preset` on `evaluator`, by run name."""
        return pd.Series({r.name: float(r.evals[r.evals.evaluator == evaluator].sort_values("sequences")["loss"].iloc[-1])
                          for r in self.runs(preset) if evaluator in r.evaluators})

    @functools.cache  # noqa: B019
    def config(self, preset: str, run_name: str):
        return RunFiles(self.repro.folder / preset / run_name).read_config()

    @functools.cache  # noqa: B019
    def fig3_subject(self) -> tuple[circuits.Subject, object, bool] | None:
        """The first fig3 run's newest checkpoint, the training sequences its analyses use and
        whether they are the whole training distribution."""
        runs = self.runs("fig3")
        if runs is None:
            return None
        subject = circuits.Subject(runs[0].dir)
        return subject, *circuits.training_distribution(subject.task, self.repro.analysis_sequences)

    def available(self, name: str) -> bool:
        """Whether a preset (or "toy") has results to judge: runs, and for a LATTICES preset its lattice."""
        if name == "toy":
            return self.toy() is not None
        return (self.lattice(name) if name in LATTICES else self.runs(name)) is not None

    @functools.cache  # noqa: B019
    def lattice(self, preset: str) -> tuple[report.Report, dict[str, pd.DataFrame]] | None:
        """The subset-lattice analysis of a LATTICES preset (subsets.subsets_report): its report and tables."""
        if self.runs(preset) is None:
            return None
        try:
            return subsets.subsets_report(subsets.load(self.repro.folder / preset))
        except UserError:  # no subsets.json yet, no eval rows
            return None

    def toy(self) -> pd.DataFrame | None:
        path = self.repro.folder / "toy" / "toy.parquet"
        return pd.read_parquet(path) if "toy" in self.repro.figures and path.is_file() else None

    def final_induction(self, run: timing.Run) -> pd.Series:
        """Last-layer induction strengths at the last fsl_train eval point, indexed "layer:head"."""
        train = run.evals[run.evals.evaluator == "fsl_train"].sort_values("sequences")
        return last_layer_induction(train).iloc[-1]


def crossing_times(train: pd.DataFrame) -> pd.Series:
    """Interpolated phase-change times; a run that never crossed counts as +inf (later than all)."""
    return train[f"{CROSSING}_interp"].where(~train[f"{CROSSING}_censored"], np.inf)


def plateau_fraction(train: pd.DataFrame) -> pd.Series:
    """Longest stretch within ln 2 ± 0.1 as a fraction of the time to the phase change (or of the run)."""
    horizon = train[f"{CROSSING}_interp"].where(~train[f"{CROSSING}_censored"], train.last_sequences)
    return train.plateau_length / horizon.clip(lower=1)


def last_layer_induction(evals: pd.DataFrame) -> pd.DataFrame:
    """induction.L{last}H{h} columns renamed "last:h"."""
    columns = [c for c in evals.columns if c.startswith("induction.L")]
    last = max(int(c.split("L")[1].split("H")[0]) for c in columns)
    mine = [c for c in columns if c.startswith(f"induction.L{last}H")]
    return evals[mine].rename(columns=lambda c: f"{last}:{c.split('H')[-1]}")


# --- formatting -----------------------------------------------------------------------------------------------


def seq(value: float) -> str:
    """Sequences as the paper writes them (2.7e5); never-crossed runs as 'never'."""
    if value is None or not np.isfinite(value):
        return "never"
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value))
    return f"{value / 10 ** exponent:.2g}e{exponent}"


def spread(values, fmt=seq) -> str:
    """One value, or the median and range over runs (seeds)."""
    values = list(values)
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.median(values)))} ({fmt(min(values))}–{fmt(max(values))}, {len(values)} runs)"


def num(value: float) -> str:
    return f"{value:.3g}"


def spearman(x, y) -> float:
    """Rank correlation (ties averaged); NaN when either side is constant."""
    x, y = pd.Series(list(x), dtype=float).rank(), pd.Series(list(y), dtype=float).rank()
    return float(x.corr(y)) if x.nunique() > 1 and y.nunique() > 1 else float("nan")


def verdict(holds: bool) -> str:
    return "yes" if holds else "no"


# --- findings: the registry, and one small function each -----------------------------------------------


@dataclass
class Finding:
    """One row of the findings table, as a judge fills it in (ihstudy, holds, details)."""

    key: str
    finding: str
    claim: str
    paper: str
    ihstudy: str = "-"
    holds: str = "not run"
    details: pd.DataFrame | None = field(default=None, repr=False)

    def row(self) -> dict:
        return {"finding": self.finding, "claim": self.claim, "paper": self.paper, "ihstudy": self.ihstudy, "holds": self.holds}


@dataclass(frozen=True)
class FindingSpec:
    """A registered finding: see the module docstring."""

    key: str
    title: str
    claim: str
    paper: dict[str, str]
    needs: tuple[str, ...]
    appendix: bool
    judge: Callable[[Results, Finding], None]

    def __call__(self, r: Results) -> Finding:
        """The finding judged on `r`, or left "not run" when a preset (or the toy model) it needs has no results."""
        f = Finding(self.key, self.title, self.claim, "; ".join(f"{what} {value}" for what, value in self.paper.items()))
        if all(r.available(name) for name in self.needs):
            self.judge(r, f)
        return f


FINDINGS: dict[str, FindingSpec] = {}  # key -> finding, in the report's order


def finding(key: str, title: str, claim: str, paper: dict[str, str], needs: tuple[str, ...], appendix: bool = False):
    """Register the decorated judge as finding `key` (see the module docstring)."""
    def register(judge: Callable[[Results, Finding], None]) -> Callable[[Results, Finding], None]:
        FINDINGS[key] = FindingSpec(key, title, claim, paper, needs, appendix, judge)
        return judge
    return register


@finding("1", "1 phase change", "the fsl_train loss plateaus near ln 2, then drops abruptly below 0.4·ln 2",
         paper={"below 0.4·ln 2 at": "~2.7e5", "end losses": "0.005 (train), 0.03 (held-out pairs), 0.12 (held-out classes)"},
         needs=("fig3",))
def phase_change(r: Results, f: Finding) -> None:
    t = r.timing("fig3")
    plateau = t.plateau_fraction >= PLATEAU_FRACTION
    holds = plateau & np.isfinite(t.crossing) & (t.plateau_start < t.crossing)
    ends = {e: r.final("fig3", e) for e in ("fsl_train", "fsl_val_rl", "fsl_test_class")}
    where = (f"plateau {spread(t.plateau_start)}–{spread(t.plateau_end)}" if t.plateau_length.gt(0).all()
             else "no plateau near ln 2 in some run")
    f.ihstudy = (f"{where}; below 0.4·ln 2 at {spread(t.crossing)}; "
                 f"end losses {', '.join(f'{spread(v, num)} ({e})' for e, v in ends.items() if len(v))}")
    f.holds = verdict(bool(holds.all()))
    f.details = t[["run", "plateau_start", "plateau_end", "plateau_fraction", "crossing", "final_loss"]]


@finding("2", "2 several induction heads", "several last-layer heads become induction heads together, during the drop",
         paper={"heads": "all 8", "final strengths": "0.10–0.85", "rise": "together, during the drop"}, needs=("fig3",))
def several_induction_heads(r: Results, f: Finding) -> None:
    t = r.timing("fig3")
    rows = []
    by_run = t.set_index("run")
    for run in r.runs("fig3"):
        timed = by_run.loc[run.name]
        train = run.evals[run.evals.evaluator == "fsl_train"].sort_values("sequences")
        strengths = last_layer_induction(train)
        # the drop: from the plateau's end to the loss below 0.1 (or the run's end), one eval interval slack
        slack = float(np.diff(train.sequences).max()) if len(train) > 1 else 0.0
        start = timed.plateau_end if np.isfinite(timed.plateau_end) else float(train.sequences.iloc[0])
        end = float(train.sequences.iloc[-1]) if timed["0.1_censored"] else timed["0.1_eval"]
        for head, value in strengths.iloc[-1].items():
            reached = np.flatnonzero(strengths[head].to_numpy() >= value / 2) if value > 0 else []
            rise = float(train.sequences.iloc[reached[0]]) if len(reached) else np.nan
            rows.append({"run": run.name, "head": head, "final_strength": value, "half_rise": rise,
                         "during_drop": bool(start - slack <= rise <= end + slack), "drop_start": start, "drop_end": end})
    details = pd.DataFrame(rows)
    heads = details[details.final_strength > INDUCTION_HEAD]
    count = heads.groupby("run").size().reindex(details.run.unique(), fill_value=0)
    f.ihstudy = (f"{spread(count, str)} of {details.groupby('run').size().iloc[0]} heads above {INDUCTION_HEAD}; "
                 f"final strengths {num(details.final_strength.min())}–{num(details.final_strength.max())}; "
                 f"{int(heads.during_drop.sum())} of {len(heads)} induction heads reach half their strength during the drop")
    f.holds = verdict(bool((count >= 2).all() and heads.during_drop.all()))
    f.details = details


@finding("3", "3 redundancy and additivity", "removing any one layer-2 head keeps accuracy; keep-one-head accuracy "
         "rises with strength; the loss falls as heads are added back",
         paper={"remove-one accuracy": "≥ ~0.98", "keep-one": "0.29 → 0.98 with strength",
                "add-back losses": "0.117, 0.044, 0.010, ..."},
         needs=("fig3",))
def redundancy_and_additivity(r: Results, f: Finding) -> None:
    tables = circuits.last_layer_heads(*r.fig3_subject()[:2])
    heads, added, full = tables["heads"], tables["add_back"], float(tables["full_model"].acc.iloc[0])
    rho = spearman(heads.induction, heads.keep_one_acc)
    falling = spearman(added.n_heads, added["loss"])
    redundant = heads.remove_one_acc.min() >= full - REDUNDANT_ACC_DROP
    f.ihstudy = (f"accuracy {num(full)}; remove-one accuracy ≥ {num(heads.remove_one_acc.min())}; keep-one "
                 f"{num(heads.keep_one_acc.min())}–{num(heads.keep_one_acc.max())}, Spearman with strength {num(rho)}; "
                 f"add-back losses {', '.join(num(v) for v in added['loss'].head(4))}, ... (Spearman with heads {num(falling)})")
    f.holds = verdict(bool(redundant and rho > 0 and falling < 0))
    f.details = heads


@finding("4", "4 single-head retraining", "any single layer-2 head trained alone learns the task, later than the full "
         "model; its speed is not predicted by its strength in the full model",
         paper={"single heads": "3.1e5–6.2e5", "full model": "2.7e5"}, needs=("fig4b",))
def single_head_retraining(r: Results, f: Finding) -> None:
    t = r.timing("fig4b")
    head = [kept_head(r.config("fig4b", run).clamp.keep.heads) for run in t.run]
    times = t.crossing.groupby(pd.Series(head, index=t.index)).median()
    f.ihstudy = f"single heads {seq(times.min())}–{seq(times.max())} ({int(np.isfinite(times).sum())} of {len(times)} cross)"
    f.details = pd.DataFrame({"head": times.index, "crossing": times.values})
    full = r.timing("fig3")
    if full is None:
        f.ihstudy += "; full model not run (figure 3)"
        return
    strength = pd.concat([r.final_induction(run) for run in r.runs("fig3")], axis=1).median(axis=1)
    rho = spearman(strength.reindex(times.index), -times)
    f.details["full_model_strength"] = strength.reindex(times.index).values
    f.ihstudy += f" vs full model {spread(full.crossing)}; speed vs full-model strength: Spearman {num(rho)}"
    f.holds = verdict(bool(np.isfinite(times).all() and (times > full.crossing.median()).all()))


def kept_head(heads) -> str:
    """The kept head of a keep_only clamp: "layer:head" as given alone or first in a list."""
    return str(heads if isinstance(heads, str) else heads[0])


@finding("5", "5 layer 1 through layer 2", "layer 1 acts only through layer 2; previous-token heads matter through Q/K, "
         "the other layer-1 heads through V",
         paper={"direct path": "~0.01% accuracy", "value-preserving ablation of PT heads": "0.70",
                "pattern-preserving ablation of the others": "0.34"}, needs=("fig3",))
def layer1_through_layer2(r: Results, f: Finding) -> None:
    subject, batch, _ = r.fig3_subject()
    roles = circuits.first_layer_roles(subject, batch)
    model = subject.model([subject.step], 2)  # run 0 as trained, run 1 without layer 1's direct path
    hooks = circuits.direct_path_hooks(0, subject.last, torch.tensor([0.0, 1.0]))
    result = circuits.evaluate(model, subject.clamp_set([{}, {}]), batch, subject.shape.n_labels, hooks)
    full, direct = float(result["acc"][0]), float(result["acc"][1] - result["acc"][0])
    pt = roles[roles.heads.str.startswith("PT heads")]
    other = roles[roles.heads.str.startswith("other heads")]
    qk = float(pt.value_preserved_acc.iloc[0]) if len(pt) else np.nan
    v = float(other.pattern_preserved_acc.iloc[0]) if len(other) else np.nan
    f.ihstudy = (f"accuracy {num(full)}; direct path of layer 1 changes it by {direct:+.4f}; "
                 f"{pt.heads.iloc[0] if len(pt) else 'no PT heads'}: value-preserving ablation {num(qk)}; "
                 f"{other.heads.iloc[0] if len(other) else 'no other heads'}: pattern-preserving ablation {num(v)}")
    f.holds = verdict(bool(abs(direct) <= DIRECT_PATH_ACC and qk <= full - ROLE_ACC_DROP and v <= full - ROLE_ACC_DROP))
    f.details = roles


SMOOTH = {"match", "layer1_copy"}  # one subcircuit left to learn: no plateau


def medians(t: pd.DataFrame, keys) -> pd.DataFrame:
    """Median crossing time (and its range over seeds) and plateau fraction per group (never crossed: +inf)."""
    return t.groupby(keys).agg(crossing=("crossing", "median"), crossing_min=("crossing", "min"),
                               crossing_max=("crossing", "max"), plateau_fraction=("plateau_fraction", "median"),
                               runs=("run", "size"))


@finding("6", "6 Fig-5b clamps", "every clamp makes the phase change earlier, in the order none > PT attention > layer 1 > "
         "copy > match ≈ layer 1 + copy; a plateau only while two or more subcircuits learn",
         # crossing time per clamp condition (conf/experiment/fig5b.yaml), slowest first: the order judged
         paper={"only_l2h3": "3.3e5", "pt_attention": "2.2e5", "layer1": "0.8e5", "copy": "0.4e5", "match": "0.33e5",
                "layer1_copy": "0.29e5"}, needs=("fig5b",))
def fig5b_clamps(r: Results, f: Finding) -> None:
    t = r.timing("fig5b")
    order = list(FINDINGS["6"].paper)
    m = medians(t.assign(clamp=t["config.clamp"].astype(str)), "clamp").reindex(order)
    times = m.crossing
    earlier = all(times[c] < times[order[0]] for c in order[1:])
    swapped = [f"{a} < {b}" for i, a in enumerate(order) for b in order[i + 1:]
               if {a, b} != SMOOTH and times[a] < times[b]]
    m["plateau"] = m.plateau_fraction >= PLATEAU_FRACTION
    plateaus_right = all(m.plateau[c] == (c not in SMOOTH) for c in order)
    f.ihstudy = (", ".join(f"{c} {seq(times[c])}" for c in order) + f"; swapped pairs: {'; '.join(swapped) or 'none'}; "
                 f"plateau in: {', '.join(c for c in order if m.plateau[c]) or 'none'}")
    f.holds = verdict(bool(earlier and not swapped and plateaus_right))
    f.details = m.reset_index()


@finding("7", "7 toy model", "a rank-1 3-tensor fit plateaus, then drops; clamping c shortens the plateau, "
         "clamping b and c removes it",
         paper={"plateau unclamped": "~800 iterations", "c clamped": "shorter", "b, c clamped": "none"}, needs=("toy",))
def toy_model(r: Results, f: Finding) -> None:
    fits = {c: (np.inf if i is None else i) for c, i in toy.fit_iterations(r.toy()).items()}
    f.ihstudy = "iterations to fit (loss < 1% of predicting zero): " + ", ".join(
        f"{'unclamped' if c == 'none' else c + ' clamped'} {'never' if np.isinf(i) else int(i)}" for c, i in fits.items())
    f.holds = verdict(bool(fits["none"] > fits["c"] > fits["bc"]))
    f.details = pd.DataFrame({"condition": list(fits), "fit_iteration": list(fits.values())})


@finding("8", "8 data dependence", "more labels delay the phase change strongly (also with match clamped: through "
         "subcircuit C); more classes delay it modestly (also with layer 1 + copy clamped: through subcircuit B)",
         paper={"labels 5/10/15": "3.1e5/8.8e5/1.43e6", "classes 50/100/200": "3.1e5/3.9e5/4.2e5"},
         needs=("fig6_long", "fig6_clamps"))
def data_dependence(r: Results, f: Finding) -> None:
    long, clamped = task_sizes(r, "fig6_long"), task_sizes(r, "fig6_clamps")
    base = {"labels": long.labels.min(), "classes": long.classes.min()}  # the default task: 5 labels, 50 classes
    varied = {"labels": "classes", "classes": "labels"}  # each series varies one size at the other's base value
    series = {f"{what} (long runs)": medians(long[long[fixed] == base[fixed]], what).crossing for what, fixed in varied.items()}
    fig5b = r.timing("fig5b")
    fig5b = {} if fig5b is None else medians(fig5b.assign(clamp=fig5b["config.clamp"].astype(str)), "clamp").crossing
    for clamp, what in (("match", "labels"), ("layer1_copy", "classes")):
        runs = clamped[(clamped["config.clamp"].astype(str) == clamp) & (clamped[varied[what]] == base[varied[what]])]
        at_base = pd.Series({base[what]: fig5b.get(clamp, np.nan)})  # the default task's run of this clamp is fig5b's
        series[f"{what} ({clamp} clamped)"] = pd.concat([at_base, medians(runs, what).crossing]).sort_index()
    parts, monotone = [], []
    for name, s in series.items():
        present = s.dropna()
        values = present.to_numpy()
        rising = len(values) >= 2 and all(a < b for a, b in zip(values, values[1:]))  # never crossed: +inf
        monotone.append(rising)
        sizes, times = "/".join(str(int(k)) for k in s.index), "/".join(seq(v) if not np.isnan(v) else "not run" for v in s)
        parts.append(f"{name} {sizes}: {times}{'' if rising else ' (not rising)'}")
    f.ihstudy = "; ".join(parts)
    f.holds = verdict(all(monotone))
    f.details = pd.DataFrame([{"series": name, **s.to_dict()} for name, s in series.items()])


def task_sizes(r: Results, preset: str) -> pd.DataFrame | None:
    """The preset's timing table with each run's label count and train class count (its saved task config)."""
    t = r.timing(preset)
    if t is None:
        return None
    tasks = [r.config(preset, run).task for run in t.run]
    return t.assign(labels=[task.n_labels for task in tasks], classes=[task.class_split[0] for task in tasks])


@finding("fig8", "appendix: Fig. 8", "clamping previous-token attention on some layer-1 heads speeds learning, on all 8 slows it",
         paper={"faster than none with": "L1H6 or L1H1,2,5 clamped", "slower with": "all 8"}, needs=("fig8",), appendix=True)
def fig8_previous_token_clamps(r: Results, f: Finding) -> None:
    t = r.timing("fig8")
    count = [len(r.config("fig8", run).clamp.pt_attention.heads) for run in t.run]
    times = t.crossing.groupby(pd.Series(count, index=t.index)).median()
    f.ihstudy = ", ".join(f"{n} head{'s' * (n > 1)} clamped {seq(v)}" for n, v in times.items())
    f.details = pd.DataFrame({"heads_clamped": times.index, "crossing": times.values})
    base = r.timing("fig5b")
    if base is None:
        f.ihstudy += "; none (figure 5b) not run"
        return
    none = base.crossing[base["config.clamp"].astype(str) == "only_l2h3"].median()
    all_heads = max(times.index)
    f.ihstudy += f"; none {seq(none)}"
    f.holds = verdict(bool(all(times[n] < none for n in times.index if n < all_heads) and times[all_heads] > none))


@finding("fig15", "appendix: Fig. 15", "a stronger clamped match makes the phase change earlier; an anti-induction match "
         "(strength < 0) fits training pairs but fails held-out pairs", paper={"crossing time": "falls with match strength"},
         needs=("fig15",), appendix=True)
def fig15_match_strength(r: Results, f: Finding) -> None:
    t = r.timing("fig15")
    strength = pd.Series([2 * float(r.config("fig15", run).clamp.match.strength) - 1 for run in t.run], index=t.index)
    train, held_out = r.final("fig15", "fsl_train").reindex(t.run).values, r.final("fig15", "fsl_val_rl").reindex(t.run).values
    details = pd.DataFrame({"run": t.run, "induction_strength": strength, "crossing": t.crossing,
                            "final_train_loss": train, "final_held_out_pairs_loss": held_out})
    positive, anti = details[details.induction_strength > 0], details[details.induction_strength < 0]
    rho = spearman(positive.induction_strength, positive.crossing)
    fits = bool(len(anti) and (anti.final_train_loss < PHASE_CHANGE_THRESHOLD).all())
    fails = bool(len(anti) and (anti.final_held_out_pairs_loss > LN2).all())
    f.ihstudy = (f"Spearman(strength, crossing) over strengths > 0: {num(rho)}; strengths < 0: train loss "
                 f"{spread(anti.final_train_loss, num)}, held-out pairs {spread(anti.final_held_out_pairs_loss, num)}"
                 if len(anti) else f"Spearman(strength, crossing) {num(rho)}; no anti-induction run")
    f.holds = verdict(bool(rho < 0 and fits and fails))
    f.details = details


@finding("fig17", "appendix: Fig. 17", "copy circuits are label-specific and complementary across heads (L2H3 trained "
         "with one other head)", paper={"each head": "copies some labels well, its partner the others"}, needs=("fig17",),
         appendix=True)
def fig17_copy_circuits(r: Results, f: Finding) -> None:
    rows = []
    for run in r.runs("fig17"):  # per pair: per-label accuracy with one head kept, under a perfect match (its copy circuit alone)
        subject = circuits.Subject(run.dir)
        batch, _ = circuits.training_distribution(subject.task, r.repro.analysis_sequences)
        heads = [str(h) for h in subject.cfg.clamp.keep.heads]
        conditions = [{"keep": {"kind": "keep_only", "heads": [h]}} | circuits.perfect_match(subject) for h in heads]
        result = circuits.evaluate(subject.model([subject.step], len(heads)), subject.clamp_set(conditions), batch,
                                   subject.shape.n_labels)
        per_label = result["label_acc"]  # [2 heads, labels]
        rows.append({"run": run.name, "heads": " + ".join(heads),
                     "label_range": float((per_label.max(1) - per_label.min(1)).min()),
                     "alone": float(per_label.mean(1).max()), "together": float(per_label.max(0).mean())})
    details = pd.DataFrame(rows)
    specific = details.label_range >= LABEL_SPECIFIC
    complementary = details.together - details.alone >= COMPLEMENTARY_GAIN
    f.ihstudy = (f"{int(specific.sum())} of {len(details)} pairs label-specific (per-label accuracy of each head spans ≥ "
                 f"{LABEL_SPECIFIC}), {int(complementary.sum())} complementary (the better head per label beats the better "
                 f"head overall by ≥ {COMPLEMENTARY_GAIN} accuracy)")
    f.holds = verdict(bool(specific.all() and complementary.all()))
    f.details = details


# --- running the toy model and writing the report ------------------------------------------------------------


def run_toy(repro: Reproduction) -> None:
    """The toy model's conditions into <reproduction>/toy (skipped when done)."""
    folder = repro.folder / "toy"
    if "toy" not in repro.figures or (folder / "toy.json").is_file():
        return
    settings = defaults.TOY | {"iterations": repro.toy_iterations}
    table = toy.run_conditions(settings["conditions"], settings["dim"], settings["lr"], settings["iterations"], settings["seed"])
    toy.write_toy(table, folder, settings)


def markov_runs(r: Results, prior: str) -> list[pd.DataFrame]:
    """Eval tables of the markov_prior runs whose saved config has task.prior == `prior` (dirichlet | doubly_stochastic)."""
    return [run.evals for run in r.runs("markov_prior") or [] if RunFiles(run.dir).read_config().task.get("prior") == prior]


def judge_every_dirichlet_run(r: Results, f: Finding, judge: Callable[[pd.DataFrame], tuple[bool, str]]) -> None:
    """The finding holds if `judge` holds for every Dirichlet-prior run; what each run shows, joined."""
    judged = [judge(evals) for evals in markov_runs(r, "dirichlet")]
    f.ihstudy = " | ".join(what for _, what in judged)
    f.holds = verdict(bool(judged) and all(holds for holds, _ in judged))


@finding("markov1", "Markov: three phases", "the predictions pass from uniform to the in-context unigram and then to the "
         "in-context bigram strategy (the closest by KL), in that order",
         paper={"phases": "uniform, unigram, then a rapid transition to bigram"}, needs=("markov_prior",))
def markov_three_phases(r: Results, f: Finding) -> None:
    judge_every_dirichlet_run(r, f, markov_findings.three_phases_in_order)


@finding("markov2", "Markov: statistical induction head", "in the bigram phase the first layer attends to the previous "
         "token and the second to the positions after earlier occurrences of the current state",
         paper={"circuit": "previous-token head in layer 1, statistical induction head in layer 2"}, needs=("markov_prior",))
def markov_induction_head(r: Results, f: Finding) -> None:
    judge_every_dirichlet_run(r, f, markov_findings.statistical_induction_head)


@finding("markov3", "Markov: unigrams delay bigrams", "a prior whose chains have uniform stationary distributions "
         "(doubly stochastic) reaches the bigram solution sooner",
         paper={"doubly stochastic prior": "bigram phase sooner"}, needs=("markov_prior",))
def markov_doubly_stochastic(r: Results, f: Finding) -> None:
    holds, f.ihstudy = markov_findings.doubly_stochastic_sooner(markov_runs(r, "dirichlet"),
                                                                markov_runs(r, "doubly_stochastic"))
    f.holds = verdict(holds)


# --- what needs to go right: the subset lattices (LATTICES) -----------------------------------------------


def register_lattice_findings(preset: str, title: str, paper_factors: dict[str, float] | None) -> None:
    """Two findings of a LATTICES preset: which clamps hold the phase change back (ranked against
    `paper_factors`, the paper's time with each clamp alone over its time with none; None: no paper
    numbers) and whether a composition rule predicts held-out subsets."""
    clamps = ", ".join(LATTICES[preset].clamps)
    paper = ({"alone, time vs none (Fig. 5b)": ", ".join(f"{c} x{v:.2g}" for c, v in sorted(paper_factors.items(),
                                                                                        key=lambda kv: kv[1])),
              "over the lattice": "not measured"} if paper_factors else {"lattice": "not in the paper"})
    finding(preset, f"{title}: bottlenecks", f"every clamp ({clamps}) shortens formation in every context it is added to; "
            f"averaged over the lattice, they rank as the paper's single clamps do", paper=paper,
            needs=(preset,))(functools.partial(lattice_bottlenecks, preset, paper_factors))
    finding(f"{preset}_rules", f"{title}: composition", "a simple rule (additive in log time, slowest sets the pace, rates "
            "add) predicts a subset's time from the others' (the paper leaves open whether the clamped times predict the "
            "unclamped one)", paper={"composition": "not tested in the paper"},
            needs=(preset,))(functools.partial(lattice_composition, preset))


def lattice_bottlenecks(preset: str, paper_factors: dict[str, float] | None, r: Results, f: Finding) -> None:
    """Holds if every clamp's effect over the lattice is 'shortens' and they rank as in the paper."""
    effects = r.lattice(preset)[1]["effects"]  # most shortening first
    ranked = list(effects.dropna(subset=["estimate"]).clamp)
    paper_rank = sorted(paper_factors, key=paper_factors.get) if paper_factors else ranked
    f.ihstudy = ("; ".join(f"{row.clamp} x{row.factor:.2g}" + ("" if row.bound == "exact" else f" ({row.bound})")
                           for row in effects.itertuples() if np.isfinite(row.estimate))
                 + f" (time with / without, mean over contexts); ranked {' > '.join(ranked)}" if ranked
                 else "no effect measured")
    if not_shortening := [f"{row.clamp} {row.verdict}" for row in effects.itertuples() if row.verdict != "shortens"]:
        f.ihstudy += f"; not shortening: {', '.join(not_shortening)}"
    f.holds = verdict(not not_shortening and ranked == [c for c in paper_rank if c in ranked])


def lattice_composition(preset: str, r: Results, f: Finding) -> None:
    """Holds if the best rule's median held-out error factor is at most PREDICTS_WITHIN."""
    rules = r.lattice(preset)[1]["composition"].dropna(subset=["median_factor"])  # best first
    if rules.empty:
        f.ihstudy, f.holds = "too few crossed subsets to fit a rule", verdict(False)
        return
    best = rules.iloc[0]
    empty = ("unclamped subset: never crossed" if best.empty_subset_censored or np.isnan(best.empty_subset_factor)
             else f"unclamped subset within x{best.empty_subset_factor:.2f}")
    f.ihstudy = (f"best: {best['rule']}, held-out error x{best.median_factor:.2f} median (mean x{best.mean_factor:.2f}) "
                 f"over {best.held_out} (subset, seed) pairs, {empty}; "
                 + ", ".join(f"{row.rule} x{row.median_factor:.2f}" for row in rules.iloc[1:].itertuples()))
    f.holds = verdict(bool(best.median_factor <= PREDICTS_WITHIN))


def paper_factors_fig5b() -> dict[str, float]:
    """Finding 6's paper times of the lattice's clamps over the paper's none (the lattice's base)."""
    times, lattice = FINDINGS["6"].paper, LATTICES["fig5b_lattice"]
    return {c: float(times[c]) / float(times[lattice.base]) for c in lattice.clamps}


register_lattice_findings("fig5b_lattice", "what needs to go right (Fig-5b clamps)", paper_factors_fig5b())


def findings(r: Results) -> list[Finding]:
    """Every main finding (not run if its presets were not chosen), and the appendix findings whose presets were."""
    return [spec(r) for spec in FINDINGS.values() if not spec.appendix or all(p in r.repro.sweeps for p in spec.needs)]


def build_report(repro: Reproduction) -> tuple[report.Report, pd.DataFrame]:
    """The findings table (one row per finding), each finding's details, and the main figures."""
    r = Results(repro)
    found = findings(r)
    table = pd.DataFrame([f.row() for f in found])
    out = report.Report("Reproducing Singh et al. (ICML 2024): the findings of docs/science.md §5")
    if repro.quick:
        out.notes.append(f"**Quick mode**: the paper's figure presets with their time compressed {QUICK_SPEEDUP}x (learning "
                         f"rate x{QUICK_SPEEDUP}, every run 1/{QUICK_SPEEDUP} as long; {', '.join(QUICK_AS_IS)} as it is), "
                         f"so the times are in compressed sequences; docs/reproduce.md compares its verdicts with the "
                         f"full run's. Run without --quick to reproduce.")
    elif repro.scale != 1:
        out.notes.append(f"**Quick look at scale {repro.scale:g}**: every run is {repro.scale:g}x the paper's length "
                         f"(evals and checkpoints scaled alike), so the phase changes may not happen and the verdicts "
                         f"need not hold; run without --scale to reproduce.")
    out.notes.append(f"figures: {' '.join(repro.figures)}; presets: {' '.join(repro.presets) or 'none'} "
                     f"(sweeps in {repro.folder})")
    runs = [run for preset in repro.presets for run in (r.runs(preset) or [])]
    if unfinished := [f"{run.dir.parent.name}/{run.name} ({run.status})" for run in runs if run.status != "completed"]:
        out.notes.append(f"not completed, analysed up to their last eval point: {', '.join(unfinished)}")
    out.notes.append("'holds' is computed from the runs (the judging rules are in ihstudy/analysis/reproduce.py); 'not run': "
                     "the figure needed was not chosen or has no eval rows yet. Times are sequences until the fsl_train "
                     "loss falls below 0.4·ln 2 (interpolated), medians over seeds.")
    if (loaded := r.fig3_subject()) is not None:
        subject, batch, enumerated = loaded
        out.notes.append(f"findings 3 and 5 analyse {subject.dir.name}'s checkpoint at {subject.step * subject.batch_size:,} "
                         f"sequences, {report.sequences_note(batch, enumerated)}")
    out.table("findings", table, "One row per finding: the paper's claim and numbers (Omniglot), what these runs give, "
                                 "and whether the qualitative claim holds.")
    for f in found:
        if f.details is not None:
            out.table(f"finding_{f.key}", f.details, f.claim)
    add_figures(out, r)
    for preset in (p for p in LATTICES if p in repro.sweeps):
        add_lattice(out, preset, r.lattice(preset))
    return out, table


def add_lattice(out: report.Report, preset: str, analysed: tuple[report.Report, dict] | None) -> None:
    """The subset analysis of a LATTICES preset (`ihstudy analyze subsets` on its folder) as a section:
    its findings in words among the notes, its tables and figures named `<preset>_...`."""
    lattice = LATTICES[preset]
    head = (f"What needs to go right ({preset}: every subset of {', '.join(lattice.clamps)}"
            + (f" on top of {lattice.base}" if lattice.base else "") + ", docs/subsets.md)")
    if analysed is None:
        out.notes.append(f"{head}: no runs with eval rows yet")
        return
    sub, _ = analysed
    out.notes += [f"{head}: {sub.notes[0]}" if sub.notes else head, *sub.notes[1:]]
    for name, frame, sentence in sub.tables:
        out.table(f"{preset}_{name}", frame, sentence)
    for name, fig, caption in sub.figures:
        out.figure(f"{preset}_{name}", fig, caption)


def add_figures(out: report.Report, r: Results) -> None:
    if runs := r.runs("fig3"):
        t = r.timing("fig3")
        crossing = float(t.crossing.iloc[0])
        out.figure("fig3", report.plot_run(runs[0].evals, runs[0].name, crossing if np.isfinite(crossing) else None),
                   "Fig. 3: loss per evaluator, last-layer induction strengths, first-layer previous-token scores.")
    long = task_sizes(r, "fig6_long")
    data_order = [] if long is None else list(dict.fromkeys(long.sort_values(["classes", "labels"])["config.task"].astype(str)))
    orders = {"fig5b": ("config.clamp", list(FINDINGS["6"].paper)), "fig6_long": ("config.task", data_order)}
    for preset, (key, order) in orders.items():
        if (t := r.timing(preset)) is not None:
            by_name = {run.name: run for run in r.runs(preset)}
            curves = [(str(group), by_name[name].evals[by_name[name].evals.evaluator == "fsl_train"].sort_values("sequences"))
                      for name, group in zip(t.run, t[key])]
            present = [g for g in order if g in {c for c, _ in curves}]
            out.figure(preset, report.plot_curves(curves, present, key.removeprefix("config.")),
                       f"{preset}: fsl_train loss of every run.")


def write_reproduction_report(repro: Reproduction, fmt: str = "png") -> tuple[Path, pd.DataFrame]:
    built, table = build_report(repro)
    return report.write_report(built, repro.folder / "report", fmt), table
