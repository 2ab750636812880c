"""Kept for existing imports: `chip_ext.data` is `chip_ext.evaluation.data` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .evaluation import data as _module

sys.modules[__name__] = _module
