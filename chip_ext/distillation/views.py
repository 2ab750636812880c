"""Views of a user's model that chip_ext runs instead of the model itself: an eval-mode (and, on another
device, moved) shallow twin that leaves the user's model untouched, the model split at a layer (cached per
model and layer), and the model run with a dtype mismatch said in the user's terms. Distillation and
explanation both run models through these."""
from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import Tensor, fx, nn

from .split import split, structure as _structure

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
