"""Why maps miss the box: at each method's best threshold (GT-known MaxBoxAcc, IoU 0.5) on the
CALIBRATION half of the Imagenette val images, the predicted box against the ground truth: how many
misses are boxes too large (area >= the GT box's) or too small, the median area ratio, the mean IoU, and
the fraction of pixels above half the map's maximum. CHIP (the chosen solver options, base pass),
Grad-CAM, LayerCAM and the no-model centre baseline, at blocks.3, blocks.4, blocks.5 and bn2.

    python benchmarks/quality/box_failures.py          # writes results/box_failures.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chip_variants as cv  # noqa: E402
import quality_common as q  # noqa: E402

from chip_ext import evaluation  # noqa: E402
from chip_ext.localization import DEFAULT_THRESHOLDS, box_correct_both, box_from_map, iou  # noqa: E402


def area(b) -> float:
    return float((b[2] - b[0] + 1) * (b[3] - b[1] + 1))


def failures(maps_batches, boxes_batches) -> dict:
    both = [box_correct_both(m.float().clamp(0, 1), b, DEFAULT_THRESHOLDS) for m, b in zip(maps_batches, boxes_batches)]
    correct = np.concatenate([c[0] for c in both])
    ti = int(correct.mean(0).argmax())
    th = float(DEFAULT_THRESHOLDS[ti])
    ratios, ious, large, small, spread = [], [], 0, 0, []
    for maps, boxes in zip(maps_batches, boxes_batches):
        for m, b in zip(maps, boxes):
            m = m.float().clamp(0, 1)
            box = np.array([box_from_map(m.numpy(), th)], dtype=float)
            gt = np.asarray(b, dtype=float).reshape(-1, 4)
            j = iou(box, gt)[0]
            k = int(j.argmax())
            r = area(box[0]) / area(gt[k])
            ratios.append(r)
            ious.append(float(j[k]))
            if j[k] < 0.5:
                large += r >= 1
                small += r < 1
            spread.append(float((m > 0.5).float().mean()))
    return {"max_box_acc": float(correct.mean(0).max()), "best_threshold": th, "misses_too_large": int(large),
            "misses_too_small": int(small), "median_box_over_gt_area": float(np.median(ratios)),
            "mean_iou": float(np.mean(ious)), "fraction_of_pixels_above_half_max": float(np.mean(spread))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="blocks.3,blocks.4,blocks.5,bn2")
    p.add_argument("--out", type=Path, default=q.RESULTS / "box_failures.json")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, pre = q.load_model()
    cal = q.val_half(pre, "calibration")
    cache = cv.Cached(model, cal, pre)
    chosen = json.loads(cv.OUT.read_text())["chosen_solver"]
    opts = {k: chosen[k] for k in ("lam_ratio", "fit_intercept", "positive")}
    imp = q.solve(model, "base", **opts)
    record = {"benchmark": "box_failures", "date": dt.date.today().isoformat(),
              "machine": f"CPU (2-core AMD EPYC), {torch.get_num_threads()} threads", "model": q.MODEL,
              "split": f"calibration half of data/imagenette/val ({len(cal)} images)", "chip": opts, "results": {}}
    center = evaluation.standard_methods(model, ["center"])["center"]
    record["results"]["center"] = failures([center(x, t) for x, t in zip(cache.x, cache.labels)], cache.boxes)
    print("center", record["results"]["center"], flush=True)
    for layer in args.layers.split(","):
        peers = evaluation.standard_methods(model, ["gradcam", "layercam"], layer=layer)
        methods = {"chip": cache.chip_maps(imp, layer),
                   **{n: [fn(x, t) for x, t in zip(cache.x, cache.labels)] for n, fn in peers.items()}}
        for name, maps in methods.items():
            record["results"][f"{name}@{layer}"] = r = failures(maps, cache.boxes)
            print(f"{name}@{layer}", r, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
