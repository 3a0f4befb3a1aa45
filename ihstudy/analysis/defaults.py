"""The analyses' defaults that the command line shows as its own, owned here and read by cli.py,
timing.py, report.py and reproduce.py. Free of torch and pandas, so `ihstudy --help` stays fast."""

from __future__ import annotations

import math

from ihstudy.errors import ConfigError

PHASE_CHANGE = "0.4ln2"  # the paper's criterion: fsl_train loss below 0.4·ln 2 (evaluate.PHASE_CHANGE_THRESHOLD)
THRESHOLDS = f"ln2,{PHASE_CHANGE},0.1"  # the loss thresholds `ihstudy analyze` times
PLATEAU_BAND = 0.1  # a plateau: the loss within ln 2 ± this
# The toy model of Figs. 5a and 9 (toy.py): `ihstudy toy` and `ihstudy reproduce toy`.
TOY = {"dim": 20, "lr": 1.0, "iterations": 1000, "seed": 17, "conditions": ["none", "c", "bc"]}


def parse_thresholds(text: str) -> dict[str, float]:
    """'ln2,0.4ln2,0.1' -> {name: value}."""
    values = {}
    for name in (t.strip() for t in text.split(",") if t.strip()):
        try:
            values[name] = float(name.removesuffix("ln2") or 1) * math.log(2) if name.endswith("ln2") else float(name)
        except ValueError:
            raise ConfigError(f"--thresholds: '{name}' is not a number or Xln2") from None
        if not 0 < values[name] < math.inf:
            raise ConfigError(f"--thresholds: '{name}' must be a positive finite number")
    if not values:
        raise ConfigError("--thresholds is empty")
    return values
