"""Kept for existing imports: `chip_ext.ranks` is `chip_ext.distillation.ranks` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import ranks as _module

sys.modules[__name__] = _module
