"""Kept for existing imports: `chip_ext.faithfulness` is `chip_ext.evaluation.faithfulness` (the same module object, so
attributes set on one are seen through the other)."""
import sys

from .evaluation import faithfulness as _module

sys.modules[__name__] = _module
