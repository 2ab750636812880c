"""Is CHIP's class-by-channel importance causal, and more class-selective than the rankings other
methods give? Class-selective channel ablation (`chip_ext.channels.ablation`) on EfficientNet-Lite0.

Rankings, all from the same training images (the shared Imagenette train images, `--per-class` a
class): CHIP's effect W·z̄ (`Importance.top_channels`'s default) and its weight W (the paper's order),
both from the distillation pass "channels" of `quality_common.py` (defaults: prob target, λ/λ_max 0.03,
intercept, N=32); the dataset averages over class-c images of gradient × activation (first-order
Taylor), Grad-CAM's channel weight, the mean activation; Concept Relevance Propagation's channel
relevance (zennit-crp, its recommended composite, `chip_ext.channels.crp_relevance`; computed once for
every layer and kept in the work folder); CAM's classifier rows (bn2 only); random channels (3 draws, a
floor). With --variants, CHIP's effect also from the same pass re-solved with positive=True, without
intercept (the paper's Lasso) and at λ/λ_max 0.01 and 0.1. Measured on the Imagenette val images (the evaluation half, odd
indices, unless --half all): for each class, its top-k channels set to 0; selectivity = the fall of
the class's probability on its own images - the mean fall of the true class's probability on other
images, with 95% bootstrap intervals over images.

    python benchmarks/quality/quality_common.py channels            # the distillation pass (resumable, ~10 min here)
    python benchmarks/quality/channel_ablation.py                    # ~15 min on 2 cores
    python benchmarks/quality/channel_ablation.py --layers blocks.5 --ks 1,4 --half calibration

Writes benchmarks/results/channel_ablation.json (curves over k per layer and ranking) and
channel_ablation.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402

import chip_ext  # noqa: E402
from chip_ext import channels, data, models  # noqa: E402
from chip_ext.maps import shared_activations  # noqa: E402

LAYERS = ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"]
RANDOM_DRAWS = 3


def train_loader(pre, per_class: int, dataset: str = "imagenette"):
    root = qc.DATA / ("imagenette/train" if dataset == "imagenette" else "imagenet/train-one-per-class")
    ds = data.ImageNetTrain(root, pre, per_class=per_class)
    return ds, DataLoader(ds, batch_size=16, num_workers=1)


def ilsvrc_importance(model, layer: str):
    """CHIP for all 1000 classes from the 1000 train-one-per-class images (the pass of channel_sharing.py,
    N=32, distill's defaults; resumable checkpoint)."""
    import chip_ext
    from chip_ext import models

    pre = models.load(qc.MODEL)[1]
    train = data.ImageNetTrain(qc.DATA / "imagenet" / "train-one-per-class", pre)
    qc.WORK.mkdir(parents=True, exist_ok=True)
    return chip_ext.distill(model, DataLoader(train, batch_size=16, num_workers=1), layer, num_perturbations=32,
                            checkpoint=qc.WORK / f"sharing_{layer}.ckpt",
                            class_names=models.class_names_for(qc.MODEL), progress=True)


def val_images(pre, half: str, dataset: str = "imagenette"):
    val = qc.val_dataset(pre) if dataset == "imagenette" else data.LocalizationDataset(
        data.find_localization_samples(qc.DATA / "ilsvrc-val"), interpolation=pre.interpolation)
    cal, ev = qc.halves(len(val))
    idx = {"calibration": cal, "evaluation": ev, "all": list(range(len(val)))}[half]
    xs, ys = [], []
    for x, y, _ in DataLoader(Subset(val, idx), batch_size=32, collate_fn=data.collate_localization):
        xs.append(pre.normalize(x))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--half", default="evaluation", choices=("evaluation", "calibration", "all"))
    p.add_argument("--per-class", type=int, default=100, help="train images a class for the rankings (100)")
    p.add_argument("--others", type=int, default=20, help="images of other classes each class is ablated on (20)")
    p.add_argument("--mode", default="zero", choices=channels.ablation.__globals__["MODES"])
    p.add_argument("--dataset", default="imagenette", choices=("imagenette", "ilsvrc"),
                   help="imagenette: 10 classes, rankings from 100 train images a class; ilsvrc: the 456 classes of "
                        "the shared ILSVRC val images, rankings from one train image a class (W for all 1000)")
    p.add_argument("--tag", default="channels", help="the distillation pass of quality_common.py (Imagenette)")
    p.add_argument("--variants", action="store_true",
                   help="also CHIP re-solved positive / without intercept / at lam_ratio 0.01 and 0.1 (Imagenette)")
    p.add_argument("--no-crp", action="store_true", help="leave out zennit-crp's ranking")
    p.add_argument("--out", default=None, help="default results/channel_ablation[_ilsvrc].json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(qc.RESULTS / ("channel_ablation.json" if args.dataset == "imagenette"
                                     else "channel_ablation_ilsvrc.json"))
    layers = [l for l in args.layers.split(",") if l]
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(int(os.environ.get("CHIP_EXT_THREADS", torch.get_num_threads())))

    model, pre = qc.load_model()
    if args.dataset == "imagenette":
        if not (qc.WORK / f"{args.tag}.ckpt").is_file():
            qc.distill_pass(args.tag)
        imp = qc.solve(model, args.tag, lam_ratio=0.03, fit_intercept=True)  # distill's defaults
        variants = {} if not args.variants else {
            "chip_effect_positive": qc.solve(model, args.tag, lam_ratio=0.03, fit_intercept=True, positive=True),
            "chip_effect_nointercept": qc.solve(model, args.tag, lam_ratio=0.03, fit_intercept=False),
            "chip_effect_lam0.01": qc.solve(model, args.tag, lam_ratio=0.01, fit_intercept=True),
            "chip_effect_lam0.1": qc.solve(model, args.tag, lam_ratio=0.1, fit_intercept=True)}
        ds, loader = train_loader(pre, args.per_class)
        classes = ds.classes
    else:
        imps = [ilsvrc_importance(model, layer) for layer in layers]
        imp = chip_ext.Importance({l: i.weights[l] for l, i in zip(layers, imps)}, imps[0].classes,
                                  feature_means={l: i.feature_means[l] for l, i in zip(layers, imps)},
                                  class_names=imps[0].class_names, meta=imps[0].meta)
        ds, loader = train_loader(models.load(qc.MODEL)[1], None, "ilsvrc")
        variants = {}
    x, y = val_images(pre, args.half, args.dataset)
    if args.dataset == "ilsvrc":
        classes = sorted(set(y.tolist()))
    print(f"{len(x)} val images ({args.half}), {len(classes)} classes, rankings from {len(ds)} train images",
          flush=True)
    result = {"benchmark": "channel_ablation", "dataset": args.dataset, "date": dt.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": qc.MODEL, "val_half": args.half, "val_images": len(x), "classes": classes,
              "tag": args.tag, "train_images_per_class": args.per_class if args.dataset == "imagenette" else 1,
              "others_per_class": args.others, "mode": args.mode,
              "distillation": {k: imp.meta.get(k) for k in ("num_perturbations", "lam_ratio", "fit_intercept",
                                                            "target", "images_seen")},
              "layers": {}}
    crp = None if args.no_crp else crp_rankings(model, loader, layers, classes, args)
    for layer in layers:
        t0 = time.perf_counter()
        sources = channels.rankings(model, ((im, lab) for im, lab in loader), layer, classes, importance=imp)
        for name, v in variants.items():
            sources[name] = v.effect(layer)[[v.row(int(c)) for c in classes]].float()
        if crp is not None:
            sources["crp"] = crp[layer]
        g = torch.Generator().manual_seed(0)
        K = next(iter(sources.values())).shape[1]
        with shared_activations():  # the prefix once per layer for every ranking
            raw = {name: channels.ablation(model, x, y, layer, s, classes, ks=ks, mode=args.mode,
                                           others_per_class=args.others) for name, s in sources.items()}
            runs = {name: r.summary() for name, r in raw.items()}
            draws = [channels.ablation(model, x, y, layer, torch.rand(len(classes), K, generator=g), classes,
                                       ks=ks, mode=args.mode, others_per_class=args.others, seed=d)
                     for d in range(RANDOM_DRAWS)]
        runs["random"] = {"ks": ks, "per_k": {str(k): {"selectivity": {"mean": float(np.mean([r.selectivity()[j]
                                                                                            for r in draws]))}}
                                               for j, k in enumerate(ks)}, "draws": RANDOM_DRAWS}
        # paired: CHIP effect - each other ranking, over the same resampled images
        paired = {other: {str(k): paired_difference(raw["chip_effect"], raw[other], j) for j, k in enumerate(ks)}
                  for other in raw if other != "chip_effect"} if "chip_effect" in raw else {}
        result["layers"][layer] = {"K": K, "rankings": runs, "chip_effect_minus": paired,
                                   "seconds": round(time.perf_counter() - t0, 1)}
        line = ", ".join(f"{n} {r['per_k'][str(ks[-1])]['selectivity']['mean']:.3f}" for n, r in runs.items())
        print(f"{layer} (K={K}): selectivity at k={ks[-1]}: {line} ({time.perf_counter() - t0:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


def crp_rankings(model, loader, layers, classes, args) -> dict:
    """zennit-crp's channel relevance at every layer, from the same train images as the other rankings;
    kept in the work folder (one backward pass an image, about 0.4 s an image here)."""
    key = f"crp_{args.dataset}_{args.per_class if args.dataset == 'imagenette' else 1}.pt"
    path = qc.WORK / key
    cached = torch.load(path, weights_only=True) if path.is_file() else {}
    todo = [l for l in layers if l not in cached]
    if todo:
        t0 = time.perf_counter()
        new = channels.crp_relevance(model, ((im, lab) for im, lab in loader), todo, classes)
        cached.update(new)
        qc.WORK.mkdir(parents=True, exist_ok=True)
        torch.save(cached, path)
        print(f"CRP relevance at {todo} in {time.perf_counter() - t0:.0f} s", flush=True)
    return cached


def paired_difference(a, b, j: int, boot: int = 2000, seed: int = 0) -> dict:
    """Selectivity of ablation a minus that of b at column j, with a 95% bootstrap interval over images
    resampled together (the same images and the same other-class draws: paired)."""
    rng = np.random.default_rng(seed)
    n = len(a.own)

    def stat(idx):
        sa = np.nanmean(a.own[idx, j]) - np.nanmean(a.off[idx, j])
        sb = np.nanmean(b.own[idx, j]) - np.nanmean(b.off[idx, j])
        return sa - sb

    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(boot)])
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return {"mean": float(stat(np.arange(n))), "lo": float(lo), "hi": float(hi)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(result["layers"])
    names = sorted({n for L in result["layers"].values() for n in L["rankings"]})
    colour = {n: f"C{i}" for i, n in enumerate(names)}  # one colour per ranking in every panel
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, r in result["layers"][layer]["rankings"].items():
            ks = [int(k) for k in r["per_k"]]
            sel = [r["per_k"][str(k)]["selectivity"] for k in ks]
            mean = [s["mean"] for s in sel]
            style = dict(lw=2.2) if name.startswith("chip") else dict(lw=1.2, ls="--" if name == "random" else "-")
            ax.plot(ks, mean, marker="o", ms=3, label=name, color=colour[name], **style)
            if "lo" in sel[0]:
                ax.fill_between(ks, [s["lo"] for s in sel], [s["hi"] for s in sel], alpha=0.12, color=colour[name])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{layer} (K={result['layers'][layer]['K']})")
        ax.set_xlabel("channels switched off (k)")
    axes[0][0].set_ylabel("class selectivity")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    axes[0][-1].legend([handles[n] for n in names], names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Class-selective channel ablation, EfficientNet-Lite0, {result['val_images']} "
                 f"{'ILSVRC' if result.get('dataset') == 'ilsvrc' else 'Imagenette'} val images, "
                 f"{len(result['classes'])} classes ({result['date']}; 95% bootstrap bands)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
