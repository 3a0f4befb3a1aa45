"""Analyses of finished runs: phase-change timing, head circuits, figures, reports, the paper's findings, the toy model."""
