"""The per-class Lasso solve (CHIP eq. 11): chip_ext.admm_lasso (batched ADMM, one cached Cholesky
factor per class) against the same ADMM re-solving its linear system every iteration (no cached
factor), and against scikit-learn's coordinate-descent Lasso per class on the CPU.

The statistics are real sums: gram_accumulate over synthetic per-image inputs (pooled activations,
gates from chip_ext.gates, softmax scores), then normalised, λ = 0.1 λ_max (the default). The slow
baselines run on a subset of the classes and are extrapolated linearly to all of them (each class
is an independent problem); that is said in the JSON. Writes benchmarks/results/solver-<device>.json.

    python benchmarks/bench_solver.py                       # CPU: C=1000, K=512
    python benchmarks/bench_solver.py --device cuda --naive-classes 1000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

import chip_ext
from chip_ext.gates import proximity, sample_gates
from chip_ext.packing import unpack_triu
from chip_ext.solver import admm_lasso, default_rho, lambda_max, soft_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import RESULTS, device_name, slug, sync  # noqa: E402


def statistics(C: int, K: int, images: int, N: int, device: torch.device):
    """Normalised Ĝ [C, K, K] and b̂ [C, K] (float64) from gram_accumulate over synthetic images."""
    gen = torch.Generator().manual_seed(0)
    acc = chip_ext.new_accumulators(C, K, device)
    for i0 in range(0, images, 16):
        B = min(16, images - i0)
        a = (torch.rand(B, K, generator=gen) * 2 + 0.05).to(device)
        gates = sample_gates(range(i0, i0 + B), N, K, seed=0, layer="bench", device=device)
        h = proximity(gates, (K / 4) ** 0.5)
        logits = torch.randn(B, N, C, generator=gen).to(device) + 0.5 * (gates.float() @ torch.randn(
            K, C, generator=gen).to(device)) / K ** 0.5  # scores that depend on the gates
        g = torch.softmax(logits, dim=-1)
        f = g[:, 0].contiguous()
        chip_ext.gram_accumulate(*acc, a, gates, h, f, g.contiguous())
    G = unpack_triu(acc.G, K) / acc.n[:, None, None]
    b = acc.b / acc.n[:, None]
    return G, b


def admm_resolve(G, b, lam, rho, iterations):
    """The same ADMM iterations, solving (Ĝ + ρI) w = rhs from scratch each time (no cached factor)."""
    K = G.shape[-1]
    A = G + rho[:, None, None] * torch.eye(K, dtype=G.dtype, device=G.device)
    m = torch.zeros_like(b)
    q = torch.zeros_like(b)
    t = (lam / rho)[:, None]
    for _ in range(iterations):
        w = torch.linalg.solve(A, b + rho[:, None] * (m + q))
        m_new = soft_threshold(w - q, t)
        q = q - (w - m_new)
        m = m_new
    return m


def sklearn_equivalent(G, b, lam):
    """One class as sklearn data: X = chol(K Ĝ)ᵀ (K rows), y = K X⁻ᵀ b̂, so that
    (1/2K)||y - Xw||² + λ||w||₁ = ½wᵀĜw - b̂ᵀw + λ||w||₁ + const."""
    K = G.shape[-1]
    R = torch.linalg.cholesky(K * G).mT  # upper: RᵀR = KĜ
    y = K * torch.linalg.solve_triangular(R.mT, b[:, None], upper=False).squeeze(1)
    return R.numpy(), y.numpy(), float(lam)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--perturbations", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-7)
    p.add_argument("--naive-classes", type=int, default=20, help="classes for the no-cached-factor ADMM")
    p.add_argument("--sklearn-classes", type=int, default=5, help="classes for scikit-learn (on the CPU)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    C, K = args.classes, args.channels
    name = device_name(device)
    print(f"# bench_solver on {name}: C={C}, K={K}, tol={args.tol}", flush=True)

    G, b = statistics(C, K, args.images, args.perturbations, device)
    lam = 0.1 * lambda_max(b)
    rho = default_rho(G)
    admm_lasso(G[:2], b[:2], lam[:2], tol=args.tol)  # warm-up
    (W, info), t_admm = timed(lambda: admm_lasso(G, b, lam, tol=args.tol), device)
    iters = info.iterations
    print(f"  admm_lasso (cached factor): {t_admm:.2f} s, iterations mean {iters.float().mean():.1f} "
          f"max {int(iters.max())}, converged {bool(info.converged.all())}", flush=True)
    (W_plain, info_plain), t_plain = timed(lambda: admm_lasso(G, b, lam, tol=args.tol, relaxation=1.0), device)
    it_plain = info_plain.iterations
    print(f"  admm_lasso without over-relaxation: {t_plain:.2f} s, iterations mean "
          f"{it_plain.float().mean():.1f} max {int(it_plain.max())}", flush=True)

    # no cached factor: as many iterations as the cached version needed at most, on a subset
    n_naive = min(C, args.naive_classes)
    it_naive = int(iters[:n_naive].max())
    W_naive, t_naive = timed(lambda: admm_resolve(G[:n_naive], b[:n_naive], lam[:n_naive], rho[:n_naive],
                                                  it_naive), device)
    t_naive_all = t_naive * C / n_naive
    print(f"  ADMM re-solving each iteration: {t_naive:.2f} s for {n_naive} classes x {it_naive} iterations "
          f"-> {t_naive_all:.1f} s for {C} (extrapolated)", flush=True)

    # scikit-learn on the CPU, a few classes
    from sklearn.linear_model import Lasso

    n_sk = min(C, args.sklearn_classes)
    diffs, t_sk = [], 0.0
    for c in range(n_sk):
        X, y, alpha = sklearn_equivalent(G[c].cpu(), b[c].cpu(), lam[c].cpu())
        t0 = time.perf_counter()
        ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(X, y).coef_
        t_sk += time.perf_counter() - t0
        diffs.append(float((torch.from_numpy(ref) - W[c].cpu()).abs().max() / W[c].abs().max().clamp_min(1e-30)))
    t_sk_all = t_sk * C / n_sk
    print(f"  scikit-learn Lasso (CPU): {t_sk:.2f} s for {n_sk} classes -> {t_sk_all:.1f} s for {C} "
          f"(extrapolated); max |W - W_sklearn| / max|W| = {max(diffs):.1e}", flush=True)

    record = {
        "benchmark": "bench_solver", "device": name, "device_type": device.type,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
        "chip_ext": chip_ext.__version__,
        "config": {"classes": C, "channels": K, "images": args.images, "perturbations": args.perturbations,
                   "tol": args.tol, "lam": "0.1 lambda_max per class", "dtype": "float64"},
        "admm_lasso_cached_factor": {"seconds": t_admm, "iterations_mean": float(iters.float().mean()),
                                     "iterations_max": int(iters.max()),
                                     "converged": bool(info.converged.all()), "relaxation": 1.7},
        "admm_lasso_no_relaxation": {"seconds": t_plain, "iterations_mean": float(it_plain.float().mean()),
                                     "iterations_max": int(it_plain.max()),
                                     "max_abs_diff_vs_relaxed": float((W_plain - W).abs().max()),
                                     "max_abs_W": float(W.abs().max())},
        "admm_resolve_each_iteration": {"classes_timed": n_naive, "iterations": it_naive, "seconds": t_naive,
                                        "seconds_all_classes_extrapolated": t_naive_all,
                                        "max_abs_diff_vs_cached": float((W_naive - W[:n_naive]).abs().max())},
        "sklearn_lasso_cpu": {"classes_timed": n_sk, "seconds": t_sk, "seconds_all_classes_extrapolated": t_sk_all,
                              "max_rel_diff_vs_admm": max(diffs)},
        "speedup_vs_resolve": t_naive_all / t_admm, "speedup_vs_sklearn": t_sk_all / t_admm,
    }
    out = args.out or RESULTS / f"solver-{slug(name if device.type == 'cuda' else 'cpu-' + name)}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
