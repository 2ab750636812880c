"""Concept Relevance Propagation (zennit-crp, Achtibat et al. 2023) as a per-class channel ranking:
the strongest peer for dataset-level channel explanations, run through its own API.

Needs `pip install 'zennit-crp==0.6.0'` (it pins zennit <= 0.4.6).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def _zennit():
    try:
        from crp.attribution import CondAttribution
        from crp.concepts import ChannelConcept
        from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat
        from zennit.layer import Sum
    except ImportError as e:
        raise ImportError("CRP rankings need zennit-crp: pip install 'zennit-crp==0.6.0'") from e
    return CondAttribution, ChannelConcept, AttributeCanonizer, SequentialMergeBatchNorm, EpsilonPlusFlat, Sum


def skip_sum_canonizer():
    """A zennit canonizer for residual blocks that add their input back behind a `has_skip` flag (timm's
    EfficientNet / MobileNet blocks: `x = drop_path(x) + shortcut`). Without it LRP passes the full
    relevance down both the branch and the shortcut at each such addition, so relevance is not conserved
    (EfficientNet-Lite0: 120 at blocks.4 for a logit of 8.8). With it the addition goes through zennit's
    `Sum` layer, which the composites give the `Norm` rule (relevance split in proportion to the
    summands), as zennit's own `ResNetBottleneckCanonizer` does for torchvision's ResNets. The block's own
    forward computes the branch (its flag off for the call), so the canonizer follows timm's code."""
    _, _, AttributeCanonizer, _, _, Sum = _zennit()

    def attribute_map(name, module):
        if not (isinstance(getattr(module, "has_skip", None), bool) and module.has_skip):
            return None
        original = type(module).forward

        def forward(x, _module=module):
            _module.has_skip = False
            try:
                branch = original(_module, x)
            finally:
                _module.has_skip = True
            return _module.canonizer_sum(torch.stack([branch, x], dim=-1))
        return {"forward": forward, "canonizer_sum": Sum()}

    return AttributeCanonizer(attribute_map)


def default_composite():
    """zennit-crp's recommended composite: `EpsilonPlusFlat` with BatchNorm merged into the preceding
    convolution (`SequentialMergeBatchNorm`), plus `skip_sum_canonizer` for timm's residual blocks."""
    _, _, _, SequentialMergeBatchNorm, EpsilonPlusFlat, _ = _zennit()
    return EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm(), skip_sum_canonizer()])


def crp_relevance(model: nn.Module, loader: Iterable, layers: str | Sequence[str], classes: Sequence[int], *,
                  composite=None) -> Tensor | dict[str, Tensor]:
    """CRP's channel relevance at each of `layers` for each class, averaged over the images of that
    class (by their labels): Tensor[C, K] for one layer name, {layer: Tensor[C, K]} for a list (one
    backward pass an image records every layer); zeros for a class without images.

    zennit-crp's own API: `CondAttribution` conditioned on the image's own class (`{"y": [c]}`),
    `default_composite()` unless `composite` is given, the relevance of `layer` recorded and reduced to
    one number a channel by `ChannelConcept.attribute(..., abs_norm=True)` (the channel's share of the
    image's absolute relevance at the layer). zennit's canonizers change the model for the pass and
    restore it after; the model runs in eval mode."""
    from .rankings import _images_and_labels

    CondAttribution, ChannelConcept, *_ = _zennit()
    names = [layers] if isinstance(layers, str) else list(layers)
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing or not names:
        raise ValueError(f"layers must name modules of the model; got {missing or names}")
    composite = default_composite() if composite is None else composite
    attribution = CondAttribution(model, no_param_grad=True)
    concept = ChannelConcept()
    row = {int(c): i for i, c in enumerate(classes)}
    sums: dict[str, Tensor] = {}
    count = torch.zeros(len(classes), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for position, item in enumerate(loader):
            x, y = _images_and_labels(item, position)
            keep = torch.tensor([int(c) in row for c in y.tolist()], dtype=torch.bool)
            if not bool(keep.any()):
                continue
            x, y = x[keep].to(device).requires_grad_(True), y[keep]
            result = attribution(x, [{"y": [int(c)]} for c in y.tolist()], composite, record_layer=names)
            rows = torch.tensor([row[int(c)] for c in y.tolist()])
            for name in names:
                rel = concept.attribute(result.relevances[name], abs_norm=True)  # [B, K]
                if name not in sums:
                    sums[name] = torch.zeros(len(classes), rel.shape[1], dtype=torch.float64)
                sums[name].index_add_(0, rows, rel.detach().double().cpu())
            count.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError(f"the loader has no image of the classes {list(classes)[:10]}")
    out = {n: (s / count.clamp_min(1)[:, None]).float() for n, s in sums.items()}
    return out[names[0]] if isinstance(layers, str) else out
