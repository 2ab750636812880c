"""A loader's items as image batches: the image tensor of a tensor, tuple/list or dict item,
their copy to a GPU one batch ahead on a side stream (`device_batches`), `normalize` applied on the device
(uint8 or [0, 1] images in, normalised float32 out), and `RankSlice`, the dataset of one rank's own images
under torch.distributed."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


def images_of(batch: Any, position: int, allow_uint8: bool = False) -> Tensor:
    """The image tensor [B, C, H, W] of one loader item: a tensor, a (images, ...) tuple/list, or a
    dict with an "image" key. A single image [C, H, W] counts as a batch of one. allow_uint8: uint8
    images too (distill's `normalize` turns them into floats on the device)."""
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    elif isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        x = batch["image"]
    else:
        raise TypeError(
            f"loader item {position} is a {type(batch).__name__}; expected an image tensor [B, C, H, W], "
            "a tuple/list whose first element is one, or a dict with an 'image' key")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or not (x.is_floating_point() or (allow_uint8 and x.dtype == torch.uint8)):
        hint = "" if x.dtype != torch.uint8 or x.dim() != 4 else \
            " (uint8 images: pass distill's normalize=(mean, std) to convert them on the device)"
        raise TypeError(f"loader item {position} holds a {x.dim()}-D {x.dtype} tensor of shape "
                        f"{list(x.shape)}; expected floating-point images [B, C, H, W]{hint}")
    return x


def loader_images(loader, allow_uint8: bool = False) -> Iterator[Tensor]:
    """The image tensor [B, C, H, W] of every loader item that holds an image (`images_of`)."""
    for item_index, item in enumerate(loader):
        x = images_of(item, item_index, allow_uint8)
        if x.shape[0]:
            yield x


def device_batches(images: Iterator[Tensor], device: torch.device) -> Iterator[Tensor]:
    """The host images on a CUDA `device`, each batch's copy started one batch ahead on a side stream from
    pinned memory (pinned here when the loader did not pin it), so it overlaps the work on the last one; the
    work's stream waits for the copy's event before using it. Elsewhere (CPU, or images already on the
    device) the images as they come, and nothing is read ahead."""
    if device.type != "cuda":
        yield from images
        return
    side = torch.cuda.Stream(device)
    ahead = None  # (host batch, device batch, its copy's event): the host batch lives until the copy is done
    for x in images:
        if x.device.type == "cpu":
            host = x if x.is_pinned() else x.pin_memory()
            with torch.cuda.stream(side):
                y = host.to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            item = (host, y, done)
        else:
            item = (x, x, None)
        if ahead is not None:
            yield _arrived(ahead)
        ahead = item
    if ahead is not None:
        yield _arrived(ahead)


def _arrived(item) -> Tensor:
    """The device batch of a device_batches item, once the current stream has waited for its copy; its
    memory is marked as used by the current stream, so the side stream cannot reuse it early."""
    _, y, done = item
    if done is not None:
        work = torch.cuda.current_stream(y.device)
        work.wait_event(done)
        y.record_stream(work)
    return y


def device_normalizer(normalize, device: torch.device):
    """normalize = (mean, std) per channel -> a function of images on the device: uint8 (0-255) or float
    in [0, 1] -> (x - mean) / std in float32. None -> None."""
    if normalize is None:
        return None
    mean = torch.tensor([float(m) for m in normalize[0]], device=device)[:, None, None]
    std = torch.tensor([float(v) for v in normalize[1]], device=device)[:, None, None]

    def apply(x: Tensor) -> Tensor:
        if x.shape[1] != mean.shape[0]:
            raise ValueError(f"normalize has {mean.shape[0]} channels but the images have {x.shape[1]}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - mean) / std
    return apply


class RankSlice(Dataset):
    """Rank `rank` of `world`'s own share of a dataset, for distill under torch.distributed: item j is
    dataset[rank + j * world], so a DataLoader over it reads, decodes, collates and copies only the images
    this rank forwards. distill recognises a loader whose `.dataset` is a RankSlice and keys every image's
    gates by its global index rank + j * world: W is the same as with one loader shared by all ranks.
    Every rank's loader must keep the order (no shuffling) and give its items in batches of one size.
    dataset: anything with __len__ and __getitem__ (an image tensor or a tuple (image, ...) per item)."""

    def __init__(self, dataset, rank: int, world: int):
        for name, value in (("rank", rank), ("world", world)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int; got {value!r}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) and world >= 1; got rank={rank}, world={world}")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must have __len__ and __getitem__ (a map-style dataset); got a "
                            f"{type(dataset).__name__}")
        self.dataset, self.rank, self.world = dataset, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world))

    def global_index(self, j: int) -> int:
        """The index in `dataset` of this share's item j."""
        return self.rank + j * self.world

    def __getitem__(self, j: int):
        if not 0 <= j < len(self):
            raise IndexError(f"RankSlice index {j} is out of range: rank {self.rank} of {self.world} holds "
                             f"{len(self)} of the {len(self.dataset)} items")
        return self.dataset[self.global_index(j)]
