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

from . import baselines
from .data import LocalizationDataset, collate_localization
from .explain import explain
from .importance import Importance
from .localization import DEFAULT_THRESHOLDS, box_correct_both, ilsvrc_metrics
from .maps import inference_view

MapFn = Callable[[Tensor, Tensor], Tensor]  # (normalised images [B,3,H,W], classes [B]) -> maps [B,H,W]


def standard_methods(model: nn.Module, names, *, importance: Importance | None = None,
                     layer: str | None = None, cam_layer: str | None = None) -> dict[str, MapFn]:
    """Map functions for method names: chip, refined (need importance), gradcam (layer), cam
    (cam_layer: the layer right before global pooling), gradcam_pytorch_grad_cam (the peer)."""
    fns: dict[str, MapFn] = {}
    for name in names:
        if name in ("chip", "refined"):
            if importance is None:
                raise ValueError(f"method {name!r} needs an importance")
            fns[name] = (lambda m: lambda x, t: explain(model, x, importance, method=m, target=t,
                                                        layer=layer if m == "chip" else None))(name)
        elif name == "gradcam":
            fns[name] = lambda x, t: baselines.gradcam(model, x, layer, t)
        elif name == "cam":
            fns[name] = lambda x, t: baselines.cam(model, x, cam_layer or layer, t)
        elif name == "gradcam_pytorch_grad_cam":
            fns[name] = _peer_gradcam(model, layer)
        else:
            raise ValueError(f"unknown method {name!r}; choose from chip, refined, gradcam, cam, "
                             "gradcam_pytorch_grad_cam")
    return fns


def _peer_gradcam(model, layer) -> MapFn:
    def fn(x, t):
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        view = inference_view(model, private=True)  # grad-cam calls model.eval() and hooks the layer
        with GradCAM(model=view, target_layers=[view.get_submodule(layer)]) as cam:
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
        return torch.from_numpy(out).clamp(0, 1)

    return fn


def evaluate(model: nn.Module, dataset: LocalizationDataset, methods: dict[str, MapFn],
             normalize: Callable[[Tensor], Tensor], *, batch_size: int = 25,
             thresholds=DEFAULT_THRESHOLDS, progress: bool = True) -> dict:
    """-> {"n": N, "classification": {...}, "methods": {name: metrics}} (see module docstring)."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_localization)
    top5s, labels_all, boxes_all = [], [], []
    correct = {name: [] for name in methods}  # [N, T] at IoU .5, largest contour
    correct_v2 = {name: [] for name in methods}  # [N, T, 3] all contours, IoU .3/.5/.7
    view = inference_view(model)  # eval mode without changing the model
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    for x01, labels, boxes in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        x = normalize(x01.to(device))  # on the model's device
        with torch.no_grad():
            top5s.append(view(x).topk(5, dim=1).indices.cpu())
        labels_all.append(labels)
        boxes_all += boxes
        for name, fn in methods.items():
            maps = fn(x, labels.to(device)).detach().float().cpu().clamp(0, 1)
            v1, v2 = box_correct_both(maps, boxes, thresholds)
            correct[name].append(v1)
            correct_v2[name].append(v2)
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
        }
        r = result["methods"][name]["max_box_acc_v2_all_images"]
        r["mean"] = float(np.mean(list(r.values())))
    return result


def format_table(result: dict) -> str:
    """The shape of the paper's Table II: localisation and classification errors per method."""
    lines = [f"{'method':<26} {'top-1 loc err':>13} {'top-5 loc err':>13} {'GT-known':>9} "
             f"{'MaxBoxAcc':>9} {'MaxBoxAccV2':>11} {'thr (calib)':>11}"]
    for name, r in result["methods"].items():
        a = r["at_calibrated_threshold"]
        lines.append(f"{name:<26} {a['top1_loc_error']:>13.3f} {a['top5_loc_error']:>13.3f} "
                     f"{a['gt_known_loc']:>9.3f} {r['max_box_acc_all_images']:>9.3f} "
                     f"{r['max_box_acc_v2_all_images']['mean']:>11.3f} {r['calibrated_threshold']:>11.2f}")
    c = result["classification"]
    lines.append(f"classification error: top-1 {c['top1_error']:.3f}, top-5 {c['top5_error']:.3f}  "
                 f"(N={result['n']}; loc errors and GT-known on the {result['n_evaluation']} evaluation images "
                 f"at the threshold chosen on the {result['n_calibration']} calibration images; "
                 "MaxBoxAcc/V2 over all images at their best threshold)")
    return "\n".join(lines)
