"""A loader's items as image batches: the image tensor of a tensor, tuple/list or dict item, and
`normalize` applied on the device (uint8 or [0, 1] images in, normalised float32 out)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def images_of(batch: Any, position: int, allow_uint8: bool = False) -> Tensor:
    """The image tensor [B, C, H, W] of one loader item: a tensor, a (images, ...) tuple/list, or a
    dict with an "image" key. A single image [C, H, W] counts as a batch of one. allow_uint8: uint8
    images too (distill's `normalize` turns them into floats on the device)."""
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    elif isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        x = batch["image"]
    else:
        raise TypeError(
            f"loader item {position} is a {type(batch).__name__}; expected an image tensor [B, C, H, W], "
            "a tuple/list whose first element is one, or a dict with an 'image' key")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or not (x.is_floating_point() or (allow_uint8 and x.dtype == torch.uint8)):
        hint = "" if x.dtype != torch.uint8 or x.dim() != 4 else \
            " (uint8 images: pass distill's normalize=(mean, std) to convert them on the device)"
        raise TypeError(f"loader item {position} holds a {x.dim()}-D {x.dtype} tensor of shape "
                        f"{list(x.shape)}; expected floating-point images [B, C, H, W]{hint}")
    return x


def device_normalizer(normalize, device: torch.device):
    """normalize = (mean, std) per channel -> a function of images on the device: uint8 (0-255) or float
    in [0, 1] -> (x - mean) / std in float32. None -> None."""
    if normalize is None:
        return None
    mean = torch.tensor([float(m) for m in normalize[0]], device=device)[:, None, None]
    std = torch.tensor([float(v) for v in normalize[1]], device=device)[:, None, None]

    def apply(x: Tensor) -> Tensor:
        if x.shape[1] != mean.shape[0]:
            raise ValueError(f"normalize has {mean.shape[0]} channels but the images have {x.shape[1]}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - mean) / std
    return apply
