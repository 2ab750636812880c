"""CHIP variants against today's default, on the CALIBRATION half of the Imagenette val images only
(even indices; issue 13's protocol): the solver options (λ, fit_intercept, positive) on one pass,
the pass options (target, gate distribution, σ, N, images) one at a time, Refined CHIP over layer
pairs, per-image CHIP (N, λ, score, intercept, a class-level prior) at blocks.6 and bn2, and per-image CHIP at
blocks.3-blocks.5 (part image_mid), class-contrastive weights (part contrast) and weights per unit of activation
(part scale). Every row is kept in the JSON;
the choice is the row with the best calibration GT-known MaxBoxAcc (mean over the layers it covers).

    python benchmarks/quality/quality_common.py base logit drop09 sigma2 n100 img300   # the passes first
    python benchmarks/quality/chip_variants.py [--parts solver,passes,refined,image]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as q  # noqa: E402

from chip_ext import Importance, image_chip  # noqa: E402
from chip_ext.localization import DEFAULT_THRESHOLDS, box_correct_both  # noqa: E402
from chip_ext.maps import cached_split, inference_view, normalize_maps  # noqa: E402

OUT = q.RESULTS / "chip_variants.json"


def chip_fn(cache, imp, layer):
    return lambda: cache.score(cache.chip_maps(imp, layer))


def refined_fn(cache, imp, layers, how):
    """Maps normalised per layer, then multiplied (the paper's Refined CHIP) or averaged."""
    def fn():
        per_layer = [cache.chip_maps(imp, l) for l in layers]
        out = []
        for maps in zip(*per_layer):
            m = torch.stack(maps).prod(0) if how == "product" else torch.stack(maps).mean(0)
            out.append(normalize_maps(m))
        return cache.score(out)
    return fn


def image_fn(model, layer, prior_imp=None, **kw):
    def fn(x, t):
        prior = None
        if prior_imp is not None:
            W = prior_imp.weights[layer]
            prior = torch.stack([W[prior_imp.row(int(c))] for c in t]).double()
        return image_chip.image_chip(model, x, layer, t, prior=prior, **kw)
    return fn


class Cached:
    """The calibration images with their labels and boxes, and each layer's activations computed
    once: a class-level CHIP variant's maps are then one einsum (the same maps `explain` draws)."""

    def __init__(self, model, ds, pre, batch_size=25):
        from torch.utils.data import DataLoader

        from chip_ext.data import collate_localization

        self.model, self.x, self.labels, self.boxes = model, [], [], []
        for x01, labels, boxes in DataLoader(ds, batch_size=batch_size, collate_fn=collate_localization):
            self.x.append(pre.normalize(x01))
            self.labels.append(labels)
            self.boxes.append(boxes)
        self.acts = {}

    def activations(self, layer):
        if layer not in self.acts:
            prefix, _ = cached_split(inference_view(self.model), layer)
            with torch.no_grad():
                self.acts[layer] = [prefix(x) for x in self.x]
        return self.acts[layer]

    def chip_maps(self, imp, layer, scale=None):
        """scale: None, or (A [B, K, h, w], targets [B]) -> s [B, K]: the maps of W / s (part scale)."""
        out = []
        for A, t in zip(self.activations(layer), self.labels):
            W = torch.stack([imp.weights[layer][imp.row(int(c))] for c in t]).float()
            if scale is not None:
                W = W / scale(A, t)
            out.append(normalize_maps(torch.relu(torch.einsum("bk,bkhw->bhw", W, A.float())), self.x[0].shape[-2:]))
        return out

    def score(self, maps_batches) -> dict:
        both = [box_correct_both(m.float().clamp(0, 1), b, DEFAULT_THRESHOLDS)
                for m, b in zip(maps_batches, self.boxes)]
        v1 = np.concatenate([c[0] for c in both])
        v2 = np.concatenate([c[1] for c in both])
        return {"max_box_acc": float(v1.mean(0).max()), "max_box_acc_v2": float(v2.mean(0).max(0).mean())}

    def score_fn(self, fn) -> dict:
        return self.score([fn(x, t) for x, t in zip(self.x, self.labels)])


def train_activation_stats(model, pre, layers, per_class: int) -> dict:
    """Per layer: mean |A_k| over `per_class` shared train images a class (the distillation's first
    images), all classes together (Tensor[K]) and per class ({label: Tensor[K]})."""
    from torch.utils.data import DataLoader

    from chip_ext import data

    ds = data.ImageNetTrain(q.DATA / "imagenette" / "train", pre, per_class=per_class)
    sums = {l: {} for l in layers}
    counts: dict = {}
    for x, y in DataLoader(ds, batch_size=25):
        for layer in layers:
            prefix, _ = cached_split(inference_view(model), layer)
            with torch.no_grad():
                a = prefix(x).abs().mean(dim=(2, 3))  # [B, K]
            for c in y.unique().tolist():
                sums[layer][c] = sums[layer].get(c, 0) + a[y == c].sum(0)
        for c in y.tolist():
            counts[c] = counts.get(c, 0) + 1
    out = {}
    for layer in layers:
        per = {c: sums[layer][c] / counts[c] for c in counts}
        out[layer] = {"all": torch.stack(list(per.values())).mean(0), "class": per}
    return out


def scale_maps_fn(cache, imp, layer, how, stats):
    """ReLU(sum_k W_ck A_k / s_k): the channels re-weighted by the inverse of their activation scale (W is
    fitted on z = d * a, the gated pooled activations, so it is already per unit of activation; this
    favours channels with small activations, a test of whether the activation scale matters at all).
    s = the train images' mean |A_k| ("mean_abs"), that of class c's train images ("class_mean_abs"), or
    this image's own mean |A_k| ("image_abs"); 1% of the mean scale is added against dead channels."""
    def scale(A, t):
        if how == "mean_abs":
            s = stats["all"][None].expand(len(t), -1)
        elif how == "class_mean_abs":
            s = torch.stack([stats["class"][int(c)] for c in t])
        else:
            s = A.abs().mean(dim=(2, 3))
        return s + 0.01 * s.mean(dim=1, keepdim=True)

    return lambda: cache.score(cache.chip_maps(imp, layer, scale))


def choose_solver(rows: dict) -> dict:
    """The solver options with the best mean calibration MaxBoxAcc over the sweep layers."""
    by: dict = {}
    for r in rows.values():
        if r["part"] == "solver":
            by.setdefault((r["lam_ratio"], r["fit_intercept"], r["positive"]), []).append(r["max_box_acc"])
    full = {k: v for k, v in by.items() if len(v) == len(q.SWEEP_LAYERS)}
    (lam, fi, pos), accs = max(full.items(), key=lambda kv: float(np.mean(kv[1])))
    return {"lam_ratio": lam, "fit_intercept": fi, "positive": pos, "mean_max_box_acc": float(np.mean(accs))}


def choose_image(rows: dict) -> dict:
    """Per-image CHIP options with the best calibration MaxBoxAcc at blocks.6 (the full grid)."""
    grid = [r for r in rows.values() if r["part"] == "image" and r["layer"] == "blocks.6" and "prior" not in r]
    best = max(grid, key=lambda r: r["max_box_acc"])
    return {"num_perturbations": best["N"], "lam_ratio": best["lam_ratio"], "score": best["score"],
            "fit_intercept": best["fit_intercept"], "max_box_acc_blocks.6": best["max_box_acc"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="solver,passes,peers,image,choose,refined,image_mid,contrast,scale")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--redo", action="store_true", help="measure rows that the JSON already has again")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    model, pre = q.load_model()
    cal = q.val_half(pre, "calibration")
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record.update({"benchmark": "chip_variants", "date": dt.date.today().isoformat(),
                   "machine": f"CPU (2-core AMD EPYC), {torch.get_num_threads()} threads",
                   "split": f"calibration half of data/imagenette/val (even indices, {len(cal)} images)",
                   "model": q.MODEL, "passes": q.PASSES})
    rows = record.setdefault("rows", {})

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")

    cache = Cached(model, cal, pre)

    def run(part, fns_by_key: dict, meta: dict):
        for k, fn in fns_by_key.items():
            if k in rows and not args.redo:  # measured already (the JSON keeps every row)
                continue
            t0 = time.perf_counter()
            r = fn() if callable(fn) and fn.__code__.co_argcount == 0 else cache.score_fn(fn)
            rows[k] = {"part": part, **meta.get(k, {}), **r, "seconds": time.perf_counter() - t0}
            print(f"{k:<75} MaxBoxAcc {r['max_box_acc']:.3f}  V2 {r['max_box_acc_v2']:.3f}", flush=True)
            save()

    if "solver" in parts:  # one pass, every solver option, every sweep layer
        for ratio in (0.01, 0.03, 0.1, 0.3):
            fns, meta = {}, {}
            for fi in (False, True):
                for pos in (False, True):
                    imp = q.solve(model, "base", lam_ratio=ratio, fit_intercept=fi, positive=pos)
                    for layer in q.SWEEP_LAYERS:
                        key = f"solver base lam={ratio} intercept={fi} positive={pos} @{layer}"
                        fns[key] = chip_fn(cache, imp, layer)
                        meta[key] = {"pass": "base", "lam_ratio": ratio, "fit_intercept": fi, "positive": pos,
                                     "layer": layer}
            run("solver", fns, meta)

    if "passes" in parts:  # one pass option at a time, default and positive+intercept solver
        for tag in ("base", "logit", "drop09", "sigma2", "n100", "img300", "bern25", "drop02", "drop01"):
            if not (q.WORK / f"{tag}.ckpt").is_file():
                print(f"pass {tag}: no checkpoint yet, skipped in this run", flush=True)
                continue
            fns, meta = {}, {}
            for ratio in (0.03, 0.1):
                for fi, pos in ((False, False), (True, False)):
                    try:
                        imp = q.solve(model, tag, lam_ratio=ratio, fit_intercept=fi, positive=pos,)
                    except Exception as err:  # an unfinished pass
                        print(f"pass {tag}: {err}", flush=True)
                        break
                    for layer in q.PASSES[tag]["layers"]:
                        if layer not in q.VARIANT_LAYERS:
                            continue
                        key = f"pass {tag} lam={ratio} intercept={fi} positive={pos} @{layer}"
                        fns[key] = chip_fn(cache, imp, layer)
                        meta[key] = {"pass": tag, "lam_ratio": ratio, "fit_intercept": fi, "positive": pos,
                                     "layer": layer}
            if fns:
                run("passes", fns, meta)

    if "choose" in parts:
        record["chosen_solver"] = choose_solver(rows)
        record["chosen_image_chip"] = choose_image(rows)
        print("chosen on the calibration half:", record["chosen_solver"], record["chosen_image_chip"], flush=True)
        save()

    if "refined" in parts:
        chosen = record["chosen_solver"]  # run --parts choose first
        best = {k: chosen[k] for k in ("lam_ratio", "fit_intercept", "positive")}
        imp = q.solve(model, "base", **best)
        fns, meta = {}, {}
        for layers in (["blocks.2", "bn2"], ["blocks.3", "bn2"], ["blocks.4", "bn2"], ["blocks.5", "bn2"],
                       ["blocks.4", "blocks.6"], ["blocks.4", "blocks.5", "blocks.6", "bn2"]):
            for how in ("product", "mean"):
                key = f"refined {how} {'x'.join(layers)} {best}"
                fns[key] = refined_fn(cache, imp, layers, how)
                meta[key] = {"layers": layers, "how": how, **best}
        run("refined", fns, meta)

    if "peers" in parts:  # for reference only: the peers are not tuned
        from chip_ext import evaluation

        for layer in q.SWEEP_LAYERS:
            names = ["gradcam", "gradcam++", "layercam", "xgradcam", "eigencam"]
            fns = evaluation.standard_methods(model, names, layer=layer)
            if layer == "bn2":
                fns["cam"] = evaluation.standard_methods(model, ["cam"], layer=layer)["cam"]
            run("peers", {f"peer {k} @{layer}": v for k, v in fns.items()},
                {f"peer {k} @{layer}": {"layer": layer, "method": k} for k in fns})

    if "image" in parts:  # per-image CHIP: the grid at blocks.6, its best neighbours at bn2
        grid = {"blocks.6": [(N, r, "logit", True) for N in (128, 256) for r in (0.003, 0.01, 0.03, 0.1)]
                + [(256, 0.01, "prob", True), (256, 0.01, "logit", False), (256, 0.01, "prob", False)],
                "bn2": [(256, r, "logit", True) for r in (0.01, 0.03)] + [(256, 0.01, "prob", True),
                                                                          (256, 0.01, "logit", False)]}
        for layer, combos in grid.items():
            fns, meta = {}, {}
            for N, ratio, sc, fi in combos:
                key = f"image N={N} lam={ratio} score={sc} intercept={fi} @{layer}"
                fns[key] = image_fn(model, layer, num_perturbations=N, lam_ratio=ratio, score=sc, fit_intercept=fi)
                meta[key] = {"layer": layer, "N": N, "lam_ratio": ratio, "score": sc, "fit_intercept": fi}
            if (q.WORK / "logit.ckpt").is_file():
                prior = q.solve(model, "logit", lam_ratio=0.1)
                for ratio in (0.01, 0.1):
                    key = f"image N=256 lam={ratio} score=logit intercept=True prior=logit-pass @{layer}"
                    fns[key] = image_fn(model, layer, prior, num_perturbations=256, lam_ratio=ratio)
                    meta[key] = {"layer": layer, "N": 256, "lam_ratio": ratio, "score": "logit",
                                 "fit_intercept": True, "prior": "class-level W of the logit pass, lam 0.1"}
            run("image", fns, meta)

    if "contrast" in parts:  # class-contrastive weights W_c - a·mean_c' W_c' (less of what every class uses)
        best = {k: record["chosen_solver"][k] for k in ("lam_ratio", "fit_intercept", "positive")}
        imp = q.solve(model, "base", **best)
        fns, meta = {}, {}
        for a in (0.5, 1.0):
            W = {l: imp.weights[l] - a * imp.weights[l].mean(0, keepdim=True) for l in q.SWEEP_LAYERS}
            sub = Importance(W, imp.classes, class_names=imp.class_names, meta={})
            for layer in q.SWEEP_LAYERS:
                key = f"contrast W - {a} mean(W) {best} @{layer}"
                fns[key] = chip_fn(cache, sub, layer)
                meta[key] = {"layer": layer, "minus_mean_fraction": a, **best}
        run("contrast", fns, meta)

    if "scale" in parts:  # W_ck per unit of activation: ReLU(sum_k W_ck A_k / s_k) (see scale_maps_fn)
        best = {k: record["chosen_solver"][k] for k in ("lam_ratio", "fit_intercept", "positive")}
        imp = q.solve(model, "base", **best)
        stats = train_activation_stats(model, pre, q.SWEEP_LAYERS, per_class=20)
        fns, meta = {}, {}
        for layer in q.SWEEP_LAYERS:
            for how in ("mean_abs", "class_mean_abs", "image_abs"):
                key = f"scale W/s s={how} {best} @{layer}"
                fns[key] = scale_maps_fn(cache, imp, layer, how, stats[layer])
                meta[key] = {"layer": layer, "scale": how, "train_images_per_class": 20, **best}
        run("scale", fns, meta)

    if "image_mid" in parts:  # per-image CHIP at the intermediate layers (goal (a))
        grid = {"blocks.3": ((128, 0.01), (256, 0.01)), "blocks.4": ((128, 0.01),), "blocks.5": ((128, 0.01),)}
        for layer, combos in grid.items():
            fns, meta = {}, {}
            for N, ratio in combos:
                key = f"image N={N} lam={ratio} score=logit intercept=True @{layer}"
                fns[key] = image_fn(model, layer, num_perturbations=N, lam_ratio=ratio)
                meta[key] = {"layer": layer, "N": N, "lam_ratio": ratio, "score": "logit", "fit_intercept": True}
            run("image_mid", fns, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
