"""Localisation and faithfulness at ILSVRC breadth, with intervals: CHIP (single layers and fused) against
the CAM family (single layers and pytorch-grad-cam's multi-layer fusions), on the evaluation half.

Datasets: `ilsvrc` (the 650 shared ILSVRC val images over 456 classes; W for all 1000 classes from one
train image a class, the "ilsvrc" pass) and `imagenette` (250 val images; W from 100 train images a class,
the "channels" pass). W with distill's defaults. Every method runs through `chip_ext.evaluation.evaluate`:
thresholds chosen on the calibration half (even indices), everything reported on the evaluation half (odd)
with 95% bootstrap intervals over images; paired differences on the same images with the exact sign test.
The headline: the best CHIP map against the best peer map at any layer (the peer chosen by its own
evaluation-half score, which favours the peers).

    python benchmarks/quality/breadth_sweep.py --dataset ilsvrc       # results/breadth_ilsvrc.json, .png
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_chip  # noqa: E402
import quality_common as qc  # noqa: E402

from chip_ext import evaluation  # noqa: E402
from chip_ext.evaluation import stats  # noqa: E402

LAYERS = ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"]  # the default run
ORDER = ["blocks.2"] + LAYERS  # every layer a run may add (blocks.2: pass "ilsvrc_b2"), in depth order
PEERS = ["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam", "eigencam"]
CLASS_DISCRIMINATIVE = ["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam"]
MULTI = ["fused", "refined", "refinecam", "refinecam_gradcam", "layercam_multi", "gradcam_multi", "center"]
FAITHFUL = ["chip", "fused", "gradcam", "gradcam++", "layercam", "xgradcam", "hirescam", "refinecam",
            "layercam_multi"]


def row(r: dict) -> dict:
    """The figures of one method from `evaluate`'s result, intervals included."""
    out = {"max_box_acc_evaluation": r["intervals"]["max_box_acc_evaluation"],
           "gt_known_at_calibrated_threshold": r["intervals"]["gt_known_loc"],
           "top1_loc": r["intervals"]["top1_loc"],
           "max_box_acc_v2_evaluation": r["max_box_acc_v2_evaluation"],
           "calibrated_threshold": r["calibrated_threshold"]}
    for m in ("deletion", "insertion"):
        if m in r["intervals"]:
            out[m] = r["intervals"][m]
    if "paired" in r:
        out["minus_gradcam_same_layer"] = {k: r["paired"][k] for k in ("max_box_acc_evaluation", "gt_known_loc")}
    return out


def run(model, pre, imp, val, names, layer, fused_opts, faithful, step, progress):
    fns = evaluation.standard_methods(model, names, importance=imp, layer=layer,
                                      options={"fused": fused_opts} if fused_opts else None)
    res = evaluation.evaluate(model, val, {k: v for k, v in fns.items() if k not in faithful}, pre.normalize,
                              progress=progress, keep_hits=True, reference="gradcam" if "gradcam" in fns else None)
    if any(k in faithful for k in fns):
        more = evaluation.evaluate(model, val, {k: v for k, v in fns.items() if k in faithful}, pre.normalize,
                                   progress=progress, keep_hits=True, faithfulness_metrics=("deletion", "insertion"),
                                   deletion_step=step, reference="gradcam" if "gradcam" in faithful else None)
        res["methods"].update(more["methods"])
    return res


def headline(record: dict, hits: dict, faith: dict, evals: np.ndarray) -> dict:
    """Best CHIP map against the best peer map (any layer), paired on the evaluation images."""
    def score(key):
        return float(hits[key][evals].mean(0).max())

    ours = [k for k in hits if k.split("@")[0] in ("chip", "fused", "refined")]
    peers = [k for k in hits if k.split("@")[0] not in ("chip", "fused", "refined", "center")]
    best_ours, best_peer = max(ours, key=score), max(peers, key=score)
    out = {"best_chip_map": best_ours, "best_peer_map": best_peer,
           "difference": stats.max_over_thresholds_interval(hits[best_ours][evals], hits[best_peer][evals])}
    a, b = hits[best_ours][evals], hits[best_peer][evals]
    out["difference"]["sign_test"] = stats.sign_test(a[:, a.mean(0).argmax()], b[:, b.mean(0).argmax()])
    discriminative = [k for k in peers if not k.startswith("eigencam")]  # EigenCAM ignores the class
    best_cd = max(discriminative, key=score)
    out["best_class_discriminative_peer_map"] = best_cd
    for mine in ("fused", best_ours):
        if mine not in hits:
            continue
        for name, other in (("best_peer", best_peer), ("best_class_discriminative_peer", best_cd)):
            a, b = hits[mine][evals], hits[other][evals]
            d = stats.max_over_thresholds_interval(a, b)
            d["sign_test"] = stats.sign_test(a[:, a.mean(0).argmax()], b[:, b.mean(0).argmax()])
            out[f"{'fused' if mine == 'fused' else 'best_chip'}_minus_{name}"] = d
    if "fused" in faith:  # (b): fused against every gradient CAM measured, paired per image
        out["faithfulness"] = {}
        for key, f in faith.items():
            if key.split("@")[0] in CLASS_DISCRIMINATIVE:
                out["faithfulness"][key] = {m: stats.paired(faith["fused"][m], f[m]) for m in ("deletion", "insertion")}
    for layer in ("blocks.4", "blocks.5"):  # (c): class-level CHIP against every class-discriminative peer
        key = f"chip@{layer}"
        if key in hits:
            out[f"chip_minus_peers@{layer}"] = {
                p: stats.max_over_thresholds_interval(hits[key][evals], hits[f"{p}@{layer}"][evals])
                for p in CLASS_DISCRIMINATIVE if f"{p}@{layer}" in hits}
    return out


def _ci(r: dict) -> str:
    return f"{r['mean']:.3f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def markdown(record: dict) -> str:
    """The results page's tables: MaxBoxAcc [95% CI] on the evaluation half per method and layer, the
    multi-layer maps, and deletion / insertion where measured."""
    layers = [l for l in ORDER if l in record["layers"]]
    names = list(dict.fromkeys(n for l in layers for n in record["layers"][l]))
    lines = ["| MaxBoxAcc [95% CI] | " + " | ".join(f"`{l}`" for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for n in names:
        cells = [_ci(record["layers"][l][n]["max_box_acc_evaluation"]) if n in record["layers"][l] else ""
                 for l in layers]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    multi = record["layers"].get("multi", {})
    if multi:
        lines += ["", "| multi-layer map | MaxBoxAcc [95% CI] | MaxBoxAccV2 | top-1 loc | deletion ↓ | insertion ↑ |",
                  "|---|---|---|---|---|---|"]
        for n, r in multi.items():
            lines.append(f"| {n} | {_ci(r['max_box_acc_evaluation'])} | {r['max_box_acc_v2_evaluation']:.3f} | "
                         f"{_ci(r['top1_loc'])} | {_ci(r['deletion']) if 'deletion' in r else ''} | "
                         f"{_ci(r['insertion']) if 'insertion' in r else ''} |")
    faith = [(l, n, r) for l in layers for n, r in record["layers"][l].items() if "deletion" in r]
    if faith:
        lines += ["", "| single-layer map | deletion ↓ | insertion ↑ |", "|---|---|---|"]
        lines += [f"| {n} at `{l}` | {_ci(r['deletion'])} | {_ci(r['insertion'])} |" for l, n, r in faith]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ilsvrc", choices=("ilsvrc", "imagenette"))
    p.add_argument("--layers", default=",".join(LAYERS + ["multi"]), help="layers, and 'multi' for the "
                   "multi-layer maps")
    p.add_argument("--faithful-layers", default="bn2,multi", help="layers with deletion / insertion ('multi': "
                   "the multi-layer maps)")
    p.add_argument("--deletion-step", type=int, default=224 * 28, help="pixels a step (8 steps at 224x224)")
    p.add_argument("--tag", default=None, help="the distillation pass (default: the dataset's, quality_common)")
    p.add_argument("--headline", action="store_true", help="only recompute the headline from the saved hits")
    p.add_argument("--merge", nargs="*", default=[], help="with --headline: fold these runs' JSON (and their saved "
                   "hits) into --out first (runs of other layers, same data)")
    p.add_argument("--fused", default="{}", help="JSON options of fused (default: its defaults)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or qc.RESULTS / f"breadth_{args.dataset}.json"
    store = qc.WORK / f"{out.stem}_hits.npz"  # per image: hits [N, T] and faithfulness, every run merged
    saved = dict(np.load(store)) if store.is_file() else {}
    if args.headline:
        record = json.loads(out.read_text())
        for other in map(Path, args.merge):
            o = json.loads(other.read_text())
            record["layers"].update(o["layers"])
            for k in ("pass_by_layer", "deletion_step_by_layer", "seconds"):
                record.setdefault(k, {}).update(o.get(k, {}))
            more = qc.WORK / f"{other.stem}_hits.npz"
            if more.is_file():
                saved.update(dict(np.load(more)))
        if args.merge:
            np.savez_compressed(store, **saved)
        finish(record, saved, out)
        print(markdown(record))
        return 0
    t0 = time.perf_counter()
    model, pre = qc.load_model()
    val = fused_chip.dataset(args.dataset, pre)
    if args.limit:
        val = torch.utils.data.Subset(val, list(range(args.limit)))
    tag = args.tag or fused_chip.TAGS[args.dataset]
    imp = fused_chip.importance(model, args.dataset, tag)
    fused_opts = json.loads(args.fused)
    record = json.loads(out.read_text()) if out.is_file() else {"layers": {}}  # layers of earlier runs stay
    record.update({"benchmark": "breadth_sweep", "dataset": args.dataset, "date": dt.date.today().isoformat(),
              "machine": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
              "model": qc.MODEL, "fused": fused_opts,
              "protocol": "thresholds on the calibration half (even indices); figures on the evaluation half (odd) "
              "with 95% bootstrap intervals"})
    layers = [l for l in args.layers.split(",") if l]
    for layer in layers:
        s0 = time.perf_counter()
        names = MULTI if layer == "multi" else ["chip"] + PEERS
        faithful = FAITHFUL if layer in args.faithful_layers.split(",") else []
        if faithful:
            record.setdefault("deletion_step_by_layer", {})[layer] = args.deletion_step
        record.setdefault("pass_by_layer", {})[layer] = {"tag": tag, **qc.PASSES[tag]}
        res = run(model, pre, imp, val, names, None if layer == "multi" else layer, fused_opts, faithful,
                  args.deletion_step, args.progress)
        record["layers"][layer] = {name: row(r) for name, r in res["methods"].items()}
        for name, r in res["methods"].items():
            key = name if layer == "multi" else f"{name}@{layer}"
            saved[f"hits:{key}"] = np.asarray(r["hits"], dtype=np.int8)
            for m, v in r.get("faithfulness", {}).items():
                saved[f"faith:{key}:{m}"] = np.asarray(v["per_image"])
        record["n"], record["n_evaluation"] = res["n"], res["n_evaluation"]
        record["classification"] = res["classification"]
        record.setdefault("seconds", {})[layer] = time.perf_counter() - s0
        print(f"== {layer} ({record['seconds'][layer]:.0f} s)", flush=True)
        for name, r in record["layers"][layer].items():
            extra = "".join(f" {m} {stats.format_interval(r[m])}" for m in ("deletion", "insertion") if m in r)
            print(f"  {name:<20} MaxBoxAcc {stats.format_interval(r['max_box_acc_evaluation'])} "
                  f"V2 {r['max_box_acc_v2_evaluation']:.3f}{extra}", flush=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        qc.WORK.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(store, **saved)
    finish(record, saved, out)
    return 0


def finish(record: dict, saved: dict, out: Path) -> None:
    """The headline from every saved layer's hits, into the JSON."""
    hits = {k[5:]: v for k, v in saved.items() if k.startswith("hits:")}
    faith: dict = {}
    for k, v in saved.items():
        if k.startswith("faith:"):
            _, key, m = k.split(":")
            faith.setdefault(key, {})[m] = v
    evals = np.arange(1, record["n"], 2)
    record["headline"] = headline(record, hits, faith, evals)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record["headline"].items() if k != "faithfulness"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
