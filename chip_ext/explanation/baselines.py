"""The methods CHIP is compared with: Grad-CAM, CAM, Guided Backpropagation, Guided Grad-CAM, RISE,
and the no-model centre baseline that every localisation number should be read against.

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

from .maps import (Target, cached_split, check_images, check_logits, run_model, inference_view, layer_activations, normalize_maps,
                   resolve_target, upsample)

# autograd nodes of ReLU-type ops (relu, relu_, F.relu(inplace=True), relu6/ReLU6 = hardtanh(0, 6))
GUIDED_NODES = ("ReluBackward0", "ReluBackward1", "HardtanhBackward0", "HardtanhBackward1",
                "ThresholdBackward0", "ThresholdBackward1")


# ------------------------------------------------------------------------------------- Grad-CAM


def gradcam_raw(model: nn.Module, images: Tensor, layer: str, target: Target = None,
                ) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU(sum_k mean_hw(dy_c/dA_k) A_k) at the layer's resolution -> (maps [B, h, w], target [B],
    logits [B, C])."""
    check_images(images)
    view = inference_view(model)
    _, suffix = cached_split(view, layer)
    with torch.enable_grad():
        A = layer_activations(view, images, layer).detach().requires_grad_(True)
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
    view = inference_view(model)
    _, suffix = cached_split(view, layer)
    A = layer_activations(view, images, layer)
    with torch.no_grad():
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
        logits = check_logits(run_model(view, view, x), model)
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


# ------------------------------------------------------------------------------------- RISE


def rise_masks(num_masks: int, size: tuple[int, int], *, grid: int = 7, p: float = 0.5, seed: int = 0,
               device=None) -> Tensor:
    """RISE's random masks (Petsiuk et al. 2018, §3.2) -> Tensor[num_masks, H, W] in [0, 1]: a
    grid x grid binary array with P(1) = p, bilinearly upsampled to (grid + 1) x cell (cell =
    ceil(size / grid)) and cropped to `size` at a random shift in [0, cell)."""
    if not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"num_masks must be a positive int; got {num_masks!r}")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int; got {grid!r}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1]; got {p!r}")
    H, W = (int(s) for s in size)
    gen = torch.Generator().manual_seed(seed)
    cells = (torch.rand(num_masks, 1, grid, grid, generator=gen) < p).float()
    ch, cw = -(-H // grid), -(-W // grid)
    up = F.interpolate(cells, size=((grid + 1) * ch, (grid + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (num_masks,), generator=gen)
    dx = torch.randint(0, cw, (num_masks,), generator=gen)
    masks = torch.stack([up[i, 0, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(num_masks)]).clamp_(0, 1)
    return masks.to(device) if device is not None else masks


def rise(model: nn.Module, images: Tensor, target: Target = None, *, num_masks: int = 4000, grid: int = 7,
         p: float = 0.5, batch_size: int = 64, seed: int = 0) -> Tensor:
    """RISE (Petsiuk et al. 2018): S_c = 1 / (N p) sum_i P_c(I ⊙ M_i) M_i over random masks M_i
    (`rise_masks`, the same masks for every image), P_c the softmax probability of the target class;
    the images are masked as the model sees them (a masked pixel becomes 0 after normalisation, as in
    the authors' code) -> Tensor[B, H, W] in [0, 1] (min-max normalised). Costs num_masks forwards
    of the whole model per image, batch_size at a time."""
    check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    view = inference_view(model)
    B, _, H, W = images.shape
    masks = rise_masks(num_masks, (H, W), grid=grid, p=p, seed=seed, device=images.device)
    with torch.no_grad():
        t = resolve_target(target, view(images))
        sal = torch.zeros(B, H, W, dtype=torch.float64, device=images.device)
        per = max(1, batch_size // B)
        for i in range(0, num_masks, per):
            m = masks[i:i + per]  # [n, H, W]
            x = (images[:, None] * m[None, :, None]).flatten(0, 1)  # [B*n, 3, H, W]
            prob = view(x).float().softmax(dim=1).view(B, len(m), -1)
            score = prob.gather(2, t[:, None, None].expand(B, len(m), 1)).squeeze(2)  # [B, n]
            sal += torch.einsum("bn,nhw->bhw", score.double(), m.double())
    return normalize_maps((sal / (num_masks * p)).float())


# ------------------------------------------------------------------------------- centre baseline


def center(images: Tensor, target: Target = None, *, sigma: float = 0.25) -> Tensor:
    """The centre baseline (no model, no class): an isotropic Gaussian centred on the image ->
    Tensor[B, H, W] in [0, 1], the same map for every image. sigma: the standard deviation as a
    fraction of the image width. Thresholding it gives centred boxes of every size, so its
    MaxBoxAcc measures how much of a localisation score the dataset's centred, large objects give
    for free. sigma only changes which box sizes the threshold grid reaches (MaxBoxAcc was the same
    for sigma 0.15 to 1.0 on the Imagenette val halves). `target` is accepted and ignored (one
    signature for all methods)."""
    check_images(images)
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be > 0 (a fraction of the image width); got {sigma!r}")
    B, _, H, W = images.shape
    y = torch.arange(H, dtype=torch.float32, device=images.device) - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float32, device=images.device) - (W - 1) / 2
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * (sigma * W) ** 2))
    return normalize_maps(g.expand(B, H, W).contiguous())
