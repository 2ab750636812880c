"""The conventions every saliency method here shares (CHIP and its peers): checked inputs, target
classes, the model split cache, bilinear upsampling and per-image min-max normalisation, and the
inference view that lets a method run a model in eval mode (and on another device) without touching
the user's model.

images: Tensor[B, 3, H, W]; target: None (top-1), an int, or one class per image (list or Tensor[B]);
maps: Tensor[B, H, W] in [0, 1] at the input resolution (a constant map becomes zeros).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distillation.split import output_problem
from ..distillation.views import cached_split, dtype_error, inference_view, run_model, split_on  # noqa: F401

Target = int | Sequence[int] | Tensor | None


def check_images(images: Tensor) -> None:
    """A floating-point batch [B, 3, H, W] with B >= 1 and no NaN/Inf (a NaN pixel would turn every
    map of its image into zeros, silently)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dim()}-D {images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating-point Tensor[B, 3, H, W]; got {got}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B=0)")
    bad = ~torch.isfinite(images).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"images hold NaN or Inf (images {bad.nonzero().flatten().tolist()[:10]} of the batch); "
                         "fix the input or its preprocessing")


def _class_indices(target, where: str = "target") -> Tensor:
    """An int, a sequence of ints or an integer tensor -> Tensor (long); floats and bools refused
    (they were silently truncated)."""
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError(f"{where} must be integer class indices; got {target!r}")
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        shown = target if not isinstance(target, Tensor) else t.tolist()
        raise TypeError(f"{where} must be integer class indices; got {shown!r}")
    return t.long()


def check_logits(out, model: nn.Module) -> Tensor:
    """The model's output, checked to be logits Tensor[B, C] (a tuple or dict output says how to wrap
    the model)."""
    problem = output_problem(out, model)
    if problem:
        raise TypeError(problem)
    if out.dim() != 2:
        raise ValueError(f"{type(model).__name__} returns a tensor of shape {list(out.shape)}; chip_ext needs "
                         "logits [B, C] (one score per class)")
    return out


def resolve_target(target: Target, logits: Tensor) -> Tensor:
    """Class index per image -> Tensor[B] (long) on the logits' device."""
    B, C = logits.shape
    if target is None:
        t = logits.argmax(dim=1)
    else:
        t = _class_indices(target).to(logits.device).flatten()
        if t.numel() == 1:
            t = t.expand(B).clone()
        if t.numel() != B:
            raise ValueError(f"target must give one class per image ({B}); got {t.numel()}")
    if bool(((t < 0) | (t >= C)).any()):
        raise ValueError(f"target {t.tolist()} out of range: the model has {C} outputs")
    return t


def upsample(maps: Tensor, size, mode: str = "bilinear") -> Tensor:
    """maps: Tensor[B, h, w] -> Tensor[B, *size] ("bilinear", half-pixel centres, or "nearest")."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"upsample must be 'bilinear' or 'nearest'; got {mode!r}")
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=mode, **kw).squeeze(1)


# a map whose span is within this many float32 ulps of its magnitude is constant: bilinear upsampling
# of a constant map leaves rounding ripples (~1e-9) that min-max would stretch to full contrast
CONSTANT_ULPS = 8


def constant_maps(maps: Tensor) -> Tensor:
    """Tensor[B] bool: which maps (Tensor[B, h, w]) are constant up to rounding."""
    flat = maps.reshape(maps.shape[0], -1).float()
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    scale = torch.maximum(lo.abs(), hi.abs())
    return (hi - lo) <= CONSTANT_ULPS * torch.finfo(torch.float32).eps * scale


def normalize_maps(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """maps: Tensor[B, h, w] -> bilinear to `size`, then per-image min-max to [0, 1]. A constant map
    (at its own resolution or after upsampling, up to rounding: `constant_maps`) becomes zeros."""
    flat_before = constant_maps(maps)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = upsample(maps, size)
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    ok = ((span > 0) & ~(flat_before | constant_maps(maps))[:, None, None])
    return torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(maps))


# ------------------------------------------------------------------------------ shared activations

_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("chip_ext_shared_activations", default=None)


@contextlib.contextmanager
def shared_activations() -> Iterator[None]:
    """Within the block, methods that need a layer's activations of the same images tensor (same object,
    unmodified) compute them once: `evaluate` runs every method on a batch inside one, so CHIP, Refined
    CHIP, Grad-CAM, CAM and per-image CHIP at one layer share one forward of the model's prefix. The
    activations are held until the block ends (per thread and task: a context variable); the model's
    weights must not change inside the block (an in-place change of the images is noticed). A block
    inside another shares the outer one's activations."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def layer_activations(view: nn.Module, images: Tensor, layer: str) -> Tensor:
    """The output A of `layer` for `images` through the inference view `view` (no gradient), computed
    once per (view, layer, images) inside `shared_activations()`, every call outside one. The result
    may be shared: do not modify it in place."""
    prefix, _ = cached_split(view, layer)
    memo = _SHARED.get()
    if memo is None:
        with torch.no_grad():
            return run_model(prefix, view, images)
    key = (id(view), layer)
    hit = memo.get(key)
    # the same view and images objects (both held here, so their ids cannot be reused) at the same version
    if hit is None or hit[0] is not view or hit[1] is not images or hit[2] != images._version:
        with torch.no_grad():
            hit = memo[key] = (view, images, images._version, run_model(prefix, view, images))
    return hit[3]
