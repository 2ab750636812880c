"""Kept for existing imports: `chip_ext.paths` is `chip_ext.distillation.paths` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import paths as _module

sys.modules[__name__] = _module
