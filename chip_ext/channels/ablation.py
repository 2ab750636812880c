"""Is a per-class channel ranking causal? Class-selective channel ablation.

For each class c, switch off the top-k channels of c's ranking at the layer (set them to zero, or to the
channel's mean map over the images) and measure on held-out images (i) the fall of class c's
probability on images of class c and (ii) the fall of the true class's probability on images of other
classes. A ranking that knows what class c relies on makes (i) large and (ii) small: selectivity =
(i) - (ii). keep=True measures sufficiency instead: every channel but the top-k is switched off.

Per image: `own[i, k]` is the fall of p(y_i) when y_i's top-k are switched off; `off[i, k]` the mean
fall of p(y_i) when the top-k of other classes (a random sample of classes that image i is drawn for)
are. Selectivity = mean_i own - mean_i off, so intervals come from resampling images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..evaluation.stats import bootstrap_interval
from ..explanation.maps import cached_split, inference_view, layer_activations
from .rankings import top_k

MODES = ("zero", "mean")


@dataclass
class AblationResult:
    """Per image (rows, in the order of the images given) and per k (columns, `ks`): `own` the fall of the
    true class's probability when its own class's top-k channels are off; `own_hit` whether the image
    is still classified right then; `off` the mean fall of the true class's probability when other
    classes' top-k are off (NaN for an image no other class was applied to); `base_prob`, `base_hit`:
    the unablated model."""

    ks: list[int]
    own: np.ndarray
    own_hit: np.ndarray
    off: np.ndarray
    base_prob: np.ndarray
    base_hit: np.ndarray
    meta: dict = field(default_factory=dict)

    def selectivity(self) -> np.ndarray:
        """mean_i own - mean_i off, per k."""
        return np.nanmean(self.own, axis=0) - np.nanmean(self.off, axis=0)

    def summary(self, boot: int = 2000, seed: int = 0) -> dict:
        """Per k: own fall, off fall, selectivity, accuracy after ablation, each with a 95% bootstrap
        interval over images."""
        rows = {}
        for j, k in enumerate(self.ks):
            rows[str(k)] = {
                "own_drop": bootstrap_interval(self.own[:, j], boot=boot, seed=seed),
                "off_drop": bootstrap_interval(self.off[:, j], boot=boot, seed=seed),
                "selectivity": bootstrap_interval(self.own[:, j], self.off[:, j], boot=boot, seed=seed),
                "accuracy_after": bootstrap_interval(self.own_hit[:, j].astype(float), boot=boot, seed=seed),
            }
        return {"ks": self.ks, "images": int(self.own.shape[0]), "accuracy_before": float(self.base_hit.mean()),
                "per_k": rows, **self.meta}


def _check(images: Tensor, labels: Tensor, scores: Tensor, classes: Sequence[int], ks, mode: str) -> list[int]:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be Tensor[B, 3, H, W]; got {getattr(images, 'shape', type(images).__name__)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be Tensor[B] with B={images.shape[0]}; got {list(labels.shape)}")
    if scores.dim() != 2 or scores.shape[0] != len(classes):
        raise ValueError(f"scores must be Tensor[C, K] with C={len(classes)} (one row per class); got {list(scores.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 or k > scores.shape[1] for k in ks):
        raise ValueError(f"ks must be channel counts between 1 and K={scores.shape[1]}; got {ks}")
    return ks


def ablation(model: nn.Module, images: Tensor, labels: Tensor, layer: str, scores: Tensor, classes: Sequence[int], *,
             ks: Sequence[int] = (1, 2, 4, 8, 16), mode: str = "zero", keep: bool = False,
             others_per_class: int = 50, seed: int = 0, batch_size: int = 64) -> AblationResult:
    """Class-selective ablation of the ranking `scores` (Tensor[C, K], row i for class classes[i]) at
    `layer`, measured on `images` (Tensor[B, 3, H, W], preprocessed) with true `labels` (Tensor[B]).

    Each class of `classes` that has images is ablated on its own images and on up to `others_per_class`
    images of other classes (a sample drawn with `seed`). mode="zero" sets the channels to 0; "mean" to
    their mean map over `images`. keep=True: sufficiency, every channel but the top-k is switched off.
    Only the model's suffix after the layer runs per ablation; the prefix runs once per call (once for
    several calls on the same images tensor inside `chip_ext.maps.shared_activations()`)."""
    labels = torch.as_tensor(labels).long().cpu()
    ks = _check(images, labels, scores, classes, ks, mode)
    view = inference_view(model)
    prefix, suffix = cached_split(view, layer)
    with torch.no_grad():
        A = layer_activations(view, images, layer)  # once per images and layer inside shared_activations()
        fill = A.mean(dim=0) if mode == "mean" else torch.zeros_like(A[0])

        def probs(idx: Tensor, off: Tensor | None) -> Tensor:
            """p(true class) of images idx with the channels `off` (bool [K]) replaced by the fill."""
            out = []
            for i in range(0, len(idx), batch_size):
                a = A[idx[i:i + batch_size]]
                if off is not None:
                    a = torch.where(off[None, :, None, None], fill[None], a)
                p = torch.softmax(suffix(a.clone()).float(), dim=1)
                out.append(p)
            p = torch.cat(out)
            return p

        every = torch.arange(len(A))
        p0_all = probs(every, None)
        y = labels.to(p0_all.device)
        base_prob = p0_all.gather(1, y[:, None]).squeeze(1).cpu().numpy()
        base_hit = (p0_all.argmax(1) == y).cpu().numpy()
        I, nk, K = len(A), len(ks), scores.shape[1]
        own = np.full((I, nk), np.nan)
        own_hit = np.zeros((I, nk), dtype=bool)
        off_sum, off_count = np.zeros((I, nk)), np.zeros(I)
        rng = np.random.default_rng(seed)
        lab = labels.numpy()
        tops = {k: top_k(scores, k).cpu() for k in ks}
        for r, c in enumerate(classes):
            mine = np.nonzero(lab == int(c))[0]
            if not len(mine):
                continue
            others = np.nonzero(lab != int(c))[0]
            others = rng.choice(others, size=min(others_per_class, len(others)), replace=False) if len(others) else others
            idx = torch.as_tensor(np.concatenate([mine, others]), dtype=torch.long)
            off_count[others] += 1
            for j, k in enumerate(ks):
                off = torch.zeros(K, dtype=torch.bool)
                off[tops[k][r]] = True
                if keep:
                    off = ~off
                p = probs(idx, off.to(A.device))
                pt = p.gather(1, y[idx][:, None]).squeeze(1).cpu().numpy()
                drop = base_prob[idx.numpy()] - pt
                own[mine, j] = drop[:len(mine)]
                own_hit[mine, j] = (p[:len(mine)].argmax(1) == y[idx[:len(mine)]]).cpu().numpy()
                off_sum[others, j] += drop[len(mine):]
        with np.errstate(invalid="ignore"):
            off_mean = np.where(off_count[:, None] > 0, off_sum / np.maximum(off_count, 1)[:, None], np.nan)
    return AblationResult(ks, own, own_hit, off_mean, base_prob, base_hit,
                          meta={"layer": layer, "mode": mode, "keep": keep, "others_per_class": others_per_class})
