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
import copy
import threading
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..distillation.split import output_problem, split, structure as _structure

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


# ------------------------------------------------------------------------------ inference view

_VIEWS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _twin(module: nn.Module, device: torch.device | None, moved: dict, own_hooks: bool = False) -> nn.Module:
    """A shallow copy of the module tree in eval mode. Same device: the copies share the parameter
    and buffer dicts (the same tensors, no memory). Another device: new dicts with detached copies
    there (a tensor shared by several modules stays shared). own_hooks: copies of the hook dicts,
    so hooks registered on the twin do not reach the model (the user's hooks still run)."""
    twin = copy.copy(module)
    twin.__dict__["training"] = False
    if own_hooks:
        for name, value in module.__dict__.items():
            if "hooks" in name and isinstance(value, dict):
                twin.__dict__[name] = type(value)(value)
    if device is not None:
        def move(t):
            if t is None:
                return None
            if id(t) not in moved:
                data = t.detach().to(device)
                moved[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
            return moved[id(t)]

        twin.__dict__["_parameters"] = {k: move(p) for k, p in module._parameters.items()}
        twin.__dict__["_buffers"] = {k: move(b) for k, b in module._buffers.items()}
    twin.__dict__["_modules"] = {k: None if m is None else _twin(m, device, moved, own_hooks)
                                 for k, m in module._modules.items()}
    return twin


def _tensor_devices(model: nn.Module) -> set:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def inference_view(model: nn.Module, device: torch.device | str | None = None, *,
                   private: bool = False) -> nn.Module:
    """The model in eval mode, on `device` (default: where it is), without changing the model.

    The user's model is never put in eval mode or moved: another thread may be training it, or
    running it in train mode (BatchNorm statistics), at the same time. On the model's own device the
    view shares its tensors (no copy; load_state_dict on the model shows through); on another device
    it holds copies there (made anew each call, not remembered: they hold device memory). The shared
    view is remembered per model (weakly) while the model's modules stay the same objects.
    private=True: a new view with its own hook dicts, for code that registers module hooks (e.g.
    pytorch-grad-cam), so they never reach the user's model."""
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "meta":
        raise ValueError("device='meta' holds no data: pass a device that computes ('cpu', 'cuda', ...)")
    if device is not None and _tensor_devices(model) <= {device}:
        device = None  # already there: share the tensors
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None or private:
        return _twin(model, device, {}, own_hooks=private)
    structure = _structure(model)
    with _LOCK:
        per_model = _VIEWS.setdefault(model, {})
        hit = per_model.get("view")
        if hit is None or hit[0] != structure:
            hit = per_model["view"] = (structure, _twin(model, None, {}))
    return hit[1]


def cached_split(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """split(model, layer), remembered per model (weakly) and layer while the model's modules stay
    the same objects: tracing costs more than a forward."""
    structure = _structure(model)
    with _LOCK:
        per_model = _VIEWS.setdefault(model, {})
        hit = per_model.get(("split", layer))
    if hit is None or hit[0] != structure:
        hit = (structure, *split(model, layer))
        with _LOCK:
            per_model[("split", layer)] = hit
    return hit[1], hit[2]


def split_on(model: nn.Module, view: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prefix, suffix) of `model` at `layer`, running `view` (an inference view of the model, e.g. its
    copy on another device): traced once on the shared view (`cached_split`), the graphs bound to
    `view`'s modules, so a new view is never traced again."""
    shared = inference_view(model)
    prefix, suffix = cached_split(shared, layer)
    if view is shared:
        return prefix, suffix
    return tuple(fx.GraphModule(view, copy.deepcopy(gm.graph), type(gm).__name__) for gm in (prefix, suffix))


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


def dtype_error(model: nn.Module, images: Tensor, err: RuntimeError, where: str = "images") -> Exception:
    """float64 images into a float32 model (or float32 into a half one) fail deep in the first layer with
    a message about bias types: a TypeError in the user's terms when that is the cause, else `err`."""
    want = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    if want is not None and images.dtype != want:
        return TypeError(f"the {where} are {images.dtype} but the model's weights are {want}, and the model "
                         f"failed on them ({str(err).splitlines()[0][:120]}): convert one to the other "
                         f"(e.g. images.to({want}))")
    return err


def run_model(fn, model: nn.Module, images: Tensor):
    """fn(images), a RuntimeError from a dtype mismatch between the images and the model said plainly."""
    try:
        return fn(images)
    except RuntimeError as err:
        raise dtype_error(model, images, err) from err


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
