"""Kept for existing imports: `chip_ext.checkpoints` is `chip_ext.distillation.checkpoints` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import checkpoints as _module

sys.modules[__name__] = _module
