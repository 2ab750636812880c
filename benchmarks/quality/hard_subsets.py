"""Localisation where it is not free: CHIP and the CAM family on the hard images of the evaluation half.

Half of GT-known MaxBoxAcc@0.5 on the Imagenette val images comes with no model at all: the centre
baseline (`baselines.center`) scores 0.536, because most objects are large and centred. This
benchmark scores every method of `layer_sweep.py` on subsets of the evaluation half (odd indices)
fixed before any method was scored, from the ground-truth boxes alone (the largest box of an image):

- small: the box covers less than a quarter of the image;
- off-centre: the box centre lies more than 0.15 of the image side from the image centre;
- several objects: the image has more than one ground-truth box;
- centre misses: the centre baseline's box (at its calibrated threshold) has IoU < 0.5.

Two numbers per subset, both GT-known localisation accuracy (IoU >= 0.5, the largest region,
wsolevaluation's rule) on the evaluation-half images of the subset:
- "global": at the threshold chosen on the whole calibration half (even indices), as in
  `layer_sweep.py`'s "GT-known" column: one threshold for every image, as a user would run it;
- "calibrated": at the threshold chosen on the calibration-half images of the same subset, i.e. what
  the method reaches on data of that kind when the threshold is set for it.
RISE is added from `expensive_peers.py`'s per-image results where that file exists (evaluation half
only: its threshold is the best one on the evaluation half, which favours it; "global" only).

    python benchmarks/quality/hard_subsets.py              # writes results/hard_subsets.json and .png
    python benchmarks/quality/hard_subsets.py --table      # the README table from the JSON
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as q  # noqa: E402
from layer_sweep import PEERS, depth_order  # noqa: E402

from chip_ext import evaluation  # noqa: E402
from chip_ext.distillation import DEFAULT_LAM_RATIO  # noqa: E402

SMALL_AREA = 0.25  # fraction of the image
OFF_CENTRE = 0.15  # distance of the box centre from the image centre, in image sides
SUBSETS = ("all", "small", "off-centre", "several objects", "centre misses")


def box_facts(dataset, indices) -> dict[str, np.ndarray]:
    """Per image (in `indices` order): the largest GT box's area fraction and centre offset, and the
    number of boxes."""
    area, offset, count = [], [], []
    for i in indices:
        x, _, boxes = dataset[i]
        H, W = x.shape[-2:]
        b = np.asarray(boxes, dtype=float).reshape(-1, 4)
        a = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (H * W)
        j = int(a.argmax())
        area.append(a[j])
        offset.append(np.hypot((b[j, 0] + b[j, 2]) / 2 / W - 0.5, (b[j, 1] + b[j, 3]) / 2 / H - 0.5))
        count.append(len(b))
    return {"area": np.array(area), "offset": np.array(offset), "count": np.array(count)}


def subset_masks(facts: dict[str, np.ndarray], centre_hits: np.ndarray) -> dict[str, np.ndarray]:
    return {"all": np.ones(len(centre_hits), dtype=bool), "small": facts["area"] < SMALL_AREA,
            "off-centre": facts["offset"] > OFF_CENTRE, "several objects": facts["count"] > 1,
            "centre misses": centre_hits == 0}


def scores(hits, masks: dict[str, np.ndarray], calib: np.ndarray, evals: np.ndarray) -> dict[str, dict]:
    """hits [N, T] (every image, every threshold), masks {subset: bool[N]}, calib/evals bool[N] ->
    {subset: {"global": acc, "calibrated": acc, "n": evaluation images}} (see the module docstring)."""
    h = np.asarray(hits, dtype=float)
    t_all = int(h[calib].mean(0).argmax())
    out = {}
    for name, m in masks.items():
        t_sub = int(h[calib & m].mean(0).argmax())
        out[name] = {"global": float(h[evals & m, t_all].mean()), "calibrated": float(h[evals & m, t_sub].mean()),
                     "n": int((evals & m).sum())}
    return out


def evaluation_masks(record: dict) -> dict[str, np.ndarray]:
    """The subsets as bool[n_evaluation], from the per-image facts kept in the JSON."""
    pi = record["per_image_evaluation_half"]
    facts = {"area": np.asarray(pi["area"]), "offset": np.asarray(pi["offset"]), "count": np.asarray(pi["boxes"])}
    return subset_masks(facts, np.asarray(pi["center"]))


def add_rise(record: dict, path: Path) -> None:
    """RISE's per-image hits from expensive_peers.py (its best threshold on the evaluation half) -> "rise"."""
    if not path.is_file():
        return
    r = json.loads(path.read_text())
    hits = np.asarray(r["results"]["rise"]["hit_at_best"], dtype=float)
    masks = evaluation_masks(record)
    if len(hits) != len(masks["all"]):
        raise SystemExit(f"--rise: {path} has {len(hits)} images, the evaluation half {len(masks['all'])}")
    record["rise"] = {"masks": r["rise_masks"], "file": path.name, "threshold": "best on the evaluation half",
                      "scores": {k: float(hits[m].mean()) for k, m in masks.items()}}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on the discordant pairs)."""
    n, k = wins + losses, min(wins, losses)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(record: dict, ours: str = "chip") -> dict:
    """CHIP against each other method at the same layer, image by image on the evaluation half at the
    global threshold: {subset: {layer: {method: {"wins", "losses", "p"}}}} (wins: CHIP right, it wrong)."""
    pi = record["per_image_evaluation_half"]
    masks = evaluation_masks(record)
    out: dict = {}
    for subset, m in masks.items():
        for layer in depth_order(record["results"]):
            a = np.asarray(pi.get(f"{layer}/{ours}", []))
            if not len(a):
                continue
            for method in record["results"][layer]:
                if method == ours:
                    continue
                b = np.asarray(pi[f"{layer}/{method}"])
                w, l = int((a[m] > b[m]).sum()), int((a[m] < b[m]).sum())
                out.setdefault(subset, {}).setdefault(layer, {})[method] = {"wins": w, "losses": l,
                                                                            "p": sign_test(w, l)}
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = depth_order(record["results"])
    fig, grid = plt.subplots(2, len(SUBSETS), figsize=(4 * len(SUBSETS), 8), sharey=True)
    methods = [m for m in record["methods"] if m != "center"]
    for row, kind in zip(grid, ("global", "calibrated")):
        for ax, subset in zip(row, SUBSETS):
            for i, m in enumerate(methods):
                ys = [record["results"][l].get(m, {}).get(subset, {}).get(kind, float("nan")) for l in layers]
                ours = m.startswith(("chip", "image_chip"))
                ax.plot(range(len(layers)), ys, "-o" if ours else "--.", lw=2.5 if ours else 1.2, label=m,
                        color=plt.get_cmap("tab10")(i % 10), markersize=8 if ours else 5)
            ax.axhline(record["center"][subset][kind], color="0.4", ls=":", lw=2, label="centre baseline")
            if "rise" in record and kind == "global":
                ax.axhline(record["rise"]["scores"][subset], color="k", ls="-.", lw=1.5,
                           label="RISE (best threshold)")
            ax.set_title(f"{subset} (n={record['subset_sizes'][subset]}), {kind} threshold", fontsize=9)
            ax.set_xticks(range(len(layers)), layers, rotation=30)
            ax.grid(alpha=0.3)
        row[0].set_ylabel(f"GT-known loc. acc. (IoU 0.5), {kind} threshold")
    grid[0][0].legend(fontsize=7)
    fig.suptitle(f"EfficientNet-Lite0, Imagenette val evaluation half, subsets fixed from the GT boxes; "
                 f"{record['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


EXAMPLES = (("chip", "blocks.5"), ("gradcam", "blocks.5"), ("chip", "bn2"), ("gradcam", "bn2"))


def examples_figure(record: dict, model, pre, imp, path: Path, count: int = 6) -> None:
    """The first `count` evaluation images the centre baseline misses (in index order, not picked by
    result): each method's map with the ground-truth boxes (green) and its own box (red: wrong, white:
    right) at its global calibrated threshold."""
    import matplotlib.patches as patches

    from chip_ext.localization import box_from_map, iou
    from chip_ext.render import grid_figure

    val = q.val_dataset(pre)
    N = len(val)
    calib = np.arange(N) % 2 == 0
    misses = np.flatnonzero(np.asarray(record["per_image_evaluation_half"]["center"]) == 0)[:count]
    index = [2 * int(i) + 1 for i in misses]  # evaluation-half position -> dataset index
    items = [val[i] for i in index]
    x01 = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    x = pre.normalize(x01)
    columns, thresholds = {}, {}
    for method, layer in EXAMPLES:
        fn = evaluation.standard_methods(model, [method], importance=imp, layer=layer)[method]
        hits = np.asarray(evaluation.evaluate(model, val, {method: fn}, pre.normalize, progress=False,
                                              keep_hits=True)["methods"][method]["hits"])
        name = f"{method} @ {layer}"
        thresholds[name] = float(evaluation.DEFAULT_THRESHOLDS[int(hits[calib].mean(0).argmax())])
        columns[name] = fn(x, labels).detach().float().clamp(0, 1)
    names = imp.class_names or []
    titles = [f"val #{i}: {names[imp.classes.index(int(c))] if names else int(c)}" for i, c in zip(index, labels)]
    fig = grid_figure(x01, columns, row_titles=titles)
    axes = np.asarray(fig.axes).reshape(len(index), 1 + len(columns))
    for r, (_, _, boxes) in enumerate(items):
        gt = np.asarray(boxes, dtype=float).reshape(-1, 4)
        for c, (name, maps) in enumerate(columns.items(), start=1):
            box = box_from_map(maps[r].numpy(), thresholds[name])
            right = iou(np.asarray([box], dtype=float), gt).max() >= 0.5
            method, layer = name.split(" @ ")
            kept = record["per_image_evaluation_half"].get(f"{layer}/{method}")
            if kept is not None and bool(kept[int(misses[r])]) != bool(right):  # the same rule as the table's
                raise RuntimeError(f"{name} on val #{index[r]}: box {'right' if right else 'wrong'} here, "
                                   "not in the JSON")
            for b in gt:
                axes[r][c].add_patch(patches.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                                       edgecolor="lime", lw=1.5))
            axes[r][c].add_patch(patches.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                                   edgecolor="white" if right else "red", lw=1.5, ls="--"))
            axes[r][c].set_title(f"{name} (thr {thresholds[name]:.2f})", fontsize=8)
    fig.suptitle("Images the centre baseline misses (the first six of the evaluation half): GT boxes green, "
                 "each method's box at its calibrated threshold white (IoU >= 0.5) or red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    from PIL import Image  # 256 colours: a fifth of the bytes, the same picture

    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def markdown(record: dict, subset: str = "centre misses") -> str:
    """One subset's table: "global / calibrated" accuracy per layer and method."""
    layers = depth_order(record["results"])
    lines = [f"| {subset} (n={record['subset_sizes'][subset]}), global / calibrated | "
             + " | ".join(f"`{l}`" for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for m in record["methods"]:
        if m == "center":
            continue
        cells = []
        for l in layers:
            r = record["results"][l].get(m, {}).get(subset)
            cells.append("" if r is None else f"{r['global']:.3f} / {r['calibrated']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    c = record["center"][subset]
    lines.append(f"| centre baseline (no model) | {c['global']:.3f} / {c['calibrated']:.3f} |"
                 + " |" * (len(layers) - 1))
    if "rise" in record:
        lines.append(f"| RISE ({record['rise']['masks']} masks), best threshold | "
                     f"{record['rise']['scores'][subset]:.3f} |" + " |" * (len(layers) - 1))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(q.SWEEP_LAYERS))
    p.add_argument("--methods", default="chip,image_chip," + ",".join(m for m in PEERS
                                                                      if m != "gradcam_pytorch_grad_cam"))
    p.add_argument("--image-chip-layers", default="blocks.6,bn2",
                   help="layers for image_chip (as in the README table; it costs N suffix passes an image)")
    p.add_argument("--lam-ratio", type=float, default=DEFAULT_LAM_RATIO, help="default: distill's")
    p.add_argument("--fit-intercept", action=argparse.BooleanOptionalAction, default=True, help="default: distill's")
    p.add_argument("--rise", type=Path, default=q.RESULTS / "expensive_peers_rise.json",
                   help="expensive_peers.py's JSON with RISE's per-image hits (skipped if absent)")
    p.add_argument("--out", type=Path, default=q.RESULTS / "hard_subsets.json")
    p.add_argument("--table", action="store_true", help="print the README tables from the JSON (adding RISE's "
                   "column and the paired tests from it), redraw the PNG and stop")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--figure", action="store_true", help="only draw results/hard_subsets_examples.png (maps and "
                   "boxes of the first six images the centre baseline misses) from the JSON and stop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.figure:
        model, pre = q.load_model()
        record = json.loads(args.out.read_text())
        imp = q.solve(model, "base", **{k: record["chip"][k] for k in ("lam_ratio", "fit_intercept")})
        examples_figure(record, model, pre, imp, args.out.with_name("hard_subsets_examples.png"))
        return 0
    if args.table:  # refreshes the parts derived from the JSON (RISE's column, the paired tests) too
        record = json.loads(args.out.read_text())
        add_rise(record, args.rise)
        record["paired"] = paired(record)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        plot(record, args.out.with_suffix(".png"))
        for subset in SUBSETS[1:]:
            print(markdown(record, subset) + "\n")
        for subset, layers in paired(record).items():
            print(f"CHIP against each method at the same layer, {subset}: wins-losses (sign-test p)")
            for layer, rows in layers.items():
                print(f"  {layer:<9} " + ", ".join(f"{m} {r['wins']}-{r['losses']} ({r['p']:.2f})"
                                                 for m, r in rows.items()))
        return 0
    model, pre = q.load_model()
    val = q.val_dataset(pre)
    N = len(val)
    calib, evals = np.arange(N) % 2 == 0, np.arange(N) % 2 == 1  # evaluate()'s halves
    facts = box_facts(val, range(N))
    t0 = time.perf_counter()
    centre = evaluation.evaluate(model, val, evaluation.standard_methods(model, ["center"]), pre.normalize,
                                 progress=args.progress, keep_hits=True)["methods"]["center"]
    c = np.asarray(centre["hits"])
    masks = subset_masks(facts, c[:, int(c[calib].mean(0).argmax())])
    chip_opts = {"lam_ratio": args.lam_ratio, "fit_intercept": args.fit_intercept}
    imp = q.solve(model, "base", **chip_opts)
    methods = args.methods.split(",")
    record = {"benchmark": "hard_subsets", "date": dt.date.today().isoformat(),
              "machine": f"CPU (2-core AMD EPYC), {torch.get_num_threads()} threads", "model": q.MODEL,
              "chip": {"pass": q.PASSES["base"], **chip_opts}, "methods": methods + ["center"],
              "rules": {"small": f"largest GT box area < {SMALL_AREA} of the image",
                        "off-centre": f"largest GT box centre > {OFF_CENTRE} image sides from the centre",
                        "several objects": "more than one GT box",
                        "centre misses": "the centre baseline's box at its calibrated threshold has IoU < 0.5"},
              "protocol": __doc__.split("Two numbers per subset")[1].split("RISE is added")[0].strip(),
              "subset_sizes": {k: int((v & evals).sum()) for k, v in masks.items()},
              "calibration_subset_sizes": {k: int((v & calib).sum()) for k, v in masks.items()},
              "center": scores(c, masks, calib, evals), "results": {},
              "per_image_evaluation_half": {"area": facts["area"][evals].round(4).tolist(),
                                            "offset": facts["offset"][evals].round(4).tolist(),
                                            "boxes": facts["count"][evals].tolist(),
                                            "center": centre["evaluation_hits_at_calibrated_threshold"]}}
    for layer in args.layers.split(","):
        t1 = time.perf_counter()
        names = [m for m in methods if m != "image_chip" or layer in args.image_chip_layers.split(",")]
        res = evaluation.evaluate(model, val, evaluation.standard_methods(model, names, importance=imp, layer=layer),
                                  pre.normalize, progress=args.progress, keep_hits=True)
        record["results"][layer] = {m: scores(r["hits"], masks, calib, evals) for m, r in res["methods"].items()}
        for m, r in res["methods"].items():
            record["per_image_evaluation_half"][f"{layer}/{m}"] = r["evaluation_hits_at_calibrated_threshold"]
        print(f"== {layer} ({time.perf_counter() - t1:.0f} s)", flush=True)
        for m, sc in record["results"][layer].items():
            print(f"  {m:<12} " + "  ".join(f"{k} {v['global']:.3f}/{v['calibrated']:.3f}" for k, v in sc.items()),
                  flush=True)
        record["seconds"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    add_rise(record, args.rise)
    record["paired"] = paired(record)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, args.out.with_suffix(".png"))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
