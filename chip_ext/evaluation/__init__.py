"""Evaluation: localisation (`localization`), faithfulness (`faithfulness`), the data readers
(`data`), the model zoo (`models`) and the evaluation driver (`core.evaluate`).

The names of `core` are reachable from the package itself."""
from .._lazy import core_getattr

__getattr__ = core_getattr(__name__)
