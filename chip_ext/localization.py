"""Kept for existing imports: `chip_ext.localization` is `chip_ext.evaluation.localization` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .evaluation import localization as _module

sys.modules[__name__] = _module
