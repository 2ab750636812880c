"""chip_ext: CHIP (Channel-wise Disentangled Interpretation) for PyTorch CNNs.

Kernels (CPU and CUDA): `gate_pool` (channel gating fused with global average pooling) and
`gram_accumulate` (class-weighted Gram accumulation in float64). See README.md and docs/.
"""
from ._extension import build_info
from . import baselines, distributed
from .distillation import distill
from .explain import explain
from .importance import Importance
from .ops import Accumulators, GatePoolOutput, gate_pool, gram_accumulate, new_accumulators
from .packing import pack_triu, packed_size, size_from_packed, unpack_triu
from .split import select_output

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
