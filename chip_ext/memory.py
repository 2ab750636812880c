"""Kept for existing imports: `chip_ext.memory` is `chip_ext.distillation.memory` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import memory as _module

sys.modules[__name__] = _module
