"""Training packs of runs as one batched computation: steps, optimizer, evaluation, recording, sweeps."""
