"""The peers that cost one forward of the whole model per channel (Score-CAM, Ablation-CAM) or per
mask (RISE), against CHIP and Grad-CAM on the SAME images: the first --images images of the
evaluation half (odd indices) of the Imagenette val set, at one layer. GT-known MaxBoxAcc at each
method's best threshold on those images (no calibration split: too few images to halve), and the
seconds each method took. With --faithful, also deletion and insertion AUC (the RISE protocol, the
step of layer_sweep.py) for those methods. Per-image results (box hit at the best threshold, AUCs)
are kept in the JSON, so subsets (hard_subsets.py) can be read off later without running again.

    python benchmarks/quality/expensive_peers.py --layer blocks.5 --images 40 --rise-masks 1000

--channels-last runs the model in channels-last memory format (1.8x faster on this CPU at batch 64;
the maps differ from the default format only by float rounding).
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

from chip_ext import evaluation, faithfulness  # noqa: E402
from chip_ext.data import collate_localization  # noqa: E402
from chip_ext.distillation import DEFAULT_LAM_RATIO  # noqa: E402
from chip_ext.localization import DEFAULT_THRESHOLDS, box_correct_both  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default="blocks.5")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--rise-masks", type=int, default=1000)
    p.add_argument("--methods", default="chip,gradcam,scorecam,ablationcam,rise")
    p.add_argument("--chip", default=json.dumps({"lam_ratio": DEFAULT_LAM_RATIO, "fit_intercept": True}),
                   help="solver options (JSON; default: distill's)")
    p.add_argument("--out", type=Path, default=q.RESULTS / "expensive_peers.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--faithful", default="", help="methods with deletion/insertion AUC")
    p.add_argument("--deletion-step", type=int, default=224 * 14, help="pixels a step (as layer_sweep.py)")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, pre = q.load_model()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, ev = q.halves(len(q.val_dataset(pre)))
    ds = Subset(q.val_dataset(pre), ev[: args.images])
    imp = q.solve(model, "base", **json.loads(args.chip))
    names = args.methods.split(",")
    fns = evaluation.standard_methods(model, names, importance=imp, layer=args.layer,
                                      options={"rise": {"num_masks": args.rise_masks}} if "rise" in names else None)
    faithful = [n for n in args.faithful.split(",") if n]
    unknown = sorted(set(faithful) - set(fns))
    if unknown:
        p.error(f"--faithful names methods not in --methods: {unknown}")
    correct = {n: [] for n in fns}
    seconds = {n: 0.0 for n in fns}
    auc = {n: {"deletion": [], "insertion": []} for n in faithful}
    for i, (x01, labels, boxes) in enumerate(DataLoader(ds, batch_size=4, collate_fn=collate_localization)):
        print(f"batch {i + 1} of {-(-len(ds) // 4)}", flush=True)
        x = pre.normalize(x01)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for n, fn in fns.items():
            t0 = time.perf_counter()
            maps = fn(x, labels).detach().float().clamp(0, 1)
            seconds[n] += time.perf_counter() - t0
            correct[n].append(box_correct_both(maps, boxes, DEFAULT_THRESHOLDS)[0])
            if n in auc:
                for k, v in faithfulness.deletion_insertion(model, x, maps, labels, step=args.deletion_step).items():
                    auc[n][k].extend(v.tolist())
    record = {"benchmark": "expensive_peers", "date": dt.date.today().isoformat(),
              "machine": f"CPU (2-core AMD EPYC), {torch.get_num_threads()} threads", "model": q.MODEL,
              "layer": args.layer, "images": f"the first {len(ds)} of the evaluation half (odd indices)",
              "rise_masks": args.rise_masks if "rise" in names else None, "chip": json.loads(args.chip),
              "channels_last": args.channels_last, "deletion_step_pixels": args.deletion_step if faithful else None,
              "results": {}}
    for n in fns:
        c = np.concatenate(correct[n])
        best = int(c.mean(0).argmax())
        row = {"max_box_acc": float(c.mean(0).max()), "best_threshold": float(DEFAULT_THRESHOLDS[best]),
               "seconds": seconds[n], "hit_at_best": c[:, best].astype(int).tolist()}
        extra = ""
        if n in auc:
            row.update({k: float(np.mean(v)) for k, v in auc[n].items()})
            row.update({f"{k}_per_image": v for k, v in auc[n].items()})
            extra = f"  del {row['deletion']:.3f} ins {row['insertion']:.3f}"
        record["results"][n] = row
        print(f"{n:<14} MaxBoxAcc {c.mean(0).max():.3f}{extra}  ({seconds[n]:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
