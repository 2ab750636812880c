"""One rank's loader under torch.distributed: `RankShard` (the shared layout: this rank's items decoded, every
other item a zero placeholder that is still collated) against `RankSlice` (this rank's items only), as rank 0 of
--worlds ranks sees it. Real shared Imagenette train JPEGs, resized and cropped to --size by DataLoader workers
(uint8, as `distill(normalize=...)` takes them). Reports, per world size, the seconds and images/s of rank 0's
own images (median of --repeats interleaved runs) and the bytes its loader collates per own image. No process group is needed: the loader's side is
the same in every rank. Writes benchmarks/results/rank_loader-<machine>.json.

    python benchmarks/speed/bench_rank_loader.py                       # 2 workers, 1024 images, worlds 2 and 8
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from chip_ext.data import ImageNetTrain, RankShard, RankSlice

DATA = Path(os.environ.get("CHIP_EXT_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import RESULTS, device_name  # noqa: E402


def transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.PILToTensor()])


def time_loader(dataset, rank: int, world: int, batch: int, workers: int) -> dict:
    """Rank `rank`'s pass over its loader: seconds, own images, bytes of images collated."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)
    t0 = time.perf_counter()
    images, collated = 0, 0
    for x, _ in loader:
        collated += x.numel() * x.element_size()
        images += x.shape[0]
    seconds = time.perf_counter() - t0
    own = len(range(rank, len(dataset.dataset), world))
    return {"seconds": seconds, "own_images": own, "loader_images": images, "own_images_per_s": own / seconds,
            "collated_bytes_per_own_image": collated / own}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA / "imagenette" / "train")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--worlds", default="2,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs of each loader; the median is reported")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    base = ImageNetTrain(args.data, transform(args.size))
    base.samples = base.samples[::max(1, len(base.samples) // args.images)][:args.images]  # every class
    results = []
    for world in (int(w) for w in args.worlds.split(",")):
        row = {"world": world}
        for name, wrap in (("RankShard", RankShard), ("RankSlice", RankSlice)):
            time_loader(wrap(base, 0, world), 0, world, args.batch, args.workers)  # file cache warmed
        runs = {"RankShard": [], "RankSlice": []}
        for _ in range(args.repeats):  # interleaved: this machine's speed drifts between runs
            for name, wrap in (("RankShard", RankShard), ("RankSlice", RankSlice)):
                runs[name].append(time_loader(wrap(base, 0, world), 0, world, args.batch, args.workers))
        for name, rs in runs.items():
            row[name] = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]  # the median run
            row[name]["seconds_all"] = [r["seconds"] for r in rs]
        row["speedup_slice_vs_shard"] = row["RankShard"]["seconds"] / row["RankSlice"]["seconds"]
        results.append(row)
        print(f"world {world}: rank 0's {row['RankSlice']['own_images']} images: RankShard "
              f"{row['RankShard']['seconds']:.2f} s ({row['RankShard']['collated_bytes_per_own_image'] / 1e6:.2f} MB "
              f"collated an image), RankSlice {row['RankSlice']['seconds']:.2f} s "
              f"({row['RankSlice']['collated_bytes_per_own_image'] / 1e6:.2f} MB): "
              f"{row['speedup_slice_vs_shard']:.2f}x", flush=True)
    record = {"benchmark": "rank_loader", "device": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(), "date": dt.date.today().isoformat(),
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "images_in_dataset": len(base), "results": results}
    out = args.out or RESULTS / f"rank_loader-cpu-{os.cpu_count()}-cores.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
