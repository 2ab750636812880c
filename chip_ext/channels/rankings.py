"""Per-class channel rankings of a layer, from one dataset, by several methods: CHIP's weights and
effects (`chip_ext.Importance`), and the dataset averages that other methods give.

Every ranking is a score matrix Tensor[C, K] (row i for class classes[i]; a higher score = a more
important channel for that class); `top_k` turns it into channel indices.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..importance import Importance
from ..explanation.maps import cached_split, inference_view, run_model


def _images_and_labels(item, position: int) -> tuple[Tensor, Tensor]:
    if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor):
        return item[0], torch.as_tensor(item[1]).long().flatten()
    raise TypeError(f"loader item {position} must be (images Tensor[B, 3, H, W], labels Tensor[B], ...); "
                    f"got {type(item).__name__}")


def gradient_statistics(model: nn.Module, loader: Iterable, layer: str, classes: Sequence[int]) -> dict[str, Tensor]:
    """Dataset averages over the images of each class (by their labels) of, per channel k of `layer`:
    "taylor": Σ_hw ∂y_c/∂A_k · A_k (first-order Taylor, the pruning criterion of Molchanov et al.),
    "gradcam": mean_hw ∂y_c/∂A_k (Grad-CAM's channel weight α_k^c), "activation": mean_hw A_k,
    "pooled_taylor": h·w · mean_hw ∂y_c/∂A_k · mean_hw A_k (first-order Taylor that, like CHIP's linear
    model, sees only the pooled map: where the gradient and the activation sit is lost);
    y_c the logit of the image's own class c. -> {name: Tensor[C, K]} (zeros for a class without images),
    and "count": Tensor[C] images per class."""
    view = inference_view(model)
    prefix, suffix = cached_split(view, layer)
    row = {int(c): i for i, c in enumerate(classes)}
    sums: dict[str, Tensor] | None = None
    count = torch.zeros(len(classes), dtype=torch.float64)
    for position, item in enumerate(loader):
        x, y = _images_and_labels(item, position)
        keep = torch.tensor([int(c) in row for c in y.tolist()], dtype=torch.bool)
        if not bool(keep.any()):
            continue
        x, y = x[keep], y[keep]
        with torch.no_grad():
            A = run_model(prefix, view, x)
        with torch.enable_grad():
            A = A.detach().requires_grad_(True)
            logits = suffix(A.clone())
            (grad,) = torch.autograd.grad(logits.gather(1, y.to(logits.device)[:, None]).sum(), A)
        hw = A.shape[2] * A.shape[3]
        per = {"taylor": (grad * A.detach()).sum(dim=(2, 3)), "gradcam": grad.mean(dim=(2, 3)),
               "activation": A.detach().mean(dim=(2, 3)),
               "pooled_taylor": hw * grad.mean(dim=(2, 3)) * A.detach().mean(dim=(2, 3))}
        if sums is None:
            sums = {k: torch.zeros(len(classes), v.shape[1], dtype=torch.float64) for k, v in per.items()}
        rows = torch.tensor([row[int(c)] for c in y.tolist()])
        for k, v in per.items():
            sums[k].index_add_(0, rows, v.double().cpu())
        count.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    if sums is None:
        raise ValueError(f"the loader has no image of the classes {list(classes)[:10]}")
    out = {k: (v / count.clamp_min(1)[:, None]).float() for k, v in sums.items()}
    out["count"] = count
    return out


def classifier_rows(model: nn.Module, layer: str, classes: Sequence[int]) -> Tensor | None:
    """CAM's channel weights: the rows of the Linear that follows global pooling after `layer`, or None
    where the model does not end so there."""
    from ..explanation.baselines import cam_weights

    try:
        W, _ = cam_weights(model, layer)
    except ValueError:
        return None
    return W[list(classes)].float().cpu()


def rankings(model: nn.Module, loader: Iterable, layer: str, classes: Sequence[int], *,
             importance: Importance | None = None) -> dict[str, Tensor]:
    """{name: Tensor[C, K]} for every ranking available at `layer`, all from the images of `loader`
    (items (images, labels)): "chip_effect" (W · z̄, what removing a channel does in CHIP's model) and
    "chip_weight" (W, the paper's order) when `importance` is given; "taylor", "gradcam", "activation"
    (`gradient_statistics`); "classifier" (CAM's weights) where a Linear follows global pooling."""
    out: dict[str, Tensor] = {}
    if importance is not None:
        rows = [importance.row(int(c)) for c in classes]
        out["chip_weight"] = importance.weights[layer][rows].float()
        if importance.feature_means is not None:
            out["chip_effect"] = importance.effect(layer)[rows].float()
    stats = gradient_statistics(model, loader, layer, classes)
    out.update({k: v for k, v in stats.items() if k != "count"})
    fc = classifier_rows(model, layer, classes)
    if fc is not None:
        out["classifier"] = fc
    return out


def top_k(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring channels of each class: Tensor[C, k] (ties broken by the lower index)."""
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return order[:, :k]
