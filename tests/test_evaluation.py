"""`chip-ext distill` and `chip-ext evaluate` end to end on a handful of the shared real images."""
import json
import subprocess
import sys

from shared_data import data_dir


def test_distill_then_evaluate_cli(tmp_path):
    root = data_dir() / "imagenette"
    imp = tmp_path / "imp.pt"
    r = subprocess.run([sys.executable, "-m", "chip_ext", "distill", "--model", "efficientnet_lite0",
                        "--data", str(root / "train"), "--layers", "blocks.6", "--per-class", "1",
                        "--perturbations", "4", "--squash", "--out", str(imp), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "chip_ext", "evaluate", "--model", "efficientnet_lite0",
                        "--importance", str(imp), "--data", str(root), "--methods", "chip,gradcam,cam",
                        "--cam-layer", "bn2", "--limit", "8", "--batch-size", "4", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "top-1 loc err" in r.stdout and "classification error" in r.stdout
    assert "warning" not in r.stderr  # distilled with --squash: the geometry evaluate uses
    result = json.loads(out.read_text())
    assert result["n"] == 8 and result["n_calibration"] == 4 and result["layer"] == "blocks.6"
    for name in ("chip", "gradcam", "cam"):
        m = result["methods"][name]
        assert 0 <= m["at_calibrated_threshold"]["gt_known_loc"] <= 1
        assert 0 <= m["max_box_acc_all_images"] <= 1 and m["calibrated_threshold"] in result["thresholds"]
        ci = m["intervals"]["gt_known_loc"]
        assert ci["lo"] <= m["at_calibrated_threshold"]["gt_known_loc"] == ci["mean"] <= ci["hi"]
        assert m["intervals"]["max_box_acc_evaluation"]["mean"] == m["max_box_acc_evaluation"]
    # every method against Grad-CAM (the default reference) on the same images, in the JSON and the table
    assert result["reference"] == "gradcam" and "paired" not in result["methods"]["gradcam"]
    d = result["methods"]["chip"]["paired"]["gt_known_loc"]
    hits = {n: result["methods"][n]["evaluation_hits_at_calibrated_threshold"] for n in ("chip", "gradcam")}
    assert d["mean"] == sum(hits["chip"]) / 4 - sum(hits["gradcam"]) / 4 and 0 < d["sign_test"]["p"] <= 1
    assert "vs gradcam" in r.stdout and "(reference)" in r.stdout
    # the peers and faithfulness from the command line
    r = subprocess.run([sys.executable, "-m", "chip_ext", "evaluate", "--model", "efficientnet_lite0",
                        "--data", str(root), "--methods", "eigencam,rise,image_chip,center", "--layer", "blocks.6",
                        "--rise-masks", "8", "--faithfulness", "deletion,insertion", "--deletion-step", "12544",
                        "--limit", "4", "--batch-size", "4", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    for name in ("eigencam", "rise", "image_chip", "center"):
        f = result["methods"][name]["faithfulness"]
        assert f["deletion"]["n"] == 2 and 0 <= f["deletion"]["mean"] <= 1 and 0 <= f["insertion"]["mean"] <= 1
    assert "deletion: " in r.stdout and result["reference"] is None  # no gradcam listed: nothing paired
    assert all("paired" not in m and "deletion" in m["intervals"] for m in result["methods"].values())
    for bad, message in ((["--methods", "gradcam,scorecamm"], "--methods: unknown ['scorecamm']"),
                         (["--methods", "gradcam", "--faithfulness", "auc"], "--faithfulness: unknown ['auc']"),
                         (["--methods", "layercam"], "--layer is needed for layercam"),
                         (["--methods", "cam", "--reference", "gradcam"], "--reference 'gradcam' must be one of")):
        r = subprocess.run([sys.executable, "-m", "chip_ext", "evaluate", "--model", "efficientnet_lite0",
                            "--data", str(root), *bad], capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and message in r.stderr, r.stderr


def test_peer_gradcam_leaves_the_model_alone(resnet):
    """pytorch-grad-cam calls model.eval() and hooks the target layer: it runs on a private inference
    view, so the user's model keeps its mode and gets no hooks."""
    import torch

    from chip_ext.peers import cam_method

    resnet.train()
    try:
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        maps = cam_method(resnet, "gradcam_pytorch_grad_cam", "layer4")(x, torch.tensor([1, 2]))
        assert maps.shape == (2, 64, 64) and float(maps.max()) > 0
        assert resnet.training and all(m.training for m in resnet.modules())
        assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in resnet.modules())
    finally:
        resnet.eval()


# ------------------------------------------------------------------ evaluate() on hand-built cases

# image size; the ground-truth region (pixels 8..23) and its box in the library's convention (wsolevaluation's:
# x1 = x + w from cv2.boundingRect, areas counted inclusively)
S, GT, GT_BOX = 32, (8, 8, 23, 23), (8, 8, 24, 24)


def blob(m, x0, y0, x1, y1, value):
    m[y0:y1 + 1, x0:x1 + 1] = value


def kind_map(kind):
    """Maps whose box is right (IoU >= 0.5 with GT, largest contour / any contour) at thresholds 0.1 and
    0.5 exactly as the table in test_evaluate_known_answers says."""
    import torch

    m = torch.zeros(S, S)
    if kind == "right":
        blob(m, *GT, 1.0)
    elif kind == "wrong":
        blob(m, 0, 0, 5, 5, 1.0)
    elif kind == "low":  # plateau on GT, a small peak: right at 0.1, a 4x4 box at 0.5
        blob(m, *GT, 0.3)
        blob(m, 14, 14, 17, 17, 1.0)
    elif kind == "high":  # plateau over the whole image, peak on GT: wrong at 0.1, right at 0.5
        m[:] = 0.3
        blob(m, *GT, 1.0)
    elif kind == "two":  # a larger wrong region and a smaller right one (GT below is 8x8 for it)
        blob(m, 8, 8, 15, 15, 1.0)
        blob(m, 19, 19, 31, 31, 1.0)
    return m


def test_evaluate_known_answers():
    """Issue 14.13: evaluate()'s numbers were only checked to lie in [0, 1]. Ten images of known
    correctness: the calibration half (even indices) prefers threshold 0.5, the evaluation half 0.1;
    classes and top-5 lists set by hand."""
    import numpy as np
    import torch

    from chip_ext.evaluation import evaluate

    kinds = ["high", "low", "high", "low", "high", "right", "wrong", "low", "two", "two"]
    # correct (v1: largest region; v2: any region) at thresholds (0.1, 0.5), from the construction
    table = {"high": ((0, 1), (0, 1)), "low": ((1, 0), (1, 0)), "right": ((1, 1), (1, 1)),
             "wrong": ((0, 0), (0, 0)), "two": ((0, 0), (1, 1))}
    label = 3
    top5 = {i: [3, 0, 1, 2, 4] for i in range(10)}
    top5[3] = [5, 3, 0, 1, 2]  # right class in the top 5 only
    top5[7] = [5, 6, 7, 8, 9]  # right class not in the top 5
    top5[9] = [0, 1, 2, 4, 3]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            x = torch.zeros(3, S, S)
            x[0, 0, 0] = i  # the image says which it is
            gt = (8, 8, 16, 16) if kinds[i] == "two" else GT_BOX
            return x, label, np.array([gt])

    class Model(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            for b, i in enumerate(x[:, 0, 0, 0].round().long().tolist()):
                logits[b, top5[i]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
            return logits

    def fn(x, labels):
        assert torch.all(labels == label)
        return torch.stack([kind_map(kinds[i]) for i in x[:, 0, 0, 0].round().long().tolist()])

    r = evaluate(Model(), Data(), {"m": fn}, lambda x: x, batch_size=3, thresholds=np.array([0.1, 0.5]),
                 progress=False)
    m = r["methods"]["m"]
    v1 = np.array([table[k][0] for k in kinds], dtype=float)  # [10, 2]
    v2 = np.array([table[k][1] for k in kinds], dtype=float)
    assert (r["n"], r["n_calibration"], r["n_evaluation"]) == (10, 5, 5)
    assert v1[0::2].mean(0).tolist() == [0.0, 0.6] and v1[1::2].mean(0).tolist() == [0.8, 0.2]
    assert m["calibrated_threshold"] == 0.5 and m["best_threshold_on_evaluation"] == 0.1
    assert m["max_box_acc_calibration"] == 0.6 and m["max_box_acc_evaluation"] == 0.8
    # at 0.5 on the evaluation images (1, 3, 5, 7, 9) only 5 is right; at 0.1: 1, 3, 5, 7
    cal, best = m["at_calibrated_threshold"], m["at_best_threshold"]
    assert m["evaluation_hits_at_calibrated_threshold"] == [0, 0, 1, 0, 0] and "hits" not in m
    kept = evaluate(Model(), Data(), {"m": fn}, lambda x: x, batch_size=4, thresholds=np.array([0.1, 0.5]),
                    progress=False, keep_hits=True)["methods"]["m"]["hits"]
    assert kept == v1.astype(int).tolist()
    approx = __import__("pytest").approx
    assert cal["gt_known_loc"] == approx(0.2) and best["gt_known_loc"] == approx(0.8)
    assert cal["top1_loc_error"] == approx(0.8) and cal["top5_loc_error"] == approx(0.8)
    assert best["top1_loc_error"] == approx(0.6)  # top-1 right and box right: 1, 5
    assert best["top5_loc_error"] == approx(0.4)  # in the top 5 and box right: 1, 3, 5
    # over all images: 0.1 -> 1, 3, 5, 7 = 0.4; 0.5 -> 0, 2, 4, 5 = 0.4 (the first best threshold)
    assert m["max_box_acc_all_images"] == 0.4 and m["max_box_acc_threshold_all_images"] == 0.1
    assert m["max_box_acc_v2_all_images"]["iou50"] == v2.mean(0).max() == 0.6
    # classification over all ten: top-1 right on 0, 1, 2, 4, 5, 6, 8 -> error 0.3; top-5 misses only 7
    assert r["classification"]["top1_error"] == approx(0.3) and r["classification"]["top5_error"] == approx(0.1)


def test_max_box_acc_v2_takes_the_best_threshold_per_iou():
    """MaxBoxAccV2 (wsolevaluation) is the mean over IoU 0.3/0.5/0.7 of each IoU's best threshold, not
    the best threshold of the mean. 'near': at 0.1 a 20x20 box around the 16x16 GT (IoU 0.66: right at
    0.3 and 0.5, not 0.7), at 0.5 exact; 'inner': at 0.1 exact, at 0.5 an 8x8 box inside (IoU 0.28)."""
    import numpy as np
    import torch

    from chip_ext.localization import box_correct_both, max_box_acc_v2

    near = torch.zeros(S, S)
    blob(near, 6, 6, 25, 25, 0.3)
    blob(near, *GT, 1.0)
    inner = torch.zeros(S, S)
    blob(inner, *GT, 0.3)
    blob(inner, 12, 12, 19, 19, 1.0)
    maps = torch.stack([near, inner, near])
    gts = [np.array([GT_BOX])] * 3
    per = max_box_acc_v2(maps, gts, thresholds=np.array([0.1, 0.5]))
    # threshold 0.1: (1, 1, 1/3); 0.5: (2/3, 2/3, 2/3) -> per IoU best: 1, 1, 2/3
    assert per["iou30"] == 1.0 and per["iou50"] == 1.0 and abs(per["iou70"] - 2 / 3) < 1e-9
    assert abs(per["mean"] - (1 + 1 + 2 / 3) / 3) < 1e-9  # the best single threshold would give 0.778
    _, v2 = box_correct_both(maps, gts, np.array([0.1, 0.5]))
    assert v2.mean(0).tolist() == [[1.0, 1.0, 1 / 3], [2 / 3, 2 / 3, 2 / 3]]


def test_evaluate_faithfulness_on_the_evaluation_half():
    """deletion (RISE protocol) inside evaluate(): the known answer of test_faithfulness (0.25 for the
    perfect map, 0.75 for its reverse), averaged over the odd-indexed images only."""
    import numpy as np
    import torch
    from test_faithfulness import RegionFraction

    from chip_ext.evaluation import evaluate

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.ones(3, 16, 16), 0, np.array([[0, 0, 16, 8]])

    def perfect(x, t):
        m = torch.zeros(x.shape[0], 16, 16)
        m[:, :8] = 1
        return m

    r = evaluate(RegionFraction(), Data(), {"good": perfect, "bad": lambda x, t: 1 - perfect(x, t)},
                 lambda x: x, batch_size=2, progress=False, faithfulness_metrics=("deletion",), deletion_step=64)
    good, bad = r["methods"]["good"]["faithfulness"], r["methods"]["bad"]["faithfulness"]
    assert good["deletion"]["n"] == 2 and len(good["deletion"]["per_image"]) == 2  # images 1 and 3
    assert abs(good["deletion"]["mean"] - 0.25) < 1e-5 and abs(bad["deletion"]["mean"] - 0.75) < 1e-5
    assert r["faithfulness_protocol"]["better"]["deletion"] == "lower"
    assert "insertion" not in good
    with __import__("pytest").raises(ValueError, match="faithfulness_metrics: unknown"):
        evaluate(RegionFraction(), Data(), {"good": perfect}, lambda x: x, progress=False,
                 faithfulness_metrics=("auc",))


def test_standard_methods_names_and_options(resnet):
    import pytest

    from chip_ext import evaluation

    fns = evaluation.standard_methods(resnet, ["gradcam++", "rise", "image_chip", "region_chip", "eigencam", "center"],
                                      layer="layer4", options={"rise": {"num_masks": 8}, "image_chip": {
                                          "num_perturbations": 4}, "region_chip": {"num_perturbations": 4}})
    import torch

    x = torch.randn(2, 3, 32, 32)
    for name, fn in fns.items():
        m = fn(x, torch.tensor([0, 1]))
        assert m.shape == (2, 32, 32), name
    with pytest.raises(ValueError, match=r"unknown method 'gradcam\+'"):
        evaluation.standard_methods(resnet, ["gradcam+"], layer="layer4")
    with pytest.raises(ValueError, match="needs layer="):
        evaluation.standard_methods(resnet, ["layercam"])
    assert set(evaluation.standard_methods(resnet, ["center", "rise"])) == {"center", "rise"}  # layer-free
    with pytest.raises(ValueError, match="options for unknown"):
        evaluation.standard_methods(resnet, ["rise"], options={"risee": {}})


def test_ties_take_the_lowest_threshold_of_the_default_grid():
    """wsolevaluation's grid is 0.00, 0.01, ..., 0.99 and the first best threshold wins: a grid reversed
    (ties broken at the highest threshold) changed the calibrated threshold without failing a test."""
    import numpy as np
    import torch

    from chip_ext.evaluation import evaluate
    from chip_ext.localization import DEFAULT_THRESHOLDS

    assert len(DEFAULT_THRESHOLDS) == 100 and DEFAULT_THRESHOLDS[0] == 0.0 and DEFAULT_THRESHOLDS[-1] == 0.99
    assert np.all(np.diff(DEFAULT_THRESHOLDS) > 0)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, S, S), 0, np.array([GT_BOX])

    class Model(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2)

    r = evaluate(Model(), Data(), {"m": lambda x, t: kind_map("right").expand(x.shape[0], S, S)}, lambda x: x,
                 batch_size=2, progress=False)  # right at every threshold: a tie over the whole grid
    m = r["methods"]["m"]
    assert m["calibrated_threshold"] == 0.0 and m["best_threshold_on_evaluation"] == 0.0
    assert m["max_box_acc_threshold_all_images"] == 0.0


def test_max_box_acc_v2_top_iou_is_0_7():
    """A box at IoU 0.727 with the GT is right at 0.7: MaxBoxAccV2 with its top IoU at 0.75 would count
    it wrong (no test box had an IoU between the two)."""
    import numpy as np
    import torch

    from chip_ext.localization import box_from_map, iou, max_box_acc_v2

    m = torch.zeros(S, S)
    blob(m, 8, 8, 23, 29, 1.0)  # the GT's 16 columns, 22 rows: IoU 256 / 352
    box = box_from_map(m, 0.5)
    value = float(iou(np.array([box]), np.array([GT_BOX]))[0, 0])
    assert 0.7 <= value < 0.75, value
    per = max_box_acc_v2(m[None], [np.array([GT_BOX])], thresholds=np.array([0.5]))
    assert per["iou70"] == 1.0 and per["iou50"] == 1.0 and per["iou30"] == 1.0
