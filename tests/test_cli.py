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

METHODS = "chip,refined,guided_chip,image_chip,region_chip,gradcam,cam,guided_backprop,guided_gradcam"


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


def image_folder(root, n=2, bad=None):
    """root/train/<wnid>/*.JPEG with n images of the tabby class; `bad` names a file written truncated."""
    rng = np.random.default_rng(1)
    folder = root / "train" / "n02123045"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
    if bad:
        whole = (folder / "img0.JPEG").read_bytes()
        (folder / bad).write_bytes(whole[: len(whole) // 3])
    return root / "train"


def test_runtime_errors_are_one_line_naming_the_file(setup):
    """Issue 14.9: a truncated JPEG printed 34 lines of traceback that never named the file; a random-bytes
    importance file ended with torch's 'please file an issue'. One line, exit code 1, --debug for more."""
    tmp, spec, images = setup
    train = image_folder(tmp / "data", bad="img9.JPEG")
    args = ["distill", "--model", f"{spec}:build", "--data", train, "--layers", "3", "--perturbations", "2",
            "--workers", "0", "--quiet", "--out", tmp / "x.pt"]
    r = run(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "img9.JPEG: cannot read the image" in lines[0] and lines[0].startswith("chip-ext distill: error:")
    r = run("--debug", *args)
    assert r.returncode == 1 and "Traceback" in r.stderr
    (tmp / "junk.pt").write_bytes(bytes(range(256)) * 4)
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "junk.pt", "--images", images[0],
            "--out", tmp / "o")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "junk.pt is not a readable chip_ext Importance file" in lines[0]
    assert "file an issue" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["distill", "--per-class", "-1"], "argument --per-class: must be an integer >= 1; got -1"),
    (["distill", "--perturbations", "0"], "argument --perturbations: must be an integer >= 1; got 0"),
    (["distill", "--max-drop", "1.5"], "argument --max-drop: must be a finite number >= 0 and <= 1; got 1.5"),
    (["distill", "--lam", "0.1", "--lam-ratio", "0.1"], "argument --lam-ratio: not allowed with argument --lam"),
    (["evaluate", "--limit", "0"], "argument --limit: must be an integer >= 2; got 0"),
    (["evaluate", "--limit", "-1"], "argument --limit: must be an integer >= 2; got -1"),
    (["evaluate", "--limit", "1"], "argument --limit: must be an integer >= 2; got 1"),
])
def test_bad_command_line_values(args, message):
    """Issue 14.10: --per-class -1 dropped each class's last image, --limit 0 was ignored, -1 dropped
    one, 1 wrote NaN with exit code 0."""
    required = {"distill": ["--model", "m", "--data", "d", "--layers", "l", "--out", "o"],
                "evaluate": ["--model", "m", "--data", "d"]}[args[0]]
    r = run(*args, *required)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_every_option_has_help():
    from chip_ext.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {opt.option_strings}" for name, p in sub.choices.items() for opt in p._actions
               if opt.option_strings and opt.dest != "help" and not opt.help]
    assert missing == []


def test_distill_options_reach_distill(setup):
    tmp, spec, _ = setup
    train = image_folder(tmp / "data", n=3)
    out = tmp / "imp.pt"
    r = run("distill", "--model", f"{spec}:build", "--data", train, "--layers", "3", "--perturbations", "3",
            "--target", "logit", "--lam", "0.001", "--sigma", "1.5", "--max-drop", "0.3", "--workers", "0",
            "--classes", "0,2", "--squash", "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    meta = chip_ext.Importance.load(out).meta
    assert meta["target"] == "logit" and meta["lam"] == 0.001 and meta["sigma"] == 1.5 and meta["max_drop"] == 0.3
    assert meta["preprocess"]["geometry"] == "squash 32"


def test_a_zero_width_in_the_annotations_is_named(tmp_path):
    (tmp_path / "val_labels.csv").write_text("file,label,wnid,width,height\na.JPEG,281,n02123045,0,375\n")
    (tmp_path / "val_boxes.csv").write_text("file,label,wnid,x0,y0,x1,y1\na.JPEG,281,n02123045,1,2,3,4\n")
    from chip_ext import data

    with pytest.raises(ValueError, match=r"val_labels.csv line 2: a.JPEG: the annotated image size .* = \(0, 375\)"):
        data.find_localization_samples(tmp_path)
