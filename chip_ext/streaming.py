"""Kept for existing imports: `chip_ext.streaming` is `chip_ext.distillation.streaming` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import streaming as _module

sys.modules[__name__] = _module
