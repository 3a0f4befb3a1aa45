"""ihstudy: train, clamp, sweep and analyse small transformers that form induction heads.

From Python (docs/notebook.md):

    import ihstudy
    run = ihstudy.load_run("outputs/2026-12-04/15-47-31")    # config, tables, checkpoints, models
    sweep = ihstudy.load_sweep("outputs/sweeps/fig5b")
    run = ihstudy.train(["train.sequences=3200"])

The names are imported on first use, so `import ihstudy` (and the CLI's start) stays light.
"""

__all__ = ["Model", "Run", "Sweep", "load_run", "load_sweep", "train"]


def __getattr__(name: str):
    if name in __all__:
        from ihstudy import api

        return getattr(api, name)
    raise AttributeError(f"module 'ihstudy' has no attribute '{name}'")
