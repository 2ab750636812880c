"""`chip_ext.evaluation.evaluate` speed with the layer's activations shared between methods (one prefix
forward per batch and layer, `maps.shared_activations`) against each method computing its own (what
evaluate did before). EfficientNet-Lite0 on the first Imagenette val images; the maps must be identical.
Writes benchmarks/results/evaluate-<device>.json.

    python benchmarks/speed/bench_evaluate.py [--images 50] [--layer bn2] [--methods chip,refined,gradcam,cam]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
import quality_common as q  # noqa: E402
from bench_ops import RESULTS, device_name, slug  # noqa: E402

from chip_ext import evaluation  # noqa: E402
from chip_ext.distillation import DEFAULT_LAM_RATIO  # noqa: E402


def importance(model, pre, layers):
    """The benchmark's CHIP statistics if they are there (quality_common.py base), else a small pass."""
    if (q.WORK / "base.ckpt").is_file():
        return q.solve(model, "base", lam_ratio=DEFAULT_LAM_RATIO, fit_intercept=True), "base pass"
    import chip_ext
    from chip_ext import data

    ds = data.ImageNetTrain(q.DATA / "imagenette" / "train", pre, per_class=4)
    imp = chip_ext.distill(model, torch.utils.data.DataLoader(ds, batch_size=8), layers, classes=ds.classes,
                           num_perturbations=8, progress=False)
    return imp, "4 images a class, N=8 (the maps' content does not matter for the timing)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--layer", default="bn2")
    p.add_argument("--methods", default="chip,refined,gradcam,cam")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each mode (the best is reported)")
    args = p.parse_args(argv)
    model, pre = q.load_model()
    imp, source = importance(model, pre, ["blocks.2", args.layer])
    names = [m for m in args.methods.split(",") if m]
    fns = evaluation.standard_methods(model, names, importance=imp, layer=args.layer)
    ds = Subset(q.val_dataset(pre), range(args.images))
    modes = {"shared": evaluation.shared_activations, "per_method": contextlib.nullcontext}
    seconds, results = {}, {}
    evaluation.evaluate(model, Subset(ds, range(2)), fns, pre.normalize, progress=False)  # warm-up (tracing)
    for rep in range(args.repeats):
        for mode, ctx in modes.items():
            evaluation.shared_activations = ctx  # what evaluate enters around each batch
            try:
                t0 = time.perf_counter()
                results[mode] = evaluation.evaluate(model, ds, fns, pre.normalize, progress=False, keep_hits=True,
                                                     batch_size=args.batch_size)
                seconds.setdefault(mode, []).append(time.perf_counter() - t0)
            finally:
                evaluation.shared_activations = modes["shared"]
    same = all(np.array_equal(results["shared"]["methods"][m]["hits"], results["per_method"]["methods"][m]["hits"])
               for m in names)
    best = {m: min(v) for m, v in seconds.items()}
    out = {"benchmark": "evaluate", "date": dt.date.today().isoformat(), "device": device_name(torch.device("cpu")),
           "threads": torch.get_num_threads(), "model": q.MODEL, "layer": args.layer, "methods": names,
           "images": args.images, "batch_size": args.batch_size, "importance": source,
           "seconds": seconds, "best_seconds": best, "speedup": best["per_method"] / best["shared"],
           "identical_hits": same}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"evaluate-{slug(out['device'])}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("best_seconds", "speedup", "identical_hits")}), "->", path)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
