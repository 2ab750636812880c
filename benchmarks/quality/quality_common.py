"""Shared set-up of the explanation-quality benchmarks (issue 13): the model, the data halves, and
CHIP statistics distilled once per configuration into a checkpoint that every later solve reuses.

The sums a distillation accumulates do not depend on λ, `positive` or `fit_intercept`, so each
configuration of the pass (layers, images per class, N, gates, target, σ) is distilled once into
`WORK/<tag>.ckpt`; `solve(tag, ...)` re-solves a finished checkpoint with other solver options
(`chip_ext.distill` with an empty loader) in seconds.

    python benchmarks/quality/quality_common.py base logit drop09 ...   # distil those passes (resumable)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import chip_ext
from chip_ext import data, models

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/
RESULTS = ROOT / "results"
DATA = Path(os.environ.get("CHIP_EXT_DATA", ROOT.parent.parent / "shared" / "data"))
WORK = Path(os.environ.get("CHIP_EXT_QUALITY_WORK", "/tmp/chip_ext_quality"))
MODEL = "efficientnet_lite0"
SWEEP_LAYERS = ["blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"]
VARIANT_LAYERS = ["blocks.4", "blocks.6", "bn2"]
LAST_LAYERS = ["blocks.6", "bn2"]

# one distillation pass per tag: keyword arguments of chip_ext.distill plus per_class
PASSES: dict[str, dict] = {
    # today's defaults of the benchmark (100 images a class, N=32, prob target, max_drop 0.5, σ=√(K/4))
    "base": {"layers": SWEEP_LAYERS, "per_class": 100, "num_perturbations": 32},
    # one change at a time against "base", on the variant layers
    "logit": {"layers": VARIANT_LAYERS, "per_class": 100, "num_perturbations": 32, "target": "logit"},
    # the others on the last layers only (blocks.4's suffix is most of the cost of a pass)
    "drop09": {"layers": VARIANT_LAYERS, "per_class": 100, "num_perturbations": 32, "max_drop": 0.9},
    "sigma2": {"layers": LAST_LAYERS, "per_class": 100, "num_perturbations": 32, "sigma_scale": 2.0},
    "n100": {"layers": LAST_LAYERS, "per_class": 100, "num_perturbations": 100},
    "img300": {"layers": LAST_LAYERS, "per_class": 300, "num_perturbations": 32},
    # Bernoulli gates: every channel off independently with p = 0.25 (the mean drop fraction of U(0, 0.5));
    # a measurement only: the library's sampler is swapped for this pass (`bernoulli_gates`)
    "bern25": {"layers": VARIANT_LAYERS, "per_class": 100, "num_perturbations": 32, "bernoulli_p": 0.25},
    # smaller perturbations (fourth session): drop fraction U(0, 0.2) and U(0, 0.1), closer to the local,
    # first-order effects that Grad-CAM's gradients measure
    "drop02": {"layers": VARIANT_LAYERS, "per_class": 100, "num_perturbations": 32, "max_drop": 0.2},
    "drop01": {"layers": VARIANT_LAYERS, "per_class": 100, "num_perturbations": 32, "max_drop": 0.1},
    # the channel rankings (channel_ablation.py): the layers of the channels study, distill's defaults, N=32
    "channels": {"layers": ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"], "per_class": 100,
                 "num_perturbations": 32},
    # how selectivity grows with images a class (channel_ablation.py --tag channels10 --per-class 10)
    "channels10": {"layers": ["blocks.5", "blocks.6"], "per_class": 10, "num_perturbations": 32},
    # why CHIP's effect trails gradient x activation at blocks.3-4 (calibration half): one change at a time
    # against "channels" -- smaller perturbations (closer to ablating k <= 16 channels), the logit target
    # (no softmax saturation), more gated networks an image
    "channels_drop01": {"layers": ["blocks.3", "blocks.4"], "per_class": 100, "num_perturbations": 32,
                        "max_drop": 0.1},
    "channels_logit": {"layers": ["blocks.3", "blocks.4"], "per_class": 100, "num_perturbations": 32,
                       "target": "logit"},
    "channels_n100": {"layers": ["blocks.4"], "per_class": 100, "num_perturbations": 100},
    # ILSVRC breadth: W for all 1000 classes from one train image a class (imagenet/train-one-per-class),
    # the layers of the fused map and the ILSVRC layer sweep
    "ilsvrc": {"layers": ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"], "per_class": None,
               "num_perturbations": 32, "root": "imagenet/train-one-per-class"},
    # the same at N=100 on the fused layers (does more perturbations of the one image a class help?)
    "ilsvrc_n100": {"layers": ["blocks.5", "blocks.6", "bn2"], "per_class": None, "num_perturbations": 100,
                    "root": "imagenet/train-one-per-class"},
    # blocks.2 for the ILSVRC layer sweep (its suffix is nearly the whole network: a pass of its own)
    "ilsvrc_b2": {"layers": ["blocks.2"], "per_class": None, "num_perturbations": 32,
                  "root": "imagenet/train-one-per-class"},
    # the one image a class and two views of it (its mirror image, its central 80% zoomed to 224), N=32 each:
    # 96 gated networks a class, the cost of ilsvrc_n100's 100 -- do views beat more gates of one view?
    "ilsvrc_views": {"layers": ["blocks.5", "blocks.6", "bn2"], "per_class": None, "num_perturbations": 32,
                     "root": "imagenet/train-one-per-class", "views": ["flip", "crop"]},
}


class Views(torch.utils.data.Dataset):
    """Every item of `dataset` ((image [3, H, W], label)) followed by its views: "flip" (mirrored left to
    right) and "crop" (the central `crop` fraction, resized back to H x W, bilinear)."""

    def __init__(self, dataset, views: list[str], crop: float = 0.8):
        bad = [v for v in views if v not in ("flip", "crop")]
        if bad:
            raise ValueError(f"views: unknown {bad}; choose from flip, crop")
        self.dataset, self.views, self.crop = dataset, list(views), crop
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset) * (1 + len(self.views))

    def __getitem__(self, i: int):
        item, view = divmod(i, 1 + len(self.views))
        x, label = self.dataset[item]
        if view == 0:
            return x, label
        if self.views[view - 1] == "flip":
            return x.flip(-1), label
        H, W = x.shape[-2:]
        h, w = round(H * self.crop), round(W * self.crop)
        top, left = (H - h) // 2, (W - w) // 2
        zoom = torch.nn.functional.interpolate(x[None, :, top:top + h, left:left + w], size=(H, W),
                                               mode="bilinear", align_corners=False)
        return zoom[0], label


def bernoulli_gates(p: float):
    """A stand-in for `gates.sample_gates` with independent Bernoulli gates (off with probability p),
    keyed like the library's by (seed, layer, global image index); row 0 all ones."""
    from chip_ext.gates import image_seed

    def sample(indices, num_perturbations, K, *, seed=0, layer="", max_drop=0.5, device=None):
        rows = []
        for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
            gen = torch.Generator().manual_seed(image_seed(seed, layer, int(i)))
            g = torch.rand(num_perturbations, K, generator=gen) >= p
            g[0] = True
            rows.append(g)
        out = torch.stack(rows) if rows else torch.ones(0, num_perturbations, K, dtype=torch.bool)
        return out.to(device) if device is not None else out
    return sample


def load_model():
    model, pre = models.load(MODEL)
    return model, dataclasses.replace(pre, squash=True)  # what the localisation images are


def val_dataset(pre) -> data.LocalizationDataset:
    return data.LocalizationDataset(data.find_localization_samples(DATA / "imagenette"),
                                    interpolation=pre.interpolation)


def halves(n: int) -> tuple[list[int], list[int]]:
    """(calibration, evaluation) indices: even and odd positions."""
    return list(range(0, n, 2)), list(range(1, n, 2))


def val_half(pre, which: str):
    val = val_dataset(pre)
    cal, ev = halves(len(val))
    return Subset(val, cal if which == "calibration" else ev)


def _distill_kwargs(model, tag: str) -> tuple[dict, data.ImageNetTrain | None]:
    spec = dict(PASSES[tag])
    per_class = spec.pop("per_class")
    spec.pop("bernoulli_p", None)  # not a distill argument (see distill_pass)
    spec.pop("root", None)  # the train folder (train_root)
    spec.pop("views", None)  # extra views of each train image (distill_pass)
    scale = spec.pop("sigma_scale", None)
    if scale is not None:  # σ = scale * √(K/4) per layer
        from chip_ext.gates import default_sigma
        from chip_ext.split import split

        sigma = {}
        for layer in spec["layers"]:
            prefix, _ = split(chip_ext.maps.inference_view(model), layer)
            with torch.no_grad():
                K = prefix(torch.zeros(1, 3, 224, 224)).shape[1]
            sigma[layer] = scale * default_sigma(K)
        spec["sigma"] = sigma
    return spec, per_class


def train_root(tag: str) -> Path:
    """The train images of pass `tag` (Imagenette's unless the pass names another folder of DATA)."""
    return DATA / PASSES[tag].get("root", "imagenette/train")


def distill_pass(tag: str, *, progress: bool = True) -> Path:
    """Distils (or resumes) the pass `tag` into WORK/<tag>.ckpt; returns the path."""
    model, pre = load_model()
    spec, per_class = _distill_kwargs(model, tag)
    ds = data.ImageNetTrain(train_root(tag), pre, per_class=per_class)
    if PASSES[tag].get("views"):
        ds = Views(ds, PASSES[tag]["views"])
    WORK.mkdir(parents=True, exist_ok=True)
    ck = WORK / f"{tag}.ckpt"
    t0 = time.perf_counter()
    p = PASSES[tag].get("bernoulli_p")
    import chip_ext.streaming as streaming

    library_sampler = streaming.sample_gates
    if p is not None:
        streaming.sample_gates = bernoulli_gates(p)
    try:
        imp = chip_ext.distill(model, DataLoader(ds, batch_size=16, num_workers=1), classes=ds.classes,
                               checkpoint=ck, class_names=models.class_names_for(MODEL), progress=progress, **spec)
    finally:
        streaming.sample_gates = library_sampler
    info = {"tag": tag, "spec": PASSES[tag], "images": imp.meta["images_seen"],
            "seconds_this_call": time.perf_counter() - t0, "timing_s": imp.meta.get("timing_s")}
    (WORK / f"{tag}.json").write_text(json.dumps(info, indent=2, default=str))
    return ck


def solve(model, tag: str, *, lam_ratio: float = 0.1, fit_intercept: bool = False, positive: bool = False,
          layers: list[str] | None = None) -> chip_ext.Importance:
    """Re-solves the finished pass `tag` with these solver options (no new pass); the solution is kept in
    WORK (re-used while the checkpoint is unchanged: 1000 classes at five layers take minutes)."""
    key = f"{tag}_lam{lam_ratio}_fi{int(fit_intercept)}_pos{int(positive)}_{'-'.join(layers or [])}"
    cached = WORK / f"{key}.solution.pt"
    ck = WORK / f"{tag}.ckpt"
    if cached.is_file() and ck.is_file() and cached.stat().st_mtime > ck.stat().st_mtime:
        return chip_ext.Importance.load(cached)
    spec, per_class = _distill_kwargs(model, tag)
    ds = data.ImageNetTrain(train_root(tag), lambda im: im, per_class=per_class)
    if not ck.is_file():
        raise FileNotFoundError(f"{ck}: distil the pass first (python benchmarks/quality/quality_common.py {tag})")
    imp = chip_ext.distill(model, [], classes=ds.classes, checkpoint=ck, lam_ratio=lam_ratio,
                           fit_intercept=fit_intercept, positive=positive,
                           class_names=models.class_names_for(MODEL), progress=False, **spec)
    imp.save(cached)
    return imp


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(description="Make (or resume) the shared distillation passes in the work "
                                  f"folder ({WORK}; $CHIP_EXT_QUALITY_WORK).")
    cli.add_argument("tags", nargs="+", choices=sorted(PASSES), metavar="TAG", help=f"one of {sorted(PASSES)}")
    torch.set_num_threads(int(os.environ.get("CHIP_EXT_THREADS", torch.get_num_threads())))
    for t in cli.parse_args().tags:
        print(f"== pass {t}", flush=True)
        distill_pass(t)
