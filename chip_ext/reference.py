"""Plain PyTorch float64 reference implementations of the two kernels.

Written for clarity, not speed: tests compare the kernels with these, and benchmarks time the
kernels against them (eager and torch.compile).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .packing import pack_triu


def gate_pool_reference(A: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as chip_ext.ops.gate_pool, computed in float64 then cast.

    A: Tensor[B, K, H, W]; gates: Tensor[B, N, K] -> (gated Tensor[B*N, K, H, W] in A's dtype and
    memory format, z Tensor[B, N, K] float32).
    """
    B, K, H, W = A.shape
    N = gates.shape[1]
    A64 = A.double()
    d64 = gates.double()
    gated = (A64.unsqueeze(1) * d64[:, :, :, None, None]).reshape(B * N, K, H, W).to(A.dtype)
    if not A.is_contiguous() and A.is_contiguous(memory_format=torch.channels_last):
        gated = gated.contiguous(memory_format=torch.channels_last)
    z = (d64 * A64.mean(dim=(2, 3)).unsqueeze(1)).float()
    return gated, z


def gram_accumulate_reference(G: Tensor, b: Tensor, y: Tensor, n: Tensor, a: Tensor,
                              gates: Tensor, h: Tensor, f: Tensor, g: Tensor) -> None:
    """Same contract as chip_ext.ops.gram_accumulate, all in float64 (in place on G, b, y, n)."""
    a64, d64, h64, f64, g64 = (t.double() for t in (a, gates, h, f, g))
    z = d64 * a64.unsqueeze(1)  # [B, N, K]
    w = f64.unsqueeze(1) * h64.unsqueeze(2)  # [B, N, C]: loyalty x proximity
    M = (z * h64.unsqueeze(2)).transpose(1, 2) @ z  # [B, K, K]: sum_n h_sn z_sn z_sn^T
    G += f64.T @ pack_triu(M)
    b += torch.einsum("snc,snk->ck", w * g64, z)
    y += (w * g64 * g64).sum(dim=(0, 1))
    n += w.sum(dim=(0, 1))
