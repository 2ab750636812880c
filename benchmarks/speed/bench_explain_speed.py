"""What one map costs: `chip_ext.explain` per method on EfficientNet-Lite0, milliseconds per image on a
device, for batches of images (the target given, so no method runs a classification first).
CHIP and Refined CHIP need an importance: a small distillation of the same images (N=16), whose
W does not matter for the timing. Grad-CAM is chip_ext.baselines.gradcam (equal to pytorch-grad-cam's).

    python benchmarks/speed/bench_explain_speed.py --data DIR --device cuda --out explain_speed.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import chip_ext
from chip_ext import baselines, data, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import device_name, timeit  # noqa: E402

METHODS = {  # name -> (layer, explain options); image CHIP (N=128) and region CHIP (N=256) at their defaults
    "chip": ("bn2", {}), "refined": (None, {}), "image_chip": ("blocks.6", {}),
    "region_chip@blocks.4": ("blocks.4", {}), "region_chip@blocks.6": ("blocks.6", {}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("CHIP_EXT_DATA", "../shared/data"))
                   / "imagenette" / "train")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dev = torch.device(args.device)
    model, pre = models.load("efficientnet_lite0")
    pre = dataclasses.replace(pre, squash=True)
    ds = data.ImageNetTrain(args.data, pre, per_class=args.per_class)
    imp = chip_ext.distill(model, DataLoader(ds, batch_size=16), ["blocks.2", "blocks.6", "bn2"], classes=ds.classes,
                           num_perturbations=16, progress=False, device=dev)
    model = model.to(dev).eval()
    x = torch.stack([ds[i % len(ds)][0] for i in range(args.batch)]).to(dev)
    target = [ds[i % len(ds)][1] for i in range(args.batch)]
    calls = {name: (lambda layer=layer, opts=opts, name=name: chip_ext.explain(
        model, x, imp, method=name.split("@")[0], layer=layer, target=target, **opts))
        for name, (layer, opts) in METHODS.items()}
    calls["gradcam@bn2"] = lambda: baselines.gradcam(model, x, "bn2", target=torch.tensor(target, device=dev))
    calls["gradcam@blocks.6"] = lambda: baselines.gradcam(model, x, "blocks.6", target=torch.tensor(target, device=dev))
    rows = {}
    for name, fn in calls.items():
        t = timeit(fn, dev, args.repeats)  # one warm-up call (tracing, kernels), then the timed ones
        rows[name] = {"ms_per_image": t["min_s"] / args.batch * 1e3, **t}
        print(f"{name:<22} {rows[name]['ms_per_image']:9.2f} ms/image", flush=True)
    record = {"benchmark": "explain_speed", "device": device_name(dev), "torch": torch.__version__,
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "model": "efficientnet_lite0", "batch": args.batch, "methods": rows,
              "note": "best of --repeats; target given; image CHIP at N=128 and region CHIP at N=256 (their defaults)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
