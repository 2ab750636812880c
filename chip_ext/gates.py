"""Channel gates d_sn and their proximity weights h(d) (CHIP eqs. 1, 7).

Gates come from a counter-based stream: the gates of an image depend only on (seed, layer, the
image's global index in the dataset), never on batch size, chunking, resume point or workers.
Distribution (DESIGN §2): row 0 is the unperturbed network (all ones); every other row drops a
fraction r ~ U(0, max_drop) of the K channels, exactly round(rK) of them, chosen uniformly.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def layer_key(layer: str) -> int:
    """A stable 32-bit key of a layer name (so each layer has its own gate stream)."""
    return zlib.crc32(layer.encode("utf-8"))


def image_seed(seed: int, layer: str, index: int) -> int:
    """The 63-bit seed of one image's gates: a hash of (seed, layer, global image index)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ layer_key(layer)) ^ index) >> 1


def sample_gates(indices: Sequence[int] | Tensor, num_perturbations: int, K: int, *, seed: int = 0,
                 layer: str = "", max_drop: float = 0.5) -> Tensor:
    """Gates for the images with these global indices -> Tensor[B, N, K] bool (row 0 all ones)."""
    if num_perturbations < 1:
        raise ValueError(f"num_perturbations must be >= 1; got {num_perturbations}")
    if not 0.0 <= max_drop <= 1.0:
        raise ValueError(f"max_drop must be in [0, 1]; got {max_drop}")
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    N = num_perturbations
    gates = torch.ones(len(idx), N, K, dtype=torch.bool)
    if N == 1:
        return gates
    positions = torch.arange(K)
    for row, index in enumerate(idx):
        gen = torch.Generator().manual_seed(image_seed(seed, layer, index))
        r = torch.rand(N - 1, generator=gen, dtype=torch.float64) * max_drop
        n_off = torch.round(r * K).long()  # exactly round(rK) channels off
        order = torch.rand(N - 1, K, generator=gen).argsort(dim=1)  # a uniform permutation per row
        off = torch.zeros(N - 1, K, dtype=torch.bool)
        off.scatter_(1, order, positions.unsqueeze(0) < n_off.unsqueeze(1))
        gates[row, 1:] = ~off
    return gates


def proximity(gates: Tensor, sigma: float) -> Tensor:
    """h(d) = exp(-||d - 1||² / σ²) for gates: Tensor[..., K] -> Tensor[...] float32."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    off = gates.shape[-1] - gates.to(torch.float32).sum(-1)  # ||d - 1||² for binary d
    return torch.exp(-off / (sigma * sigma))


def default_sigma(K: int) -> float:
    """σ² = K/4, so h spans about [e^-2, 1] for drop fractions up to one half."""
    return (K / 4.0) ** 0.5
