"""Kept for existing imports: `chip_ext.baselines` is `chip_ext.explanation.baselines` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import baselines as _module

sys.modules[__name__] = _module
