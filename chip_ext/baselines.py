"""The methods CHIP is compared with: Grad-CAM, CAM, Guided Backpropagation, Guided Grad-CAM.

Same conventions as `chip_ext.explain`: images: Tensor[B, 3, H, W]; target None (top-1), an int,
or one class per image (list or Tensor[B]); saliency maps Tensor[B, H, W] in [0, 1] at the input
resolution (bilinear upsampling, then min-max normalisation per image; a constant map becomes
zeros); guided maps Tensor[B, 3, H, W] (the shared conventions are in `chip_ext.maps`). The model runs
through `maps.inference_view` (eval mode without changing the user's model). No module hooks are
registered: Grad-CAM differentiates
the suffix of the model split at the layer (torch.fx), guided backprop hooks the ReLU nodes of the
forward's own autograd graph (so functional and in-place ReLUs are guided too), and both are gone
when the call returns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .maps import Target, cached_split, check_images, inference_view, normalize_maps, resolve_target, upsample

# autograd nodes of ReLU-type ops (relu, relu_, F.relu(inplace=True), relu6/ReLU6 = hardtanh(0, 6))
GUIDED_NODES = ("ReluBackward0", "ReluBackward1", "HardtanhBackward0", "HardtanhBackward1",
                "ThresholdBackward0", "ThresholdBackward1")


# ------------------------------------------------------------------------------------- Grad-CAM


def gradcam_raw(model: nn.Module, images: Tensor, layer: str, target: Target = None,
                ) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU(sum_k mean_hw(dy_c/dA_k) A_k) at the layer's resolution -> (maps [B, h, w], target [B],
    logits [B, C])."""
    check_images(images)
    prefix, suffix = cached_split(inference_view(model), layer)
    with torch.enable_grad():
        with torch.no_grad():
            A = prefix(images)
        A = A.detach().requires_grad_(True)
        logits = suffix(A.clone())  # clone: an in-place op at the start of the suffix keeps A intact
        t = resolve_target(target, logits)
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), A)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * A.detach()).sum(dim=1))
    return maps, t, logits.detach()


def gradcam(model: nn.Module, images: Tensor, layer: str, target: Target = None) -> Tensor:
    """Grad-CAM (Selvaraju et al.) at `layer` -> Tensor[B, H, W] in [0, 1]."""
    maps, _, _ = gradcam_raw(model, images, layer, target)
    return normalize_maps(maps, images.shape[-2:])


# ------------------------------------------------------------------------------------- CAM

_POOL_FUNCS = {torch.flatten, torch.squeeze, F.adaptive_avg_pool2d, torch.mean, F.dropout}
_POOL_METHODS = {"flatten", "view", "reshape", "squeeze", "mean"}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


def cam_weights(model: nn.Module, layer: str) -> tuple[Tensor, Tensor | None]:
    """The classifier weights [C, K] (and bias) that CAM needs: the model after `layer` must be a
    global average pooling followed by one nn.Linear (flatten and dropout allowed in between)."""
    _, suffix = cached_split(inference_view(model), layer)
    linear = None
    for node in suffix.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            mod = suffix.get_submodule(node.target)
            if isinstance(mod, nn.Linear) and linear is None:
                linear = mod
                continue
            is_global = not isinstance(mod, nn.AdaptiveAvgPool2d) or mod.output_size in (1, (1, 1))
            if isinstance(mod, _POOL_MODULES) and is_global and linear is None:
                continue
        elif node.op == "call_function" and node.target in _POOL_FUNCS and linear is None:
            continue
        elif node.op == "call_method" and node.target in _POOL_METHODS and linear is None:
            continue
        raise ValueError(
            f"CAM needs the model to end, after layer {layer!r}, in global average pooling and one "
            f"nn.Linear; found {node.op} {node.target} there. Use gradcam() for this model.")
    if linear is None:
        raise ValueError(f"CAM needs an nn.Linear classifier after layer {layer!r}; none was found")
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


def cam(model: nn.Module, images: Tensor, layer: str, target: Target = None) -> Tensor:
    """Class Activation Mapping (Zhou et al.): sum_k W[c, k] A_k with the classifier's weights
    -> Tensor[B, H, W] in [0, 1]."""
    check_images(images)
    W, _ = cam_weights(model, layer)
    prefix, suffix = cached_split(inference_view(model), layer)
    with torch.no_grad():
        A = prefix(images)
        logits = suffix(A.clone())
        t = resolve_target(target, logits)
        if W.shape[1] != A.shape[1]:
            raise ValueError(f"the classifier takes {W.shape[1]} features but layer {layer!r} has "
                             f"{A.shape[1]} channels; CAM needs the layer right before the pooling")
        maps = torch.einsum("bk,bkhw->bhw", W[t].to(A.dtype), A)
    return normalize_maps(maps, images.shape[-2:])


# ------------------------------------------------------------------------------------- guided backprop


def _guide(grad_fn) -> None:
    """Hooks every ReLU-type node of the autograd graph below grad_fn: gradients through a ReLU
    pass only where both the input and the incoming gradient are positive."""
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in GUIDED_NODES:
            node.register_hook(lambda grad_inputs, grad_outputs: tuple(
                None if g is None else g.clamp(min=0) for g in grad_inputs))
        stack.extend(fn for fn, _ in node.next_functions)


def guided_backprop(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """Guided Backpropagation (Springenberg et al.): the input gradient of the target score with
    every ReLU's backward guided -> Tensor[B, 3, H, W] (raw gradients)."""
    check_images(images)
    view = inference_view(model)
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logits = view(x)
        t = resolve_target(target, logits)
        score = logits.gather(1, t[:, None]).sum()
        _guide(score.grad_fn)
        (grad,) = torch.autograd.grad(score, x)
    return grad


def guided_gradcam(model: nn.Module, images: Tensor, layer: str, target: Target = None, *,
                   upsample_mode: str = "bilinear", normalize: bool = True) -> Tensor:
    """Guided Grad-CAM: guided backprop x the Grad-CAM map -> Tensor[B, 3, H, W].

    upsample_mode="bilinear", normalize=True: the Grad-CAM map in [0, 1] as `gradcam` returns it
    (the paper's form); upsample_mode="nearest", normalize=False: Captum's GuidedGradCam.
    """
    maps, t, _ = gradcam_raw(model, images, layer, target)
    maps = upsample(maps, images.shape[-2:], upsample_mode)
    if normalize:
        maps = normalize_maps(maps)
    return guided_backprop(model, images, t) * maps.unsqueeze(1)
