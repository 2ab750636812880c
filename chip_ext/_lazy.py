"""Module-level __getattr__ for a concern package whose main module is `core`: the package's names resolve
to core's on first use, so `chip_ext.distillation.distill` works without importing core (and with it every
submodule) when the package itself is imported."""
from __future__ import annotations

import importlib


def core_getattr(package: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        core = importlib.import_module(f"{package}.core")  # lazily: the submodules import each other
        try:
            return getattr(core, name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    return __getattr__
