"""Kept for existing imports: `chip_ext.distributed` is `chip_ext.distillation.distributed` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import distributed as _module

sys.modules[__name__] = _module
