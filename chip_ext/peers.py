"""Kept for existing imports: `chip_ext.peers` is `chip_ext.explanation.peers` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import peers as _module

sys.modules[__name__] = _module
