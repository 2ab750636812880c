"""Kept for existing imports: `chip_ext.fingerprints` is `chip_ext.distillation.fingerprints` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .distillation import fingerprints as _module

sys.modules[__name__] = _module
