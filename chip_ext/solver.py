"""Kept for existing imports: `chip_ext.solver` is `chip_ext.distillation.solver` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import solver as _module

sys.modules[__name__] = _module
