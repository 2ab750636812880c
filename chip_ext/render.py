"""Kept for existing imports: `chip_ext.render` is `chip_ext.explanation.render` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import render as _module

sys.modules[__name__] = _module
