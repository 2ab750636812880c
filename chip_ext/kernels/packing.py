"""Packed upper-triangle storage of symmetric K x K matrices (the Gram matrices G_c).

Order: `torch.triu_indices(K, K)`, i.e. row-major over the upper triangle, K(K+1)/2 entries.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def packed_size(K: int) -> int:
    """Entries of the packed upper triangle of a K x K matrix: K(K+1)/2."""
    if K < 0:
        raise ValueError(f"K must be >= 0; got {K}")
    return K * (K + 1) // 2


def size_from_packed(P: int) -> int:
    """K such that K(K+1)/2 == P; ValueError when P is not a triangular number."""
    K = (math.isqrt(8 * P + 1) - 1) // 2
    if packed_size(K) != P:
        raise ValueError(f"{P} is not K(K+1)/2 for any integer K; not a packed upper triangle")
    return K


def pack_triu(M: Tensor) -> Tensor:
    """M: Tensor[..., K, K] -> Tensor[..., K(K+1)/2], the upper triangle (diagonal included)."""
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must be [..., K, K] (square in its last two dims); got {list(M.shape)}")
    K = M.shape[-1]
    i, j = torch.triu_indices(K, K, device=M.device)
    return M[..., i, j]


def unpack_triu(packed: Tensor, K: int | None = None) -> Tensor:
    """packed: Tensor[..., K(K+1)/2] -> the symmetric Tensor[..., K, K] it stores."""
    if packed.dim() < 1:
        raise ValueError("packed must have at least one dimension [..., K(K+1)/2]")
    P = packed.shape[-1]
    if K is None:
        K = size_from_packed(P)
    elif packed_size(K) != P:
        raise ValueError(f"packed has {P} entries in its last dim, but K={K} needs {packed_size(K)}")
    i, j = torch.triu_indices(K, K, device=packed.device)
    out = packed.new_zeros(*packed.shape[:-1], K, K)
    out[..., i, j] = packed
    out[..., j, i] = packed
    return out
