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


def test_peer_gradcam_leaves_the_model_alone(resnet):
    """pytorch-grad-cam calls model.eval() and hooks the target layer: it runs on a private inference
    view, so the user's model keeps its mode and gets no hooks."""
    import torch

    from chip_ext.evaluation import _peer_gradcam

    resnet.train()
    try:
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        maps = _peer_gradcam(resnet, "layer4")(x, torch.tensor([1, 2]))
        assert maps.shape == (2, 64, 64) and float(maps.max()) > 0
        assert resnet.training and all(m.training for m in resnet.modules())
        assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in resnet.modules())
    finally:
        resnet.eval()
