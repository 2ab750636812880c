"""Distillation: the pass over a dataset that learns W (`core.distill`), its streaming run, gates,
checkpoints, torch.distributed ranks, memory budget, model split, the exact fold and the Lasso solver.

`chip_ext.distillation.distill` and the other names of `core` are reachable from the package itself."""


def __getattr__(name: str):
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    core = importlib.import_module(f"{__name__}.core")  # lazily: the submodules import each other
    try:
        return getattr(core, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
