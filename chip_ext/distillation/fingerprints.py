"""Fingerprints that tie a distillation checkpoint to the model's weights and the loader's first image."""
from __future__ import annotations

import hashlib
import itertools
import threading
import weakref

import torch
from torch import Tensor, nn

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the names, shapes and dtypes of the model's parameters and buffers and
    of their values: per tensor the integer sum of its bit patterns (exact, so the same on any device
    and thread count) and 256 evenly strided elements. (A full hash of VGG16's 553 MB took longer than
    distilling 16 images.) A checkpoint resumes only with the same weights: the same architecture with
    other weights would add another network's sums to the old ones."""
    h = hashlib.sha256()
    summaries = []
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.device.type == "meta" or not t.numel():
            continue
        flat = t.detach().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.element_size() in _INT_OF_SIZE else flat
        summaries.append((bits.sum(dtype=torch.int64).cpu(), flat[::max(1, flat.numel() // 256)][:256].cpu()))
    for total, sample in summaries:
        h.update(total.numpy().tobytes())
        h.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def cached_model_fingerprint(model: nn.Module) -> str:
    """model_fingerprint(model), computed again only when a parameter or buffer was replaced or changed
    in place (load_state_dict, an optimiser step: the tensors' version counters move)."""
    key = tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    with _CACHE_LOCK:
        hit = _CACHE.get(model)
    if hit is None or hit[0] != key:
        hit = (key, model_fingerprint(model))
        with _CACHE_LOCK:
            _CACHE[model] = hit
    return hit[1]


def image_fingerprint(image: Tensor) -> str:
    """sha256 (16 hex digits) of one image's shape and values."""
    h = hashlib.sha256(f"{tuple(image.shape)}:{image.dtype}".encode())
    h.update(image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
