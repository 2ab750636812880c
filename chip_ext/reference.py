"""Kept for existing imports: `chip_ext.reference` is `chip_ext.kernels.reference` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .kernels import reference as _module

sys.modules[__name__] = _module
