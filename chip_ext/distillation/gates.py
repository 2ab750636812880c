"""Channel gates d_sn and their proximity weights h(d) (CHIP eqs. 1, 7).

Gates come from a counter-based stream: the gates of an image depend only on (seed, layer, the
image's global index in the dataset), never on batch size, chunking, resume point, workers or the
device (they are hashed on the device where the network runs, with the same bits on CPU and GPU).
Distribution (DESIGN §2): row 0 is the unperturbed network (all ones); every other row drops a
fraction r ~ U(0, max_drop) of the K channels, exactly round(rK) of them, chosen uniformly.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import ops
from .fingerprints import image_fingerprint

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def layer_key(layer: str) -> int:
    """A stable 32-bit key of a layer name (so each layer has its own gate stream)."""
    return zlib.crc32(layer.encode("utf-8"))


def stream_base(seed: int, layer: str) -> int:
    """The 64-bit key of one (seed, layer) gate stream; image_seed hashes it with the image's index."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ layer_key(layer))


def image_seed(seed: int, layer: str, index: int) -> int:
    """The 63-bit seed of one image's gates: a hash of (seed, layer, global image index)."""
    return _splitmix64(stream_base(seed, layer) ^ index) >> 1


def content_keys(images: Tensor) -> list[int]:
    """One gate-stream key per image, from its values (`fingerprints.image_fingerprint`: shape, dtype,
    bytes): the per-image fits key their gates by it, so an image gets the same gates, and the same map,
    whatever else is in its batch and wherever it sits; different images get independent draws.
    images: Tensor[B, ...] -> B non-negative ints below 2^63 (one copy of the batch to the host)."""
    return [int(image_fingerprint(x), 16) >> 1 for x in images.detach().cpu()]


GATE_STREAM = "mix32-v2"  # the gate stream's version, recorded with every distillation
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (lowbias32, C. Wellons) on int64 tensors in [0, 2^32): the
    same bits on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _progression(idx: list[int]) -> tuple[int, int] | None:
    """(start, stride) when the indices are start, start + stride, ... (stride >= 1), else None."""
    if not idx:
        return None
    stride = idx[1] - idx[0] if len(idx) > 1 else 1
    if stride < 1 or any(b - a != stride for a, b in zip(idx, idx[1:])):
        return None
    return idx[0], stride


def _check_gate_args(num_perturbations: int, K: int, max_drop: float) -> None:
    if num_perturbations < 1:
        raise ValueError(f"num_perturbations must be >= 1; got {num_perturbations}")
    if not 0.0 <= max_drop <= 1.0:
        raise ValueError(f"max_drop must be in [0, 1]; got {max_drop}")
    if K < 1:
        raise ValueError(f"K must be >= 1; got {K}")


def sample_gates(indices: Sequence[int] | Tensor, num_perturbations: int, K: int, *, seed: int = 0,
                 layer: str = "", max_drop: float = 0.5, device: str | torch.device | None = None) -> Tensor:
    """Gates for the images with these global indices -> Tensor[B, N, K] bool on `device` (row 0 all
    ones), computed on that device from a counter-based hash: identical bits on CPU and GPU.

    Row n >= 1 of image s: a row key w = mix32(mix32(lo ^ mix32(n)) ^ hi) from the image's 64-bit
    seed (lo, hi words); drop fraction r = max_drop * mix32(w ^ 0x9E3779B9) / 2^32; channel keys
    mix32(w ^ mix32(k + 0x85EBCA6B)), ties broken by k; the round(rK) channels with the smallest
    keys are off (a uniformly random subset of that size).

    Indices in an arithmetic progression (a loader's batch: consecutive, or every world-th image under
    torch.distributed) run the `sample_gates` kernel on the device, one pass with nothing uploaded; any
    other list runs `sample_gates_reference` (the same bits, in PyTorch ops).
    """
    _check_gate_args(num_perturbations, K, max_drop)
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    device = torch.device(device) if device is not None else torch.device("cpu")
    run = _progression(idx)
    if run is None or min(idx) < 0 or device.type not in ("cpu", "cuda"):
        return sample_gates_reference(idx, num_perturbations, K, seed=seed, layer=layer, max_drop=max_drop,
                                      device=device)
    gates = torch.empty(len(idx), num_perturbations, K, dtype=torch.bool, device=device)
    return ops.sample_gates_into(gates, stream_base(seed, layer), run[0], run[1], max_drop)


def sample_gates_reference(indices: Sequence[int] | Tensor, num_perturbations: int, K: int, *, seed: int = 0,
                           layer: str = "", max_drop: float = 0.5,
                           device: str | torch.device | None = None) -> Tensor:
    """`sample_gates` in PyTorch ops (any indices, any device): the reference the kernel is tested against."""
    _check_gate_args(num_perturbations, K, max_drop)
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    device = torch.device(device) if device is not None else torch.device("cpu")
    N, B = num_perturbations, len(idx)
    gates = torch.ones(B, N, K, dtype=torch.bool, device=device)
    if N == 1 or B == 0:
        return gates
    seeds = [image_seed(seed, layer, i) for i in idx]
    words = torch.tensor([[s & _M32 for s in seeds], [(s >> 32) & _M32 for s in seeds]], dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: the upload does not wait for queued GPU work
        words = words.pin_memory()
    lo, hi = words.to(device, non_blocking=True)
    n = mix32(torch.arange(1, N, dtype=torch.int64, device=device))
    row = mix32(mix32(lo[:, None] ^ n[None, :]) ^ hi[:, None])  # [B, N-1]
    r = mix32(row ^ 0x9E3779B9).to(torch.float64) * (max_drop / 2.0**32)
    n_off = torch.round(r * K).long()  # exactly round(rK) channels off, [B, N-1]
    k = torch.arange(K, dtype=torch.int64, device=device)
    channel = mix32(k + 0x85EBCA6B & _M32)  # [K]
    per = max(1, (1 << 22) // ((N - 1) * K))  # images per step: bounded int64 temporaries
    for i0 in range(0, B, per):
        key = mix32(row[i0:i0 + per, :, None] ^ channel) * K + k  # unique keys
        order = key.argsort(dim=-1)
        off = torch.zeros_like(order, dtype=torch.bool)
        off.scatter_(-1, order, k < n_off[i0:i0 + per, :, None])
        gates[i0:i0 + per, 1:] = ~off
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
