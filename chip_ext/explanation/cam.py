"""CHIP behind pytorch-grad-cam's interface, so an existing script switches by one name:

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from chip_ext.cam import CHIPCAM                       # instead of: from pytorch_grad_cam import GradCAM

    with CHIPCAM(model=model, target_layers=[model.layer4], importance=imp) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)])   # numpy [B, H, W] in [0, 1]

`CHIPCAM` draws class-level CHIP maps from a distilled `Importance` (`chip_ext.explain(method="chip")`);
`ImageCHIPCAM` per-image CHIP (the Lasso fitted on the image's own channel perturbations, no importance
needed) and `RegionCHIPCAM` region CHIP (gates over the cells of the layer's map). They take what
pytorch-grad-cam's CAMs take: `target_layers` as modules of the model, `targets` as pytorch-grad-cam's
target objects (`ClassifierOutputTarget`, `ClassifierOutputSoftmaxTarget`, `ClassifierOutputReST`, or
any object with an integer `category`) or None (each image's top-1 class), `aug_smooth` (pytorch-grad-cam's
test-time augmentation: flips and brightness, maps averaged) and `eigen_smooth` (the first principal
component of the weighted activations). Unlike pytorch-grad-cam they register no hooks and never call
`model.eval()` on the model given (chip_ext runs an eval-mode view of it). Several target layers: the
mean of the per-layer maps, min-max normalised again (pytorch-grad-cam's aggregation).

Where chip_ext's own API is the better fit: the class-level importance is learned once from a dataset
(`chip_ext.distill`), and `chip_ext.explain` also gives Refined and Guided CHIP.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .explain import chip_maps, check_same_model
from .image_chip import image_chip_weights, region_chip_weights
from ..importance import Importance
from .maps import normalize_maps


def _layer_names(model: nn.Module, target_layers: Sequence[nn.Module]) -> list[str]:
    if isinstance(target_layers, nn.Module) or not target_layers:
        raise TypeError("target_layers must be a non-empty list of modules of the model (as in pytorch-grad-cam), "
                        "e.g. [model.layer4]")
    names = {id(m): n for n, m in model.named_modules()}
    missing = [type(m).__name__ for m in target_layers if id(m) not in names]
    if missing:
        raise ValueError(f"target_layers holds modules that are not in the model: {missing}")
    return [names[id(m)] for m in target_layers]


def _categories(targets, B: int) -> Tensor | None:
    """pytorch-grad-cam's target objects -> class indices [B] (None: top-1)."""
    if targets is None:
        return None
    targets = list(targets)
    if len(targets) != B:
        raise ValueError(f"targets must hold one target per image ({B}); got {len(targets)}")
    bad = [type(t).__name__ for t in targets if isinstance(getattr(t, "category", None), bool)
           or not isinstance(getattr(t, "category", None), (int, np.integer))]
    if bad:
        raise TypeError(f"targets must be pytorch-grad-cam target objects with an integer class `category` "
                        f"(ClassifierOutputTarget, ClassifierOutputSoftmaxTarget, ClassifierOutputReST); got {bad}. "
                        "CHIP explains a class of the model's output")
    return torch.tensor([int(t.category) for t in targets])


def _eigen(weights: Tensor, A: Tensor, size) -> Tensor:
    """The first principal component of the weighted activations w_k A_k (pytorch-grad-cam's
    get_2d_projection) -> maps [B, H, W] in [0, 1]."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    weighted = (weights[:, :, None, None].float() * A.float()).detach().cpu().numpy()
    proj = torch.from_numpy(get_2d_projection(weighted)).to(A.device)
    return normalize_maps(torch.relu(proj), size)


class _CHIPCAMBase:
    """The pytorch-grad-cam calling convention around a per-layer map function."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], reshape_transform=None):
        if reshape_transform is not None:
            raise ValueError("reshape_transform is for transformer layers; CHIP needs convolutional maps [B, K, h, w]")
        self.model = model
        self.layers = _layer_names(model, target_layers)

    def layer_maps(self, x: Tensor, layer: str, target: Tensor | None, eigen_smooth: bool) -> Tensor:
        raise NotImplementedError

    def forward(self, input_tensor: Tensor, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        target = _categories(targets, input_tensor.shape[0])
        if target is None:  # pytorch-grad-cam: the top-1 class of the model's output, for every layer alike
            from .maps import check_logits, inference_view

            with torch.no_grad():
                target = check_logits(inference_view(self.model)(input_tensor), self.model).argmax(1).cpu()
        maps = [self.layer_maps(input_tensor, layer, target, eigen_smooth) for layer in self.layers]
        out = maps[0] if len(maps) == 1 else normalize_maps(torch.stack(maps).mean(0))
        return out.detach().cpu().numpy().astype(np.float32)

    def forward_augmentation_smoothing(self, input_tensor: Tensor, targets=None, eigen_smooth: bool = False):
        """pytorch-grad-cam's test-time augmentation (its default transforms): maps of the augmented
        images, de-augmented and averaged."""
        import ttach as tta

        transforms = tta.Compose([tta.HorizontalFlip(), tta.Multiply(factors=[0.9, 1, 1.1])])
        cams = []
        for t in transforms:
            cam = torch.from_numpy(self.forward(t.augment_image(input_tensor), targets, eigen_smooth))[:, None]
            cams.append(t.deaugment_mask(cam)[:, 0].numpy())
        return np.mean(np.float32(cams), axis=0)

    def __call__(self, input_tensor: Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> np.ndarray:
        """numpy float32 [B, H, W] in [0, 1] at the input's resolution."""
        if aug_smooth:
            return self.forward_augmentation_smoothing(input_tensor, targets, eigen_smooth)
        return self.forward(input_tensor, targets, eigen_smooth)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False  # nothing to release: no hooks were registered


class CHIPCAM(_CHIPCAMBase):
    """Class-level CHIP maps, ReLU(Σ_k W[c, k] A_k), from a distilled `Importance` that holds the target
    layers (`chip_ext.explain(method="chip")`; equal maps)."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], importance: Importance,
                 reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform)
        if not isinstance(importance, Importance):
            raise TypeError(f"importance must be a chip_ext.Importance (from chip_ext.distill); "
                            f"got {type(importance).__name__}")
        missing = [l for l in self.layers if l not in importance.weights]
        if missing:
            raise ValueError(f"target_layers {missing} are not in the importance (layers: {importance.layers})")
        self.importance = importance
        check_same_model(model, importance)

    def layer_maps(self, x, layer, target, eigen_smooth):
        if not eigen_smooth:
            return chip_maps(self.model, x, self.importance, layer, target)[0]
        from .maps import inference_view, layer_activations

        A = layer_activations(inference_view(self.model), x, layer)
        W = self.importance.weights[layer][[self.importance.row(int(c)) for c in target.tolist()]]
        return _eigen(W.to(A.device), A, x.shape[-2:])


class ImageCHIPCAM(_CHIPCAMBase):
    """Per-image CHIP maps (`chip_ext.image_chip`): the CHIP Lasso fitted on each image's own channel
    perturbations; no importance needed. options: those of `chip_ext.image_chip.image_chip_weights`
    (num_perturbations=128, lam_ratio, score, ...)."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], reshape_transform=None, **options):
        super().__init__(model, target_layers, reshape_transform)
        self.options = options

    def layer_maps(self, x, layer, target, eigen_smooth):
        W, A, _ = image_chip_weights(self.model, x, layer, target.to(x.device), **self.options)
        if eigen_smooth:
            return _eigen(W, A, x.shape[-2:])
        return normalize_maps(torch.relu(torch.einsum("bk,bkhw->bhw", W.float(), A.float())), x.shape[-2:])


class RegionCHIPCAM(_CHIPCAMBase):
    """Region CHIP maps (`chip_ext.image_chip.region_chip`): CHIP's gates over the cells of the layer's map.
    options: those of `region_chip_weights` (cell, num_perturbations=256, lam_ratio, ...). eigen_smooth
    needs channel weights and is refused."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], reshape_transform=None, **options):
        super().__init__(model, target_layers, reshape_transform)
        self.options = options

    def layer_maps(self, x, layer, target, eigen_smooth):
        if eigen_smooth:
            raise ValueError("eigen_smooth projects channel-weighted activations; region CHIP weighs cells, not "
                             "channels: use CHIPCAM or ImageCHIPCAM for it")
        beta, _ = region_chip_weights(self.model, x, layer, target.to(x.device), **self.options)
        return normalize_maps(torch.relu(beta.float()), x.shape[-2:])


__all__ = ["CHIPCAM", "ImageCHIPCAM", "RegionCHIPCAM"]
