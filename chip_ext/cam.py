"""Kept for existing imports: `chip_ext.cam` is `chip_ext.explanation.cam` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import cam as _module

sys.modules[__name__] = _module
