"""The paper's Fig. 9/10 claim at scale: do the classes a model confuses share more of their top-k channels
than random class pairs do? Over every pair of the shared ILSVRC val classes (456 classes, 650 images).

Confusion of a pair (a, b): the model's mean probability of b on the val images of a plus that of a on
the images of b (soft, so every pair has a value; the hard confusions are too few on 650 images). The
rankings come from one ImageNet train image a class (`imagenet/train-one-per-class`): CHIP's effect and
weight (`chip_ext.distill` over the 1000 images, all 1000 classes, distill's defaults, N=32), and the
first-order Taylor, Grad-CAM-weight and mean-activation averages of `chip_ext.channels.rankings`. For each
ranking: the mean number of shared top-k channels of the 100 most confused pairs, of random pairs, and of
the least confused pairs, with 95% bootstrap intervals over pairs; and the Spearman correlation of shared
channels with confusion over all pairs.

    python benchmarks/quality/channel_sharing.py                   # ~15 min on 2 cores (the distillation, cached)
Writes benchmarks/results/channel_sharing.json and channel_sharing.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402

import chip_ext  # noqa: E402
from chip_ext import channels, data, models  # noqa: E402


def val_probabilities(model, pre):
    val = data.LocalizationDataset(data.find_localization_samples(qc.DATA / "ilsvrc-val"), interpolation=pre.interpolation)
    probs, labels = [], []
    with torch.no_grad():
        for x, y, _ in DataLoader(val, batch_size=50, collate_fn=data.collate_localization):
            probs.append(torch.softmax(model(pre.normalize(x)), dim=1))
            labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def soft_confusion(probs: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> np.ndarray:
    """[C, C] symmetric: mean p(b) over the images of a plus mean p(a) over the images of b."""
    idx = torch.tensor(classes)
    mean = torch.stack([probs[labels == c][:, idx].mean(0) for c in classes])  # [C, C]: row a, column b
    conf = (mean + mean.T).numpy()
    np.fill_diagonal(conf, np.nan)
    return conf


def shared_top(scores: torch.Tensor, k: int) -> np.ndarray:
    top = channels.top_k(scores, k)
    member = torch.zeros(scores.shape, dtype=torch.float32).scatter_(1, top, 1.0)
    return (member @ member.T).numpy()  # [C, C] shared top-k counts


def main(argv=None) -> int:
    from scipy.stats import spearmanr

    from chip_ext.channels.ablation import bootstrap_interval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="blocks.6")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--pairs", type=int, default=100, help="most / least confused pairs compared (100)")
    p.add_argument("--perturbations", type=int, default=32)
    p.add_argument("--out", default=str(qc.RESULTS / "channel_sharing.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("CHIP_EXT_THREADS", torch.get_num_threads())))
    model, pre = models.load(qc.MODEL)  # train images: resize + centre crop, as distillation's default
    train = data.ImageNetTrain(qc.DATA / "imagenet" / "train-one-per-class", pre)
    qc.WORK.mkdir(parents=True, exist_ok=True)
    imp = chip_ext.distill(model, DataLoader(train, batch_size=16, num_workers=1), args.layer,
                           num_perturbations=args.perturbations, checkpoint=qc.WORK / f"sharing_{args.layer}.ckpt",
                           class_names=models.class_names_for(qc.MODEL), progress=True)
    probs, labels = val_probabilities(model, pre)
    classes = sorted(set(labels.tolist()))
    conf = soft_confusion(probs, labels, classes)
    sources = channels.rankings(model, ((x, y) for x, y in DataLoader(train, batch_size=32)), args.layer, classes,
                                importance=imp)
    iu = np.triu_indices(len(classes), 1)
    c = conf[iu]
    order = np.argsort(-c)
    rng = np.random.default_rng(0)
    random_pairs = rng.choice(len(c), size=args.pairs, replace=False)
    result = {"benchmark": "channel_sharing", "date": dt.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": qc.MODEL, "layer": args.layer, "k": args.k, "classes": len(classes), "pairs_all": len(c),
              "val_images": len(labels), "most_confused": [[classes[iu[0][i]], classes[iu[1][i]], float(c[i])]
                                                            for i in order[:10]], "rankings": {}}
    for name, scores in sources.items():
        shared = shared_top(scores, args.k)[iu]
        rho = spearmanr(c, shared).statistic
        result["rankings"][name] = {
            "most_confused": bootstrap_interval(shared[order[:args.pairs]]),
            "random": bootstrap_interval(shared[random_pairs]),
            "least_confused": bootstrap_interval(shared[order[-args.pairs:]]),
            "most_minus_random": bootstrap_interval(shared[order[:args.pairs]], shared[random_pairs]),
            "spearman_confusion_shared": float(rho),
        }
        r = result["rankings"][name]
        print(f"{name:>12}: shared top-{args.k} most confused {r['most_confused']['mean']:.2f} "
              f"[{r['most_confused']['lo']:.2f}, {r['most_confused']['hi']:.2f}], random {r['random']['mean']:.2f}, "
              f"least {r['least_confused']['mean']:.2f}; Spearman {rho:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rankings"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for j, group in enumerate(("most_confused", "random", "least_confused")):
        vals = [result["rankings"][n][group] for n in names]
        x = np.arange(len(names)) + (j - 1) * 0.27
        ax.bar(x, [v["mean"] for v in vals], width=0.27, label=group.replace("_", " "),
               yerr=[[v["mean"] - v["lo"] for v in vals], [v["hi"] - v["mean"] for v in vals]], capsize=2)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(f"shared top-{result['k']} channels")
    ax.set_title(f"Class pairs of the ILSVRC val classes, {result['layer']} of EfficientNet-Lite0 "
                 f"({result['date']}; 95% bootstrap)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
