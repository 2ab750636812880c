"""Kept for existing imports: `chip_ext.split` is `chip_ext.distillation.split` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import split as _module

sys.modules[__name__] = _module
