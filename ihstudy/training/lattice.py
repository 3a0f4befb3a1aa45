"""Subset sweeps: every subset of k named clamp presets in one sweep (docs/subsets.md).

    ihstudy sweep --subsets clamp=pt_attention,layer1,match,copy clamp=only_l2h3 seed=5,6,7

A subset applies the union of its presets' named clamps, on top of the base presets every subset
shares (the command line's own `clamp=...`, here only_l2h3: the Fig-5b convention of keeping only
L2H3). The empty subset is the base alone. A subset whose presets cannot be applied together (two
presets giving one clamp name different specs, or a clamp another makes do nothing: build_clamps)
is skipped and listed with the reason. The sweep folder's subsets.json records the lattice for
`ihstudy analyze subsets`.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from ihstudy.config import compose_config, compose_with_hydra, config_groups
from ihstudy.errors import ConfigError

GROUP = "clamp"
LATTICE = "subsets.json"
MAX_CLAMPS = 6  # 64 subsets: beyond that, the lattice figure and the number of runs stop being useful
EMPTY = "none"  # the label of the empty subset


@dataclass
class Lattice:
    clamps: list[str]  # the k presets whose subsets are swept, in the order given
    base: list[str]  # presets every subset includes
    skipped: dict[tuple[str, ...], str] = field(default_factory=dict)  # subset -> why it cannot be applied

    def subsets(self) -> list[tuple[str, ...]]:
        """All 2^k subsets, by size, each in the order the clamps were given."""
        return [s for n in range(len(self.clamps) + 1) for s in itertools.combinations(self.clamps, n)]

    def value(self, subset: tuple[str, ...]) -> str:
        """The `clamp=` override value of a subset."""
        presets = [*self.base, *subset]
        return f"[{','.join(presets)}]" if presets else EMPTY

    def override(self, subset: tuple[str, ...]) -> str:
        return f"{GROUP}={self.value(subset)}"

    def kept(self) -> list[tuple[str, ...]]:
        return [s for s in self.subsets() if s not in self.skipped]

    def to_json(self, runs) -> str:
        """subsets.json: the lattice and, for each subset, its runs (sweep Run objects) or why it was skipped."""
        of_override = {self.override(s): s for s in self.subsets()}
        members = {s: [] for s in self.subsets()}
        for run in runs:
            members[next(of_override[o] for o in run.overrides if o in of_override)].append(run.name)
        return json.dumps({"group": GROUP, "clamps": self.clamps, "base": self.base,
                           "subsets": [{"clamps": list(s), "label": label(s), "override": self.override(s),
                                        "runs": members[s], "skipped": self.skipped.get(s)} for s in self.subsets()]},
                          indent=1)


def label(subset) -> str:
    return "+".join(subset) or EMPTY


def subset_sweep(spec: str, run_args: list[str]) -> tuple[Lattice, list[str]]:
    """Parse `--subsets clamp=A,B,...`; returns the lattice and the run overrides with the base
    `clamp=...` replaced by a sweep over every subset (which wins over an experiment preset's clamp sweep)."""
    key, _, names = spec.partition("=")
    if key.strip() != GROUP or not names.strip():
        raise ConfigError(f"--subsets takes {GROUP}=A,B,... (presets of conf/{GROUP}), not '{spec}'")
    clamps = [n.strip() for n in names.split(",")]
    known = dict(config_groups()).get(GROUP, [])
    for name in clamps:
        if name not in known or name == EMPTY:
            raise ConfigError(f"--subsets: '{name}' is not a {GROUP} preset (known: {', '.join(n for n in known if n != EMPTY)})")
    if len(set(clamps)) != len(clamps) or not 1 <= len(clamps) <= MAX_CLAMPS:
        raise ConfigError(f"--subsets names 1 to {MAX_CLAMPS} different presets, got {', '.join(clamps)}")
    base, rest = [], []
    for arg in run_args:
        if arg.split("=", 1)[0] == GROUP:
            base = base_presets(arg.split("=", 1)[1], known)
        else:
            rest.append(arg)
    if overlap := [n for n in clamps if n in base]:
        raise ConfigError(f"--subsets: {', '.join(overlap)} is also in the base {GROUP}={','.join(base)}")
    lattice = Lattice(clamps, base)
    lattice.skipped = {s: reason for s in lattice.subsets() if (reason := entry_conflict([*base, *s]))}
    return lattice, [*rest, f"{GROUP}={','.join(lattice.value(s) for s in lattice.subsets())}"]


def base_presets(value: str, known: list[str]) -> list[str]:
    """The presets of a base `clamp=NAME` or `clamp=[A,B]`; a sweep (A,B) is refused."""
    names = [n.strip() for n in value.strip().removeprefix("[").removesuffix("]").split(",") if n.strip()]
    if "," in value and not value.strip().startswith("["):
        raise ConfigError(f"--subsets sweeps {GROUP} itself: give one base {GROUP}=NAME or {GROUP}=[A,B], not a sweep")
    for name in names:
        if name not in known:
            raise ConfigError(f"{GROUP}={value}: '{name}' is not a {GROUP} preset")
    return [n for n in names if n != EMPTY]


def entry_conflict(presets: list[str]) -> str | None:
    """Why these presets cannot be merged: two of them give one clamp name different specs."""
    owner: dict[str, tuple[str, dict]] = {}
    for preset in presets:
        for name, spec in preset_clamps(preset).items():
            if name in owner and owner[name][1] != spec:
                return f"{owner[name][0]} and {preset} both set {GROUP}.{name}, differently"
            owner[name] = (preset, spec)
    return None


@functools.cache
def preset_clamps(preset: str) -> dict:
    return OmegaConf.to_container(compose_with_hydra([f"{GROUP}={preset}"])[GROUP], resolve=True)


def drop_incompatible(lattice: Lattice, expanded: list[list[str]], check) -> list[list[str]]:
    """The runs of subsets that can be applied; `check(cfg)` raises ConfigError for a config whose
    clamps cannot be built. One run per subset is checked: its clamps do not depend on the other overrides
    unless they change the model's shape, which compose_runs checks for every run."""
    for subset in lattice.subsets():
        if subset in lattice.skipped:
            continue
        first = next((run for run in expanded if lattice.override(subset) in run), None)
        if first is None:
            continue
        cfg, _ = compose_config(first)  # an error here is not the subset's: it stops the sweep
        try:
            check(cfg)
        except ConfigError as exc:
            lattice.skipped[subset] = str(exc)
    dropped = {lattice.override(s) for s in lattice.skipped}
    return [run for run in expanded if not dropped.intersection(run)]
