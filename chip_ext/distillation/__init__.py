"""Distillation: the pass over a dataset that learns W (`core.distill`), its streaming run, gates,
checkpoints, torch.distributed ranks, memory budget, model split, the exact fold and the Lasso solver.

`chip_ext.distillation.distill` and the other names of `core` are reachable from the package itself."""
from .._lazy import core_getattr

__getattr__ = core_getattr(__name__)
