"""Datasets laid out as ImageNet users have them.

- `ImageNetTrain(root)`: ImageFolder layout (root/<wnid>/*.JPEG) with labels in the standard
  ImageNet-1k order (index = position of the wnid in sorted order), whatever subset of classes the
  folder holds.
- ILSVRC validation with boxes, from (a) a folder of ILSVRC/PASCAL-VOC XML files, (b) clovaai
  wsolevaluation metadata (image_ids, class_labels, image_sizes, localization), (c) CSV files
  (file,label,... and file,label,wnid,x0,y0,x1,y1). `LocalizationDataset` resizes images to a square
  (as ImageNet localisation evaluations do) and rescales the boxes with them.
"""
from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..distillation.batches import RankSlice  # noqa: F401  (chip_ext.data.RankSlice)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted), from timm's bundled metadata."""
    try:
        from timm.data import ImageNetInfo
    except ImportError as err:  # pragma: no cover
        raise ImportError("the ImageNet class list comes from timm (pip install timm)") from err
    return list(ImageNetInfo().label_names())


def imagenet_class_names() -> list[str]:
    """Short names of the 1000 ImageNet-1k classes in index order ("tabby", "tench", ...)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


def wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


class ImageNetTrain(Dataset):
    """root/<wnid>/<image> with ImageNet-1k labels. transform: PIL image -> Tensor.
    per_class: keep the first `per_class` images (sorted file names) of each class."""

    def __init__(self, root: str | os.PathLike, transform: Callable, *, per_class: int | None = None,
                 wnids: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no ImageNet train folder at {root}")
        index = wnid_to_index()
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if wnids is not None:
            folders = [f for f in folders if f.name in set(wnids)]
        unknown = [f.name for f in folders if f.name not in index]
        if unknown:
            raise ValueError(f"{root} has folders that are not ImageNet-1k wnids: {unknown[:5]}")
        self.samples: list[tuple[Path, int]] = []
        for f in folders:
            files = sorted(p for p in f.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples += [(p, index[f.name]) for p in files[:per_class]]
        if not self.samples:
            raise ValueError(f"no images found under {root}")
        self.transform = transform
        self.classes = sorted({label for _, label in self.samples})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label
        except OSError as err:  # PIL's messages ("image file is truncated") do not name the file
            raise OSError(f"{path}: cannot read the image: {err}") from err


class RankShard(Dataset):
    """A dataset as rank `rank` of `world` sees it under torch.distributed distillation, with one loader
    layout shared by all ranks: the items whose index is rank mod world are decoded; every other item is a
    zero placeholder of the same shape (distill never uses those: their rank forwards them). Each rank
    decodes only 1/world of the images, but still collates and copies the placeholders: `RankSlice`
    (this rank's items only) is the faster choice. dataset[i] must be an image tensor or a tuple (image, ...)."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}); got {rank}")
        self.dataset, self.rank, self.world = dataset, rank, world
        self._template = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if i % self.world == self.rank:
            return self.dataset[i]
        if self._template is None:  # one decode of an own item gives the shapes
            own = self.rank if self.rank < len(self.dataset) else 0
            item = self.dataset[own]
            self._template = (torch.zeros_like(item) if isinstance(item, Tensor) else
                              (torch.zeros_like(item[0]), *item[1:]))
        return self._template


@dataclass
class LocSample:
    path: Path
    label: int
    size: tuple[int, int]  # (width, height) of the stored image
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x0 y0 x1 y1, pixels

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"{self.path.name}: the annotated image size (width, height) = {tuple(self.size)} "
                             "must be positive")


def read_voc_xml(folder: str | os.PathLike, image_root: str | os.PathLike) -> list[LocSample]:
    """ILSVRC / PASCAL-VOC XML files (one per image; objects named by wnid; the label is the first
    object's class). Images are looked up as image_root/<filename>.JPEG (or the XML's extension)."""
    folder, image_root = Path(folder), Path(image_root)
    index = wnid_to_index()
    samples = []
    for xml in sorted(folder.glob("*.xml")):
        root = ET.parse(xml).getroot()
        name = root.findtext("filename")
        size = root.find("size")
        w, h = int(size.findtext("width")), int(size.findtext("height"))
        boxes, label = [], None
        for obj in root.iter("object"):
            wnid = obj.findtext("name")
            if wnid not in index:
                raise ValueError(f"{xml}: object class {wnid!r} is not an ImageNet-1k wnid")
            label = index[wnid] if label is None else label
            bb = obj.find("bndbox")
            boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
        if label is None:
            raise ValueError(f"{xml} has no <object>")
        path = image_root / name
        if not path.suffix:
            path = path.with_suffix(".JPEG")
        samples.append(LocSample(path, label, (w, h), boxes))
    if not samples:
        raise ValueError(f"no XML files in {folder}")
    return samples


def read_wsol_metadata(folder: str | os.PathLike, image_root: str | os.PathLike, prefix: str = "") -> list[LocSample]:
    """clovaai/wsolevaluation metadata: {prefix}image_ids.txt, class_labels.txt (id,label),
    image_sizes.txt (id,w,h), localization.txt (id,x0,y0,x1,y1; one line per box)."""
    folder, image_root = Path(folder), Path(image_root)

    def rows(name):
        path = folder / f"{prefix}{name}"
        if not path.is_file():
            raise FileNotFoundError(f"wsolevaluation metadata file missing: {path}")
        return [line.strip().split(",") for line in path.read_text().splitlines() if line.strip()]

    ids = [r[0] for r in rows("image_ids.txt")]
    labels = {r[0]: int(r[1]) for r in rows("class_labels.txt")}
    sizes = {r[0]: (int(r[1]), int(r[2])) for r in rows("image_sizes.txt")}
    boxes = defaultdict(list)
    for r in rows("localization.txt"):
        boxes[r[0]].append(tuple(float(v) for v in r[1:5]))
    return [LocSample(image_root / i, labels[i], sizes[i], boxes[i]) for i in ids]


def read_csv_boxes(labels_csv: str | os.PathLike, boxes_csv: str | os.PathLike,
                   image_root: str | os.PathLike) -> list[LocSample]:
    """CSV: labels (file,label,...,width,height) and boxes (file,label,wnid,x0,y0,x1,y1)."""
    image_root = Path(image_root)
    boxes = defaultdict(list)
    with open(boxes_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            boxes[r["file"]].append(tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1")))
    samples = []
    with open(labels_csv, newline="") as fh:
        for line, r in enumerate(csv.DictReader(fh), start=2):
            try:
                samples.append(LocSample(image_root / r["file"], int(r["label"]),
                                         (int(r["width"]), int(r["height"])), boxes[r["file"]]))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{labels_csv} line {line}: {err}") from None
    return samples


def find_localization_samples(data: str | os.PathLike) -> list[LocSample]:
    """Reads whichever annotation form the folder holds: val_labels.csv + val_boxes.csv, a
    val_boxes_xml/ folder, or wsolevaluation metadata (*image_ids.txt)."""
    data = Path(data)
    if (data / "val_labels.csv").is_file() and (data / "val_boxes.csv").is_file():
        return read_csv_boxes(data / "val_labels.csv", data / "val_boxes.csv", data)
    if (data / "val_boxes_xml").is_dir():
        return read_voc_xml(data / "val_boxes_xml", data / "val")
    ids = sorted(data.glob("*image_ids.txt"))
    if ids:
        return read_wsol_metadata(data, data, prefix=ids[0].name[: -len("image_ids.txt")])
    raise FileNotFoundError(f"{data}: no val_labels.csv + val_boxes.csv, val_boxes_xml/ or *image_ids.txt")


def resize_box(box, size: tuple[int, int], new_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Scales x0 y0 x1 y1 from an image of size (w, h) to new_size (w, h), truncating to ints like
    wsolevaluation."""
    (w, h), (nw, nh) = size, new_size
    x0, y0, x1, y1 = box
    return int(x0 * nw / w), int(y0 * nh / h), int(x1 * nw / w), int(y1 * nh / h)


class LocalizationDataset(Dataset):
    """Images resized to size x size (aspect not kept) with their boxes rescaled.

    Items: (display image Tensor[3, S, S] in [0, 1], label, boxes np.ndarray[k, 4] int). Normalise
    for the model with its Preprocess.normalize. The stored image's own size is used for the boxes
    (so 224 x 224 copies and full-resolution originals give the same boxes). interpolation: the
    model's own ("bicubic" for EfficientNet-Lite0; `Preprocess.interpolation`), as distillation used."""

    def __init__(self, samples: Sequence[LocSample], size: int = 224, interpolation: str = "bilinear"):
        if not samples:
            raise ValueError("no localisation samples")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest; got {interpolation!r}")
        self.samples, self.size, self.interpolation = list(samples), size, interpolation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        s = self.samples[i]
        try:
            img = Image.open(s.path)
            img.load()
        except OSError as err:
            raise OSError(f"{s.path}: cannot read the image: {err}") from err
        with img:
            img = img.convert("RGB")
            # the boxes refer to the annotation's image size; scaling from it is right for any
            # stored copy of the image (224 x 224 squashed or original)
            # the same call as Preprocess(squash=True): distillation with --squash saw the same pixels
            x = TF.to_tensor(TF.resize(img, [self.size, self.size], interpolation=InterpolationMode(self.interpolation)))
        boxes = np.array([resize_box(b, s.size, (self.size, self.size)) for b in s.boxes], dtype=np.int64).reshape(-1, 4)
        return x, s.label, boxes


def collate_localization(batch):
    xs, labels, boxes = zip(*batch)
    return torch.stack(xs), torch.tensor(labels), list(boxes)
