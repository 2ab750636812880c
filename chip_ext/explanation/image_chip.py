"""Per-image CHIP: the CHIP Lasso fitted on one image's own perturbations of channels or of regions
(beyond the paper).

Class-level CHIP (`chip_ext.distill`) learns one channel weight vector per class over a dataset, so its
map cannot adapt to the image at hand the way Grad-CAM does. Per-image CHIP keeps CHIP's model of the
network (gate channels of the layer, regress the target score on the pooled gated features z = d ⊙ a,
proximity-weighted, L1-penalised: eq. 11 with one image) but fits it on N perturbations of the image
being explained. Only the suffix of the network runs (N times per image: about what Score-CAM costs at
a layer with N channels). With `prior` (a class-level W), the Lasso penalises the distance to the prior,
|w - W_c|_1, instead of |w|_1: the image's own evidence moves the class-level weights only where it is
strong enough.

Region CHIP (`region_chip`) puts the same per-image gates on the cells of the layer's map instead of its
channels (every channel at the switched-off positions is 0) and regresses the score on the cell gates: a
map of what each region of the layer contributes, the measured counterpart of HiResCAM's per-position
gradient × activation.

    maps = image_chip(model, images, "blocks.6", target=labels)      # Tensor[B, H, W] in [0, 1]
    maps = region_chip(model, images, "blocks.4", target=labels)     # Tensor[B, H, W] in [0, 1]
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distillation.gates import content_keys, default_sigma, proximity, sample_gates
from .maps import Target, cached_split, check_images, inference_view, layer_activations, normalize_maps, resolve_target
from ..distillation.solver import admm_lasso, lambda_max

SCORES = ("logit", "prob")
# region CHIP's λ / λ_max: the best mean insertion - deletion over blocks.4 and blocks.6 of EfficientNet-Lite0 on
# the calibration half of the Imagenette val images, of 0.003, 0.01, 0.03, 0.1 (benchmarks/quality/region_chip.py)
REGION_LAM_RATIO = 0.03


def _check_options(images: Tensor, score: str, num_perturbations: int, lam_ratio: float, batch_size: int) -> None:
    check_images(images)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    if not isinstance(num_perturbations, int) or num_perturbations < 2:
        raise ValueError(f"num_perturbations must be an int >= 2; got {num_perturbations!r}")
    if not (isinstance(lam_ratio, (int, float)) and lam_ratio > 0):
        raise ValueError(f"lam_ratio must be > 0; got {lam_ratio!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")


def _gated_scores(suffix: nn.Module, A: Tensor, masks: Tensor, t: Tensor, score: str, batch_size: int) -> Tensor:
    """The target's score of suffix(A[i] * masks[i, n]) -> Tensor[B, N] float64. A: Tensor[B, K, h, w];
    masks: Tensor[B, N, ...] broadcastable against one image's [K, h, w] (channel gates [K, 1, 1] or
    spatial masks [1, h, w])."""
    B, N = masks.shape[:2]
    g = torch.empty(B, N, dtype=torch.float64, device=A.device)
    for i in range(B):
        for n0 in range(0, N, batch_size):
            m = masks[i, n0:n0 + batch_size]
            out = suffix(A[i:i + 1] * m).float()
            s = out.log_softmax(1).exp() if score == "prob" else out
            g[i, n0:n0 + len(m)] = s[:, t[i]].double()
    return g


def _layer_and_target(model: nn.Module, images: Tensor, layer: str, target: Target,
                      what: str) -> tuple[nn.Module, Tensor, Tensor]:
    """(the suffix after `layer`, its activations A Tensor[B, K, h, w], the targets Tensor[B]) for a
    per-image fit named `what` in the error for a layer without a spatial map."""
    view = inference_view(model)
    _, suffix = cached_split(view, layer)
    A = layer_activations(view, images, layer)
    if A.dim() != 4:
        raise ValueError(f"layer {layer!r} gives {list(A.shape)}; {what} needs [B, K, h, w]")
    with torch.no_grad():
        t = resolve_target(target, suffix(A.clone()))
    return suffix, A, t


def image_chip_weights(model: nn.Module, images: Tensor, layer: str, target: Target = None, *,
                       num_perturbations: int = 128, lam_ratio: float = 0.01, score: str = "logit",
                       max_drop: float = 0.5, sigma: float | None = None, fit_intercept: bool = True,
                       positive: bool = False, prior: Tensor | None = None, seed: int = 0,
                       batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """-> (W Tensor[B, K] float64: each image's channel weights for its target class, the layer's
    activations A Tensor[B, K, h, w], targets Tensor[B]).

    num_perturbations: N gated networks per image (row 0 the unperturbed one); gates as in
        distillation (`gates.sample_gates`, keyed by seed, layer and the image's values,
        `gates.content_keys`: a map does not depend on the rest of the batch).
    lam_ratio: λ as a fraction of the image's λ_max. score: "logit" or "prob" (softmax) of the target.
    fit_intercept: an unpenalised intercept (the score with every channel off is not forced to 0).
    prior: Tensor[B, K] or None; with it the penalty is |w - prior|_1 (prior in the same score units).
    """
    _check_options(images, score, num_perturbations, lam_ratio, batch_size)
    N = num_perturbations
    suffix, A, t = _layer_and_target(model, images, layer, target, "per-image CHIP")
    with torch.no_grad():
        B, K = A.shape[:2]
        if prior is not None and tuple(prior.shape) != (B, K):
            raise ValueError(f"prior must be Tensor[B, K] = [{B}, {K}]; got {list(prior.shape)}")
        gates = sample_gates(content_keys(images), N, K, seed=seed, layer=layer, max_drop=max_drop,
                             device=A.device)
        g = _gated_scores(suffix, A, gates.to(A.dtype)[:, :, :, None, None], t, score, batch_size)
        a = A.double().mean(dim=(2, 3))  # [B, K]
        z = gates.double() * a[:, None, :]  # [B, N, K]
        if prior is not None:
            g = g - torch.einsum("bnk,bk->bn", z, prior.double())
        W = _weighted_lasso(z, g, proximity(gates, sigma if sigma is not None else default_sigma(K)).double(),
                            lam_ratio, fit_intercept=fit_intercept, positive=positive and prior is None)
        if prior is not None:
            W = W + prior.double()
            if positive:
                W = W.clamp_min(0)
    return W, A, t


def _weighted_lasso(z: Tensor, g: Tensor, h: Tensor, lam_ratio: float, *, fit_intercept: bool,
                    positive: bool) -> Tensor:
    """Per image, min_w Σ_n h_n (g_n - b - w·z_n)² / Σ h + λ|w|_1 (b only with fit_intercept), λ =
    lam_ratio λ_max. z: Tensor[B, N, K], g, h: Tensor[B, N] float64 -> w Tensor[B, K] float64."""
    wsum = h.sum(1)
    G = torch.einsum("bn,bnk,bnl->bkl", h, z, z) / wsum[:, None, None]
    bvec = torch.einsum("bn,bn,bnk->bk", h, g, z) / wsum[:, None]
    kw = {}
    if fit_intercept:
        kw = {"fit_intercept": True, "x_mean": torch.einsum("bn,bnk->bk", h, z) / wsum[:, None],
              "y_mean": (h * g).sum(1) / wsum}
    means = {k: v for k, v in kw.items() if k != "fit_intercept"}
    lam = lam_ratio * lambda_max(bvec, positive=positive, **means)
    W, _ = admm_lasso(G, bvec, lam, positive=positive, warn=False, **kw)
    return W


def image_chip(model: nn.Module, images: Tensor, layer: str, target: Target = None, **kwargs) -> Tensor:
    """Per-image CHIP maps ReLU(Σ_k w_k A_k) at `layer`, upsampled (bilinear) and min-max normalised
    -> Tensor[B, H, W] in [0, 1]. kwargs: those of `image_chip_weights`."""
    W, A, _ = image_chip_weights(model, images, layer, target, **kwargs)
    maps = torch.relu(torch.einsum("bk,bkhw->bhw", W.float(), A.float()))
    return normalize_maps(maps, images.shape[-2:])


def auto_cell(h: int, w: int, num_perturbations: int) -> int:
    """The smallest cell side c with ceil(h / c) * ceil(w / c) <= num_perturbations."""
    c = 1
    while -(-h // c) * -(-w // c) > num_perturbations:
        c += 1
    return c


def region_chip_weights(model: nn.Module, images: Tensor, layer: str, target: Target = None, *,
                        cell: int | None = None,
                        num_perturbations: int = 256, lam_ratio: float = REGION_LAM_RATIO, score: str = "logit",
                        max_drop: float = 0.5, sigma: float | None = None, fit_intercept: bool = True,
                        positive: bool = False, seed: int = 0, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """-> (β Tensor[B, gh, gw] float64: the effect on the target's score of each cell of the layer's map,
    targets Tensor[B]).

    CHIP's gates over space instead of channels: the layer's map is cut into cells of cell × cell
    positions (gh × gw = ceil(h / cell) × ceil(w / cell) of them); each of N perturbations switches a
    random subset of cells off (every channel there set to 0; gates as `gates.sample_gates` over the R =
    gh·gw cells, keyed by seed, layer + "#cells" and the image's values), the suffix runs,
    and the same proximity-weighted Lasso regresses the score on the binary cell gates. β_r is then what
    cell r contributes: a measured, non-linear counterpart of HiResCAM's Σ_k ∂y/∂A_k(r) · A_k(r).
    cell: None (default) picks the smallest cell with no more cells than perturbations (R <= N, so the
        regression is determined: 14 x 14 maps keep single positions at N = 256, 28 x 28 get 2 x 2 cells;
        on the calibration half single positions of a 28 x 28 map at N = 256 gave scattered maps).
    Other options as in `image_chip_weights`.
    """
    _check_options(images, score, num_perturbations, lam_ratio, batch_size)
    if cell is not None and (not isinstance(cell, int) or isinstance(cell, bool) or cell < 1):
        raise ValueError(f"cell must be None or a positive int (layer positions per cell side); got {cell!r}")
    suffix, A, t = _layer_and_target(model, images, layer, target, "region CHIP")
    with torch.no_grad():
        B, _, h, w = A.shape
        if cell is None:
            cell = auto_cell(h, w, num_perturbations)
        gh, gw = -(-h // cell), -(-w // cell)
        gates = sample_gates(content_keys(images), num_perturbations, gh * gw, seed=seed,
                             layer=f"{layer}#cells", max_drop=max_drop, device=A.device)
        masks = gates.to(A.dtype).view(B, num_perturbations, gh, gw)
        masks = masks.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[:, :, None, :h, :w]  # [B, N, 1, h, w]
        g = _gated_scores(suffix, A, masks, t, score, batch_size)
        R = gh * gw
        beta = _weighted_lasso(gates.double(), g, proximity(gates, sigma if sigma is not None else default_sigma(R)).double(),
                               lam_ratio, fit_intercept=fit_intercept, positive=positive)
    return beta.view(B, gh, gw), t


def region_chip(model: nn.Module, images: Tensor, layer: str, target: Target = None, **kwargs) -> Tensor:
    """Region CHIP maps ReLU(β) (see `region_chip_weights`), upsampled (bilinear) from the cell grid and
    min-max normalised -> Tensor[B, H, W] in [0, 1]."""
    beta, _ = region_chip_weights(model, images, layer, target, **kwargs)
    return normalize_maps(torch.relu(beta.float()), images.shape[-2:])
