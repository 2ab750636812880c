"""Box extraction, IoU and MaxBoxAcc on hand-built maps with known answers (wsolevaluation rules)."""
import numpy as np
import pytest
import torch

from chip_ext import localization as loc


def blank(h=20, w=30):
    return np.zeros((h, w), np.float32)


def test_single_blob_box():
    m = blank()
    m[5:10, 3:12] = 1.0  # rows 5..9, cols 3..11
    assert loc.box_from_map(m, 0.5) == (3, 5, 12, 10)  # x1 = x + w, y1 = y + h (wsolevaluation)
    assert loc.box_from_map(torch.from_numpy(m), 0.5) == (3, 5, 12, 10)


def test_threshold_is_strictly_above_t_times_max():
    m = blank()
    m[2:4, 2:4] = 1.0
    m[10:18, 10:25] = 0.5  # int(0.5 * 255) = 127 -> 127 > 127 is false
    assert loc.box_from_map(m, 0.5) == (2, 2, 4, 4)
    assert loc.box_from_map(m, 0.49) == (10, 10, 25, 18)  # larger region wins once it is in


def test_largest_region_and_all_contours():
    m = blank()
    m[1:3, 1:3] = 1.0
    m[8:16, 10:20] = 0.9
    assert loc.box_from_map(m, 0.2) == (10, 8, 20, 16)
    boxes = loc.boxes_from_map(m, 0.2, all_contours=True)
    assert sorted(map(tuple, boxes.tolist())) == [(1, 1, 3, 3), (10, 8, 20, 16)]


def test_tie_picks_one_of_the_equal_regions():
    m = blank()
    m[2:6, 2:6] = 1.0
    m[12:16, 20:24] = 1.0
    assert loc.box_from_map(m, 0.5) in [(2, 2, 6, 6), (20, 12, 24, 16)]


def test_empty_and_constant_maps():
    assert loc.box_from_map(blank(), 0.5) == (0, 0, 0, 0)
    ones = np.ones((20, 30), np.float32)
    assert loc.box_from_map(ones, 0.5) == (0, 0, 29, 19)  # whole image, capped at W-1, H-1


def test_border_region_is_capped():
    m = blank()
    m[15:20, 25:30] = 1.0
    assert loc.box_from_map(m, 0.5) == (25, 15, 29, 19)


def test_iou_inclusive_pixels():
    assert loc.iou([0, 0, 9, 9], [0, 0, 9, 9])[0, 0] == 1.0
    assert np.isclose(loc.iou([0, 0, 9, 9], [5, 5, 14, 14])[0, 0], 25 / 175)
    assert loc.iou([0, 0, 4, 4], [10, 10, 12, 12])[0, 0] == 0.0
    with pytest.raises(ValueError, match="x1 >= x0"):
        loc.iou([5, 0, 4, 4], [0, 0, 1, 1])


def test_max_box_acc_known_answer():
    # image 0: object at rows 5..14, cols 5..14; the map has the object at 1.0 and a halo at 0.3
    m0 = blank(20, 20)
    m0[2:18, 2:18] = 0.3
    m0[5:15, 5:15] = 1.0
    # image 1: two GT boxes; the map covers the second one only
    m1 = blank(20, 20)
    m1[0:8, 10:20] = 1.0
    gts = [np.array([[5, 5, 14, 14]]), np.array([[0, 0, 3, 3], [10, 0, 19, 7]])]
    thresholds = np.array([0.0, 0.2, 0.5])
    correct = loc.box_correct([m0, m1], gts, thresholds)[:, :, 0]
    # t=0: image 0's box is the halo (16x16 vs 10x10 -> IoU 100/256 < .5); t>=.2 -> exact box
    assert correct.tolist() == [[False, False, True], [True, True, True]]
    acc, t = loc.max_box_acc([m0, m1], gts, thresholds)
    assert acc == 1.0 and t == 0.5
    v2 = loc.max_box_acc_v2([m0, m1], gts, thresholds)
    assert v2["iou30"] == 1.0 and v2["mean"] <= 1.0


def test_ilsvrc_metrics():
    correct = np.array([True, True, False, True])
    labels = torch.tensor([1, 2, 3, 4])
    top5 = torch.tensor([[1, 0, 0, 0, 0], [9, 2, 0, 0, 0], [3, 0, 0, 0, 0], [8, 7, 6, 5, 0]])
    m = loc.ilsvrc_metrics(correct, top5, labels)
    assert m["classification_error_top1"] == 0.5 and m["classification_error_top5"] == 0.25
    assert m["top1_loc_error"] == 0.75  # only image 0: right class and right box
    assert m["top5_loc_error"] == 0.5  # images 0 and 1
    assert m["gt_known_loc"] == 0.75


def test_bad_maps():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        loc.box_from_map(np.full((4, 4), 2.0), 0.5)
    with pytest.raises(ValueError, match=r"must be \[H, W\]"):
        loc.box_from_map(np.zeros((2, 4, 4)), 0.5)


def test_both_metrics_from_one_pass_agree_with_the_separate_ones():
    rng = np.random.default_rng(0)
    maps = [rng.random((16, 16)).astype(np.float32) for _ in range(3)]
    gts = [np.array([[2, 2, 9, 9]]), np.array([[0, 0, 15, 15], [4, 4, 6, 6]]), np.array([[8, 0, 15, 7]])]
    thr = np.array([0.0, 0.3, 0.6, 0.9])
    v1, v2 = loc.box_correct_both(maps, gts, thr)
    assert np.array_equal(v1, loc.box_correct(maps, gts, thr)[:, :, 0])
    assert np.array_equal(v2, loc.box_correct(maps, gts, thr, iou_thresholds=(0.3, 0.5, 0.7), all_contours=True))
