"""Kept for existing imports: `chip_ext.packing` is `chip_ext.kernels.packing` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .kernels import packing as _module

sys.modules[__name__] = _module
