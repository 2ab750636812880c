"""Kept for existing imports: `chip_ext.models` is `chip_ext.evaluation.models` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .evaluation import models as _module

sys.modules[__name__] = _module
