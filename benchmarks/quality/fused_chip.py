"""Which multi-layer CHIP map localises best? Chosen on the calibration halves only.

Per-layer CHIP maps of the true class (blocks.3 ... bn2 of EfficientNet-Lite0, min-max normalised at the
input size) are computed once for the calibration half (even indices) of two datasets, then every
candidate fusion is scored on them with wsolevaluation's box rules:
- imagenette: the 250 Imagenette val images, W from the "channels" pass (100 train images a class, N=32);
- ilsvrc: the 650 shared ILSVRC val images over 456 classes, W for all 1000 classes from one train image
  a class (the "ilsvrc" pass, N=32).
Candidates: each single layer; the product of every layer pair (Refined CHIP); geometric and arithmetic
means over layer sets; weighted geometric means of an intermediate and a last layer. The winner is the
candidate with the best mean calibration MaxBoxAcc over the two datasets; paired intervals against the best
single layer on each dataset say how sure that choice is.

    python benchmarks/quality/fused_chip.py            # writes results/fused_chip_calibration.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402

from chip_ext import data  # noqa: E402
from chip_ext.distillation import DEFAULT_LAM_RATIO  # noqa: E402
from chip_ext.evaluation import stats  # noqa: E402
from chip_ext.evaluation.localization import DEFAULT_THRESHOLDS, box_correct_both  # noqa: E402
from chip_ext.explanation.explain import chip_maps  # noqa: E402
from chip_ext.explanation.maps import shared_activations  # noqa: E402

LAYERS = ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"]
SHORT = {"blocks.3": "3", "blocks.4": "4", "blocks.5": "5", "blocks.6": "6", "bn2": "bn2"}
TAGS = {"imagenette": "channels", "ilsvrc": "ilsvrc"}


def dataset(name: str, pre) -> data.LocalizationDataset:
    root = qc.DATA / ("imagenette" if name == "imagenette" else "ilsvrc-val")
    return data.LocalizationDataset(data.find_localization_samples(root), interpolation=pre.interpolation)


def importance(model, name: str, tag: str | None = None):
    """W with distill's defaults from the pass of `name` (or `tag`), re-solved from its checkpoint."""
    return qc.solve(model, tag or TAGS[name], lam_ratio=DEFAULT_LAM_RATIO, fit_intercept=True)


def layer_maps(model, pre, imp, ds, indices: list[int], *, progress: bool = True):
    """-> (maps float16 [n, L, H, W] of the true class at LAYERS, boxes list)."""
    from tqdm.auto import tqdm

    maps, boxes = [], []
    loader = DataLoader(Subset(ds, indices), batch_size=25, collate_fn=data.collate_localization)
    for x01, labels, bx in tqdm(loader, desc="per-layer CHIP maps", disable=not progress):
        x = pre.normalize(x01)
        with shared_activations():  # a layer the importance lacks: zeros (its candidates are skipped)
            per = [chip_maps(model, x, imp, layer, labels)[0] if layer in imp.weights else torch.zeros(x01.shape[0], *x01.shape[-2:])
                   for layer in LAYERS]
        maps.append(torch.stack(per, 1).half())
        boxes += bx
    return torch.cat(maps).numpy(), boxes


def normalise(m: np.ndarray) -> np.ndarray:
    """Per-image min-max of [n, H, W] (a constant map becomes zeros)."""
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 0.0)


def candidates() -> dict[str, tuple[str, dict[str, float]]]:
    """name -> (rule, {layer: weight}); rule "geometric" (prod m_l^w_l) or "mean" (sum w_l m_l)."""
    out = {}
    for l in LAYERS:
        out[f"single {SHORT[l]}"] = ("mean", {l: 1.0})
    for a, b in itertools.combinations(LAYERS, 2):
        out[f"product {SHORT[a]}x{SHORT[b]}"] = ("geometric", {a: 0.5, b: 0.5})
    sets = [["blocks.4", "blocks.5", "blocks.6", "bn2"], ["blocks.5", "blocks.6", "bn2"],
            ["blocks.4", "blocks.5", "bn2"], LAYERS, ["blocks.4", "blocks.5", "blocks.6"],
            ["blocks.4", "blocks.6", "bn2"]]
    for s in sets:
        key = ",".join(SHORT[l] for l in s)
        out[f"geomean {key}"] = ("geometric", {l: 1 / len(s) for l in s})
        out[f"mean {key}"] = ("mean", {l: 1 / len(s) for l in s})
    for mid, last in (("blocks.5", "bn2"), ("blocks.5", "blocks.6"), ("blocks.4", "bn2")):
        for w in (0.25, 0.75):
            out[f"geo {SHORT[mid]}^{w} x {SHORT[last]}^{1 - w}"] = ("geometric", {mid: w, last: 1 - w})
    return out


def fuse(maps: np.ndarray, rule: str, weights: dict[str, float]) -> np.ndarray:
    """maps [n, L, H, W] in [0, 1] -> the fused, min-max normalised maps [n, H, W]."""
    stack = np.stack([maps[:, LAYERS.index(l)].astype(np.float32) for l in weights])
    w = np.asarray(list(weights.values()), np.float32)[:, None, None, None]
    if rule == "geometric":
        fused = np.exp((w * np.log(np.maximum(stack, 1e-6))).sum(0)) * (stack.min(0) > 0)
    else:
        fused = (w * stack).sum(0)
    return normalise(fused)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="imagenette,ilsvrc")
    p.add_argument("--limit", type=int, default=None, help="first N calibration images (smoke test)")
    p.add_argument("--cache", type=Path, default=qc.WORK / "fused_maps", help="per-layer maps cache folder")
    p.add_argument("--tag", action="append", default=[], help="DATASET=PASS: another pass for a dataset")
    p.add_argument("--out", type=Path, default=qc.RESULTS / "fused_chip_calibration.json")
    args = p.parse_args(argv)
    tags = dict(t.split("=", 1) for t in args.tag)
    model, pre = qc.load_model()
    cands = candidates()
    record = {"benchmark": "fused_chip", "date": dt.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": qc.MODEL, "layers": LAYERS, "half": "calibration (even indices)",
              "metric": "GT-known MaxBoxAcc (IoU 0.5, largest contour) and MaxBoxAccV2",
              "passes": {k: qc.PASSES[v] for k, v in TAGS.items()}, "datasets": {}}
    hits = {}
    for name in args.datasets.split(","):
        t0 = time.perf_counter()
        ds = dataset(name, pre)
        cal, _ = qc.halves(len(ds))
        cal = cal[: args.limit] if args.limit else cal
        args.cache.mkdir(parents=True, exist_ok=True)
        tag = tags.get(name, TAGS[name])
        cache = args.cache / f"{name}_{tag}_{len(cal)}.npz"
        imp = importance(model, name, tag)
        if cache.is_file():
            z = np.load(cache, allow_pickle=True)
            maps, boxes = z["maps"], list(z["boxes"])
        else:
            maps, boxes = layer_maps(model, pre, imp, ds, cal)
            np.savez(cache, maps=maps, boxes=np.array(boxes, dtype=object))
        rows, hits[name] = {}, {}
        for cname, (rule, weights) in cands.items():
            if any(l not in imp.weights for l in weights):
                continue
            v1, v2 = box_correct_both(fuse(maps, rule, weights), boxes, DEFAULT_THRESHOLDS)
            hits[name][cname] = v1
            rows[cname] = {"max_box_acc": stats.max_over_thresholds_interval(v1),
                           "max_box_acc_v2": float(np.mean([v2[:, :, k].mean(0).max() for k in range(3)])),
                           "rule": rule, "weights": weights}
            print(f"{name:<10} {cname:<28} MaxBoxAcc {stats.format_interval(rows[cname]['max_box_acc'])} "
                  f"V2 {rows[cname]['max_box_acc_v2']:.3f}", flush=True)
        record["datasets"][name] = {"pass": tag, "n_calibration": len(cal), "candidates": rows,
                                    "seconds": time.perf_counter() - t0}
    names = list(record["datasets"])
    score = {c: float(np.mean([record["datasets"][d]["candidates"][c]["max_box_acc"]["mean"] for d in names]))
             for c in cands if all(c in record["datasets"][d]["candidates"] for d in names)}
    winner = max(score, key=score.get)
    record["mean_over_datasets"] = dict(sorted(score.items(), key=lambda kv: -kv[1]))
    record["winner"] = {"name": winner, "rule": cands[winner][0], "weights": cands[winner][1]}
    for d in names:  # how sure: the winner against the best single layer, paired on the same images
        singles = {c: v for c, v in record["datasets"][d]["candidates"].items() if c.startswith("single")}
        best = max(singles, key=lambda c: singles[c]["max_box_acc"]["mean"])
        diff = stats.max_over_thresholds_interval(hits[d][winner], hits[d][best])
        record["datasets"][d]["winner_minus_best_single"] = {"best_single": best, **diff}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print("winner:", winner, {d: record["datasets"][d]["winner_minus_best_single"] for d in names})
    return 0


if __name__ == "__main__":
    sys.exit(main())
