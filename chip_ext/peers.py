"""The CAM family as pytorch-grad-cam computes it: CHIP's peers through the peers' own library.

Each peer runs on a private inference view of the model (`maps.inference_view(private=True)`): the
library registers module hooks and calls model.eval(), neither reaches the user's model. The maps
follow the conventions of `chip_ext.maps`: the true target class given by the caller, bilinear
upsampling to the input size (the library's cv2 resize, half-pixel centres like ours), then per-image
min-max normalisation to [0, 1] (re-applied after the resize, so every method's maximum is exactly 1).

    fn = peers.cam_method(model, "gradcam++", "blocks.5")
    maps = fn(images, targets)          # images: Tensor[B, 3, H, W], targets: Tensor[B] -> Tensor[B, H, W]
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .maps import check_images, inference_view, normalize_maps

MapFn = Callable[[Tensor, Tensor], Tensor]

# name in chip_ext -> pytorch_grad_cam class name; "class-agnostic" ones ignore the target
CAM_CLASSES = {
    "gradcam_pytorch_grad_cam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "layercam": "LayerCAM",
    "xgradcam": "XGradCAM",
    "eigencam": "EigenCAM",
    "hirescam": "HiResCAM",
}
CLASS_AGNOSTIC = {"eigencam"}
# peers that run the whole model once per channel of the layer (cost grows with K)
PER_CHANNEL = {"scorecam", "ablationcam"}


def cam_method(model: nn.Module, name: str, layer: str, *, batch_size: int = 64) -> MapFn:
    """A map function (images [B, 3, H, W], targets [B]) -> maps [B, H, W] in [0, 1] for the
    pytorch-grad-cam method `name` (a key of CAM_CLASSES) at `layer` (a module name of `model`).
    batch_size: how many masked or ablated copies Score-CAM and Ablation-CAM run at once."""
    if name not in CAM_CLASSES:
        raise ValueError(f"unknown pytorch-grad-cam method {name!r}; choose from {sorted(CAM_CLASSES)}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str); got {type(layer).__name__}")
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"layer {layer!r} is not a module of the model") from None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")

    def fn(images: Tensor, targets: Tensor) -> Tensor:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        check_images(images)
        view = inference_view(model, private=True)  # hooks and eval() stay on this copy
        cls = getattr(pytorch_grad_cam, CAM_CLASSES[name])
        kwargs = {"batch_size": batch_size} if name == "ablationcam" else {}
        with cls(model=view, target_layers=[view.get_submodule(layer)], **kwargs) as cam:
            if name == "scorecam":
                cam.batch_size = batch_size
            with torch.enable_grad():
                out = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in targets])
        maps = torch.from_numpy(out).float().to(images.device)
        return normalize_maps(maps, images.shape[-2:])

    return fn
