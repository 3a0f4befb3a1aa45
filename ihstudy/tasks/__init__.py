"""The synthetic tasks that only in-context learning can solve: their data, samplers and eval sets."""
