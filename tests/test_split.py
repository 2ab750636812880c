"""Splitting real architectures at a layer: prefix then suffix equals the model; unclean cuts refused."""
import pytest
import torch
import torchvision
from torch import nn

import chip_ext
from chip_ext.split import SplitError, clean_cut_points, split
from shared_data import under_ci


def timm_lite0():
    try:
        import timm
    except ImportError:
        if under_ci():  # requirements-dev.txt installs timm: missing under CI is a failure
            raise
        pytest.skip("timm is not installed (pip install timm)")
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


MODELS = {
    "vgg16": lambda: torchvision.models.vgg16(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "efficientnet_lite0": timm_lite0,
}


@pytest.mark.parametrize("name, layer, K", [
    ("vgg16", "features.29", 512),     # conv5_3 + ReLU(inplace)
    ("vgg16", "features.3", 64),       # conv1_2 + ReLU
    ("resnet50", "layer4", 2048),
    ("resnet50", "layer2", 512),
    ("efficientnet_lite0", "bn1", 32),
    ("efficientnet_lite0", "blocks.3", 80),
    ("efficientnet_lite0", "blocks.6", 320),
    ("efficientnet_lite0", "bn2", 1280),
])
def test_prefix_then_suffix_is_the_model(name, layer, K):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    prefix, suffix = split(model, layer)
    with torch.no_grad():
        A = prefix(x)
        out = suffix(A.clone())  # clone: the suffix must not depend on anything but the activation
        ref = model(x)
    assert A.dim() == 4 and A.shape[1] == K
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_distill_runs_on_real_architectures():
    """One tiny distillation each (random weights, 2 images, 2 perturbations, 3 classes)."""
    torch.manual_seed(0)
    x = [torch.randn(2, 3, 32, 32)]
    for name, layer in [("vgg16", "features.29"), ("resnet50", "layer4"), ("efficientnet_lite0", "blocks.6")]:
        imp = chip_ext.distill(MODELS[name](), x, layer, num_perturbations=2, classes=[0, 1, 2],
                               progress=False)
        assert imp.weights[layer].shape[0] == 3 and torch.isfinite(imp.weights[layer]).all()


def test_resnet_skip_connection_is_refused_with_suggestions():
    model = torchvision.models.resnet50(weights=None)
    with pytest.raises(SplitError, match=r"cannot cut ResNet cleanly at 'layer3.2.conv3'.*Clean cut points near it: .*'layer3.2'"):
        split(model, "layer3.2.conv3")
    assert "layer4" in clean_cut_points(model) and "layer3.2.conv3" not in clean_cut_points(model)


def test_shared_module_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(SplitError, match=r"'conv' is called 2 times in forward"):
        split(Twice(), "conv")
    assert "conv" not in clean_cut_points(Twice())


def test_unknown_layer_suggests_close_names():
    with pytest.raises(SplitError, match=r"'features.290' is not a module of VGG.*Did you mean 'features.29'"):
        split(torchvision.models.vgg16(weights=None), "features.290")


def test_container_cut_uses_its_output():
    """A container (ResNet's layer4) is kept whole: its output is the cut, not its last leaf."""
    model = torchvision.models.resnet18(weights=None).eval()
    prefix, _ = split(model, "layer4")
    x = torch.randn(1, 3, 64, 64)
    feats = {}
    model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("out", o))
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(prefix(x), feats["out"])


@pytest.mark.parametrize("name, want", [("vgg16", "features.29"), ("resnet50", "layer4"),
                                        ("efficientnet_lite0", "bn2")])
def test_default_layer_is_the_one_cam_uses(name, want):
    model = MODELS[name]().eval()
    assert chip_ext.split.default_layer(model) == want


def test_default_layer_skips_squeeze_excitation_and_auxiliary_heads():
    """An SE block's pooling and GoogLeNet's auxiliary heads (train mode) are not where the maps end."""
    se = torchvision.models.efficientnet_b0(weights=None).eval()
    assert chip_ext.split.default_layer(se) == "features"
    assert chip_ext.split.default_layer(torchvision.models.shufflenet_v2_x0_5(weights=None).eval()) == "conv5"
    with pytest.raises(SplitError, match="no global pooling or flattening"):
        chip_ext.split.default_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_distill_with_the_default_layer():
    """Issue 14: chip_ext.distill(model, loader), the two-argument call users expect."""
    import warnings

    model = torchvision.models.resnet18(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 images x N=4 < K: underdetermined, fine here
        imp = chip_ext.distill(model, [torch.randn(2, 3, 64, 64)], num_perturbations=4, classes=[0, 1],
                               progress=False)
    assert imp.layers == ["layer4"] and imp.meta["layers_default"] is True and imp.meta["layers"] == ["layer4"]
    assert model.training  # the model itself was not put in eval mode to find it


# ------------------------------------------------------------------------------------- threads

def _stress():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "speed"))
    try:
        return importlib.import_module("thread_stress")
    finally:
        sys.path.pop(0)


def test_threads_on_fresh_models_and_a_user_forward_loop(tmp_path):
    """benchmarks/speed/thread_stress.py at a size CI affords: 4 threads x 4 first-time explain/distill calls on
    fresh ResNet-18s, twice, while another thread runs a user forward loop. Before the fix, calls failed
    at random (NameError, SplitError, CURRENT_PATCHER) and ~94% of the user's forwards raised."""
    stress = _stress()
    result = stress.main(["--threads", "4", "--calls", "4", "--repetitions", "2", "--out", str(tmp_path / "r.json")])
    s = result["summary"]
    assert s["calls"] == 32 and s["user_forwards"] > 0
    assert s["failed_calls"] == 0, result["repetitions"][0]["errors"]
    assert s["result_mismatches"] == 0  # every map and W equal to the single-threaded one
    assert s["user_failures"] == 0 and not s["left_patched"] and not s["main_thread_broken"]


def test_a_forward_in_another_thread_during_a_trace_is_untouched():
    """A trace patches nn.Module.__call__ process-wide; a forward made by another thread while it is
    patched must run plainly (no NameError, no proxies)."""
    import threading

    from chip_ext.split import trace

    inside, release, seen = threading.Event(), threading.Event(), {}
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)

    class Slow(nn.Module):  # a model whose trace waits while the other thread runs its forward
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            inside.set()
            release.wait(10)
            return self.lin(x)

    def run_other():
        inside.wait(10)
        try:
            seen["patched"] = torch.nn.Module.__call__ is not torch.fx._symbolic_trace._orig_module_call
            seen["out"] = other(x)
        except Exception as err:  # noqa: BLE001
            seen["error"] = err
        finally:
            release.set()

    t = threading.Thread(target=run_other)
    t.start()
    gm = trace(Slow())
    t.join()
    assert seen.get("patched") is True  # the forward did run while torch.fx had nn.Module patched
    assert "error" not in seen, seen.get("error")
    torch.testing.assert_close(seen["out"], other(x), rtol=0, atol=0)
    assert any(n.op == "call_module" and n.target == "lin" for n in gm.graph.nodes)
    assert torch.nn.Module.__call__ is torch.fx._symbolic_trace._orig_module_call


def test_a_model_is_traced_once():
    from chip_ext import split as split_module

    model = torchvision.models.resnet18(weights=None).eval()
    calls = []
    real = split_module.trace
    split_module.trace = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for _ in range(3):
            chip_ext.distill(model, [torch.randn(1, 3, 32, 32)], "layer4", classes=[0], num_perturbations=2,
                             progress=False)
    finally:
        split_module.trace = real
    assert len(calls) == 1


def test_unused_results_are_pruned_but_in_place_ops_are_kept():
    """A dropped output (x.mean() below) is no skip connection around the layer; an in-place op whose
    result is unused still changes its input and must stay."""
    import torch.nn.functional as F

    from chip_ext.split import trace

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x.mean()  # unused
            a = self.conv(x)
            F.relu(a, inplace=True)  # result unused, a changed in place
            a.mul_(2)
            return self.head(a.mean(dim=(2, 3)))

    model = M().eval()
    gm = trace(model)
    targets = [n.target for n in gm.graph.nodes]
    assert "mean" in targets and targets.count("mean") == 1 and "mul_" in targets and F.relu in targets
    x = torch.randn(2, 3, 8, 8)
    prefix, suffix = split(model, "conv")
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(x)), model(x), rtol=0, atol=0)
