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

METHODS = "chip,refined,fused,guided_chip,image_chip,region_chip,gradcam,cam,guided_backprop,guided_gradcam"


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
    (["distill", "--perturbations", "1"], "argument --perturbations: must be an integer >= 2; got 1"),
    (["distill", "--max-drop", "1.5"], "argument --max-drop: must be a finite number > 0 and <= 1; got 1.5"),
    (["distill", "--max-drop", "0"], "argument --max-drop: must be a finite number > 0 and <= 1; got 0"),
    (["distill", "--classes", "a,b"], "argument --classes: must be 'data', 'all' or a comma list of class indices; "
                                      "got 'a,b'"),
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


def test_outputs_are_checked_before_any_work(setup, tmp_path):
    """`distill` failed 10 s in on a read-only --out, after the whole pass; evaluate and explain the same."""
    tmp, spec, images = setup
    blocker = tmp / "blocker"
    blocker.write_text("a file where a folder should be")
    train = image_folder(tmp / "data", n=2)
    cases = [
        ["distill", "--model", f"{spec}:build", "--data", train, "--layers", "3", "--perturbations", "2",
         "--workers", "0", "--quiet", "--out", blocker / "imp.pt"],
        ["explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", images[0],
         "--out", blocker / "out"],
        ["evaluate", "--model", f"{spec}:build", "--data", tmp / "no-such-data", "--out", blocker / "r.json"],
        ["distill", "--model", f"{spec}:build", "--data", train, "--layers", "3", "--out", tmp],
    ]
    for args in cases:
        r = run(*args)
        assert r.returncode != 0 and "--out:" in r.stderr, (args[0], r.stderr)
        assert "blocker is a file, not a folder" in r.stderr or "is a folder; pass a file path" in r.stderr
        assert not (tmp / "imp.pt.lock").exists()


def test_a_dataloader_worker_error_is_its_own_one_line(setup):
    """With --workers 2 (the default), the 'one line' carried the worker's whole traceback text."""
    tmp, spec, _ = setup
    train = image_folder(tmp / "data", bad="img9.JPEG")
    r = run("distill", "--model", f"{spec}:build", "--data", train, "--layers", "3", "--perturbations", "2",
            "--workers", "1", "--quiet", "--out", tmp / "x.pt")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "img9.JPEG: cannot read the image" in lines[0] and "DataLoader worker process 0" in lines[0]
    assert "Traceback" not in lines[0] and 'File "' not in lines[0]


def test_target_that_is_neither_index_nor_name(setup):
    tmp, spec, images = setup
    for target, message in (("1.5", "--target: 1.5 is neither a class index (an integer) nor a distilled class name "
                                    "(names: zero, two, three)"),
                            ("7", "--target: class 7 is out of range: the model has 4 outputs")):
        r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", images[0],
                "--target", target, "--out", tmp / "o")
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert "KeyError" not in r.stderr and "'1.5'" not in r.stderr


TUPLE_MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    from chip_ext.models import Preprocess

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

        def forward(self, x):
            f = self.features(x)
            return self.head(f), f

    def build():
        torch.manual_seed(0)
        return Pair(), Preprocess(size=32, resize=36)
''')


def test_a_model_with_a_tuple_output_says_how_to_wrap_it(setup):
    """The CLI said "'tuple' object has no attribute 'float'"."""
    tmp, _, images = setup
    spec = tmp / "pair.py"
    spec.write_text(TUPLE_MODEL)
    imp = chip_ext.Importance({"features": torch.randn(4, 8)}, [0, 1, 2, 3])
    imp.save(tmp / "pair.pt")
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "pair.pt", "--images", images[0],
            "--out", tmp / "o")
    assert r.returncode == 1 and "Pair.forward returns a tuple of 2 values" in r.stderr, r.stderr
    assert "chip_ext.select_output(model, 0)" in r.stderr


def test_an_importance_of_other_weights_warns(setup):
    """Explaining with an importance distilled on other weights gave maps with exit 0 and no warning."""
    tmp, spec, images = setup
    other = tmp / "other.py"
    other.write_text(MODEL_FILE.replace("torch.manual_seed(0)", "torch.manual_seed(1)"))
    r = run("explain", "--model", f"{other}:build", "--importance", tmp / "imp.pt", "--images", images[0],
            "--methods", "chip", "--out", tmp / "o")
    assert r.returncode == 0, r.stderr
    assert "chip-ext explain: warning: the importance was distilled on a model with other weights" in r.stderr
    r = run("explain", "--model", f"{spec}:build", "--importance", tmp / "imp.pt", "--images", images[0],
            "--methods", "chip", "--out", tmp / "o")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
