"""Per-image CHIP: the CHIP Lasso fitted on one image's own channel perturbations (beyond the paper).

Class-level CHIP (`chip_ext.distill`) learns one channel weight vector per class over a dataset, so its
map cannot adapt to the image at hand the way Grad-CAM does. Per-image CHIP keeps CHIP's model of the
network (gate channels of the layer, regress the target score on the pooled gated features z = d ⊙ a,
proximity-weighted, L1-penalised: eq. 11 with one image) but fits it on N perturbations of the image
being explained. Only the suffix of the network runs (N times per image: about what Score-CAM costs at
a layer with N channels). With `prior` (a class-level W), the Lasso penalises the distance to the prior,
|w - W_c|_1, instead of |w|_1: the image's own evidence moves the class-level weights only where it is
strong enough.

    maps = image_chip(model, images, "blocks.6", target=labels)      # Tensor[B, H, W] in [0, 1]
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .gates import default_sigma, proximity, sample_gates
from .maps import Target, cached_split, check_images, inference_view, layer_activations, normalize_maps, resolve_target
from .solver import admm_lasso, lambda_max

SCORES = ("logit", "prob")


def image_chip_weights(model: nn.Module, images: Tensor, layer: str, target: Target = None, *,
                       num_perturbations: int = 128, lam_ratio: float = 0.01, score: str = "logit",
                       max_drop: float = 0.5, sigma: float | None = None, fit_intercept: bool = True,
                       positive: bool = False, prior: Tensor | None = None, seed: int = 0,
                       batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """-> (W Tensor[B, K] float64: each image's channel weights for its target class, the layer's
    activations A Tensor[B, K, h, w], targets Tensor[B]).

    num_perturbations: N gated networks per image (row 0 the unperturbed one); gates as in
        distillation (`gates.sample_gates`, keyed by seed, layer and the image's position in the batch).
    lam_ratio: λ as a fraction of the image's λ_max. score: "logit" or "prob" (softmax) of the target.
    fit_intercept: an unpenalised intercept (the score with every channel off is not forced to 0).
    prior: Tensor[B, K] or None; with it the penalty is |w - prior|_1 (prior in the same score units).
    """
    check_images(images)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    if not isinstance(num_perturbations, int) or num_perturbations < 2:
        raise ValueError(f"num_perturbations must be an int >= 2; got {num_perturbations!r}")
    if not (isinstance(lam_ratio, (int, float)) and lam_ratio > 0):
        raise ValueError(f"lam_ratio must be > 0; got {lam_ratio!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    view = inference_view(model)
    _, suffix = cached_split(view, layer)
    N = num_perturbations
    A = layer_activations(view, images, layer)
    with torch.no_grad():
        if A.dim() != 4:
            raise ValueError(f"layer {layer!r} gives {list(A.shape)}; per-image CHIP needs [B, K, h, w]")
        t = resolve_target(target, suffix(A.clone()))
        B, K = A.shape[:2]
        if prior is not None and tuple(prior.shape) != (B, K):
            raise ValueError(f"prior must be Tensor[B, K] = [{B}, {K}]; got {list(prior.shape)}")
        gates = sample_gates(range(B), N, K, seed=seed, layer=layer, max_drop=max_drop, device=A.device)
        g = torch.empty(B, N, dtype=torch.float64, device=A.device)
        for i in range(B):
            for n0 in range(0, N, batch_size):
                d = gates[i, n0:n0 + batch_size].to(A.dtype)  # [n, K]
                out = suffix(A[i:i + 1] * d[:, :, None, None]).float()
                s = out.log_softmax(1).exp() if score == "prob" else out
                g[i, n0:n0 + len(d)] = s[:, t[i]].double()
        a = A.double().mean(dim=(2, 3))  # [B, K]
        z = gates.double() * a[:, None, :]  # [B, N, K]
        h = proximity(gates, sigma if sigma is not None else default_sigma(K)).double()  # [B, N]
        if prior is not None:
            g = g - torch.einsum("bnk,bk->bn", z, prior.double())
        wsum = h.sum(1)
        G = torch.einsum("bn,bnk,bnl->bkl", h, z, z) / wsum[:, None, None]
        bvec = torch.einsum("bn,bn,bnk->bk", h, g, z) / wsum[:, None]
        kw = {}
        if fit_intercept:
            kw = {"fit_intercept": True, "x_mean": torch.einsum("bn,bnk->bk", h, z) / wsum[:, None],
                  "y_mean": (h * g).sum(1) / wsum}
        means = {k: v for k, v in kw.items() if k != "fit_intercept"}
        lam = lam_ratio * lambda_max(bvec, positive=positive and prior is None, **means)
        W, _ = admm_lasso(G, bvec, lam, positive=positive and prior is None, warn=False, **kw)
        if prior is not None:
            W = W + prior.double()
            if positive:
                W = W.clamp_min(0)
    return W, A, t


def image_chip(model: nn.Module, images: Tensor, layer: str, target: Target = None, **kwargs) -> Tensor:
    """Per-image CHIP maps ReLU(Σ_k w_k A_k) at `layer`, upsampled (bilinear) and min-max normalised
    -> Tensor[B, H, W] in [0, 1]. kwargs: those of `image_chip_weights`."""
    W, A, _ = image_chip_weights(model, images, layer, target, **kwargs)
    maps = torch.relu(torch.einsum("bk,bkhw->bhw", W.float(), A.float()))
    return normalize_maps(maps, images.shape[-2:])
