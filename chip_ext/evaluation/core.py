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
from . import faithfulness
from ..explanation import peers
from .data import LocalizationDataset, collate_localization
from ..explanation.explain import explain
from ..explanation.image_chip import image_chip, region_chip
from ..importance import Importance
from .localization import DEFAULT_THRESHOLDS, box_correct_both, ilsvrc_metrics
from ..explanation.maps import inference_view, shared_activations

MapFn = Callable[[Tensor, Tensor], Tensor]  # (normalised images [B,3,H,W], classes [B]) -> maps [B,H,W]


METHODS = ("chip", "refined", "image_chip", "region_chip", "gradcam", "cam", "rise", "center", *peers.CAM_CLASSES)
LAYER_FREE = ("chip", "refined", "rise", "center")  # methods that need no layer= (chip: the importance's last)


def standard_methods(model: nn.Module, names, *, importance: Importance | None = None,
                     layer: str | None = None, cam_layer: str | None = None,
                     options: dict | None = None) -> dict[str, MapFn]:
    """Map functions for method names (see METHODS):
    chip, refined: CHIP and Refined CHIP (need `importance`; chip at `layer`);
    image_chip: per-image CHIP at `layer` (`chip_ext.image_chip`);
    region_chip: region CHIP at `layer` (`chip_ext.image_chip.region_chip`: gates over the map's cells);
    gradcam, cam: ours (cam at `cam_layer`, the layer right before global pooling);
    rise: RISE (input masks, layer-free); center: the centre baseline (no model, `baselines.center`);
    pytorch-grad-cam's own classes at `layer`: gradcam_pytorch_grad_cam, gradcam++, scorecam,
    ablationcam, layercam, xgradcam, eigencam (class-agnostic), hirescam.
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
        if name in ("chip", "refined"):
            if importance is None:
                raise ValueError(f"method {name!r} needs an importance")
            fns[name] = (lambda m: lambda x, t: explain(model, x, importance, method=m, target=t,
                                                        layer=layer if m == "chip" else None))(name)
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
             road_percentiles=(20, 40, 60, 80), keep_hits: bool = False) -> dict:
    """-> {"n": N, "classification": {...}, "methods": {name: metrics}} (see module docstring);
    each method's "evaluation_hits_at_calibrated_threshold" lists 0/1 per evaluation image; with
    keep_hits, "hits" is every image's 0/1 at every threshold (list [N][T], IoU >= .5, largest region).

    faithfulness_metrics: any of "deletion", "insertion" (the RISE protocol, `deletion_step` pixels a
    step) and "road" (pytorch-grad-cam's ROADCombined at `road_percentiles`), each the mean over
    `faithfulness_images` ("evaluation": the odd-indexed half, "all") of the true class's softmax
    probability curve; stored per method under "faithfulness" with the per-image values."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_localization)
    top5s, labels_all, boxes_all = [], [], []
    correct = {name: [] for name in methods}  # [N, T] at IoU .5, largest contour
    correct_v2 = {name: [] for name in methods}  # [N, T, 3] all contours, IoU .3/.5/.7
    bad = [m for m in faithfulness_metrics if m not in faithfulness.METRICS]
    if bad:
        raise ValueError(f"faithfulness_metrics: unknown {bad}; choose from {faithfulness.METRICS}")
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
    if faithfulness_metrics:
        result["faithfulness_protocol"] = {
            "images": faithfulness_images, "deletion_step_pixels": deletion_step,
            "road_percentiles": list(road_percentiles), "score": "softmax probability of the true class",
            "better": {"deletion": "lower", "insertion": "higher", "road": "higher"}}
    return result


def format_table(result: dict) -> str:
    """The shape of the paper's Table II: localisation and classification errors per method."""
    lines = [f"{'method':<26} {'top-1 loc err':>13} {'top-5 loc err':>13} {'GT-known':>9} "
             f"{'MaxBoxAcc':>9} {'MaxBoxAccV2':>11} {'thr (calib)':>11}"]
    for name, r in result["methods"].items():
        a = r["at_calibrated_threshold"]
        lines.append(f"{name:<26} {a['top1_loc_error']:>13.3f} {a['top5_loc_error']:>13.3f} "
                     f"{a['gt_known_loc']:>9.3f} {r['max_box_acc_all_images']:>9.3f} "
                     f"{r['max_box_acc_v2_all_images']['mean']:>11.3f} {r['calibrated_threshold']:>11.2f}"
                     + "".join(f" {k}={v['mean']:.3f}" for k, v in r.get("faithfulness", {}).items()))
    c = result["classification"]
    lines.append(f"classification error: top-1 {c['top1_error']:.3f}, top-5 {c['top5_error']:.3f}  "
                 f"(N={result['n']}; loc errors and GT-known on the {result['n_evaluation']} evaluation images "
                 f"at the threshold chosen on the {result['n_calibration']} calibration images; "
                 "MaxBoxAcc/V2 over all images at their best threshold)")
    return "\n".join(lines)
