"""Two pictures of what CHIP knows about channels (EfficientNet-Lite0):

1. docs/channels_conditional.png: channel-conditional maps (`chip_ext.channels.conditional_maps`) -- for
   Imagenette val images, the CHIP class map at blocks.5 and the part each of the class's top-4 channels
   (by effect) gives, W[c, k] · A_k; W from the "channels" pass of quality_common.py (100 train images a
   class, N=32, distill's defaults).
2. docs/channels_confused_pairs.png: the class pairs the model confuses most on the shared ILSVRC val
   images (results/channel_sharing.json) and the top-10 channels of W at blocks.6 they share, each shown
   by its strongest crop over the ILSVRC val images (`channels.atlas`, the receptive-field core); W for
   all 1000 classes from one train image a class (the cached pass of channel_sharing.py).

    python benchmarks/quality/channel_pictures.py          # ~3 min on 2 cores with both passes cached
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import channel_ablation  # noqa: E402
import quality_common as qc  # noqa: E402

from chip_ext import channels, data, models  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def conditional_figure(path: Path, layer: str = "blocks.5", k: int = 4, images_shown: int = 3) -> None:
    model, pre = qc.load_model()
    imp = qc.solve(model, "channels", lam_ratio=0.03, fit_intercept=True, layers=[layer])
    val = qc.val_dataset(pre)
    _, ev = qc.halves(len(val))
    picks, seen = [], set()
    for i in ev:  # the first evaluation-half image of distinct classes the model gets right
        x, y, _ = val[i]
        if int(y) in seen:
            continue
        with torch.no_grad():
            if int(model(pre.normalize(x[None])).argmax()) != int(y):
                continue
        picks.append((x, int(y)))
        seen.add(int(y))
        if len(picks) == images_shown:
            break
    x = torch.stack([p[0] for p in picks])
    parts = channels.conditional_maps(model, pre.normalize(x), imp, layer, target=[p[1] for p in picks], k=k)
    names = models.class_names_for(qc.MODEL)
    plt = _plt()
    fig, axes = plt.subplots(len(picks), k + 2, figsize=(2.0 * (k + 2), 2.15 * len(picks)), squeeze=False)
    for b in range(len(picks)):
        img = x[b].permute(1, 2, 0).numpy()
        scale = float(parts.class_maps[b].clamp_min(0).max()) or 1.0
        axes[b, 0].imshow(img)
        axes[b, 0].set_title(names[int(parts.targets[b])][:22], fontsize=8)
        axes[b, 1].imshow(img)
        axes[b, 1].imshow(parts.class_maps[b].clamp_min(0) / scale, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[b, 1].set_title(f"CHIP map, {layer}", fontsize=8)
        for j in range(k):
            m = parts.maps[b, j]
            share = float(m.clamp_min(0).sum() / parts.class_maps[b].clamp_min(0).sum().clamp_min(1e-12))
            axes[b, j + 2].imshow(img)  # each channel on its own symmetric scale; its share of the class map named
            axes[b, j + 2].imshow(m / float(m.abs().max().clamp_min(1e-12)), cmap="bwr", alpha=0.6, vmin=-1, vmax=1)
            axes[b, j + 2].set_title(f"ch {int(parts.channels[b, j])}, W={float(parts.weights[b, j]):+.3f}\n"
                                     f"{100 * share:.0f}% of the map's positive mass", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Channel-conditional CHIP maps: W[c, k]·A_k of the class's top channels by effect "
                 "(red: speaks for the class, blue: against; each on its own scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def confused_pairs_figure(path: Path, layer: str = "blocks.6", pairs_shown: int = 4, k: int = 10,
                          crops: int = 5) -> None:
    sharing = json.loads((qc.RESULTS / "channel_sharing.json").read_text())
    model, pre = models.load(qc.MODEL)
    imp = channel_ablation.ilsvrc_importance(model, layer)
    val = data.LocalizationDataset(data.find_localization_samples(qc.DATA / "ilsvrc-val"),
                                   interpolation=pre.interpolation)
    loader = DataLoader(val, batch_size=32, collate_fn=data.collate_localization)
    book = channels.atlas(model, ((pre.normalize(x), y) for x, y, _ in loader), layer, top=1, progress=False)
    field = channels.receptive_field(model, layer, tuple(book.input_size))
    labels = [int(val[i][1]) for i in range(len(val))]
    names = models.class_names_for(qc.MODEL)
    shown = sharing["most_confused"][:pairs_shown]
    plt = _plt()
    fig, axes = plt.subplots(len(shown), 2 + crops, figsize=(1.6 * (2 + crops), 2.0 * len(shown)), squeeze=False)
    for r, (a, b, confusion) in enumerate(shown):
        top_a = set(imp.top_channels(a, k, layer, by="weight")[0].tolist())
        top_b = imp.top_channels(b, k, layer, by="weight")[0].tolist()
        common = [ch for ch in top_b if ch in top_a]
        for col, cls in enumerate((a, b)):
            i = labels.index(cls)
            axes[r, col].imshow(val[i][0].permute(1, 2, 0).numpy())
            axes[r, col].set_title(names[cls][:18] + (f"\nconfused {confusion:.2f}" if col else ""), fontsize=8)
        for j in range(crops):
            ax = axes[r, 2 + j]
            if j < len(common):
                ch = common[j]
                x0, y0, x1, y1 = book.crop_box(ch, 0, field)
                img = val[int(book.images[ch, 0])][0]
                ax.imshow(img[:, y0:y1, x0:x1].permute(1, 2, 0).numpy())
                ax.set_title((f"{len(common)} of {k} shared:\n" if j == 0 else "\n") + f"ch {ch}", fontsize=8)
            elif j == 0:
                ax.text(0.5, 0.5, f"none of the top {k}\nshared", ha="center", va="center", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"The most confused ILSVRC class pairs share top-{k} channels of W at {layer} "
                 "(each channel: its strongest crop on the val images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    if "--pairs-only" not in sys.argv:
        conditional_figure(DOCS / "channels_conditional.png")
    confused_pairs_figure(DOCS / "channels_confused_pairs.png")
