"""chip_ext: CHIP (Channel-wise Disentangled Interpretation) for PyTorch CNNs.

Kernels (CPU and CUDA): `gate_pool` (channel gating fused with global average pooling),
`gram_accumulate` (class-weighted Gram accumulation in float64) and the gate stream (`sample_gates`). See
README.md and docs/.
"""
from ._extension import build_info
from .explanation import baselines
from .distillation import distributed
from .distillation.core import distill
from .explanation.explain import explain
from .importance import Importance
from .kernels.ops import Accumulators, GatePoolOutput, gate_pool, gram_accumulate, new_accumulators
from .kernels.packing import pack_triu, packed_size, size_from_packed, unpack_triu
from .distillation.split import select_output

__version__ = "0.1.0"

__all__ = [
    "Accumulators",
    "Importance",
    "baselines",
    "distill",
    "distributed",
    "explain",
    "GatePoolOutput",
    "build_info",
    "gate_pool",
    "gram_accumulate",
    "new_accumulators",
    "pack_triu",
    "select_output",
    "packed_size",
    "size_from_packed",
    "unpack_triu",
    "__version__",
]

# The package is laid out by concern (kernels/, distillation/, explanation/, evaluation/, channels/); the
# flat module names of earlier versions (chip_ext.maps, chip_ext.solver, ...) still import, as the same
# module objects, and resolve as attributes too.
_MOVED = {
    "ops": "kernels", "packing": "kernels", "reference": "kernels",
    "streaming": "distillation", "checkpoints": "distillation", "ranks": "distillation",
    "gates": "distillation", "memory": "distillation", "fingerprints": "distillation", "split": "distillation",
    "solver": "distillation", "fold": "distillation", "paths": "distillation",
    "maps": "explanation", "peers": "explanation", "image_chip": "explanation", "render": "explanation",
    "cam": "explanation",
    "localization": "evaluation", "faithfulness": "evaluation", "data": "evaluation", "models": "evaluation",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return importlib.import_module(f"{__name__}.{_MOVED[name]}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
