"""Pictures: heat-map overlays, method-comparison grids (paper Figs. 3-5), the channel-importance
map (Fig. 9) and the top-k channel overlap between classes (Fig. 10). Everything is written as PNG
with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import itertools
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from ..importance import Importance  # noqa: E402


def _np_image(image: Tensor) -> np.ndarray:
    """Tensor[3, H, W] in [0, 1] -> float array [H, W, 3]."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be Tensor[3, H, W] in [0, 1]; got {list(image.shape)}")
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def overlay(image: Tensor, heatmap: Tensor, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """A heat map [H, W] in [0, 1] over an image [3, H, W] in [0, 1] -> uint8 array [H, W, 3]."""
    img = _np_image(image)
    if heatmap.shape != img.shape[:2]:
        raise ValueError(f"heatmap must be [H, W] = {list(img.shape[:2])} to match the image; "
                         f"got {list(heatmap.shape)}")
    colored = matplotlib.colormaps[cmap](heatmap.detach().float().cpu().clamp(0, 1).numpy())[..., :3]
    return (255 * ((1 - alpha) * img + alpha * colored)).round().astype(np.uint8)


def gradient_image(grad: Tensor) -> np.ndarray:
    """A gradient-like map [3, H, W] (guided backprop) shown as an image: centred on grey, ±3 std."""
    g = grad.detach().float().cpu()
    g = (g - g.mean()) / (g.std() + 1e-12) * 0.15 + 0.5
    return (255 * g.clamp(0, 1).permute(1, 2, 0).numpy()).round().astype(np.uint8)


def save_grid(path: str | os.PathLike, images: Tensor, columns: Mapping[str, Tensor], *,
              row_titles: Sequence[str] | None = None, alpha: float = 0.5, dpi: int = 100) -> Path:
    """Rows: images; columns: the original, then one per method (maps [B, H, W] are overlaid,
    gradient maps [B, 3, H, W] shown as images). images: Tensor[B, 3, H, W] in [0, 1].
    row_titles: e.g. "tabby cat (p=0.82)" per image. Returns the path written."""
    B = images.shape[0]
    for name, maps in columns.items():
        if maps.shape[0] != B or tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
            raise ValueError(f"column {name!r} must hold one map per image at {list(images.shape[-2:])}; "
                             f"got {list(maps.shape)}")
    if row_titles is not None and len(row_titles) != B:
        raise ValueError(f"row_titles must have one title per image ({B}); got {len(row_titles)}")
    fig = grid_figure(images, columns, row_titles=row_titles, alpha=alpha)
    return _save(fig, path, dpi)


TITLE_CHARS = 30  # characters per line of a 2.4-inch column title at 8 pt


def wrap_title(title: str, width: int = TITLE_CHARS) -> str:
    """Breaks a row title into lines that fit its column (a long file name cut at the left edge:
    "2102040_1003.JPEG: English springer" for n02102040_1003.JPEG), at spaces where it can."""
    return textwrap.fill(title, width=width, break_long_words=True, break_on_hyphens=False)


def grid_figure(images: Tensor, columns: Mapping[str, Tensor], *, row_titles: Sequence[str] | None = None,
                alpha: float = 0.5):
    """The figure of `save_grid` (not saved)."""
    B = images.shape[0]
    ncol = 1 + len(columns)
    fig, axes = plt.subplots(B, ncol, figsize=(2.4 * ncol, 2.5 * B), squeeze=False)
    for i in range(B):
        axes[i][0].imshow(_np_image(images[i]))
        axes[i][0].set_title(wrap_title(row_titles[i]) if row_titles else "image", fontsize=8)
        for j, (name, maps) in enumerate(columns.items(), start=1):
            m = maps[i]
            axes[i][j].imshow(gradient_image(m) if m.dim() == 3 else overlay(images[i], m, alpha=alpha))
            axes[i][j].set_title(name, fontsize=9)
    for ax in itertools.chain.from_iterable(axes):
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_channel_importance(importance: Importance, path: str | os.PathLike, *, layer: str | None = None,
                            classes: Sequence[int | str] | None = None, dpi: int = 100) -> Path:
    """Fig. 9: the importance W of every channel (rows) for each class (columns) of one layer."""
    layer = layer or importance.layers[-1]
    if layer not in importance.weights:
        raise ValueError(f"layer {layer!r} not in the importance (layers: {importance.layers})")
    rows = list(range(len(importance.classes))) if classes is None else [importance.row(c) for c in classes]
    W = importance.weights[layer][rows].T.numpy()  # [K, C]
    labels = [_label(importance, r) for r in rows]
    vmax = float(np.abs(W).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2.5), 5.0))
    im = ax.imshow(W, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"channel of {layer} (K={W.shape[0]})")
    ax.set_title(f"CHIP channel importance, {layer}", fontsize=10)
    fig.colorbar(im, ax=ax, label="W[c, k]")
    fig.tight_layout()
    return _save(fig, path, dpi)


def top_channel_overlap(importance: Importance, classes: Sequence[int | str], *, k: int = 10,
                        layer: str | None = None, by: str | None = None) -> dict[str, object]:
    """Top-k channels of each class and the pairwise overlaps |top_k(a) ∩ top_k(b)| (paper IV-E). by:
    `Importance.top_channels`'s ranking ("effect", the default when the importance has feature means,
    or "weight", the paper's)."""
    layer = layer or importance.layers[-1]
    by = by or ("effect" if importance.feature_means is not None else "weight")
    top = {c: set(importance.top_channels(c, k, layer, by=by)[0].tolist()) for c in classes}
    overlap = np.array([[len(top[a] & top[b]) for b in classes] for a in classes])
    return {"layer": layer, "k": k, "by": by, "classes": list(classes),
            "top": {str(c): sorted(v) for c, v in top.items()}, "overlap": overlap.tolist()}


def plot_top_channel_overlap(importance: Importance, classes: Sequence[int | str], path: str | os.PathLike, *,
                             k: int = 10, layer: str | None = None, dpi: int = 100, by: str | None = None) -> Path:
    """Fig. 10: which of the layer's channels are in each class's top k, and how many they share."""
    info = top_channel_overlap(importance, classes, k=k, layer=layer, by=by)
    labels = [_label(importance, importance.row(c)) for c in classes]
    channels = sorted(set().union(*map(set, info["top"].values())))
    member = np.array([[ch in info["top"][str(c)] for ch in channels] for c in classes], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(6.0, 0.25 * len(channels) + 4), 2.0 + 0.4 * len(classes)),
                                 gridspec_kw={"width_ratios": [max(1, len(channels)), len(classes) + 1]})
    a1.imshow(member, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    a1.set_yticks(range(len(classes)), labels, fontsize=8)
    a1.set_xticks(range(len(channels)), [str(c) for c in channels], rotation=90, fontsize=6)
    a1.set_xlabel(f"channels in a top-{k} set by {info['by']} ({info['layer']})")
    ov = np.array(info["overlap"])
    a2.imshow(ov, cmap="Blues", vmin=0, vmax=k)
    for i, j in itertools.product(range(len(classes)), repeat=2):
        a2.text(j, i, str(ov[i, j]), ha="center", va="center", fontsize=8)
    a2.set_xticks(range(len(classes)), labels, rotation=45, ha="right", fontsize=8)
    a2.set_yticks(range(len(classes)), labels, fontsize=8)
    a2.set_title(f"shared top-{k}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _label(importance: Importance, row: int) -> str:
    c = importance.classes[row]
    return f"{importance.class_names[row]} ({c})" if importance.class_names else str(c)


def _save(fig, path, dpi) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def save_overlay(path: str | os.PathLike, image: Tensor, heatmap: Tensor, *, alpha: float = 0.5) -> Path:
    """One overlay (or gradient image, for a [3, H, W] map) written as a PNG at the image's size."""
    from PIL import Image

    arr = gradient_image(heatmap) if heatmap.dim() == 3 else overlay(image, heatmap, alpha=alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


__all__ = ["overlay", "gradient_image", "save_grid", "save_overlay", "plot_channel_importance",
           "top_channel_overlap", "plot_top_channel_overlap"]
