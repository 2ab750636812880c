"""Kept for existing imports: `chip_ext.maps` is `chip_ext.explanation.maps` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import maps as _module

sys.modules[__name__] = _module
