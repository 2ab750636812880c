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

# name in chip_ext -> pytorch_grad_cam class name (eigencam ignores the target class)
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
# peers whose map is a formula of the layer's activations and their gradients only: with
# shared=True they are drawn by the library's own get_cam_image from one forward of the model and
# one backward through the suffix after the layer, shared by every such peer on the same batch
# multi-layer peers: name -> (pytorch_grad_cam class, base method of RefineCAM or None); LayerCAM over
# several target layers is the library's own fusion (the mean of each layer's [0, 1] map)
MULTI_LAYER = {"refinecam": ("RefineCAM", "GradCAMPlusPlus"), "refinecam_gradcam": ("RefineCAM", "GradCAM"),
               "layercam_multi": ("LayerCAM", None), "gradcam_multi": ("GradCAM", None)}
FROM_GRADIENTS = {"gradcam_pytorch_grad_cam", "gradcam++", "layercam", "xgradcam", "eigencam", "hirescam"}


class GradientCache:
    """The layer's activations and the target scores' gradients for the last batch seen (one per
    layer; pass the same object as `shared=` to several peers so they share one backward)."""

    def __init__(self):
        self.images, self.key, self.value = None, None, None

    def get(self, model: nn.Module, layer: str, images: Tensor, targets: Tensor):
        # the same tensor object, unmodified (it is held here, so its memory is not reused by another)
        key = (images._version, tuple(int(c) for c in targets))
        if images is not self.images or key != self.key:
            from .maps import cached_split, layer_activations

            view = inference_view(model)
            _, suffix = cached_split(view, layer)
            A = layer_activations(view, images, layer)
            with torch.enable_grad():
                A = A.detach().requires_grad_(True)
                logits = suffix(A.clone())
                (grad,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1).to(logits.device)).sum(), A)
            self.images, self.key = images, key
            self.value = (A.detach().cpu().numpy(), grad.detach().cpu().numpy())
        return self.value


def cam_method(model: nn.Module, name: str, layer: str, *, batch_size: int = 64,
               shared: "bool | GradientCache" = False) -> MapFn:
    """A map function (images [B, 3, H, W], targets [B]) -> maps [B, H, W] in [0, 1] for the
    pytorch-grad-cam method `name` (a key of CAM_CLASSES) at `layer` (a module name of `model`).
    batch_size: how many masked or ablated copies Score-CAM and Ablation-CAM run at once.
    shared: True or a GradientCache: for the methods in FROM_GRADIENTS, compute the activations and
    gradients once per batch (the model's prefix forward, then a backward through the suffix only;
    every peer given the same GradientCache at that layer reuses them) and apply the library's own
    get_cam_image to them: the same maps (checked to 1e-5 in tests/test_peers.py) at a fraction of
    the cost of one full forward and backward each."""
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

    if shared and name in FROM_GRADIENTS:
        cache = shared if isinstance(shared, GradientCache) else GradientCache()

        def fast(images: Tensor, targets: Tensor) -> Tensor:
            import numpy as np
            import pytorch_grad_cam

            check_images(images)
            A, grads = cache.get(model, layer, images, targets)
            view = inference_view(model, private=True)
            cls = getattr(pytorch_grad_cam, CAM_CLASSES[name])
            with cls(model=view, target_layers=[view.get_submodule(layer)]) as cam:
                raw = cam.get_cam_image(images, view.get_submodule(layer), None, A, grads, False)
            maps = torch.from_numpy(np.maximum(raw, 0)).float().to(images.device)
            return normalize_maps(maps, images.shape[-2:])

        return fast

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


def multi_layer_method(model: nn.Module, name: str, layers) -> MapFn:
    """A map function for pytorch-grad-cam's multi-layer maps (a key of MULTI_LAYER) over `layers`
    (module names, any order): "refinecam" (`RefineCAM`: the product of its base method's maps at each
    layer, GradCAM++ by default; "refinecam_gradcam" with Grad-CAM), "layercam_multi" and
    "gradcam_multi" (the class with several target layers: the library's mean of each layer's map)."""
    if name not in MULTI_LAYER:
        raise ValueError(f"unknown multi-layer method {name!r}; choose from {sorted(MULTI_LAYER)}")
    if isinstance(layers, str) or not layers or not all(isinstance(l, str) for l in layers):
        raise TypeError(f"layers must be a non-empty list of module names; got {layers!r}")
    for l in layers:
        try:
            model.get_submodule(l)
        except AttributeError:
            raise ValueError(f"layer {l!r} is not a module of the model") from None
    cls_name, base = MULTI_LAYER[name]

    def fn(images: Tensor, targets: Tensor) -> Tensor:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        check_images(images)
        view = inference_view(model, private=True)
        modules = [view.get_submodule(l) for l in layers]
        cls = getattr(pytorch_grad_cam, cls_name)
        kw = {"base_method": getattr(pytorch_grad_cam, base)} if base else {}
        cam = cls(model=view, target_layers=modules, **kw)
        try:
            with torch.enable_grad():
                out = cam(images, [ClassifierOutputTarget(int(c)) for c in targets])
        finally:  # RefineCAM has no context manager: release every base CAM's hooks
            for c in getattr(cam, "base_cam_per_layer", [cam]):
                c.activations_and_grads.release()
        return normalize_maps(torch.from_numpy(out).float().to(images.device), images.shape[-2:])

    return fn
