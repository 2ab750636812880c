"""Faithfulness of saliency maps: deletion and insertion (the RISE paper's protocol) and ROAD
(pytorch-grad-cam's implementation).

Deletion (Petsiuk et al. 2018, §4.1): pixels are removed in the order of the map, most salient first,
`step` pixels at a time (all three colour channels), replaced by the deletion substrate (zeros of the
normalised input, as in the authors' code); the softmax probability of the target class is recorded
after each step and the area under that curve (x from 0 to 1, trapezoid rule) is the score: lower is
better. Insertion starts from the insertion substrate (the image blurred by a Gaussian, kernel 11,
σ = 5, as in the authors' code) and puts the original pixels back in the same order: higher is better.
Ties in the map are broken by pixel index (a stable sort), so a constant map removes pixels in raster
order.

ROAD (Rong et al. 2022): pytorch-grad-cam's ROADCombined, (LeRF − MoRF) / 2 averaged over
percentiles, with the noisy linear imputation of the removed pixels: higher is better.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explanation.maps import check_images, inference_view, resolve_target

METRICS = ("deletion", "insertion", "road")


def blur(images: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Gaussian blur per channel (zero padding, like the RISE authors' conv2d) -> same shape."""
    r = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    g = torch.exp(-r * r / (2 * sigma * sigma))
    g = (g / g.sum()).to(images.dtype).to(images.device)
    C = images.shape[1]
    x = F.conv2d(images, g.view(1, 1, 1, -1).expand(C, 1, 1, kernel), padding=(0, kernel // 2), groups=C)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, kernel, 1), padding=(kernel // 2, 0), groups=C)


def auc(curve: Tensor) -> Tensor:
    """Area under curves sampled at equal steps on x in [0, 1]: Tensor[B, S+1] -> Tensor[B]."""
    n = curve.shape[1] - 1
    if n < 1:
        raise ValueError("a curve needs at least two points")
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def _check(images: Tensor, maps: Tensor, step: int) -> None:
    check_images(images)
    if not isinstance(maps, Tensor) or maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"maps must be Tensor[B, H, W] = {[images.shape[0], *images.shape[-2:]]} to match "
                         f"images; got {list(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive int (pixels per step); got {step!r}")


def perturbation_curve(model: nn.Module, images: Tensor, maps: Tensor, target=None, *, mode: str = "deletion",
                       step: int = 224, batch_size: int = 64) -> Tensor:
    """The RISE deletion or insertion curve -> Tensor[B, S+1] of target probabilities, S =
    ceil(H*W / step), point 0 before anything changes (mode="deletion": the image; "insertion": the
    blurred image), point S when every pixel is replaced."""
    _check(images, maps, step)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
    view = inference_view(model)
    B, C, H, W = images.shape
    HW = H * W
    S = -(-HW // step)
    if mode == "deletion":
        start, finish = images, torch.zeros_like(images)
    else:
        start, finish = blur(images), images
    order = torch.sort(maps.reshape(B, HW).float(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(HW, device=order.device).expand(B, HW))  # position of each pixel
    with torch.no_grad():
        t = resolve_target(target, view(images))
        curve = torch.empty(B, S + 1, device=images.device)
        per = max(1, batch_size // B)
        for s0 in range(0, S + 1, per):
            steps = torch.arange(s0, min(S + 1, s0 + per), device=images.device)  # [n]
            changed = (rank[:, None, :] < (steps * step)[None, :, None]).view(B, len(steps), 1, H, W)
            x = torch.where(changed, finish[:, None], start[:, None]).flatten(0, 1)
            prob = view(x).float().softmax(dim=1).view(B, len(steps), -1)
            curve[:, s0:s0 + len(steps)] = prob.gather(2, t[:, None, None].expand(B, len(steps), 1)).squeeze(2)
    return curve


def deletion_insertion(model: nn.Module, images: Tensor, maps: Tensor, target=None, *, step: int = 224,
                       batch_size: int = 64) -> dict[str, Tensor]:
    """{"deletion": AUC Tensor[B] (lower is better), "insertion": AUC Tensor[B] (higher is better)}."""
    return {mode: auc(perturbation_curve(model, images, maps, target, mode=mode, step=step, batch_size=batch_size))
            for mode in ("deletion", "insertion")}


def road(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, *,
         percentiles: Sequence[int] = (20, 40, 60, 80), seed: int = 0) -> Tensor:
    """pytorch-grad-cam's ROADCombined on the softmax probability of the target class ->
    Tensor[B] (higher is better). The imputation's noise is drawn from a generator seeded with `seed`
    (the global RNG state is restored afterwards)."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    _check(images, maps, 1)
    view = inference_view(model)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in target]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scores = ROADCombined(percentiles=list(percentiles))(images, maps.detach().float().cpu().numpy(),
                                                             targets, view)
    return torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
