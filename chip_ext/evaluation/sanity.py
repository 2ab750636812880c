"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018): cascading model-parameter
randomisation. The model's layers are re-initialised from the top down, one stage at a time; a map that
explains the model must change as its weights do. Each method's maps on the randomised model are compared
with its maps on the trained model on the same images (Spearman rank correlation, with and without
absolute values, and SSIM): values that stay near 1 as layers are randomised mean the map shows the image
(edges, the object's outline), not what the model learned.

    for stage, randomized in sanity.cascading_randomization(model):
        rho = sanity.rank_correlation(maps_trained, method(randomized, images, targets))
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def top_down_stages(model: nn.Module) -> list[str]:
    """The module names randomised one stage at a time, output end first: the model's top-level
    children that hold parameters, with Sequential / ModuleList containers (stages of blocks) expanded
    into their children. For timm's EfficientNet: classifier, bn2, conv_head, blocks.6 ... blocks.0,
    bn1, conv_stem."""
    stages = []
    for name, child in model.named_children():
        parts = ([(f"{name}.{n}", c) for n, c in child.named_children()]
                 if isinstance(child, (nn.Sequential, nn.ModuleList)) else [(name, child)])
        stages += [n for n, m in parts if any(True for _ in m.parameters())]
    return stages[::-1]


def randomize(module: nn.Module, *, seed: int = 0) -> None:
    """Re-initialises every parameter of `module` in place as its layers do at construction
    (`reset_parameters`; batch norms also forget their running statistics)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def cascading_randomization(model: nn.Module, stages: Sequence[str] | None = None, *,
                            seed: int = 0, seed_step: int = 1) -> Iterator[tuple[str, nn.Module]]:
    """Yields (stage name, a copy of `model` with that stage and every stage before it randomised),
    stages in the order given (default `top_down_stages`: output end first). Stage i draws its weights
    with seed `seed + i * seed_step` (seed_step=0, seed=43 and Quantus's layer list reproduce Quantus's
    MPRT draws). The user's model is never changed (one deep copy, randomised further at each step)."""
    stages = top_down_stages(model) if stages is None else list(stages)
    known = dict(model.named_modules())
    missing = [s for s in stages if s not in known]
    if missing:
        raise ValueError(f"stages {missing} are not modules of the model; e.g. {top_down_stages(model)[:6]}")
    randomized = copy.deepcopy(model)
    for i, name in enumerate(stages):
        randomize(randomized.get_submodule(name), seed=seed + i * seed_step)
        yield name, randomized


def _per_image(maps, absolute: bool) -> np.ndarray:
    """[B, H, W] or [B, C, H, W] (channels summed, after |.| when absolute) -> float64 [B, H*W]."""
    m = maps.detach().double().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps, np.float64)
    if m.ndim == 4:
        m = np.abs(m).sum(1) if absolute else m.sum(1)
    elif m.ndim != 3:
        raise ValueError(f"maps must be [B, H, W] or [B, C, H, W]; got shape {list(m.shape)}")
    elif absolute:
        m = np.abs(m)
    return m.reshape(len(m), -1)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks of each row, ties given their average rank (as scipy.stats.rankdata)."""
    out = np.empty_like(v)
    for i, row in enumerate(v):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        out[i] = (ends - (counts - 1) / 2.0)[inverse]
    return out


def rank_correlation(a, b, *, absolute: bool = False) -> np.ndarray:
    """Spearman's rank correlation between maps a and b of the same images, per image -> [B]
    (NaN where a map is constant). a, b: [B, H, W] or [B, C, H, W]."""
    x, y = _per_image(a, absolute), _per_image(b, absolute)
    if x.shape != y.shape:
        raise ValueError(f"a and b must be maps of the same images and size; got {list(x.shape)} and {list(y.shape)}")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1), np.nan)


def ssim(a, b, *, absolute: bool = True) -> np.ndarray:
    """Structural similarity of maps a and b per image -> [B], each map min-max normalised to [0, 1]
    first (scikit-image's `structural_similarity`, data_range 1). a, b: [B, H, W] or [B, C, H, W]."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("sanity.ssim needs scikit-image: pip install scikit-image") from err
    x, y = _per_image(a, absolute), _per_image(b, absolute)
    if x.shape != y.shape:
        raise ValueError(f"a and b must be maps of the same images and size; got {list(x.shape)} and {list(y.shape)}")
    shape = (np.asarray(a.shape if hasattr(a, "shape") else np.shape(a))[-2:]).tolist()

    def unit(m):
        span = m.max() - m.min()
        return (m - m.min()) / span if span > 0 else np.zeros_like(m)

    return np.array([structural_similarity(unit(p).reshape(shape), unit(q).reshape(shape), data_range=1.0)
                     for p, q in zip(x, y)])
