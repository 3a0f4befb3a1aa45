"""Clamps ("artificial optogenetics", paper-notes §4): named overrides of activation sites.

Placeholder until the clamp library lands: only the empty clamp set exists.
"""

from __future__ import annotations

from ihstudy.data import Batch
from ihstudy.errors import ConfigError


def build_clamps(clamp_cfg, shape) -> list:
    """The clamps one run's `clamp` config names."""
    if clamp_cfg:
        raise ConfigError(f"unknown clamp(s): {', '.join(clamp_cfg)}")
    return []


class ClampSet:
    """The clamps of each run of a pack, applied in one forward pass (training, eval and analysis)."""

    def __init__(self, per_run: list[list]):
        self.per_run = per_run

    def forward(self, model, batch: Batch):
        return model(batch)

    def run_with_cache(self, model, batch: Batch, names):
        return model.run_with_cache(batch, names)
