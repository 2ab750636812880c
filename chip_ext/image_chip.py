"""Kept for existing imports: `chip_ext.image_chip` is `chip_ext.explanation.image_chip` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .explanation import image_chip as _module

sys.modules[__name__] = _module
