"""CHIP explanations (DESIGN §1): CHIP, Refined CHIP, Guided CHIP and per-image CHIP maps from an
`Importance`."""
from __future__ import annotations

import inspect
import weakref
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .baselines import guided_backprop
from ..distillation.fingerprints import cached_model_fingerprint
from .image_chip import image_chip, image_chip_weights, region_chip, region_chip_weights
from ..importance import Importance
from .maps import (_class_indices, cached_split, check_images, inference_view, layer_activations, normalize_maps,
                   resolve_target, shared_activations)

METHODS = ("chip", "refined", "fused", "guided_chip", "image_chip", "region_chip")
FUSION_RULES = ("geometric", "mean")


def _keyword_options(fn) -> tuple[str, ...]:
    return tuple(name for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)


# keyword options of the per-image methods: image_chip_weights' (prior comes from shrink) and shrink;
# region_chip_weights'
IMAGE_CHIP_OPTIONS = tuple(n for n in _keyword_options(image_chip_weights) if n != "prior") + ("shrink",)
REGION_CHIP_OPTIONS = _keyword_options(region_chip_weights)
OPTIONS = {"image_chip": IMAGE_CHIP_OPTIONS, "region_chip": REGION_CHIP_OPTIONS, "fused": ("layers", "rule")}
TargetArg = int | str | Sequence[int] | Sequence[str] | Tensor | None


def forward_order(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """`layers` sorted by where their modules' outputs come in a forward pass of a sequential CNN: the
    position in model.named_modules() of each module's last descendant (a block's output follows its
    children's: "layer4.0" before "layer4")."""
    names = [name for name, _ in model.named_modules()]
    position = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(names):  # a parent ends where its last descendant does
        parts = name.split(".")
        for k in range(len(parts)):
            position[".".join(parts[:k])] = i
    known = set(names)
    missing = [l for l in layers if l not in known]
    if missing:
        raise ValueError(f"the importance has layer(s) {missing} that this model does not have; "
                         "was it distilled on another model?")
    return sorted(layers, key=position.__getitem__)


def check_same_model(model: nn.Module, importance: Importance) -> bool:
    """Warns (UserWarning) when `importance` records the fingerprint of other weights than the model's
    (distilled on another network, or the CLI's --weights forgotten): its W then describes that other
    network. Returns whether the fingerprints agree (True when the importance records none)."""
    recorded = importance.meta.get("model")
    if not isinstance(recorded, str):
        return True
    now = cached_model_fingerprint(model)
    if now == recorded:
        return True
    warnings.warn(
        f"the importance was distilled on a model with other weights (fingerprint {recorded}; this model's is "
        f"{now}): its channel importances describe that network, and maps drawn with them here may mean "
        "nothing. Pass the model it was distilled on (chip-ext: the same --model and --weights)",
        UserWarning, stacklevel=3)
    return False


def _given_targets(target: TargetArg, importance: Importance, B: int, device) -> Tensor:
    """A given target (index, name, or one per image) -> Tensor[B] of output indices. Membership in
    the distilled classes is checked where the rows of W are looked up."""
    if isinstance(target, str) or (isinstance(target, (list, tuple)) and target and isinstance(target[0], str)):
        names = [target] if isinstance(target, str) else list(target)
        try:
            idx = [importance.classes[importance.row(n)] for n in names]
        except KeyError as err:
            names_known = importance.class_names or []
            raise ValueError(f"target: {err.args[0]}; names: {names_known[:20]}"
                             f"{'...' if len(names_known) > 20 else ''}") from None
        target = idx[0] if isinstance(target, str) else idx
    t = _class_indices(target).to(device).flatten()
    if t.numel() == 1:
        return t.expand(B).clone()
    if t.numel() != B:
        raise ValueError(f"target must give one class per image ({B}); got {t.numel()}")
    return t


def chip_maps(model: nn.Module, images: Tensor, importance: Importance, layer: str,
              target: TargetArg = None) -> tuple[Tensor, Tensor]:
    """ReLU(sum_k W[c, k] A_k) at `layer`, upsampled (bilinear) to the input size and min-max
    normalised -> (maps Tensor[B, H, W] in [0, 1], target classes Tensor[B]). The rest of the model
    runs only when the target is the top-1 prediction (target=None)."""
    check_images(images)
    if layer not in importance.weights:
        raise ValueError(f"layer {layer!r} is not in the importance (layers: {importance.layers})")
    view = inference_view(model)
    _, suffix = cached_split(view, layer)
    A = layer_activations(view, images, layer)
    with torch.no_grad():
        logits = suffix(A.clone()) if target is None else None
    W_all = importance.weights[layer]
    if A.dim() != 4 or A.shape[1] != W_all.shape[1]:
        raise ValueError(f"layer {layer!r} of this model has {A.shape[1] if A.dim() > 1 else '?'} channels "
                         f"(output {list(A.shape)}) but the importance has K={W_all.shape[1]}; "
                         "was it distilled on another model?")
    t = resolve_target(None, logits) if target is None else _given_targets(target, importance, A.shape[0], A.device)
    try:
        rows = [importance.row(int(c)) for c in t.tolist()]
    except KeyError as err:
        raise ValueError(f"{err.args[0]}; distilled classes: {importance.classes[:20]}"
                         f"{'...' if len(importance.classes) > 20 else ''}. Pass target= one of them.") from None
    W = W_all[rows].to(device=A.device, dtype=torch.float32)
    maps = torch.relu(torch.einsum("bk,bkhw->bhw", W, A.float()))
    return normalize_maps(maps, images.shape[-2:]), t


_FUSION_SIZES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _map_sizes(model: nn.Module, layers: Sequence[str], size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The spatial size of each layer's map for inputs of `size`, from one probe image of zeros
    (cached per model and input size: the explain path does not run a prefix per batch for it)."""
    cache = _FUSION_SIZES.setdefault(model, {})
    key = (tuple(layers), tuple(size))
    if key not in cache:
        view = inference_view(model)
        probe = torch.zeros(1, 3, *size, device=_device_of(model),
                            dtype=next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
        with shared_activations():
            cache[key] = {l: tuple(layer_activations(view, probe, l).shape[-2:]) for l in layers}
    return cache[key]


def fusion_layers(model: nn.Module, importance: Importance, layers: Sequence[str] | None = None,
                  size: tuple[int, int] = (224, 224)) -> list[str]:
    """The layers the fused map combines, in forward order: `layers` when given (each in the
    importance); by default the importance's last layer and the first of its layers whose map has the
    last layer's spatial size for inputs of `size` (EfficientNet-Lite0 distilled at blocks.3 ... bn2:
    blocks.5 and bn2, the pair chosen on the calibration halves; one layer when no other has that size)."""
    if layers is None:
        ordered = forward_order(model, importance.layers)
        sizes = _map_sizes(model, ordered, size)
        first = next(l for l in ordered if sizes[l] == sizes[ordered[-1]])
        return [first, ordered[-1]] if first != ordered[-1] else [first]
    if isinstance(layers, str) or not all(isinstance(l, str) for l in layers) or not layers:
        raise TypeError(f"layers must be a non-empty list of layer names; got {layers!r}")
    missing = [l for l in layers if l not in importance.weights]
    if missing:
        raise ValueError(f"layers {missing} are not in the importance (layers: {importance.layers})")
    return forward_order(model, list(dict.fromkeys(layers)))


def _device_of(model: nn.Module) -> torch.device:
    tensors = list(model.parameters()) + list(model.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def fused_maps(model: nn.Module, images: Tensor, importance: Importance, target: TargetArg = None, *,
               layers: Sequence[str] | None = None, rule: str = "geometric") -> Tensor:
    """Fused CHIP: the CHIP maps of several layers (each min-max normalised at the input size) combined
    pixel by pixel -> Tensor[B, H, W] in [0, 1], min-max normalised again.

    rule "geometric": (prod_l m_l)^(1/L), so a pixel is bright only where every layer agrees (an
    intermediate layer's tighter maps trim the last layer's blobs; the last layer vetoes the
    intermediate one's stray responses); "mean": the average of the maps (LayerCAM-style fusion).
    layers: default `fusion_layers`' choice (the last layer and the first at its resolution)."""
    if rule not in FUSION_RULES:
        raise ValueError(f"rule must be one of {FUSION_RULES}; got {rule!r}")
    check_images(images)
    layers = fusion_layers(model, importance, layers, tuple(images.shape[-2:]))
    with shared_activations():
        last, t = chip_maps(model, images, importance, layers[-1], target)
        maps = [chip_maps(model, images, importance, l, t)[0] for l in layers[:-1]] + [last]
    stack = torch.stack(maps)  # [L, B, H, W]
    if rule == "mean":
        return normalize_maps(stack.mean(0))
    fused = torch.exp(torch.log(stack.clamp_min(1e-6)).mean(0)) * (stack.amin(0) > 0)
    return normalize_maps(fused)


def image_chip_maps(model: nn.Module, images: Tensor, importance: Importance, layer: str,
                    target: TargetArg = None, *, shrink: bool = False, **options) -> Tensor:
    """Per-image CHIP maps (`chip_ext.image_chip`) at `layer` -> Tensor[B, H, W] in [0, 1].

    The Lasso is fitted on each image's own perturbations, so any output class can be explained (target
    None: each image's top-1 prediction, distilled or not). shrink=True: penalise |w - W_c|_1 with W_c
    the importance's class-level weights (the image's evidence moves them only where it is strong); the
    class must then be distilled, and the per-image score must be the one the importance was distilled
    on (`score` defaults to it)."""
    check_images(images)
    if layer not in importance.weights:
        raise ValueError(f"layer {layer!r} is not in the importance (layers: {importance.layers})")
    if not isinstance(shrink, bool):
        raise TypeError(f"shrink must be True or False; got {shrink!r}")
    t = None if target is None else _given_targets(target, importance, images.shape[0], images.device)
    if not shrink:
        return image_chip(model, images, layer, t, **options)
    with shared_activations():  # the top-1 target and the fit share the prefix forward
        distilled_on = importance.meta.get("target")
        score = options.setdefault("score", distilled_on if distilled_on in ("prob", "logit") else "logit")
        if distilled_on is not None and distilled_on != score:
            raise ValueError(f"shrink=True needs the per-image score to be the importance's target "
                             f"({distilled_on!r}: the weights are in its units); got score={score!r}")
        if t is None:
            view = inference_view(model)
            _, suffix = cached_split(view, layer)
            with torch.no_grad():
                t = resolve_target(None, suffix(layer_activations(view, images, layer).clone()))
        try:
            rows = [importance.row(int(c)) for c in t.tolist()]
        except KeyError as err:
            raise ValueError(f"{err.args[0]}; shrink=True needs the target among the distilled classes "
                             f"{importance.classes[:20]}{'...' if len(importance.classes) > 20 else ''}") from None
        prior = importance.weights[layer][rows].to(device=images.device, dtype=torch.float64)
        return image_chip(model, images, layer, t, prior=prior, **options)


def explain(model: nn.Module, images: Tensor, importance: Importance, *, method: str = "chip",
            layer: str | None = None, target: TargetArg = None, **options) -> Tensor:
    """Class-discriminative explanation maps from distilled CHIP importances.

    images: Tensor[B, 3, H, W] (preprocessed as the model expects). importance: from chip_ext.distill.
    method: "chip" (one layer: `layer`, default the importance's last layer in forward order),
        "refined" (the product of the CHIP maps of the importance's first and last layers, min-max
        normalised again),
        "fused" (the geometric mean of the CHIP maps of several layers: `fused_maps`; options layers=,
        rule=),
        "guided_chip" (guided backprop x the CHIP map; returns Tensor[B, 3, H, W]),
        "image_chip" (per-image CHIP at `layer`: the CHIP Lasso fitted on each image's own N perturbations,
        beyond the paper; only the model's suffix runs, N times an image; see `image_chip_maps`),
        "region_chip" (region CHIP at `layer`: the same per-image Lasso with gates over the cells of the
        layer's map instead of its channels, beyond the paper; `chip_ext.image_chip.region_chip`; the
        importance only supplies the default layer and class names).
    target: None (each image's top-1 prediction), a class index, a class name, or one per image.
    options: method="image_chip": num_perturbations (128), lam_ratio (0.01), score ("logit"),
        max_drop, sigma, fit_intercept (True), positive, seed, batch_size, shrink (False: see
        `image_chip_maps`). method="region_chip": cell (None: the smallest with no more cells than
        perturbations), num_perturbations (256), lam_ratio (chosen on the calibration half, see
        `image_chip.REGION_LAM_RATIO`) and the others of image_chip but shrink.
    Returns Tensor[B, H, W] in [0, 1] at the input resolution, on the images' device.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(importance, Importance):
        raise TypeError(f"importance must be a chip_ext.Importance; got {type(importance).__name__}")
    if options and method not in OPTIONS:
        raise TypeError(f"options {sorted(options)} are for method='image_chip', 'region_chip' or 'fused' only; "
                        f"method={method!r} takes none")
    unknown = sorted(set(options) - set(OPTIONS.get(method, ())))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method={method!r}; choose from {OPTIONS[method]}")
    layers = forward_order(model, importance.layers)
    check_same_model(model, importance)
    if method == "image_chip":
        return image_chip_maps(model, images, importance, layer or layers[-1], target, **options)
    if method == "region_chip":
        check_images(images)
        t = None if target is None else _given_targets(target, importance, images.shape[0], images.device)
        return region_chip(model, images, layer or layers[-1], t, **options)
    if method == "fused":
        if layer is not None:
            raise ValueError("method='fused' combines several layers: pass layers=[...], not layer=")
        return fused_maps(model, images, importance, target, **options)
    if method == "refined":
        if layer is not None:
            raise ValueError("method='refined' uses the importance's first and last layers; do not pass layer=")
        if len(layers) < 2:
            raise ValueError(f"method='refined' needs an importance with two layers or more; it has {layers}")
        last, t = chip_maps(model, images, importance, layers[-1], target)
        first, _ = chip_maps(model, images, importance, layers[0], t)
        # the product of two [0, 1] maps peaks below 1 (0.3 was seen): min-max again, so a map
        # rendered as uint8 keeps its 256 grey levels instead of ~76
        return normalize_maps(first * last)
    maps, t = chip_maps(model, images, importance, layer or layers[-1], target)
    if method == "guided_chip":
        return guided_backprop(model, images, t) * maps.unsqueeze(1)
    return maps
