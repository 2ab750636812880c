"""Speed of the channel atlas: `chip_ext.channels.atlas` over the shared Imagenette train images against a
plain forward of the model over the same loader (JPEG decoding included in both, same batch size and
workers). The atlas runs only the prefix up to the layer and keeps K × top entries; the goal is at most
1.3x the plain forward at bn2.

    python benchmarks/speed/bench_atlas.py                       # 2,000 images here; --images 12894 for all
Writes benchmarks/results/atlas-<machine>.json.
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

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
import quality_common as qc  # noqa: E402

from chip_ext import channels, data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="bn2")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("CHIP_EXT_THREADS", torch.get_num_threads())))
    model, pre = qc.load_model()
    ds = data.ImageNetTrain(qc.DATA / "imagenette" / "train", pre)
    step = max(1, len(ds) // args.images)  # every class, evenly
    subset = Subset(ds, list(range(0, len(ds), step))[:args.images])

    def loader():
        return DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers)

    channels.atlas(model, [next(iter(loader()))[0][:2]], args.layer, progress=False)  # trace once, warm up
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader():
            model(x)
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    book = channels.atlas(model, loader(), args.layer, top=args.top, progress=False)
    atlas_s = time.perf_counter() - t0
    result = {"benchmark": "atlas", "date": dt.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "layer": args.layer, "images": len(subset), "top": args.top, "batch_size": args.batch_size,
              "workers": args.workers, "plain_forward_s": round(forward, 2), "atlas_s": round(atlas_s, 2),
              "ratio": round(atlas_s / forward, 3), "goal_ratio": 1.3, "K": book.K}
    out = Path(args.out) if args.out else qc.RESULTS / "atlas-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
