"""Weakly-supervised localisation from saliency maps, with clovaai/wsolevaluation's conventions so
numbers compare with the literature (Choe et al., CVPR 2020):

- a map in [0, 1] is quantised to uint8; at threshold t the binary mask is pixels > int(t * max);
- the box is the bounding rectangle of the largest contour (OpenCV, RETR_TREE), x1/y1 capped at
  W-1/H-1; MaxBoxAccV2 uses the boxes of all contours;
- IoU counts pixels inclusively (+1), boxes are x0, y0, x1, y1 in pixels of the map;
- MaxBoxAcc: the best accuracy over thresholds at IoU >= 0.5; MaxBoxAccV2: the mean over IoU
  0.3/0.5/0.7 of the best accuracies, each with its own threshold.
ILSVRC metrics: top-1 / top-5 localisation error, GT-known localisation, classification error.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)

Boxes = np.ndarray  # [n, 4] int, x0 y0 x1 y1


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("chip_ext.localization needs OpenCV: pip install opencv-python-headless") from err
    return cv2


def _as_map(saliency) -> np.ndarray:
    m = saliency.detach().float().cpu().numpy() if isinstance(saliency, Tensor) else np.asarray(saliency, np.float32)
    if m.ndim != 2:
        raise ValueError(f"a saliency map must be [H, W]; got shape {list(m.shape)}")
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError(f"a saliency map must be finite and in [0, 1]; got range [{m.min()}, {m.max()}]")
    return m


def _quantize(saliency) -> np.ndarray:
    """A validated map as the uint8 image wsolevaluation thresholds."""
    return (_as_map(saliency) * 255).astype(np.uint8)


def _contour_boxes(img: np.ndarray, threshold: float) -> tuple[Boxes, Boxes]:
    """One thresholding and contour search -> (the largest region's box [1, 4], every region's boxes
    [n, 4]). No region: [0, 0, 0, 0] for both."""
    cv2 = _cv2()
    H, W = img.shape
    _, mask = cv2.threshold(img, int(threshold * img.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        empty = np.zeros((1, 4), dtype=np.int64)
        return empty, empty
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, min(x + w, W - 1), min(y + h, H - 1)])
    boxes = np.asarray(boxes, dtype=np.int64)
    largest = max(range(len(contours)), key=lambda k: cv2.contourArea(contours[k]))
    return boxes[largest:largest + 1], boxes


def boxes_from_map(saliency, threshold: float, *, all_contours: bool = False) -> Boxes:
    """Boxes [n, 4] (x0, y0, x1, y1) of the region(s) above `threshold` x max; the largest contour's
    box only unless all_contours. No region: one box [0, 0, 0, 0]."""
    largest, every = _contour_boxes(_quantize(saliency), threshold)
    return every if all_contours else largest


def box_from_map(saliency, threshold: float) -> tuple[int, int, int, int]:
    """The box of the largest connected region above `threshold` x max (x0, y0, x1, y1)."""
    return tuple(int(v) for v in boxes_from_map(saliency, threshold)[0])


def iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU matrix [n_a, n_b] of x0y0x1y1 boxes, pixels counted inclusively."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    if (a[:, 2] < a[:, 0]).any() or (a[:, 3] < a[:, 1]).any() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError("boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
    ix = np.maximum(0, np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1)
    iy = np.maximum(0, np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_correct_both(saliency_maps, gt_boxes: Sequence, thresholds=DEFAULT_THRESHOLDS,
                     iou_thresholds_v2: Sequence[float] = (0.3, 0.5, 0.7)) -> tuple[np.ndarray, np.ndarray]:
    """(correct [N, T]: the largest region's box at IoU >= 0.5 (MaxBoxAcc), correct_v2 [N, T, D]: any
    region's box at each IoU of iou_thresholds_v2 (MaxBoxAccV2)), from one contour search per map and
    threshold. saliency_maps: [N, H, W]; gt_boxes: per image, boxes [k, 4] in map pixels."""
    if len(saliency_maps) != len(gt_boxes):
        raise ValueError(f"{len(saliency_maps)} maps but {len(gt_boxes)} ground-truth box lists")
    deltas = np.asarray(iou_thresholds_v2)
    v1 = np.zeros((len(saliency_maps), len(thresholds)), dtype=bool)
    v2 = np.zeros((len(saliency_maps), len(thresholds), len(deltas)), dtype=bool)
    for i, (m, gt) in enumerate(zip(saliency_maps, gt_boxes)):
        img = _quantize(m)
        gt = np.asarray(gt).reshape(-1, 4)
        for j, t in enumerate(thresholds):
            largest, every = _contour_boxes(img, float(t))
            v1[i, j] = iou(largest, gt).max() >= 0.5
            v2[i, j] = iou(every, gt).max() >= deltas
    return v1, v2


def box_correct(saliency_maps, gt_boxes: Sequence, thresholds=DEFAULT_THRESHOLDS, *,
                iou_thresholds: Sequence[float] = (0.5,), all_contours: bool = False) -> np.ndarray:
    """correct[i, t, d]: the box(es) of map i at threshold t reach IoU >= iou_thresholds[d] with a GT
    box of image i. saliency_maps: [N, H, W]; gt_boxes: per image, boxes [k, 4] in map pixels."""
    if len(saliency_maps) != len(gt_boxes):
        raise ValueError(f"{len(saliency_maps)} maps but {len(gt_boxes)} ground-truth box lists")
    out = np.zeros((len(saliency_maps), len(thresholds), len(iou_thresholds)), dtype=bool)
    deltas = np.asarray(iou_thresholds)
    for i, (m, gt) in enumerate(zip(saliency_maps, gt_boxes)):
        img = _quantize(m)
        gt = np.asarray(gt).reshape(-1, 4)
        for j, t in enumerate(thresholds):
            largest, every = _contour_boxes(img, float(t))
            out[i, j] = iou(every if all_contours else largest, gt).max() >= deltas
    return out


def max_box_acc(saliency_maps, gt_boxes, thresholds=DEFAULT_THRESHOLDS, iou_threshold: float = 0.5,
                ) -> tuple[float, float]:
    """MaxBoxAcc: (best accuracy over thresholds, that threshold)."""
    acc = box_correct(saliency_maps, gt_boxes, thresholds, iou_thresholds=(iou_threshold,))[:, :, 0].mean(0)
    j = int(np.argmax(acc))
    return float(acc[j]), float(thresholds[j])


def max_box_acc_v2(saliency_maps, gt_boxes, thresholds=DEFAULT_THRESHOLDS,
                   iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> dict[str, float]:
    """MaxBoxAccV2: boxes of all contours; the mean over IoU thresholds of the best accuracies."""
    acc = box_correct(saliency_maps, gt_boxes, thresholds, iou_thresholds=iou_thresholds,
                      all_contours=True).mean(0)  # [T, D]
    per = {f"iou{round(d * 100)}": float(acc[:, k].max()) for k, d in enumerate(iou_thresholds)}
    per["mean"] = float(np.mean(list(per.values())))
    return per


def ilsvrc_metrics(correct_at_threshold: np.ndarray, top5: Tensor, labels: Tensor) -> dict[str, float]:
    """ILSVRC localisation errors at one threshold.

    correct_at_threshold: bool [N], the box of the map for the true class is right (IoU >= 0.5);
    top5: Tensor[N, 5] predicted classes (best first); labels: Tensor[N].
    top-1 loc: top-1 class right and its box right; top-5 loc: the true class among the top 5 and
    its box right (the box of the true class's map, as ILSVRC scores it); GT-known: the box right.
    """
    correct = torch.as_tensor(np.asarray(correct_at_threshold), dtype=torch.bool)
    top1_right = top5[:, 0] == labels
    top5_right = (top5 == labels[:, None]).any(dim=1)
    return {
        "classification_error_top1": 1 - float(top1_right.float().mean()),
        "classification_error_top5": 1 - float(top5_right.float().mean()),
        "top1_loc_error": 1 - float((top1_right & correct).float().mean()),
        "top5_loc_error": 1 - float((top5_right & correct).float().mean()),
        "gt_known_loc": float(correct.float().mean()),
    }
