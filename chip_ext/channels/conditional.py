"""Channel-conditional CHIP maps: class c's map at a layer split into the part each channel gives,
W[c, k] · A_k (the class map is ReLU of their sum), so a user sees where in the image each of the
class's top channels speaks for it (zennit-crp's "conditional heat maps", from CHIP's weights)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explanation.explain import _given_targets
from ..importance import Importance
from ..explanation.maps import cached_split, check_images, inference_view, layer_activations, resolve_target, upsample


@dataclass
class ConditionalMaps:
    """maps: Tensor[B, k, H, W], W[c, k_j] · A_{k_j} upsampled (bilinear) to the input size, in the units
    of the class map (signed: a negative weight gives a map that speaks against the class);
    channels: Tensor[B, k] the channels k_j, in the order of `Importance.top_channels` (by effect unless
    `by="weight"`; `by` as there); weights: Tensor[B, k] W[c, k_j]; targets: Tensor[B] the class c of each image;
    class_maps: Tensor[B, H, W] the whole class map before ReLU, Σ_k W[c, k] A_k (upsampled), for scale."""
    maps: Tensor
    channels: Tensor
    weights: Tensor
    targets: Tensor
    class_maps: Tensor


def conditional_maps(model: nn.Module, images: Tensor, importance: Importance, layer: str, target=None, *,
                     k: int = 4, by: str | None = None) -> ConditionalMaps:
    """Class c's CHIP map at `layer` for each of its top-k channels (`importance.top_channels(c, layer,
    k, by=by)`): images Tensor[B, 3, H, W]; target: None (each image's top-1 prediction), a class index
    or name, or one per image. Summed over every channel (k = K) the maps give the class map before
    ReLU and normalisation (`chip_maps`)."""
    check_images(images)
    if layer not in importance.weights:
        raise ValueError(f"layer {layer!r} is not in the importance (layers: {importance.layers})")
    K = importance.weights[layer].shape[1]
    if not isinstance(k, int) or not 1 <= k <= K:
        raise ValueError(f"k must be an integer in [1, {K}] (the layer's channels); got {k!r}")
    view = inference_view(model)
    A = layer_activations(view, images, layer).float()
    if A.dim() != 4 or A.shape[1] != K:
        raise ValueError(f"layer {layer!r} of this model gives {list(A.shape)} but the importance has K={K}; "
                         "was it distilled on another model?")
    if target is None:
        _, suffix = cached_split(view, layer)
        with torch.no_grad():
            t = resolve_target(None, suffix(A.clone()))
    else:
        t = _given_targets(target, importance, A.shape[0], A.device)
    rows = [importance.row(int(c)) for c in t.tolist()]
    W = importance.weights[layer][rows].to(device=A.device, dtype=torch.float32)  # [B, K]
    top = torch.stack([importance.top_channels(int(c), k, layer, by=by)[0].to(A.device) for c in t.tolist()])
    w = W.gather(1, top)  # [B, k]
    parts = w[:, :, None, None] * A.gather(1, top[:, :, None, None].expand(-1, -1, *A.shape[2:]))
    size = images.shape[-2:]
    whole = torch.einsum("bk,bkhw->bhw", W, A)
    parts = F.interpolate(parts, size=tuple(size), mode="bilinear", align_corners=False)  # as `upsample`
    return ConditionalMaps(parts.cpu(), top.cpu(), w.cpu(), t.cpu(), upsample(whole, size).cpu())
