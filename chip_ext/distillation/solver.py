"""The per-class weighted Lasso of CHIP (eq. 11), solved by ADMM with cached Cholesky factors.

For class c, on the normalised statistics Ĝ_c = G_c / n_c and b̂_c = b_c / n_c:

    min_w  ½ wᵀ Ĝ_c w - b̂_cᵀ w + λ_c ||w||₁          (w ≥ 0 with positive=True)

which equals scikit-learn's ``Lasso(alpha=λ, fit_intercept=False)`` fitted with
``sample_weight = f^c h``. With ``fit_intercept=True`` the class also gets an unpenalised intercept
(scikit-learn's convention): the problem is solved on the centred statistics Ĝ - μμᵀ and b̂ - μȳ
(μ = Σ f h z / n, ȳ = Σ f h g / n, the weighted means), and the intercept is ȳ - μᵀw.

ADMM (eqs. 12-16): (Ĝ + ρI) w = b̂ + ρ(m + q);  m = soft(w - q, λ/ρ);  q = q - (w - m), over-relaxed
(w replaced by αw + (1-α)m in the last two steps, α = 1.7). With positive=True the soft threshold
becomes the projection m = max(w - q - λ/ρ, 0).

Step size ρ and accuracy: pooled activations share a large common mean, so Ĝ has one eigenvalue far
above the rest; a fixed ρ = trace(Ĝ)/K crawls along the small ones (a planted exact map: 1,000
iterations and 4-7% off), and even residuals at 1e-7 leave W off by residual / smallest eigenvalue.
Two remedies, chosen by measurement (benchmarks/NOTES.md):
- polishing (OSQP §4.3, with active-set corrections): every `adapt_interval` iterations, a class
  whose support and signs did not change since the last check is solved exactly on that support
  (one batched Cholesky), and is done when that solution passes the Lasso's optimality conditions.
  ADMM finds the support long before its residuals are small, so this both ends the crawl and makes
  W exact up to rounding; classes that meet the residual tolerances are polished too.
- residual balancing (OSQP §5.2): at the same checks, from iteration 30 on, ρ is multiplied by
  √(relative primal / relative dual residual) where that factor is off by more than `adapt_tolerance`;
  only those classes are re-factored (batched), the others keep their cached factor.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

RHO_MIN, RHO_MAX = 1e-6, 1e6  # bounds on ρ at unit scale (Ĝ with trace/K = 1)
POLISH_TOL_FACTOR = 1e-3  # the polished solution's optimality test: to 1e-3 tol at unit scale
ADAPT_MAX_STEP = 10.0  # the most one residual-balancing step changes ρ by
ADAPT_START = 30  # ρ is first adapted at this iteration: most classes are polished by then (NOTES.md)


@dataclass
class SolverInfo:
    """Convergence report of `admm_lasso`, one entry per class: Tensor[C]."""

    iterations: Tensor  # ADMM iterations run until the class met its tolerances (max_iter if never)
    primal_residual: Tensor  # ||w - m|| at the end (unit scale)
    dual_residual: Tensor  # ρ ||m - m_prev|| at the end (unit scale)
    converged: Tensor  # bool: tolerances met, or the polished solution passed the optimality test
    rho: Tensor  # ρ at the end, in Ĝ's units (adapted during the solve unless adaptive_rho=False)
    lam: Tensor  # λ used
    factorizations: int = 0  # Cholesky factorisations of Ĝ + ρI (the first one, and one per ρ change)
    polished: Tensor | None = None  # bool: the result is the polished (exact on its support) solution
    intercept: Tensor | None = None  # the intercepts (fit_intercept=True), else None
    polish_factorizations: int = 0  # Cholesky factorisations of polishing (one per polish attempt)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"iterations": self.iterations, "primal_residual": self.primal_residual,
                "dual_residual": self.dual_residual, "converged": self.converged, "rho": self.rho,
                "lam": self.lam, "factorizations": self.factorizations, "polished": self.polished,
                "intercept": self.intercept, "polish_factorizations": self.polish_factorizations}


def working_bytes(device: torch.device) -> int:
    """Bytes the solver may use for a chunk of classes: 256 MiB on the CPU; on a GPU an eighth of its
    free memory (at least 256 MiB), so a chunk is big enough to keep the GPU busy."""
    budget = 256 << 20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(budget, free // 8)
    return budget


def center(G: Tensor, b: Tensor, x_mean: Tensor, y_mean: Tensor) -> tuple[Tensor, Tensor]:
    """The centred statistics of a regression with an intercept.

    G: Tensor[C, K, K] = Σ ω z zᵀ / Σ ω, b: Tensor[C, K] = Σ ω g z / Σ ω, x_mean: Tensor[C, K] = Σ ω z / Σ ω,
    y_mean: Tensor[C] = Σ ω g / Σ ω  ->  (G - μμᵀ, b - μȳ), the weighted covariance of z and of (z, g).
    """
    return G - x_mean[:, :, None] * x_mean[:, None, :], b - x_mean * y_mean[:, None]


def lambda_max(b: Tensor, *, positive: bool = False, x_mean: Tensor | None = None,
               y_mean: Tensor | None = None) -> Tensor:
    """b: Tensor[C, K] (normalised) -> Tensor[C]: the smallest λ for which w = 0 solves the class.

    ||b̂||_∞; with positive=True max(max_k b̂_k, 0) (only channels that raise the score can enter);
    with x_mean, y_mean (fit_intercept) the same on the centred b̂ - μȳ.
    """
    if x_mean is not None or y_mean is not None:
        if x_mean is None or y_mean is None:
            raise ValueError("lambda_max: give both x_mean and y_mean (fit_intercept) or neither")
        b = b - x_mean * y_mean[:, None]
    if positive:
        return b.amax(dim=-1).clamp_min(0.0)
    return b.abs().amax(dim=-1)


def soft_threshold(x: Tensor, t: Tensor) -> Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


def default_rho(G: Tensor) -> Tensor:
    """ρ_c = mean eigenvalue of Ĝ_c (trace / K), floored: the starting ρ (unit scale: 1)."""
    K = G.shape[-1]
    tr = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / K
    return torch.clamp(tr, min=1e-12)


def _as_per_class(value: float | Tensor, C: int, name: str, like: Tensor) -> Tensor:
    if isinstance(value, Tensor) and value.is_complex():
        raise TypeError(f"{name} must be real; got a {value.dtype} tensor")
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(C)
    if t.shape != (C,):
        raise ValueError(f"{name} must be a float or a Tensor[C] with C={C}; got shape {list(t.shape)}")
    return t.clone()


def _real_float(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real (float32 or float64); got {t.dtype}")
    return t


def _check_finite(t: Tensor, name: str, offset: int = 0) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = [offset + i for i in bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()]
        raise ValueError(f"{name} holds NaN or Inf (classes {where[:10]}{' ...' if len(where) > 10 else ''}); "
                         "the statistics are broken: check the network's outputs and the accumulators")


def _check_gram(G: Tensor, block: int = 64) -> None:
    """NaN/Inf and symmetry of G: Tensor[C, K, K], a block of classes at a time, in two passes over G
    (a row sum: NaN/Inf propagate into it; and ||(G - Gᵀ)v|| for a random v, zero only when G is
    symmetric). Rounding-level asymmetry (√eps relative) is accepted; the solver symmetrises each chunk."""
    tol = math.sqrt(torch.finfo(G.dtype).eps)
    gen = torch.Generator(device=G.device).manual_seed(0)
    v = torch.randn(G.shape[-1], 1, generator=gen, device=G.device, dtype=G.dtype)
    for c0 in range(0, G.shape[0], block):
        g = G[c0:c0 + block]
        rows = g.sum(dim=2)  # [c, K]
        if not bool(torch.isfinite(rows).all()):
            _check_finite(g, "G", offset=c0)
        diff = (g @ v - g.mT @ v).norm(dim=(1, 2))
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(G.dtype).tiny) * v.norm()
        suspect = (diff > tol * scale).nonzero().flatten()
        if len(suspect):  # the exact difference, for the message
            sub = g[suspect]
            asym = (sub - sub.mT).abs().amax(dim=(1, 2))
            size = sub.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(G.dtype).tiny)
            bad = [c0 + int(suspect[i]) for i in (asym > tol * size).nonzero().flatten().tolist()]
            if bad:
                i = int(suspect.tolist().index(bad[0] - c0))
                raise ValueError(f"G must be symmetric; G[{bad[0]}] differs from its transpose by "
                                 f"{float(asym[i]):.3g} (max |G[{bad[0]}]| = {float(size[i]):.3g}; classes {bad[:10]})")


def _refuse_unbounded(G: Tensor, W: Tensor, converged: Tensor, x_mean: Tensor | None) -> None:
    """A class that did not converge (or whose W is not finite) may have no minimum at all: when Ĝ
    (centred, with an intercept) is not positive semidefinite the objective is unbounded below, Ĝ + ρI
    can still factor, and ADMM runs away (W ~1e172 or NaN) while only "did not converge" was said.
    ValueError naming the classes and the smallest eigenvalue (checked on those classes only)."""
    suspect = (~converged.to(W.device) | ~torch.isfinite(W).all(dim=1)).nonzero().flatten()
    if not len(suspect):
        return
    Gs = G[suspect].double()
    if x_mean is not None:
        m = x_mean[suspect].double()
        Gs = Gs - m[:, :, None] * m[:, None, :]
    Gs = torch.nan_to_num((Gs + Gs.mT) / 2)
    low = torch.linalg.eigvalsh(Gs)[:, 0]
    scale = Gs.diagonal(dim1=1, dim2=2).abs().mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    rel = 1e-10 if G.dtype == torch.float64 else 1e-5
    bad = (low < -rel * scale).nonzero().flatten()
    if not len(bad):
        return
    classes = suspect[bad].tolist()
    raise ValueError(
        f"the Lasso of classes {classes[:10]}{' ...' if len(classes) > 10 else ''} has no minimum: their Gram "
        f"matrix {'(centred for the intercept) ' if x_mean is not None else ''}is not positive semidefinite "
        f"(smallest eigenvalue {float(low[bad].min()):.3g}), so ADMM diverged. A Gram matrix of real features "
        "(Σ ω z zᵀ) is always semidefinite: the sums are corrupt, or G was not built from features")


def _checked_inputs(G, b, lam, rho, max_iter, tol, chunk_size, relaxation, x_mean, y_mean, fit_intercept,
                    adapt_interval, adapt_tolerance):
    G, b = _real_float(G, "G"), _real_float(b, "b")
    if G.dim() != 3 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must be [C, K, K]; got {list(G.shape)}")
    C, K, _ = G.shape
    if K == 0:
        raise ValueError(f"G must be [C, K, K] with K >= 1 channel; got {list(G.shape)}")
    if b.shape != (C, K):
        raise ValueError(f"b must be [C, K] = [{C}, {K}] to match G; got {list(b.shape)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1; got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite float > 0; got {tol!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 (classes per batch) or None; got {chunk_size!r}")
    if not 0 < relaxation < 2:
        raise ValueError(f"relaxation must be in (0, 2); got {relaxation}")
    if isinstance(adapt_interval, bool) or not isinstance(adapt_interval, int) or adapt_interval < 1:
        raise ValueError(f"adapt_interval must be an int >= 1; got {adapt_interval!r}")
    if not adapt_tolerance > 1:
        raise ValueError(f"adapt_tolerance must be > 1; got {adapt_tolerance}")
    if fit_intercept:
        if x_mean is None or y_mean is None:
            raise ValueError("fit_intercept=True needs x_mean: Tensor[C, K] (Σ ω z / Σ ω) and "
                             "y_mean: Tensor[C] (Σ ω g / Σ ω), the weighted means of the features and targets")
        x_mean, y_mean = _real_float(x_mean, "x_mean"), _real_float(y_mean, "y_mean")
        if x_mean.shape != (C, K):
            raise ValueError(f"x_mean must be [C, K] = [{C}, {K}] to match G; got {list(x_mean.shape)}")
        if y_mean.shape != (C,):
            raise ValueError(f"y_mean must be [C] = [{C}] to match G; got {list(y_mean.shape)}")
    elif x_mean is not None or y_mean is not None:
        raise ValueError("x_mean and y_mean are the means for the intercept: pass fit_intercept=True with them")
    dtype = G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float64
    G = G.to(dtype)
    b = b.to(dtype=dtype, device=G.device)
    _check_gram(G)
    _check_finite(b, "b")
    if fit_intercept:
        x_mean = x_mean.to(dtype=dtype, device=G.device)
        y_mean = y_mean.to(dtype=dtype, device=G.device)
        _check_finite(x_mean, "x_mean")
        _check_finite(y_mean, "y_mean")
    lam_t = _as_per_class(lam, C, "lam", G)
    if torch.any(lam_t < 0) or not torch.isfinite(lam_t).all():
        raise ValueError(f"lam must be finite and >= 0; got min {float(lam_t.min())}, max {float(lam_t.max())}")
    rho_t = None
    if rho is not None:
        rho_t = _as_per_class(rho, C, "rho", G)
        if torch.any(rho_t <= 0) or not torch.isfinite(rho_t).all():
            raise ValueError(f"rho must be finite and > 0; got min {float(rho_t.min())}")
    return G, b, lam_t, rho_t, x_mean, y_mean


def admm_lasso(G: Tensor, b: Tensor, lam: float | Tensor, *, rho: float | Tensor | None = None,
               max_iter: int = 1000, tol: float = 1e-7, chunk_size: int | None = None,
               relaxation: float = 1.7, positive: bool = False, fit_intercept: bool = False,
               x_mean: Tensor | None = None, y_mean: Tensor | None = None, adaptive_rho: bool = True,
               adapt_interval: int = 10, adapt_tolerance: float = 5.0, polish: bool = True,
               warn: bool = True) -> tuple[Tensor, SolverInfo]:
    """Solves C weighted Lasso problems at once.

    G: Tensor[C, K, K] normalised Gram matrices (symmetric PSD); b: Tensor[C, K];
    lam: float or Tensor[C] (>= 0); rho: float, Tensor[C] or None: the starting ρ (default
    trace(Ĝ_c)/K), adapted during the solve unless adaptive_rho=False.
    positive: constrain w >= 0 (scikit-learn's positive=True).
    fit_intercept: fit an unpenalised intercept per class (scikit-learn's convention); needs the
        weighted means x_mean: Tensor[C, K] (Σ ω z / Σ ω) and y_mean: Tensor[C] (Σ ω g / Σ ω). G and b
        stay the uncentred second moments; the intercepts are in SolverInfo.intercept.
    Stops per class on Boyd's residuals: ||w-m|| <= √K·tol + tol·max(||w||,||m||) and
    ρ||m-m_prev|| <= √K·tol + tol·||ρq||, measured on the class rescaled to unit scale (Ĝ by
    trace(Ĝ)/K, b̂ and λ by max|b̂|), so tol is relative and the result does not depend on the
    scale of the targets; SolverInfo's residuals are in those units.
    adaptive_rho: residual balancing every `adapt_interval` iterations from iteration 30 on, when the
        balancing factor is above `adapt_tolerance` or below its inverse; each change re-factors that
        class. (Most classes are polished before iteration 30; adapting from the start re-factored
        them for nothing: 1.6 instead of 1.0 factorisations per class on 1000 well-conditioned classes.)
    polish: on convergence (and at max_iter) solve exactly on the support and signs found (with up
        to 4 active-set corrections of that support), and keep that solution when it meets the Lasso's
        optimality conditions to 1e-3·tol (unit scale); a class stopped at max_iter whose polished
        solution passes counts as converged. Small residuals alone do not make W accurate when Ĝ is
        ill-conditioned (the error grows like residual / smallest eigenvalue); the polished solution
        is exact up to rounding once its support is right.
    Classes are solved in chunks of `chunk_size` (default from `working_bytes`: 256 MiB of K x K
    matrices on the CPU, 1/8 of the free memory on a GPU).
    relaxation: ADMM over-relaxation α in (0, 2) (Boyd et al. §3.4.3; 1 = plain ADMM).
    warn: a UserWarning when classes stop at max_iter without converging.
    Returns W: Tensor[C, K] (exactly sparse) in G's dtype and a SolverInfo.
    """
    G, b, lam_t, rho_t, x_mean, y_mean = _checked_inputs(
        G, b, lam, rho, max_iter, tol, chunk_size, relaxation, x_mean, y_mean, fit_intercept,
        adapt_interval, adapt_tolerance)
    C, K, _ = G.shape
    dtype = G.dtype
    if chunk_size is None:
        chunk_size = max(1, working_bytes(G.device) // max(1, 4 * K * K * G.element_size()))

    W = torch.zeros(C, K, dtype=dtype, device=G.device)
    out = {"iterations": torch.full((C,), max_iter, dtype=torch.long),
           "primal": torch.zeros(C, dtype=torch.float64), "dual": torch.zeros(C, dtype=torch.float64),
           "converged": torch.zeros(C, dtype=torch.bool), "polished": torch.zeros(C, dtype=torch.bool),
           "rho": torch.zeros(C, dtype=torch.float64)}
    counts = {"factorizations": 0, "polish_factorizations": 0}
    settings = dict(max_iter=max_iter, tol=tol, relaxation=relaxation, positive=positive,
                    adaptive_rho=adaptive_rho, adapt_interval=adapt_interval,
                    adapt_tolerance=adapt_tolerance, polish=polish)
    for c0 in range(0, C, chunk_size):
        sl = slice(c0, min(C, c0 + chunk_size))
        Gc, bc = G[sl], b[sl]
        if fit_intercept:
            Gc, bc = center(Gc, bc, x_mean[sl], y_mean[sl])
        # Each class is solved at unit scale: Ĝ' = Ĝ/g, b̂' = b̂/β, λ' = λ/β, ρ' = ρ/g with g = trace(Ĝ)/K
        # and β = max|b̂|, then w = (β/g) w'. The objective only scales, so the solution is the same,
        # but the stopping rule's absolute part (√K·tol) is now relative to the problem: CHIP's targets
        # are probabilities ~1/C, and with C=1000 an absolute rule stopped at ~7% error.
        gs = default_rho(Gc)
        bs = bc.abs().amax(dim=-1).clamp_min(torch.finfo(dtype).tiny)
        rho_c = gs if rho_t is None else rho_t[sl]
        Gc = (Gc + Gc.mT) * (0.5 / gs)[:, None, None]  # exactly symmetric for the factorisation
        chunk = _solve_chunk(Gc, bc / bs[:, None], lam_t[sl] / bs, rho_c / gs, counts, **settings)
        del Gc
        W[sl] = chunk["w"] * (bs / gs)[:, None]
        for key in ("iterations", "primal", "dual", "converged", "polished"):
            out[key][sl] = chunk[key].to(out[key].dtype).cpu()
        out["rho"][sl] = (chunk["rho"] * gs).double().cpu()
    _refuse_unbounded(G, W, out["converged"], x_mean if fit_intercept else None)
    intercept = (y_mean - (x_mean * W).sum(dim=1)) if fit_intercept else None
    info = SolverInfo(out["iterations"], out["primal"], out["dual"], out["converged"], out["rho"],
                      lam_t.double().cpu(), counts["factorizations"], out["polished"],
                      None if intercept is None else intercept.double().cpu(), counts["polish_factorizations"])
    if warn:
        message = not_converged_message(info.converged, info.primal_residual, info.dual_residual, max_iter)
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)
    return W, info


def not_converged_message(converged, primal, dual, max_iter: int, labels: list | None = None,
                          what: str = "") -> str | None:
    """The warning text for the classes that did not converge (converged, primal, dual: one entry per
    class, as SolverInfo's; labels: how to name them, default their positions), or None when all did."""
    converged, primal, dual = (torch.as_tensor(v) for v in (converged, primal, dual))
    bad = (~converged.bool()).nonzero().flatten().tolist()
    if not bad:
        return None
    labels = list(range(len(converged))) if labels is None else labels
    worst = max(bad, key=lambda i: max(float(primal[i]), float(dual[i])))
    return (f"{what}{len(bad)} of {len(converged)} classes did not converge in max_iter={max_iter} ADMM iterations "
            f"(classes {[labels[i] for i in bad[:10]]}{' ...' if len(bad) > 10 else ''}; worst: class "
            f"{labels[worst]}, primal residual {float(primal[worst]):.2e}, dual residual {float(dual[worst]):.2e} "
            "at unit scale). Their W is approximate: raise max_iter, loosen tol, raise lam/lam_ratio, or distil "
            "more images (images x N well above K)")


class _Active:
    """The classes of a chunk still iterating: row-aligned tensors, compacted together."""

    def __init__(self, **tensors: Tensor):
        self.__dict__.update(tensors)
        self._names = list(tensors)

    def keep(self, mask: Tensor) -> None:
        for name in self._names:
            setattr(self, name, getattr(self, name)[mask])


def _factor(G: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, status = torch.linalg.cholesky_ex(G + rho[:, None, None] * eye)
    return L, status == 0


def _chol_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ rhs for L: [n, K, K] lower, rhs: [n, K], by two triangular solves (batched
    torch.cholesky_solve took 4x as long on the CPU: 24 ms against 6 ms for 32 x 512)."""
    y = torch.linalg.solve_triangular(L, rhs.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)


def _prox(v: Tensor, t: Tensor, positive: bool) -> Tensor:
    """The proximal map of t||·||₁ (+ the indicator of w >= 0 when positive)."""
    return torch.clamp(v - t, min=0.0) if positive else soft_threshold(v, t)


def _solve_chunk(G, b, lam, rho, counts, *, max_iter, tol, relaxation, positive, adaptive_rho,
                 adapt_interval, adapt_tolerance, polish) -> dict:
    """ADMM on one chunk of classes at unit scale. G: [n, K, K], b: [n, K], lam, rho: [n]."""
    n, K = b.shape
    dev, dtype = G.device, G.dtype
    L, ok = _factor(G, rho)
    counts["factorizations"] += n
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten().tolist()
        raise RuntimeError(f"Cholesky of G + rho*I failed for classes {bad[:10]} of this chunk: G is not "
                           "symmetric positive semi-definite")
    res = {"w": torch.zeros_like(b), "iterations": torch.full((n,), max_iter, dtype=torch.long, device=dev),
           "primal": torch.zeros(n, dtype=dtype, device=dev), "dual": torch.zeros(n, dtype=dtype, device=dev),
           "converged": torch.zeros(n, dtype=torch.bool, device=dev),
           "polished": torch.zeros(n, dtype=torch.bool, device=dev), "rho": rho.clone()}
    zeros = torch.zeros(n, dtype=dtype, device=dev)
    # Converged classes are frozen (a class's result does not depend on its chunk-mates) and dropped
    # from the working tensors once a quarter of the active rows are done.
    act = _Active(rows=torch.arange(n, device=dev), G=G, L=L, b=b, lam=lam, rho=rho.clone(),
                  w=torch.zeros_like(b), m=torch.zeros_like(b), q=torch.zeros_like(b), primal=zeros,
                  dual=zeros.clone(), pattern=torch.zeros_like(b), tried=torch.zeros(n, dtype=torch.bool, device=dev),
                  done=torch.zeros(n, dtype=torch.bool, device=dev))
    sqrt_k = K ** 0.5
    for it in range(1, max_iter + 1):
        rhs = act.b + act.rho[:, None] * (act.m + act.q)
        w = _chol_solve(act.L, rhs)  # the cached factor
        w_hat = w if relaxation == 1.0 else relaxation * w + (1.0 - relaxation) * act.m
        m_new = _prox(w_hat - act.q, (act.lam / act.rho)[:, None], positive)
        q_new = act.q - (w_hat - m_new)
        primal = (w - m_new).norm(dim=1)
        dual = act.rho * (m_new - act.m).norm(dim=1)
        eps_pri = sqrt_k * tol + tol * torch.maximum(w.norm(dim=1), m_new.norm(dim=1))
        eps_dual = sqrt_k * tol + tol * (act.rho[:, None] * q_new).norm(dim=1)
        frozen = act.done[:, None]
        act.w = torch.where(frozen, act.w, w)
        act.m = torch.where(frozen, act.m, m_new)
        act.q = torch.where(frozen, act.q, q_new)
        act.primal = torch.where(act.done, act.primal, primal)
        act.dual = torch.where(act.done, act.dual, dual)
        met = (primal <= eps_pri) & (dual <= eps_dual) & ~act.done
        if bool(met.any()):
            _finish(res, act, met, it, polish, positive, tol, counts)
            act.done = act.done | met
        if it % adapt_interval == 0 and it < max_iter:
            if polish:
                _polish_early(res, act, it, positive, tol, counts)
            if adaptive_rho and it >= ADAPT_START:
                _adapt_rho(act, adapt_tolerance, counts)
        n_done = int(act.done.sum())
        if n_done == act.done.numel():
            break
        if n_done * 4 >= act.done.numel():
            act.keep(~act.done)
    else:
        left = ~act.done
        if bool(left.any()):
            _finish(res, act, left, max_iter, polish, positive, tol, counts, at_max_iter=True)
    return res


def _polish_early(res: dict, act: _Active, it: int, positive: bool, tol: float, counts: dict) -> None:
    """Polishes the classes whose support and signs did not change since the last check (ADMM often
    finds them long before its residuals are small), once per support; a class that passes the
    optimality test is done."""
    pattern = torch.sign(act.m)
    stable = (pattern == act.pattern).all(dim=1)
    act.tried = act.tried & stable
    act.pattern = pattern
    try_now = stable & ~act.tried & ~act.done & (pattern != 0).any(dim=1)
    if not bool(try_now.any()):
        return
    act.tried = act.tried | try_now
    w, good, factorizations = polish_support(act.G[try_now], act.b[try_now], act.lam[try_now], act.m[try_now],
                                             positive, POLISH_TOL_FACTOR * tol)
    counts["polish_factorizations"] += factorizations
    if not bool(good.any()):
        return
    sel = try_now.clone()
    sel[try_now.nonzero().flatten()[~good]] = False
    r = act.rows[sel]
    res["w"][r] = w[good]
    res["iterations"][r] = it
    res["primal"][r], res["dual"][r] = act.primal[sel], act.dual[sel]
    res["rho"][r] = act.rho[sel]
    res["converged"][r] = True
    res["polished"][r] = True
    act.done = act.done | sel


def _adapt_rho(act: _Active, tolerance: float, counts: dict) -> None:
    """Residual balancing (OSQP §5.2): ρ ← ρ √(rel. primal / rel. dual) where that factor is off by
    more than `tolerance`, with the relative residuals of the stopping rule: ||w - m|| / max(||w||, ||m||)
    and ρ||m - m_prev|| / ||ρq||. A step changes ρ by at most ADAPT_MAX_STEP, and classes whose m or
    w - m stood still are left alone (no information: unguarded, a class still at m = 0 jumped to
    ρ = 1e6 and took 900 iterations to come back). Re-factors only the classes whose ρ changed and
    rescales their scaled duals q (ρq is kept)."""
    tiny = 1e-300
    rel_pri = act.primal / torch.maximum(act.w.norm(dim=1), act.m.norm(dim=1)).clamp_min(tiny)
    rel_dual = act.dual / (act.rho[:, None] * act.q).norm(dim=1).clamp_min(tiny)
    factor = torch.sqrt(rel_pri.clamp_min(tiny) / rel_dual.clamp_min(tiny))
    factor = factor.clamp(1.0 / ADAPT_MAX_STEP, ADAPT_MAX_STEP)
    new_rho = (act.rho * factor).clamp(RHO_MIN, RHO_MAX)
    change = (((factor > tolerance) | (factor < 1.0 / tolerance)) & ~act.done & (new_rho != act.rho)
              & (act.primal > 0) & (act.dual > 0))
    if not bool(change.any()):
        return
    idx = change.nonzero().flatten()
    L, ok = _factor(act.G[idx], new_rho[idx])
    counts["factorizations"] += len(idx)
    idx, L = idx[ok], L[ok]  # a failed factorisation keeps the old ρ and factor
    if len(idx) == 0:
        return
    act.L[idx] = L
    act.q[idx] = act.q[idx] * (act.rho[idx] / new_rho[idx])[:, None]
    act.rho[idx] = new_rho[idx]


def _finish(res: dict, act: _Active, sel: Tensor, it: int, polish: bool, positive: bool, tol: float,
            counts: dict, at_max_iter: bool = False) -> None:
    """Writes the results of the active rows `sel` (met their tolerances, or reached max_iter)."""
    r = act.rows[sel]
    m = act.m[sel]
    res["w"][r] = m
    res["iterations"][r] = it
    res["primal"][r], res["dual"][r] = act.primal[sel], act.dual[sel]
    res["rho"][r] = act.rho[sel]
    res["converged"][r] = not at_max_iter
    if not polish:
        return
    w, good, factorizations = polish_support(act.G[sel], act.b[sel], act.lam[sel], m, positive,
                                             POLISH_TOL_FACTOR * tol)
    counts["polish_factorizations"] += factorizations
    res["w"][r[good]] = w[good]
    res["polished"][r] = good
    if at_max_iter:
        res["converged"][r] = good


def _solve_on_support(G: Tensor, rhs: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
    """w with w_S = G_SS⁻¹ rhs_S and 0 elsewhere, per row (S = support[i], varying in size): the support
    submatrices are gathered into [n, p, p] (p = the largest support; identity padding), so the
    Cholesky costs p³ rather than K³. Returns (w [n, K], factorisation succeeded [n] bool)."""
    n, K = rhs.shape
    size = support.sum(dim=1)
    p = int(size.max()) if n else 0
    if p == 0:
        return torch.zeros_like(rhs), torch.ones(n, dtype=torch.bool, device=rhs.device)
    order = torch.argsort((~support).to(torch.int8), dim=1, stable=True)[:, :p]  # support columns first
    valid = torch.arange(p, device=rhs.device)[None, :] < size[:, None]
    sub = G[torch.arange(n, device=G.device)[:, None, None], order[:, :, None], order[:, None, :]]
    both = valid[:, :, None] & valid[:, None, :]
    sub = torch.where(both, sub, torch.eye(p, dtype=G.dtype, device=G.device).expand(n, p, p))
    L, status = torch.linalg.cholesky_ex(sub)
    ws = torch.where(valid, _chol_solve(L, torch.where(valid, rhs.gather(1, order), 0.0)), 0.0)
    return torch.zeros_like(rhs).scatter(1, order, ws), status == 0


def polish_support(G: Tensor, b: Tensor, lam: Tensor, m: Tensor, positive: bool, kkt_tol: float,
                   rounds: int = 4) -> tuple[Tensor, Tensor, int]:
    """The exact Lasso minimiser near an approximate one, and whether it is optimal.

    G: [n, K, K], b: [n, K], lam: [n], m: [n, K] (an approximate solution, e.g. ADMM's). With the
    support S = {k: m_k != 0} and signs s = sign(m): w_S = G_SS⁻¹ (b_S - λ s_S), w = 0 elsewhere. That
    solves the Lasso when sign(w_S) = s and |(Gw - b)_k| <= λ off S (positive: (Gw - b)_k >= -λ),
    tested here to `kkt_tol`. Where the test fails, the support is corrected (channels whose sign
    flipped leave it, channels that violate the off-support condition join it with the sign that
    lowers the objective) and solved again, up to `rounds` times: an active-set step.
    Returns (w [n, K], ok [n] bool, factorisations done). One batched Cholesky of the support
    submatrices per round.
    """
    n, K = m.shape
    support = m != 0
    s = torch.ones_like(m) if positive else torch.sign(m)
    w_out = m.clone()
    ok_out = torch.zeros(n, dtype=torch.bool, device=m.device)
    todo = torch.arange(n, device=m.device)
    eps = torch.finfo(G.dtype).eps
    g_max = torch.diagonal(G, dim1=1, dim2=2).amax(dim=1)  # max |G_ij| of a PSD matrix: on its diagonal
    factorizations = 0
    for _ in range(rounds):
        Gt, bt, lt, St, st = G[todo], b[todo], lam[todo], support[todo], s[todo]
        w, status = _solve_on_support(Gt, bt - lt[:, None] * st, St)
        factorizations += len(todo)
        grad = torch.bmm(Gt, w.unsqueeze(-1)).squeeze(-1) - bt
        # rounding in grad: K products of size |G||w|
        slack = kkt_tol + 8 * K * eps * (g_max[todo] * w.abs().amax(dim=1) + bt.abs().amax(dim=1))
        limit = (lt + slack)[:, None]
        flipped = St & (torch.sign(w) != st)
        violates = ~St & ((grad < -limit) if positive else (grad.abs() > limit))
        good = status & torch.isfinite(w).all(dim=1) & ~flipped.any(dim=1) & ~violates.any(dim=1)
        w_out[todo[good]] = w[good]
        ok_out[todo[good]] = True
        if bool(good.all()):
            break
        bad = ~good
        rows = todo[bad]
        # the next support: drop sign flips, add violators with the sign that lowers the objective
        new_support = (St[bad] & ~flipped[bad]) | violates[bad]
        new_sign = torch.where(violates[bad], torch.ones_like(grad[bad]) if positive else -torch.sign(grad[bad]),
                               st[bad])
        support[rows], s[rows] = new_support, new_sign
        todo = rows
    return w_out, ok_out, factorizations


# ------------------------------------------------------------------------- from the sums of a pass


def solve_sums(G: Tensor, b: Tensor, n: Tensor, zs: Tensor, gs: Tensor, K: int, *, lam: float | None,
               lam_ratio: float | None, rho: float | None, max_iter: int, tol: float, fit_intercept: bool,
               positive: bool) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Solves every class of one layer's float64 sums (`chip_ext.ops.Accumulators` fields: G packed
    [C, K(K+1)/2], b [C, K], n [C], zs [C, K], gs [C]), in chunks of classes normalised on the fly.
    lam (absolute) or lam_ratio (fraction of each class's λ_max under the same options).
    Returns (W [C, K] float64, intercepts [C] (zeros without fit_intercept), λ [C], report) on the
    CPU; classes with n = 0 get zero rows and are listed in report["empty"] (positions in the sums)."""
    from ..kernels.packing import unpack_triu

    C = n.shape[0]
    W = torch.zeros(C, K, dtype=torch.float64)
    b0 = torch.zeros(C, dtype=torch.float64)
    lam_c = torch.zeros(C, dtype=torch.float64)
    valid = (n > 0).nonzero().flatten().cpu()
    report = {"rows": [], "iterations": [], "converged": [], "primal": [], "dual": [], "polished": [],
              "factorizations": 0, "empty": (n <= 0).nonzero().flatten().tolist()}
    chunk = max(1, working_bytes(G.device) // (4 * 8 * K * K))  # Ĝ, its factor and temporaries
    for c0 in range(0, len(valid), chunk):
        rows = valid[c0:c0 + chunk].to(G.device)
        nn_ = n[rows]
        G_hat = unpack_triu(G[rows], K) / nn_[:, None, None]
        b_hat = b[rows] / nn_[:, None]
        means = dict(x_mean=zs[rows] / nn_[:, None], y_mean=gs[rows] / nn_) if fit_intercept else {}
        lam_rows = (torch.full_like(nn_, float(lam)) if lam is not None
                    else lam_ratio * lambda_max(b_hat, positive=positive, **means))
        Wc, info = admm_lasso(G_hat, b_hat, lam_rows, rho=rho, max_iter=max_iter, tol=tol,
                              fit_intercept=fit_intercept, positive=positive, warn=False, **means)
        at = rows.cpu()
        W[at] = Wc.cpu().double()
        lam_c[at] = lam_rows.cpu().double()
        if info.intercept is not None:
            b0[at] = info.intercept
        report["rows"] += at.tolist()
        for key, value in (("iterations", info.iterations), ("converged", info.converged),
                           ("primal", info.primal_residual), ("dual", info.dual_residual),
                           ("polished", info.polished)):
            report[key] += value.tolist()
        report["factorizations"] += info.factorizations
    return W, b0, lam_c, report


def solver_report(layer: str, report: dict, classes: list[int], max_iter: int) -> dict:
    """imp.meta["solver"][layer] from `solve_sums`'s report (its rows are positions in `classes`):
    iterations, convergence, factorisations, and the warning text for classes that did not converge."""
    it = torch.tensor(report["iterations"], dtype=torch.long)
    ok = torch.tensor(report["converged"], dtype=torch.bool)
    label = [classes[r] for r in report["rows"]]
    bad = (~ok).nonzero().flatten().tolist()
    message = not_converged_message(ok, report["primal"], report["dual"], max_iter, label, f"layer {layer!r}: ")
    return {
        "iterations_max": int(it.max()) if len(it) else 0,
        "iterations_mean": float(it.float().mean()) if len(it) else 0.0,
        "converged": not bad,
        "not_converged_classes": [label[i] for i in bad[:100]],
        "polished": int(sum(report["polished"])),
        "factorizations": int(report["factorizations"]),
        "message": message,
    }
