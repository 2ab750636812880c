"""The peers that cost one forward of the whole model per channel (Score-CAM, Ablation-CAM) or per
mask (RISE), against CHIP and Grad-CAM on the SAME images: the first --images images of the
evaluation half (odd indices) of the Imagenette val set, at one layer. GT-known MaxBoxAcc at each
method's best threshold on those images (no calibration split: too few images to halve), and the
seconds each method took.

    python benchmarks/expensive_peers.py --layer blocks.5 --images 40 --rise-masks 1000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as q  # noqa: E402

from chip_ext import evaluation  # noqa: E402
from chip_ext.data import collate_localization  # noqa: E402
from chip_ext.localization import DEFAULT_THRESHOLDS, box_correct_both  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default="blocks.5")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--rise-masks", type=int, default=1000)
    p.add_argument("--methods", default="chip,gradcam,scorecam,ablationcam,rise")
    p.add_argument("--chip", default='{"lam_ratio": 0.03, "fit_intercept": true}', help="solver options (JSON)")
    p.add_argument("--out", type=Path, default=q.RESULTS / "expensive_peers.json")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, pre = q.load_model()
    _, ev = q.halves(len(q.val_dataset(pre)))
    ds = Subset(q.val_dataset(pre), ev[: args.images])
    imp = q.solve(model, "base", **json.loads(args.chip))
    names = args.methods.split(",")
    fns = evaluation.standard_methods(model, names, importance=imp, layer=args.layer,
                                      options={"rise": {"num_masks": args.rise_masks}} if "rise" in names else None)
    correct = {n: [] for n in fns}
    seconds = {n: 0.0 for n in fns}
    for i, (x01, labels, boxes) in enumerate(DataLoader(ds, batch_size=4, collate_fn=collate_localization)):
        print(f"batch {i + 1} of {-(-len(ds) // 4)}", flush=True)
        x = pre.normalize(x01)
        for n, fn in fns.items():
            t0 = time.perf_counter()
            maps = fn(x, labels).detach().float().clamp(0, 1)
            seconds[n] += time.perf_counter() - t0
            correct[n].append(box_correct_both(maps, boxes, DEFAULT_THRESHOLDS)[0])
    record = {"benchmark": "expensive_peers", "date": dt.date.today().isoformat(),
              "machine": f"CPU (2-core AMD EPYC), {torch.get_num_threads()} threads", "model": q.MODEL,
              "layer": args.layer, "images": f"the first {len(ds)} of the evaluation half (odd indices)",
              "rise_masks": args.rise_masks if "rise" in names else None, "chip": json.loads(args.chip), "results": {}}
    for n in fns:
        c = np.concatenate(correct[n])
        record["results"][n] = {"max_box_acc": float(c.mean(0).max()), "seconds": seconds[n]}
        print(f"{n:<14} MaxBoxAcc {c.mean(0).max():.3f}  ({seconds[n]:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
