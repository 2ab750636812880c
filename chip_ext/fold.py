"""Kept for existing imports: `chip_ext.fold` is `chip_ext.distillation.fold` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import fold as _module

sys.modules[__name__] = _module
