"""Evaluation: localisation (`localization`), faithfulness (`faithfulness`), the data readers
(`data`), the model zoo (`models`) and the evaluation driver (`core.evaluate`).

The names of `core` are reachable from the package itself."""


def __getattr__(name: str):
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    core = importlib.import_module(f"{__name__}.core")  # lazily: the submodules import each other
    try:
        return getattr(core, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
