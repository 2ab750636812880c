"""Kept for existing imports: `chip_ext.ops` is `chip_ext.kernels.ops` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .kernels import ops as _module

sys.modules[__name__] = _module
