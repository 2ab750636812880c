"""Kept for existing imports: `chip_ext.explain` is `chip_ext.explanation.explain` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import explain as _module

sys.modules[__name__] = _module
