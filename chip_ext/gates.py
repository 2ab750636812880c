"""Kept for existing imports: `chip_ext.gates` is `chip_ext.distillation.gates` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import gates as _module

sys.modules[__name__] = _module
