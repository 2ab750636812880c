"""Localisation and faithfulness against depth (the paper's Fig. 8), CHIP against the CAM family.

EfficientNet-Lite0, every layer from blocks.2 to bn2; CHIP from the "base" statistics pass
(`quality_common.py base`: 100 shared train images a class, N=32) solved with the options chosen on
the calibration half (`chip_variants.py`), per-image CHIP, our Grad-CAM and pytorch-grad-cam 1.5.7's
own classes, on the 250 Imagenette val images: thresholds chosen on the calibration half (even
indices), everything reported on the evaluation half (odd indices). Faithfulness (deletion and
insertion AUC, RISE protocol; ROAD with --faithful-metrics) on the evaluation half for the methods in
--faithful.

    python benchmarks/quality/layer_sweep.py            # writes results/layer_sweep.json and .png
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as q  # noqa: E402

from chip_ext import Importance, evaluation  # noqa: E402
from chip_ext.distillation import DEFAULT_LAM_RATIO  # noqa: E402

PEERS = ["gradcam", "gradcam_pytorch_grad_cam", "gradcam++", "layercam", "xgradcam", "hirescam", "eigencam"]


def depth_order(layers):
    return sorted(layers, key=lambda l: q.SWEEP_LAYERS.index(l) if l in q.SWEEP_LAYERS else len(q.SWEEP_LAYERS))


def method_names(record: dict) -> list[str]:
    """Every method with a result, in the order first seen (the run's list, then bn2's extras)."""
    names = list(record["methods"])
    for layer in depth_order(record["results"]):
        names += [m for m in record["results"][layer] if m not in names]
    return names


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = depth_order(record["layers"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    metrics = [("max_box_acc_evaluation", "GT-known MaxBoxAcc (IoU 0.5)"),
               ("max_box_acc_v2_evaluation", "MaxBoxAccV2 (IoU .3/.5/.7)"),
               ("insertion_minus_deletion", "insertion AUC − deletion AUC")]
    for ax, (key, title) in zip(axes, metrics):
        for i, method in enumerate(method_names(record)):
            ys = [record["results"].get(layer, {}).get(method, {}).get(key) for layer in layers]
            if all(y is None for y in ys):
                continue
            ours = method.startswith(("chip", "image_chip", "region_chip", "refined"))
            style = ("o" if method.startswith("refined") else "-o") if ours else "--."
            width = 2.5 if ours else 1.2
            color = "black" if method == "region_chip" else plt.get_cmap("tab20")(i % 20)
            ax.plot(range(len(layers)), [float("nan") if y is None else y for y in ys], style, lw=width,
                    label=method, color=color, markersize=9 if ours else 5)
        ax.set_xticks(range(len(layers)), layers, rotation=30)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    base = record.get("baseline_center")
    if base:  # the no-model reference: what centred boxes score on this data
        for ax, key in zip(axes[:2], ("max_box_acc_evaluation", "max_box_acc_v2_evaluation")):
            ax.axhline(base[key], color="0.4", ls=":", lw=2, label="centre baseline (no model)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)  # outside the panels: no line hidden
    fig.suptitle(f"EfficientNet-Lite0, Imagenette val evaluation half ({record['n_evaluation']} images), "
                 f"{record['date']}" + (f" (merged runs to {record['merged_on']})"
                                        if record.get("merged_on", record["date"]) != record["date"] else ""),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)


def markdown(record: dict) -> str:
    """The README table: GT-known MaxBoxAcc on the evaluation half per layer and method, then
    deletion / insertion where measured."""
    layers = depth_order(record["layers"])
    methods = method_names(record)
    lines = ["| method | " + " | ".join(f"`{l}`" for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for m in methods:
        cells = []
        for l in layers:
            r = record["results"].get(l, {}).get(m)
            cells.append("" if r is None else f"{r['max_box_acc_evaluation']:.3f}")
        if any(cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = record.get("baseline_center")
    if base:
        lines.append("| *centre baseline (no model)* | " + " | ".join(
            f"*{base['max_box_acc_evaluation']:.3f}*" for _ in layers) + " |")
    faith = [m for m in methods if any("deletion" in record["results"].get(l, {}).get(m, {}) for l in layers)]
    if faith:
        lines += ["", "| deletion ↓ / insertion ↑ | " + " | ".join(f"`{l}`" for l in layers) + " |",
                  "|---" * (len(layers) + 1) + "|"]
        for m in faith:
            cells = []
            for l in layers:
                r = record["results"].get(l, {}).get(m, {})
                cells.append(f"{r['deletion']:.3f} / {r['insertion']:.3f}" if "deletion" in r else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    road = [m for m in methods if any("road" in record["results"].get(l, {}).get(m, {}) for l in layers)]
    if road:
        lines += ["", "| ROAD ↑ | " + " | ".join(f"`{l}`" for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
        for m in road:
            lines.append(f"| {m} | " + " | ".join(f"{record['results'].get(l, {}).get(m, {})['road']:.3f}"
                                                   if "road" in record["results"].get(l, {}).get(m, {}) else ""
                                                   for l in layers) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(q.SWEEP_LAYERS))
    p.add_argument("--methods", default="chip,image_chip," + ",".join(PEERS))
    p.add_argument("--faithful", default="chip,image_chip,gradcam", help="methods with deletion/insertion")
    p.add_argument("--refined", default="blocks.2,bn2", help="layer pair of Refined CHIP, drawn at bn2")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--image-chip-layers", default=None, help="layers for image_chip (default: all)")
    p.add_argument("--faithful-layers", default=None, help="layers with deletion/insertion (default: all)")
    p.add_argument("--faithful-metrics", default="deletion,insertion",
                   help="any of deletion, insertion, road (pytorch-grad-cam's ROADCombined)")
    p.add_argument("--deletion-step", type=int, default=224 * 14, help="pixels a step (16 steps at 224x224)")
    p.add_argument("--lam-ratio", type=float, default=DEFAULT_LAM_RATIO, help="default: distill's")
    p.add_argument("--fit-intercept", action=argparse.BooleanOptionalAction, default=True, help="default: distill's")
    p.add_argument("--positive", action="store_true")
    p.add_argument("--image-chip", default="{}", help="JSON options of image_chip")
    p.add_argument("--region-chip", default="{}", help="JSON options of region_chip")
    p.add_argument("--out", type=Path, default=q.RESULTS / "layer_sweep.json")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a smoke test)")
    p.add_argument("--table", action="store_true", help="print the README table from the JSON and stop")
    p.add_argument("--merge", nargs="*", default=[], help="with --table: fold the per-layer results of these "
                   "JSON files (runs of other layers, same settings) into --out first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--baseline", action="store_true", help="only measure the centre baseline (no model; "
                   "`baselines.center`) on the same images and protocol, into --out, and stop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:  # also redraws the figure from the JSON
        record = json.loads(args.out.read_text())
        for other in args.merge:
            o = json.loads(Path(other).read_text())
            for layer, rows in o["results"].items():
                mine = record["results"].setdefault(layer, {})
                for method, row in rows.items():  # fields not there yet (e.g. faithfulness of a later run)
                    mine[method] = row | mine.get(method, {})
            for layer, step in o.get("deletion_step_by_layer", {}).items():
                record.setdefault("deletion_step_by_layer", {}).setdefault(layer, step)
                record.setdefault("seconds", {}).setdefault(layer, o.get("seconds", {}).get(layer))
            record["layers"] = depth_order(set(record["layers"]) | set(o["layers"]))
            record.setdefault("merged_from", []).append({"file": Path(other).name, "layers": o["layers"],
                                                         "machine": o["machine"], "chip": o["chip"]})
        record["layers"] = depth_order(record["results"])  # every layer measured, by this run or others
        if args.merge:
            record["merged_on"] = dt.date.today().isoformat()
            args.out.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, args.out.with_suffix(".png"))
        print(markdown(record))
        return 0
    model, pre = q.load_model()
    val = q.val_dataset(pre)
    if args.limit is not None:
        val = torch.utils.data.Subset(val, list(range(args.limit)))
    if args.baseline:
        record = json.loads(args.out.read_text())
        res = evaluation.evaluate(model, val, evaluation.standard_methods(model, ["center"]), pre.normalize,
                                  progress=args.progress, faithfulness_metrics=("deletion", "insertion"),
                                  deletion_step=args.deletion_step)
        r = res["methods"]["center"]
        record["baseline_center"] = {
            "max_box_acc_evaluation": r["max_box_acc_evaluation"],
            "max_box_acc_v2_evaluation": r["max_box_acc_v2_evaluation"],
            "top1_loc_error": r["at_calibrated_threshold"]["top1_loc_error"],
            "gt_known_at_calibrated_threshold": r["at_calibrated_threshold"]["gt_known_loc"],
            "calibrated_threshold": r["calibrated_threshold"],
            "deletion": r["faithfulness"]["deletion"]["mean"], "insertion": r["faithfulness"]["insertion"]["mean"],
            "deletion_step_pixels": args.deletion_step, "date": dt.date.today().isoformat(),
            "note": "baselines.center: an isotropic Gaussian at the image centre, no model, no class"}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record["baseline_center"], indent=1))
        return 0
    layers = args.layers.split(",")
    methods = args.methods.split(",")
    if "refined" in methods:
        raise SystemExit("--methods: Refined CHIP is drawn at bn2 from --refined, not listed here")
    faithful = [m for m in args.faithful.split(",") if m]
    metrics = [m for m in args.faithful_metrics.split(",") if m]
    chip_opts = {"lam_ratio": args.lam_ratio, "fit_intercept": args.fit_intercept, "positive": args.positive}
    image_opts = json.loads(args.image_chip)
    region_opts = json.loads(args.region_chip)
    imp = q.solve(model, "base", **chip_opts)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"results": {}}
    steps = record.setdefault("deletion_step_by_layer", {})
    for l, rows in record["results"].items():  # layers of an earlier run keep their own step
        if any("deletion" in r for r in rows.values()):
            steps.setdefault(l, record.get("deletion_step_pixels"))
    record.update({"benchmark": "layer_sweep", "date": dt.date.today().isoformat(),
                   "machine": f"CPU (2-core AMD EPYC), {torch.get_num_threads()} threads", "model": q.MODEL,
                   "layers": depth_order(set(record.get("layers", [])) | set(layers)), "methods": methods, "faithful": faithful, "chip": {"pass": q.PASSES["base"],
                                                                                       **chip_opts},
                   "image_chip": image_opts, "region_chip": region_opts, "deletion_step_pixels": args.deletion_step,
                   "image_chip_layers": args.image_chip_layers, "faithful_layers": args.faithful_layers,
                   "protocol": "threshold on the calibration half (even indices); numbers on the evaluation half"})
    for layer in layers:
        t0 = time.perf_counter()
        names = [m for m in methods if m != "image_chip" or args.image_chip_layers is None
                 or layer in args.image_chip_layers.split(",")]
        faithful_here = faithful if args.faithful_layers is None or layer in args.faithful_layers.split(",") else []
        fns = evaluation.standard_methods(model, names, importance=imp, layer=layer,
                                          options={k: v for k, v in (("image_chip", image_opts),
                                                                     ("region_chip", region_opts)) if k in names})
        if layer == "bn2":
            fns["cam"] = evaluation.standard_methods(model, ["cam"], layer="bn2")["cam"]
            if args.refined:  # Refined CHIP over the layer pair chosen on the calibration half
                pair = args.refined.split(",")
                sub = Importance({l: imp.weights[l] for l in pair}, imp.classes, class_names=imp.class_names,
                                 meta={"note": f"Refined CHIP {pair} from the base pass"})
                fns[f"refined({'×'.join(pair)})"] = evaluation.standard_methods(
                    model, ["refined"], importance=sub)["refined"]
        loc = evaluation.evaluate(model, val, {k: v for k, v in fns.items() if k not in faithful_here},
                                  pre.normalize, progress=args.progress)
        results = [loc]
        if any(k in faithful_here for k in fns):
            results.append(evaluation.evaluate(model, val, {k: v for k, v in fns.items() if k in faithful_here},
                                               pre.normalize, progress=args.progress,
                                               faithfulness_metrics=tuple(metrics),
                                               deletion_step=args.deletion_step))
        if len(results) > 1 and "deletion" in metrics:
            steps[layer] = args.deletion_step
        out = {}
        for res in results:
            for name, r in res["methods"].items():
                a = r["at_calibrated_threshold"]
                row = {"max_box_acc_evaluation": r["max_box_acc_evaluation"],
                       "max_box_acc_v2_evaluation": r["max_box_acc_v2_evaluation"],
                       "top1_loc_error": a["top1_loc_error"], "gt_known_at_calibrated_threshold": a["gt_known_loc"],
                       "calibrated_threshold": r["calibrated_threshold"]}
                for metric, f in r.get("faithfulness", {}).items():
                    row[metric] = f["mean"]
                    row["n_faithfulness"] = f["n"]
                if "deletion" in row and "insertion" in row:
                    row["insertion_minus_deletion"] = row["insertion"] - row["deletion"]
                out[name] = row
        record["results"][layer] = out
        record["n_evaluation"] = loc["n_evaluation"]
        record["classification"] = loc["classification"]
        record.setdefault("seconds", {})[layer] = time.perf_counter() - t0
        print(f"== {layer} ({record['seconds'][layer]:.0f} s)", flush=True)
        for name, r in out.items():
            extra = "".join(f" {k} {r[k]:.3f}" for k in ("deletion", "insertion", "road") if k in r)
            print(f"  {name:<26} MaxBoxAcc {r['max_box_acc_evaluation']:.3f} V2 {r['max_box_acc_v2_evaluation']:.3f} "
                  f"top1-loc-err {r['top1_loc_error']:.3f}{extra}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
