"""The results page's picture: per method, the same eight evaluation-half images with their boxes.

Eight val images of the evaluation half (ILSVRC or Imagenette) at fixed, evenly spaced positions (chosen before any map
was drawn), the true class's map of each method, the ground-truth boxes (green) and the method's box at the
threshold chosen on the calibration half (red; from `breadth_sweep.py`'s JSON).

    python benchmarks/quality/method_gallery.py          # docs/gallery_ilsvrc.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_chip  # noqa: E402
import quality_common as qc  # noqa: E402

from chip_ext import data, evaluation  # noqa: E402
from chip_ext.evaluation.localization import box_from_map  # noqa: E402
from chip_ext.explanation.maps import shared_activations  # noqa: E402

ROWS = ["fused", "chip@blocks.5", "chip@bn2", "gradcam@blocks.6", "gradcam@bn2", "gradcam++@bn2", "layercam@bn2",
        "layercam_multi", "refinecam"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ilsvrc", choices=("ilsvrc", "imagenette"))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or qc.ROOT.parent / "docs" / f"gallery_{args.dataset}.png"
    record = json.loads((qc.RESULTS / f"breadth_{args.dataset}.json").read_text())
    model, pre = qc.load_model()
    val = fused_chip.dataset(args.dataset, pre)
    _, ev = qc.halves(len(val))
    idx = ev[:: len(ev) // args.images][: args.images]
    x01, labels, boxes = data.collate_localization([val[i] for i in idx])
    x = pre.normalize(x01)
    imp = fused_chip.importance(model, args.dataset, record.get("pass_by_layer", {}).get("multi", {}).get("tag"))
    rows = [k for k in ROWS if (k.partition("@")[2] or "multi") in record["layers"]]  # measured layers only
    maps, thresholds = {}, {}
    with shared_activations():
        for key in rows:
            name, _, layer = key.partition("@")
            fn = evaluation.standard_methods(model, [name], importance=imp, layer=layer or None)[name]
            maps[key] = fn(x, labels).detach().float().clamp(0, 1)
            thresholds[key] = record["layers"][layer or "multi"][name]["calibrated_threshold"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = [n for n in (getattr(imp, "class_names", None) or [])]
    fig, axes = plt.subplots(len(rows) + 1, len(idx), figsize=(1.6 * len(idx), 1.6 * (len(rows) + 1)))

    def box(ax, b, color):
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color=color, lw=1.3))

    for c in range(len(idx)):
        axes[0, c].imshow(x01[c].permute(1, 2, 0).numpy())
        cls = int(labels[c])
        label = names[imp.row(cls)] if names else str(cls)
        axes[0, c].set_title(label[:18], fontsize=7)
        for b in boxes[c]:
            box(axes[0, c], b, "lime")
        for r, key in enumerate(rows, start=1):
            ax = axes[r, c]
            ax.imshow(x01[c].permute(1, 2, 0).numpy())
            ax.imshow(maps[key][c].numpy(), cmap="jet", alpha=0.5)
            for b in boxes[c]:
                box(ax, b, "lime")
            box(ax, box_from_map(maps[key][c], thresholds[key]), "red")
    for r, key in enumerate(["image"] + rows):
        axes[r, 0].set_ylabel(key, fontsize=7, rotation=0, ha="right", va="center")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{args.dataset} val, evaluation half, fixed positions; green: ground truth, red: the box at the "
                 f"threshold chosen on the calibration half ({record['date']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=68)  # small enough for the repository
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
