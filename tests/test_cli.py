"""`chip-ext explain` end to end on a small model given as a Python spec."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import chip_ext
from chip_ext import models

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn
    from chip_ext.models import Preprocess

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        return model, Preprocess(size=32, resize=36)
''')

METHODS = "chip,refined,guided_chip,gradcam,cam,guided_backprop,guided_gradcam"


@pytest.fixture
def setup(tmp_path):
    spec_file = tmp_path / "tiny_model.py"
    spec_file.write_text(MODEL_FILE)
    model, pre = models.load(f"{spec_file}:build")
    imp = chip_ext.distill(model, [torch.randn(4, 3, 32, 32) for _ in range(2)], ["1", "3"],
                           num_perturbations=4, classes=[0, 2, 3], class_names=["zero", "one", "two", "three"],
                           progress=False)
    imp.save(tmp_path / "imp.pt")
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return tmp_path, spec_file, images


def run(*args):
    return subprocess.run([sys.executable, "-m", "chip_ext", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_explain_writes_pngs_and_json(setup):
    tmp, spec, images = setup
    out = tmp / "out"
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", *images,
            "--methods", METHODS, "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "explain.json").read_text())
    assert report["layer"] == "3" and len(report["images"]) == 2
    with Image.open(out / report["grid"]) as im:
        assert im.format == "PNG" and im.size[0] > 500
    for entry in report["images"]:
        assert entry["target"]["index"] in (0, 2, 3) and entry["target"]["name"] in ("zero", "two", "three")
        assert len(entry["predictions"]) == 4 and abs(sum(p["prob"] for p in entry["predictions"]) - 1) < 1e-5
        assert set(entry["outputs"]) == set(METHODS.split(","))
        for png in entry["outputs"].values():
            with Image.open(out / png) as im:
                assert im.format == "PNG" and im.size == (32, 32)


def test_explain_with_named_target_and_errors(setup):
    tmp, spec, images = setup
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", images[0],
            "--target", "two", "--out", tmp / "o2")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp / "o2" / "explain.json").read_text())
    assert report["images"][0]["target"]["index"] == 2
    assert set(report["images"][0]["outputs"]) == {"chip", "refined", "gradcam"}
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", tmp / "nope.jpg",
            "--out", tmp / "o3")
    assert r.returncode != 0 and "no such file" in r.stderr
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", images[0],
            "--methods", "chip,magic", "--out", tmp / "o4")
    assert r.returncode != 0 and "unknown ['magic']" in r.stderr


def test_model_loading():
    model, pre = models.load("resnet18")
    assert isinstance(model, torch.nn.Module) and not model.training and pre.size == 224
    assert models.class_names_for("resnet18")[281] == "tabby"
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        models.load("resnet9000")
    with pytest.raises(ValueError, match="'module:function' or 'file.py:function'"):
        models.load("nomodule:")
