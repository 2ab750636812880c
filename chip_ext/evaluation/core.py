"""Weakly-supervised localisation evaluation of saliency methods (paper IV-C, Table II).

One pass over a `LocalizationDataset`: the model's top-5 predictions, and for every method the map
of the true class, turned into boxes at every threshold (wsolevaluation's rules). The threshold is
chosen on a calibration split (the even-indexed images) and applied to the evaluation split (the
odd-indexed ones); the best threshold on the evaluation split itself (MaxBoxAcc, the paper's grid
search) is reported separately.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..explanation import baselines
from . import faithfulness, stats
from ..explanation import peers
from .data import LocalizationDataset, collate_localization
from ..explanation.explain import explain, fusion_layers
from ..explanation.image_chip import image_chip, region_chip
from ..importance import Importance
from .localization import DEFAULT_THRESHOLDS, box_correct_both, ilsvrc_metrics
from ..explanation.maps import inference_view, shared_activations

MapFn = Callable[[Tensor, Tensor], Tensor]  # (normalised images [B,3,H,W], classes [B]) -> maps [B,H,W]


METHODS = ("chip", "refined", "fused", "image_chip", "region_chip", "gradcam", "cam", "rise", "center",
           *peers.CAM_CLASSES, *peers.MULTI_LAYER)
LAYER_FREE = ("chip", "refined", "fused", "rise", "center", *peers.MULTI_LAYER)  # methods that need no layer= (chip: the importance's last)


def standard_methods(model: nn.Module, names, *, importance: Importance | None = None,
                     layer: str | None = None, cam_layer: str | None = None,
                     options: dict | None = None) -> dict[str, MapFn]:
    """Map functions for method names (see METHODS):
    chip, refined, fused: CHIP, Refined CHIP and fused CHIP (need `importance`; chip at `layer`;
    fused over its default layers, or options {"fused": {"layers": [...]}});
    image_chip: per-image CHIP at `layer` (`chip_ext.image_chip`);
    region_chip: region CHIP at `layer` (`chip_ext.image_chip.region_chip`: gates over the map's cells);
    gradcam, cam: ours (cam at `cam_layer`, the layer right before global pooling);
    rise: RISE (input masks, layer-free); center: the centre baseline (no model, `baselines.center`);
    pytorch-grad-cam's own classes at `layer`: gradcam_pytorch_grad_cam, gradcam++, scorecam,
    ablationcam, layercam, xgradcam, eigencam (class-agnostic), hirescam;
    its multi-layer maps (`peers.MULTI_LAYER`): refinecam (RefineCAM over GradCAM++), refinecam_gradcam,
    layercam_multi, gradcam_multi, over options {name: {"layers": [...]}} (default: the layers fused
    CHIP combines, so the peers fuse what CHIP fuses).
    options: {method: {keyword: value}} passed on (e.g. {"rise": {"num_masks": 1000}},
    {"image_chip": {"num_perturbations": 256}}, {"scorecam": {"batch_size": 32}}).
    The gradient peers (peers.FROM_GRADIENTS) share one forward and suffix backward per batch
    (`peers.cam_method(shared=...)`: the library's own formulas on them, the same maps)."""
    options = dict(options or {})
    unknown = [m for m in options if m not in METHODS]
    if unknown:
        raise ValueError(f"options for unknown method(s) {unknown}; methods: {', '.join(METHODS)}")
    fns: dict[str, MapFn] = {}
    gradients = peers.GradientCache()
    for name in names:
        kw = dict(options.get(name, {}))
        if name in peers.FROM_GRADIENTS:
            kw.setdefault("shared", gradients)
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        if name in ("chip", "refined", "fused"):
            if importance is None:
                raise ValueError(f"method {name!r} needs an importance")
            fns[name] = (lambda m, kw: lambda x, t: explain(model, x, importance, method=m, target=t,
                                                            layer=layer if m == "chip" else None, **kw))(name, kw)
            continue
        if name in peers.MULTI_LAYER:
            layers = kw.pop("layers", None)
            if layers is None:
                if importance is None:
                    raise ValueError(f"method {name!r} needs options {{{name!r}: {{'layers': [...]}}}} "
                                     "or an importance (the layers fused CHIP combines)")
                layers = fusion_layers(model, importance, options.get("fused", {}).get("layers"))
            fns[name] = peers.multi_layer_method(model, name, layers, **kw)
            continue
        if name == "rise":
            fns[name] = lambda x, t, kw=kw: baselines.rise(model, x, t, **kw)
            continue
        if name == "center":
            fns[name] = lambda x, t, kw=kw: baselines.center(x, t, **kw)
            continue
        if layer is None and not (name == "cam" and cam_layer is not None):
            raise ValueError(f"method {name!r} needs layer=")
        if name == "image_chip":
            fns[name] = lambda x, t, kw=kw: image_chip(model, x, layer, t, **kw)
        elif name == "region_chip":
            fns[name] = lambda x, t, kw=kw: region_chip(model, x, layer, t, **kw)
        elif name == "gradcam":
            fns[name] = lambda x, t: baselines.gradcam(model, x, layer, t)
        elif name == "cam":
            fns[name] = lambda x, t: baselines.cam(model, x, cam_layer or layer, t)
        else:
            fns[name] = peers.cam_method(model, name, layer, **kw)
    return fns


def evaluate(model: nn.Module, dataset: LocalizationDataset, methods: dict[str, MapFn],
             normalize: Callable[[Tensor], Tensor], *, batch_size: int = 25,
             thresholds=DEFAULT_THRESHOLDS, progress: bool = True, faithfulness_metrics=(),
             faithfulness_images: str = "evaluation", deletion_step: int = 224,
             road_percentiles=(20, 40, 60, 80), keep_hits: bool = False,
             reference: str | None = "gradcam", boot: int = stats.BOOT) -> dict:
    """-> {"n": N, "classification": {...}, "methods": {name: metrics}} (see module docstring);
    each method's "evaluation_hits_at_calibrated_threshold" lists 0/1 per evaluation image; with
    keep_hits, "hits" is every image's 0/1 at every threshold (list [N][T], IoU >= .5, largest region).

    faithfulness_metrics: any of "deletion", "insertion" (the RISE protocol, `deletion_step` pixels a
    step) and "road" (pytorch-grad-cam's ROADCombined at `road_percentiles`), each the mean over
    `faithfulness_images` ("evaluation": the odd-indexed half, "all") of the true class's softmax
    probability curve; stored per method under "faithfulness" with the per-image values.

    Uncertainty (`stats`): each method's "intervals" hold 95% bootstrap intervals over images
    ({"mean", "lo", "hi"}, `boot` resamples) of GT-known and top-1 localisation at the calibrated
    threshold, MaxBoxAcc (re-maximised in every resample) and the faithfulness means; "paired" holds
    its difference to the `reference` method (default Grad-CAM, when it is among `methods`) on the
    same images, with the exact sign test on the images where one is right and the other wrong."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_localization)
    top5s, labels_all, boxes_all = [], [], []
    correct = {name: [] for name in methods}  # [N, T] at IoU .5, largest contour
    correct_v2 = {name: [] for name in methods}  # [N, T, 3] all contours, IoU .3/.5/.7
    bad = [m for m in faithfulness_metrics if m not in faithfulness.METRICS]
    if bad:
        raise ValueError(f"faithfulness_metrics: unknown {bad}; choose from {faithfulness.METRICS}")
    if reference is not None and reference not in methods:
        reference = None  # nothing to pair with: no paired differences
    if faithfulness_images not in ("evaluation", "all"):
        raise ValueError(f"faithfulness_images must be 'evaluation' or 'all'; got {faithfulness_images!r}")
    faith = {name: {m: [] for m in faithfulness_metrics} for name in methods}
    seen = 0
    view = inference_view(model)  # eval mode without changing the model
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    for x01, labels, boxes in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        x = normalize(x01.to(device))  # on the model's device
        with torch.no_grad():
            logits = view(x)
            top5s.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())  # fewer classes: all
        labels_all.append(labels)
        boxes_all += boxes
        index = torch.arange(seen, seen + len(labels))
        seen += len(labels)
        pick = index % 2 == 1 if faithfulness_images == "evaluation" else torch.ones(len(labels), dtype=torch.bool)
        with shared_activations():  # one prefix forward per layer for every method on this batch
            batch_maps = {name: fn(x, labels.to(device)).detach().float().cpu().clamp(0, 1)
                          for name, fn in methods.items()}
        for name, maps in batch_maps.items():
            v1, v2 = box_correct_both(maps, boxes, thresholds)
            correct[name].append(v1)
            correct_v2[name].append(v2)
            if faithfulness_metrics and bool(pick.any()):
                xs, ms, ts = x[pick.to(x.device)], maps[pick].to(device), labels[pick].to(device)
                if "deletion" in faithfulness_metrics or "insertion" in faithfulness_metrics:
                    di = faithfulness.deletion_insertion(model, xs, ms, ts, step=deletion_step)
                    for m in ("deletion", "insertion"):
                        if m in faithfulness_metrics:
                            faith[name][m] += di[m].tolist()
                if "road" in faithfulness_metrics:
                    faith[name]["road"] += faithfulness.road(model, xs, ms, ts, percentiles=road_percentiles).tolist()
    top5, labels = torch.cat(top5s), torch.cat(labels_all)
    N = len(labels)
    calib, evals = np.arange(0, N, 2), np.arange(1, N, 2)
    result = {"n": N, "n_calibration": len(calib), "n_evaluation": len(evals),
              "thresholds": [float(t) for t in thresholds], "methods": {}}
    result["classification"] = {
        "top1_error": 1 - float((top5[:, 0] == labels).float().mean()),
        "top5_error": 1 - float((top5 == labels[:, None]).any(1).float().mean()),
    }
    for name in methods:
        c = np.concatenate(correct[name])  # [N, T]
        v2 = np.concatenate(correct_v2[name])  # [N, T, 3]
        t_cal = int(np.argmax(c[calib].mean(0))) if len(calib) else 0
        t_best = int(np.argmax(c[evals].mean(0)))
        at_cal = ilsvrc_metrics(c[evals, t_cal], top5[evals], labels[evals])
        at_best = ilsvrc_metrics(c[evals, t_best], top5[evals], labels[evals])
        acc_all = c.mean(0)
        result["methods"][name] = {
            "calibrated_threshold": float(thresholds[t_cal]),
            "at_calibrated_threshold": at_cal,
            "best_threshold_on_evaluation": float(thresholds[t_best]),
            "at_best_threshold": at_best,
            "max_box_acc_calibration": float(c[calib].mean(0).max()) if len(calib) else None,
            "max_box_acc_evaluation": float(c[evals].mean(0).max()),
            "max_box_acc_all_images": float(acc_all.max()),
            "max_box_acc_threshold_all_images": float(thresholds[int(np.argmax(acc_all))]),
            "max_box_acc_v2_all_images": {f"iou{d}": float(v2[:, :, k].mean(0).max())
                                          for k, d in enumerate((30, 50, 70))},
            "max_box_acc_v2_evaluation": float(np.mean([v2[evals, :, k].mean(0).max() for k in range(3)])),
            # per evaluation image (odd indices, in order): box right (IoU >= .5) at the calibrated
            # threshold, so that subsets (small objects, ...) can be scored without running again
            "evaluation_hits_at_calibrated_threshold": c[evals, t_cal].astype(int).tolist(),
        }
        if keep_hits:
            result["methods"][name]["hits"] = c.astype(int).tolist()
        r = result["methods"][name]["max_box_acc_v2_all_images"]
        r["mean"] = float(np.mean(list(r.values())))
        if faithfulness_metrics:
            result["methods"][name]["faithfulness"] = {
                m: {"mean": float(np.mean(v)), "n": len(v), "per_image": v} for m, v in faith[name].items()}
    _add_intervals(result, correct, top5, labels, calib, evals, reference, boot)
    if faithfulness_metrics:
        result["faithfulness_protocol"] = {
            "images": faithfulness_images, "deletion_step_pixels": deletion_step,
            "road_percentiles": list(road_percentiles), "score": "softmax probability of the true class",
            "better": {"deletion": "lower", "insertion": "higher", "road": "higher"}}
    return result


def _add_intervals(result: dict, correct: dict, top5: Tensor, labels: Tensor, calib: np.ndarray,
                   evals: np.ndarray, reference: str | None, boot: int) -> None:
    """Bootstrap intervals per method and paired differences to `reference` (see `evaluate`)."""
    top1_right = (top5[:, 0] == labels).numpy()
    per = {}
    for name, r in result["methods"].items():
        c = np.concatenate(correct[name]).astype(float)  # [N, T]
        hits = np.asarray(r["evaluation_hits_at_calibrated_threshold"], dtype=float)
        top1 = hits * top1_right[evals]
        faith = {m: np.asarray(v["per_image"], dtype=float) for m, v in r.get("faithfulness", {}).items()}
        per[name] = (c, hits, top1, faith)
        r["intervals"] = {
            "gt_known_loc": stats.bootstrap_interval(hits, boot=boot),
            "top1_loc": stats.bootstrap_interval(top1, boot=boot),
            "max_box_acc_evaluation": stats.max_over_thresholds_interval(c[evals], boot=boot),
            "max_box_acc_all_images": stats.max_over_thresholds_interval(c, boot=boot),
            **{m: stats.bootstrap_interval(v, boot=boot) for m, v in faith.items()},
        }
    result["reference"] = reference
    if reference is None:
        return
    c_ref, hits_ref, top1_ref, faith_ref = per[reference]
    for name, r in result["methods"].items():
        if name == reference:
            continue
        c, hits, top1, faith = per[name]
        best, best_ref = c[evals].mean(0).argmax(), c_ref[evals].mean(0).argmax()
        mba = stats.max_over_thresholds_interval(c[evals], c_ref[evals], boot=boot)
        mba["sign_test"] = stats.sign_test(c[evals, best], c_ref[evals, best_ref])
        r["paired"] = {
            "reference": reference,
            "gt_known_loc": stats.paired(hits, hits_ref, boot=boot),
            "top1_loc": stats.paired(top1, top1_ref, boot=boot),
            "max_box_acc_evaluation": mba,
            **{m: stats.paired(v, faith_ref[m], boot=boot) for m, v in faith.items() if m in faith_ref},
        }


def _cell(r: dict | None, point: float, width: int = 21) -> str:
    """"0.560 [0.505, 0.614]" from an interval, the bare figure where there is none."""
    return f"{stats.format_interval(r) if r else f'{point:.3f}':>{width}}"


def format_table(result: dict) -> str:
    """The shape of the paper's Table II with 95% bootstrap intervals over images: localisation errors,
    GT-known at the calibrated threshold, MaxBoxAcc on the evaluation images, and each method's paired
    difference in MaxBoxAcc to the reference method with the sign test's p-value."""
    ref = result.get("reference")
    lines = [f"{'method':<26} {'top-1 loc err':>13} {'GT-known [95% CI]':>21} {'MaxBoxAcc [95% CI]':>21} "
             f"{('vs ' + ref if ref else 'vs -'):>21} {'sign p':>7} {'MaxBoxAccV2':>11} {'thr':>5}"]
    for name, r in result["methods"].items():
        a, ci, pr = r["at_calibrated_threshold"], r.get("intervals", {}), r.get("paired", {})
        d = pr.get("max_box_acc_evaluation")
        diff = (f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else
                ("(reference)" if name == ref else "-"))
        p = f"{d['sign_test']['p']:.3g}" if d else "-"
        lines.append(f"{name:<26} {a['top1_loc_error']:>13.3f} {_cell(ci.get('gt_known_loc'), a['gt_known_loc'])} "
                     f"{_cell(ci.get('max_box_acc_evaluation'), r['max_box_acc_evaluation'])} {diff:>21} {p:>7} "
                     f"{r['max_box_acc_v2_all_images']['mean']:>11.3f} {r['calibrated_threshold']:>5.2f}")
        for m, v in r.get("faithfulness", {}).items():
            dm = pr.get(m)
            lines.append(f"{'':<28}{m}: {_cell(ci.get(m), v['mean'], 0)}"
                         + (f"   vs {ref}: {dm['mean']:+.3f} [{dm['lo']:+.3f}, {dm['hi']:+.3f}], sign p "
                            f"{dm['sign_test']['p']:.3g}" if dm else ""))
    c = result["classification"]
    lines.append(f"classification error: top-1 {c['top1_error']:.3f}, top-5 {c['top5_error']:.3f}  "
                 f"(N={result['n']}; loc errors and GT-known on the {result['n_evaluation']} evaluation images "
                 f"at the threshold chosen on the {result['n_calibration']} calibration images; MaxBoxAcc on the "
                 "evaluation images at their best threshold; MaxBoxAccV2 over all images; [95% bootstrap "
                 "intervals over images]; differences paired on the same images, p: exact sign test)")
    return "\n".join(lines)
