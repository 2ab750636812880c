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


def gram_accumulate_reference(G: Tensor, b: Tensor, y: Tensor, n: Tensor, zs: Tensor, gs: Tensor,
                              a: Tensor, gates: Tensor, h: Tensor, f: Tensor, g: Tensor) -> None:
    """Same contract as chip_ext.ops.gram_accumulate, all in float64 (in place on G, b, y, n, zs, gs)."""
    a64, d64, h64, f64, g64 = (t.double() for t in (a, gates, h, f, g))
    z = d64 * a64.unsqueeze(1)  # [B, N, K]
    w = f64.unsqueeze(1) * h64.unsqueeze(2)  # [B, N, C]: loyalty x proximity
    M = (z * h64.unsqueeze(2)).transpose(1, 2) @ z  # [B, K, K]: sum_n h_sn z_sn z_sn^T
    G += f64.T @ pack_triu(M)
    b += torch.einsum("snc,snk->ck", w * g64, z)
    y += (w * g64 * g64).sum(dim=(0, 1))
    n += w.sum(dim=(0, 1))
    zs += torch.einsum("snc,snk->ck", w, z)
    gs += (w * g64).sum(dim=(0, 1))


def equivalent_data(G: Tensor, b: Tensor, x_mean: Tensor | None = None,
                    y_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A data set (X, y) of one class whose plain (unweighted) statistics are the given ones, so that
    any Lasso solver on samples (scikit-learn's `Lasso`) can be checked against `admm_lasso` on the
    sufficient statistics of a distillation.

    G: Tensor[K, K] = Σ ω z zᵀ / Σ ω, b: Tensor[K] = Σ ω g z / Σ ω (normalised, one class).
    Without means: X [K, K] with XᵀX / K = G and Xᵀy / K = b (X = diag(√e) Vᵀ from G's eigenpairs),
    so (1/2K)||y - Xw||² = ½wᵀGw - bᵀw + const. With x_mean: Tensor[K] and y_mean: Tensor[] (the
    weighted means Σ ω z / Σ ω, Σ ω g / Σ ω): X [2K, K] = μ ± rows of diag(√e) Vᵀ built from the
    centred G - μμᵀ, y = ȳ ± t, so the data have mean μ, ȳ and the centred moments of the statistics
    (what scikit-learn's fit_intercept=True solves). G must be positive definite. float64.
    """
    G, b = G.double(), b.double()
    K = G.shape[-1]
    centred = x_mean is not None
    if centred:
        mu, ybar = x_mean.double(), torch.as_tensor(y_mean, dtype=torch.float64)
        G = G - torch.outer(mu, mu)
        b = b - mu * ybar
    e, V = torch.linalg.eigh(K * 0.5 * (G + G.T))
    if float(e.min()) <= 1e-14 * float(e.max()):
        raise ValueError(f"G must be positive definite for an equivalent data set; smallest eigenvalue "
                         f"{float(e.min()) / K:.3g}")
    R = torch.sqrt(e)[:, None] * V.T  # RᵀR = K G
    t = K * (V.T @ b) / torch.sqrt(e)  # Rᵀ t = K b
    if not centred:
        return R, t
    return torch.cat([mu + R, mu - R]), torch.cat([ybar + t, ybar - t])
