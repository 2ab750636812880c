"""What each channel detects: the images and positions of a dataset where a channel's map is largest.

`atlas(model, loader, layer, top=16)` makes one streaming pass and keeps, per channel, the `top` images
whose map of that channel peaks highest (one entry per image: its peak value and the peak's position
in the layer's map). Only indices, positions and values are kept, not pixels, so it scales to
ImageNet (K × top entries). `receptive_field` measures, for a layer, the input region a position sees,
and `Atlas.crop_box` turns a kept position into the box of input pixels to show.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..explanation.maps import cached_split, inference_view, run_model

FORMAT = "chip_ext.channels.Atlas"
FORMAT_VERSION = 1


@dataclass
class ReceptiveField:
    """Where position (r, c) of a layer's map looks in the input: the box centred at
    (offset + r·stride_y, offset + c·stride_x) with the measured size, clipped to the image. `how`: how it
    was found ("gradient": the input gradient of one position at the map's centre, measured)."""

    size: tuple[int, int]  # (height, width) in input pixels of the box shown
    stride: tuple[float, float]
    offset: tuple[float, float]
    input_size: tuple[int, int]
    how: str = "gradient"
    support: tuple[int, int] | None = None  # (height, width) of every pixel with a non-zero gradient

    def box(self, r: int, c: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive, clipped to the input."""
        H, W = self.input_size
        cy, cx = self.offset[0] + r * self.stride[0], self.offset[1] + c * self.stride[1]
        y0, x0 = int(round(cy - self.size[0] / 2)), int(round(cx - self.size[1] / 2))
        return max(0, x0), max(0, y0), min(W, x0 + self.size[1]), min(H, y0 + self.size[0])


def receptive_field(model: nn.Module, layer: str, input_size: tuple[int, int] = (224, 224), *,
                    mass: float = 0.5) -> ReceptiveField:
    """Measured receptive field of `layer`, from the input gradient of the layer's centre position (summed
    over channels, for a random input): its support (every pixel with a non-zero gradient: the theoretical
    receptive field of a convolution stack, which for deep layers is the whole image) and the box shown,
    the smallest square around the position's centre that holds `mass` of the gradient's magnitude (the core
    of the effective receptive field; at EfficientNet-Lite0's blocks.6, 93 pixels for half the magnitude
    against 224 of support; mass=1.0 shows the support). The stride is the ratio of input to map size."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1]; got {mass!r}")
    view = inference_view(model)
    prefix, _ = cached_split(view, layer)
    H, W = input_size
    dtype = next((p.dtype for p in prefix.parameters() if p.is_floating_point()), torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, H, W, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    with torch.enable_grad():
        A = prefix(x)
        if A.dim() != 4:
            raise ValueError(f"layer {layer!r} gives {list(A.shape)}; a receptive field needs a map [B, K, h, w]")
        h, w = A.shape[-2:]
        r, c = h // 2, w // 2
        (grad,) = torch.autograd.grad(A[0, :, r, c].abs().sum(), x)
    weight = grad[0].abs().sum(0).double()
    seen = weight > 0
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    if not len(rows):
        raise ValueError(f"layer {layer!r}: no input pixel reaches its centre position (a constant map?)")
    stride = (H / h, W / w)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    support = (y1 - y0, x1 - x0)
    centre = ((y0 + y1) / 2, (x0 + x1) / 2)
    offset = (centre[0] - r * stride[0], centre[1] - c * stride[1])
    size, how = support, "gradient support"
    if mass < 1:
        total = float(weight.sum())
        cy, cx = int(centre[0]), int(centre[1])
        for half in range(0, max(H, W)):
            box = weight[max(0, cy - half):cy + half + 1, max(0, cx - half):cx + half + 1]
            if float(box.sum()) >= mass * total:
                side = 2 * half + 1
                size = (min(side, support[0]), min(side, support[1]))
                break
        how = f"gradient, {mass:.0%} of its magnitude"
    return ReceptiveField(size, stride, offset, (H, W), how, support)


@dataclass
class Atlas:
    """Per channel k of `layer`, its `top` images with the highest peak of the channel's map, in
    descending order: values [K, top] (−inf where fewer images were seen), images [K, top] (the image's
    index in the loader's order, −1 where empty), positions [K, top, 2] (row, column of the peak in the
    layer's h × w map)."""

    layer: str
    values: Tensor
    images: Tensor
    positions: Tensor
    map_size: tuple[int, int]
    input_size: tuple[int, int]
    images_seen: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.values.shape[0]

    @property
    def top(self) -> int:
        return self.values.shape[1]

    def update(self, A: Tensor, first_index: int) -> None:
        """Adds a batch of the layer's maps A: Tensor[B, K, h, w] whose images have the loader indices
        first_index .. first_index + B - 1. Ties keep the earlier image."""
        B, K, h, w = A.shape
        peak, where = A.detach().float().flatten(2).max(dim=2)  # [B, K]
        vals = torch.cat([self.values, peak.T.cpu()], dim=1)  # existing entries first: ties keep them
        idx = torch.cat([self.images, torch.arange(first_index, first_index + B).expand(K, B)], dim=1)
        pos = torch.cat([self.positions, torch.stack([where.T.cpu() // w, where.T.cpu() % w], dim=-1)], dim=1)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :self.top]
        self.values = vals.gather(1, order)
        self.images = idx.gather(1, order)
        self.positions = pos.gather(1, order[..., None].expand(-1, -1, 2))
        self.images_seen += B

    def crop_box(self, k: int, j: int, field: ReceptiveField) -> tuple[int, int, int, int]:
        """The input box (x0, y0, x1, y1) of channel k's j-th image: the receptive field of its peak."""
        r, c = self.positions[k, j].tolist()
        return field.box(r, c)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": self.layer, "values": self.values,
                "images": self.images, "positions": self.positions, "map_size": list(self.map_size),
                "input_size": list(self.input_size), "images_seen": self.images_seen, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        from ..importance import _plain, atomic_save

        state = self.state_dict()
        state["meta"] = _plain(state["meta"])
        atomic_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Atlas":
        from ..importance import read_state

        state = read_state(path, FORMAT, FORMAT_VERSION, "atlas", "Atlas.save / chip-ext channels")
        return cls(state["layer"], state["values"], state["images"], state["positions"], tuple(state["map_size"]),
                   tuple(state["input_size"]), state["images_seen"], state["meta"])


def empty_atlas(layer: str, K: int, top: int, map_size, input_size) -> Atlas:
    return Atlas(layer, torch.full((K, top), float("-inf")), torch.full((K, top), -1, dtype=torch.long),
                 torch.zeros(K, top, 2, dtype=torch.long), tuple(map_size), tuple(input_size))


def atlas(model: nn.Module, loader: Iterable, layer: str, top: int = 16, *, progress: bool = True) -> Atlas:
    """One pass over `loader` (images Tensor[B, 3, H, W], or (images, ...) items, in a fixed order): per
    channel of `layer`, the `top` images whose map of the channel peaks highest, with the peak's value and
    position. Only the model's prefix up to the layer runs (no gradient)."""
    from tqdm.auto import tqdm

    from ..distillation.streaming import images_of

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1; got {top!r}")
    view = inference_view(model)
    prefix, _ = cached_split(view, layer)
    result: Atlas | None = None
    seen = 0
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    with tqdm(total=total, unit="img", desc=f"atlas {layer}", disable=not progress, dynamic_ncols=True) as bar:
        for position, item in enumerate(loader):
            x = images_of(item, position)
            if not len(x):
                continue
            with torch.no_grad():
                A = run_model(prefix, view, x)
            if A.dim() != 4:
                raise ValueError(f"layer {layer!r} outputs {list(A.shape)}; an atlas needs a map [B, K, h, w]")
            if result is None:
                result = empty_atlas(layer, A.shape[1], top, A.shape[-2:], x.shape[-2:])
            result.update(A, seen)
            seen += len(x)
            bar.update(len(x))
    if result is None:
        raise ValueError("the loader produced no images")
    return result
