"""The CHIP kernels as Python functions, and their fake (meta) kernels for torch.compile.

All are `torch.ops.chip_ext.*` operators registered by the compiled library (csrc/), with a CPU
and (when built with CUDA) a CUDA implementation; the dispatcher picks by the tensors' device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._extension import _C  # noqa: F401  (loading it registers torch.ops.chip_ext.*)
from .packing import packed_size


class GatePoolOutput(NamedTuple):
    gated: Tensor  # [B*N, K, H, W], A's dtype and memory format
    z: Tensor  # [B, N, K] float32


def gate_pool(A: Tensor, gates: Tensor) -> GatePoolOutput:
    """Channel gating fused with global average pooling (CHIP eqs. 1-2).

    A: Tensor[B, K, H, W] float32/float16/bfloat16, contiguous or channels_last (other strides
       are copied to contiguous first).
    gates: Tensor[B, N, K] bool/uint8/float, the gate d_sn of perturbation n of image s.
    Returns (gated, z):
      gated: Tensor[B*N, K, H, W], row b*N+n = A[b] with channel k multiplied by gates[b, n, k],
             in A's dtype and memory format;
      z: Tensor[B, N, K] float32 = gates * mean_hw(A), the pooled gated features.
    """
    gated, z = torch.ops.chip_ext.gate_pool(A, gates)
    return GatePoolOutput(gated, z)


def gram_accumulate(G: Tensor, b: Tensor, y: Tensor, n: Tensor, zs: Tensor, gs: Tensor, a: Tensor,
                    gates: Tensor, h: Tensor, f: Tensor, g: Tensor) -> None:
    """Adds one batch to the float64 sufficient statistics of the per-class weighted Lasso, in place.

    With z_sn = gates_sn * a_s (DESIGN §1), for every class c:
      G[c]  += sum_{s,n} f[s,c] h[s,n] pack_triu(z_sn z_sn^T)    G: Tensor[C, K(K+1)/2] float64
      b[c]  += sum_{s,n} f[s,c] h[s,n] g[s,n,c] z_sn             b: Tensor[C, K] float64
      y[c]  += sum_{s,n} f[s,c] h[s,n] g[s,n,c]^2                y: Tensor[C] float64
      n[c]  += sum_{s,n} f[s,c] h[s,n]                           n: Tensor[C] float64
      zs[c] += sum_{s,n} f[s,c] h[s,n] z_sn                      zs: Tensor[C, K] float64
      gs[c] += sum_{s,n} f[s,c] h[s,n] g[s,n,c]                  gs: Tensor[C] float64
    (zs and gs, the first moments, give the intercept: fit_intercept in the solver) from a: Tensor[B, K] float32 (pooled activations), gates: Tensor[B, N, K] (bool/uint8/float),
    h: Tensor[B, N] float32 (proximity), f: Tensor[B, C] float32 (unperturbed scores, the loyalty
    weights), g: Tensor[B, N, C] float32 (perturbed scores).
    The accumulators must be contiguous float64 tensors on the inputs' device.
    """
    torch.ops.chip_ext.gram_accumulate(G, b, y, n, zs, gs, a, gates, h, f, g)


def sample_gates_into(gates: Tensor, base: int, start: int, stride: int, max_drop: float) -> Tensor:
    """Fills gates: Tensor[B, N, K] bool (contiguous, on any device) in place with the gate stream of the
    images with global indices start, start + stride, ..., start + (B-1) stride, and returns it: row 0 all
    ones; row n >= 1 with round(r K) channels off, r = max_drop * u (the bits of
    `chip_ext.distillation.gates.sample_gates`, computed where gates lives: nothing comes from the host).
    base: the 64-bit key of (seed, layer), `gates.stream_base`."""
    base = int(base) & 0xFFFFFFFFFFFFFFFF
    torch.ops.chip_ext.sample_gates(gates, base - (1 << 64) if base >= 1 << 63 else base, int(start), int(stride),
                                    float(max_drop))
    return gates


class Accumulators(NamedTuple):
    """The float64 running sums of one layer (see `gram_accumulate`), in its argument order."""

    G: Tensor  # [C, K(K+1)/2]  Σ f h z zᵀ (packed upper triangle)
    b: Tensor  # [C, K]  Σ f h g z
    y: Tensor  # [C]  Σ f h g²
    n: Tensor  # [C]  Σ f h
    zs: Tensor  # [C, K]  Σ f h z
    gs: Tensor  # [C]  Σ f h g


def accumulator_bytes(C: int, K: int) -> int:
    """Bytes of the float64 accumulators for C classes and K channels."""
    return 8 * C * (packed_size(K) + 2 * K + 3)


def new_accumulators(C: int, K: int, device: torch.device | str | None = None) -> Accumulators:
    """Zeroed float64 accumulators for C classes and K channels (`accumulator_bytes`: mostly
    C*K(K+1)/2*8 bytes for G)."""
    if C < 1 or K < 1:
        raise ValueError(f"C and K must be >= 1; got C={C}, K={K}")
    kw = dict(dtype=torch.float64, device=device)
    return Accumulators(torch.zeros(C, packed_size(K), **kw), torch.zeros(C, K, **kw),
                        torch.zeros(C, **kw), torch.zeros(C, **kw), torch.zeros(C, K, **kw),
                        torch.zeros(C, **kw))


# ---- fake kernels: shapes, dtypes and strides without computing (torch.compile, meta tensors) ----

def _check_same_device(ref: Tensor, ref_name: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        torch._check(t.device == ref.device,
                     lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "move all arguments to one device")


@torch.library.register_fake("chip_ext::gate_pool")
def _gate_pool_fake(A: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(A.dim() == 4, lambda: f"A must be a 4-D tensor [B, K, H, W]; got {list(A.shape)}")
    torch._check(gates.dim() == 3, lambda: f"gates must be a 3-D tensor [B, N, K]; got {list(gates.shape)}")
    _check_same_device(A, "A", gates=gates)
    B, K, H, W = A.shape
    N = gates.shape[1]
    torch._check(gates.shape[0] == B and gates.shape[2] == K,
                 lambda: f"gates must be [B, N, K] with B={B}, K={K} to match A; got {list(gates.shape)}")
    if A.is_contiguous():
        fmt = torch.contiguous_format
    elif A.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        fmt = torch.contiguous_format
    gated = torch.empty((B * N, K, H, W), dtype=A.dtype, device=A.device, memory_format=fmt)
    z = torch.empty((B, N, K), dtype=torch.float32, device=A.device)
    return gated, z


@torch.library.register_fake("chip_ext::gram_accumulate")
def _gram_accumulate_fake(G: Tensor, b: Tensor, y: Tensor, n: Tensor, zs: Tensor, gs: Tensor, a: Tensor,
                          gates: Tensor, h: Tensor, f: Tensor, g: Tensor) -> None:
    torch._check(a.dim() == 2 and gates.dim() == 3 and h.dim() == 2 and f.dim() == 2 and g.dim() == 3,
                 lambda: "gram_accumulate: a must be [B, K], gates [B, N, K], h [B, N], f [B, C], g [B, N, C]")
    _check_same_device(G, "G", b=b, y=y, n=n, zs=zs, gs=gs, a=a, gates=gates, h=h, f=f, g=g)
    B, K = a.shape
    N, C = gates.shape[1], f.shape[1]
    torch._check(tuple(gates.shape) == (B, N, K) and tuple(h.shape) == (B, N)
                 and tuple(f.shape) == (B, C) and tuple(g.shape) == (B, N, C),
                 lambda: f"gram_accumulate: shapes disagree: a {list(a.shape)}, gates {list(gates.shape)}, "
                         f"h {list(h.shape)}, f {list(f.shape)}, g {list(g.shape)}")
    torch._check(tuple(G.shape) == (C, K * (K + 1) // 2),
                 lambda: f"G must be [C, K(K+1)/2] = [{C}, {K * (K + 1) // 2}]; got {list(G.shape)}")
    torch._check(tuple(zs.shape) == (C, K) and tuple(gs.shape) == (C,),
                 lambda: f"zs must be [C, K] = [{C}, {K}] and gs [C]; got {list(zs.shape)}, {list(gs.shape)}")
    return None


@torch.library.register_fake("chip_ext::sample_gates")
def _sample_gates_fake(gates: Tensor, base: int, start: int, stride: int, max_drop: float) -> None:
    torch._check(gates.dim() == 3, lambda: f"gates must be a 3-D tensor [B, N, K]; got {list(gates.shape)}")
    torch._check(gates.dtype == torch.bool, lambda: f"gates must be torch.bool; got {gates.dtype}")
    return None
