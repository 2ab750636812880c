"""Grad-CAM, CAM, Guided Backprop and Guided Grad-CAM against the peers people already use:
pytorch-grad-cam and Captum, same model, layer, images and classes."""
import copy
import gc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from chip_ext import baselines as bl


def no_inplace(model):
    """A copy whose ReLUs are not in place (Captum's module hooks need that; the math is the same)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, (nn.ReLU, nn.ReLU6)):
            mod.inplace = False
    return m


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()  # ReLU(inplace=True) everywhere


def images(B=2, size=96, seed=1):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ pytorch-grad-cam


@pytest.mark.parametrize("arch, layer", [("resnet", "layer4"), ("resnet", "layer3"),
                                         ("vgg", "features.18"), ("vgg", "features.17")])
def test_gradcam_matches_pytorch_grad_cam(arch, layer, request):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(arch)
    x, t = images(), [3, 7]
    ours = bl.gradcam(model, x, layer, t)
    # pytorch-grad-cam 1.5.7 gets a wrong map at a ReLU(inplace=True) target layer (off by 0.55 at
    # VGG11 features.18; see test_gradcam_inplace_relu_layers_by_hand), so it runs on a copy without
    # in-place ReLUs, which computes the same function.
    peer_model = no_inplace(model)
    with GradCAM(model=peer_model, target_layers=[peer_model.get_submodule(layer)]) as peer:
        ref = peer(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in t])
    assert ours.shape == (2, 96, 96) and float(ours.min()) >= 0 and float(ours.max()) <= 1
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


def test_guided_backprop_matches_pytorch_grad_cam(resnet):
    from pytorch_grad_cam import GuidedBackpropReLUModel

    x, t = images(), [3, 7]
    ours = bl.guided_backprop(resnet, x, t)
    peer = GuidedBackpropReLUModel(copy.deepcopy(resnet), device="cpu")  # it swaps the model's ReLUs
    for i in range(2):
        ref = peer(x[i:i + 1], target_category=t[i])  # [H, W, 3], one image at a time
        scale = np.abs(ref).max()
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy() / scale, ref / scale, atol=1e-4)


# ------------------------------------------------------------------------------ Captum


@pytest.mark.parametrize("arch, layer", [("resnet", "layer4"), ("vgg", "features.18")])
def test_matches_captum(arch, layer, request):
    from captum.attr import GuidedBackprop, GuidedGradCam, LayerGradCam

    model = request.getfixturevalue(arch)
    peer_model = no_inplace(model)
    x, t = images(), [3, 7]
    module = peer_model.get_submodule(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = LayerGradCam(peer_model, module).attribute(x, target=t, relu_attributions=True).squeeze(1)
        gb = GuidedBackprop(peer_model).attribute(x, target=t)
        ggc = GuidedGradCam(peer_model, module).attribute(x, target=t)

    def close(ours, ref):  # after the same normalisation: both divided by the reference's max |.|
        scale = ref.abs().max()
        torch.testing.assert_close(ours / scale, ref / scale, rtol=0, atol=1e-4)

    close(bl.gradcam_raw(model, x, layer, t)[0], raw)
    close(bl.gradcam(model, x, layer, t), bl.normalize_maps(raw, x.shape[-2:]))
    close(bl.guided_backprop(model, x, t), gb)
    close(bl.guided_gradcam(model, x, layer, t, upsample_mode="nearest", normalize=False), ggc)


# ------------------------------------------------------------------------------ activations


class Acts(nn.Module):
    """ReLU as module, in-place module, functional call and ReLU6: guided backprop must guide all."""

    def __init__(self, guided=None):
        super().__init__()
        torch.manual_seed(5)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Conv2d(6, 8, 3)
        self.relu, self.relu_ip, self.relu6 = nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()
        self.fc = nn.Linear(8, 4)
        self.guided = guided

    def act(self, kind, x):
        if self.guided is not None:
            return self.guided(x, 6.0 if kind == "relu6" else None)
        return {"relu": self.relu, "ip": self.relu_ip, "f": F.relu, "relu6": self.relu6}[kind](x)

    def forward(self, x):
        x = self.act("relu", self.c1(x))
        x = self.act("ip", self.c2(x))
        x = self.act("f", self.c3(x))
        x = self.act("relu6", x)
        return self.fc(x.mean(dim=(2, 3)))


class GuidedClamp(torch.autograd.Function):
    """Independent reference: guided backprop written as an explicit autograd Function."""

    @staticmethod
    def forward(ctx, x, top):
        ctx.save_for_backward(x)
        ctx.top = top
        return x.clamp(0, top) if top is not None else x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        inside = (x > 0) if ctx.top is None else (x > 0) & (x < ctx.top)
        return grad * inside * (grad > 0), None


def test_guided_backprop_handles_inplace_functional_and_relu6():
    x, t = images(2, 16), [1, 2]
    ours = bl.guided_backprop(Acts(), x, t)
    ref_model = Acts(guided=GuidedClamp.apply)
    xr = x.clone().requires_grad_(True)
    ref_model.eval()(xr).gather(1, torch.tensor(t)[:, None]).sum().backward()
    torch.testing.assert_close(ours, xr.grad, rtol=0, atol=1e-7)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("layer", ["features.17", "features.18"])
def test_gradcam_inplace_relu_layers_by_hand(vgg, layer):
    """VGG11: features.17 is a conv followed by ReLU(inplace=True) (the suffix starts in place);
    features.18 is that ReLU. Both against Grad-CAM computed by hand on sliced Sequentials."""
    x, t = images(), [3, 7]
    cut = int(layer.split(".")[1]) + 1
    with torch.no_grad():
        A = vgg.features[:cut](x)
    A = A.detach().requires_grad_(True)
    logits = vgg.classifier(torch.flatten(vgg.avgpool(vgg.features[cut:](A.clone())), 1))
    (g,) = torch.autograd.grad(logits[[0, 1], t].sum(), A)
    manual = torch.relu((g.mean((2, 3), keepdim=True) * A.detach()).sum(1))
    torch.testing.assert_close(bl.gradcam_raw(vgg, x, layer, t)[0], manual, rtol=0, atol=1e-7)
    assert manual.abs().max() > 0


# ------------------------------------------------------------------------------ CAM


def test_cam_is_the_classifier_weighted_sum(resnet):
    x, t = images(), [2, 9]
    feats = {}
    h = resnet.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("A", o.detach()))
    with torch.no_grad():
        resnet(x)
    h.remove()
    manual = torch.einsum("bk,bkhw->bhw", resnet.fc.weight[t], feats["A"])
    torch.testing.assert_close(bl.cam(resnet, x, "layer4", t), bl.normalize_maps(manual, (96, 96)),
                               rtol=0, atol=1e-5)


def test_cam_for_gap_linear_equals_gradcam_without_relu(resnet):
    """For GAP + linear the gradient of logit c w.r.t. A_k is W[c, k] / HW everywhere, so the raw
    Grad-CAM map times HW is ReLU of the raw CAM map."""
    x, t = images(), [2, 9]
    raw, _, _ = bl.gradcam_raw(resnet, x, "layer4", t)
    prefix, _ = bl.cached_split(resnet, "layer4")
    with torch.no_grad():
        A = prefix(x)
        manual = torch.einsum("bk,bkhw->bhw", resnet.fc.weight[t], A)
    HW = A.shape[-1] * A.shape[-2]
    assert (manual > 0).any() and (manual < 0).any()
    torch.testing.assert_close(raw * HW, torch.relu(manual), rtol=0, atol=1e-5 * float(manual.abs().max()))


def test_cam_refuses_models_without_gap_linear(vgg):
    with pytest.raises(ValueError, match=r"CAM needs the model to end, after layer 'features.20', in global average pooling"):
        bl.cam(vgg, images(), "features.20")


# ------------------------------------------------------------------------------ conventions


def test_constant_map_becomes_zeros():
    maps = torch.stack([torch.full((3, 3), 2.5), torch.arange(9.0).reshape(3, 3)])
    out = bl.normalize_maps(maps, (6, 6))
    assert torch.equal(out[0], torch.zeros(6, 6)) and not torch.isnan(out).any()
    assert float(out[1].min()) == 0.0 and float(out[1].max()) == 1.0


def test_target_forms(resnet):
    x = images()
    top1 = bl.gradcam(resnet, x, "layer4")
    with torch.no_grad():
        pred = resnet(x).argmax(1)
    torch.testing.assert_close(top1, bl.gradcam(resnet, x, "layer4", pred))
    torch.testing.assert_close(bl.gradcam(resnet, x, "layer4", 5), bl.gradcam(resnet, x, "layer4", [5, 5]))


def test_no_hooks_left_and_no_growth(resnet):
    x = images(1, 64)
    for fn in (lambda: bl.gradcam(resnet, x, "layer4"), lambda: bl.guided_backprop(resnet, x),
               lambda: bl.cam(resnet, x, "layer4"), lambda: bl.guided_gradcam(resnet, x, "layer4")):
        fn()
    gc.collect()
    before = sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())
    for _ in range(25):
        bl.gradcam(resnet, x, "layer4")
        bl.guided_backprop(resnet, x)
        bl.guided_gradcam(resnet, x, "layer4")
    gc.collect()
    after = sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())
    assert after - before <= 2, (before, after)
    for m in resnet.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not getattr(m, "_backward_pre_hooks", None)
    assert all(p.grad is None for p in resnet.parameters())


def test_mode_restored(resnet):
    resnet.train()
    try:
        bl.gradcam(resnet, images(1, 64), "layer4")
        assert resnet.training and resnet.layer4.training
    finally:
        resnet.eval()


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda m: bl.gradcam(m, torch.randn(3, 64, 64), "layer4"), ValueError, r"images must be a floating-point Tensor\[B, 3, H, W\]; got 3-D"),
    (lambda m: bl.gradcam(m, images(), "layer4", 1000), ValueError, r"target \[1000, 1000\] out of range: the model has 1000 outputs"),
    (lambda m: bl.gradcam(m, images(), "layer4", [1, 2, 3]), ValueError, r"target must give one class per image \(2\); got 3"),
    (lambda m: bl.gradcam(m, images(), "layer9"), ValueError, r"'layer9' is not a module of ResNet"),
    (lambda m: bl.guided_gradcam(m, images(), "layer4", upsample_mode="cubic"), ValueError, "upsample must be 'bilinear' or 'nearest'"),
])
def test_bad_inputs(resnet, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(resnet)


# ------------------------------------------------------------------------------------- RISE


class QuadrantModel(nn.Module):
    """Class 0's logit is 8 x the mean of channel 0 over the top-left quadrant; class 1's is 0."""

    def forward(self, x):
        s = x[:, 0, : x.shape[2] // 2, : x.shape[3] // 2].mean(dim=(1, 2)) * 8
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_rise_masks_follow_the_paper():
    from chip_ext.baselines import rise_masks

    m = rise_masks(400, (40, 56), grid=7, p=0.3, seed=3)
    assert m.shape == (400, 40, 56) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.3) < 0.03  # E[M] = p
    assert torch.equal(m, rise_masks(400, (40, 56), grid=7, p=0.3, seed=3))
    assert not torch.equal(m, rise_masks(400, (40, 56), grid=7, p=0.3, seed=4))


def test_rise_is_the_papers_sum_in_float64():
    """S = 1/(N p) sum_i P_c(I ⊙ M_i) M_i, computed here mask by mask in float64."""
    from chip_ext.baselines import rise, rise_masks
    from chip_ext.maps import normalize_maps

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).double()
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    t = torch.tensor([1, 4])
    masks = rise_masks(50, (24, 24), grid=4, p=0.5, seed=7).double()
    expected = torch.zeros(2, 24, 24, dtype=torch.float64)
    for b in range(2):
        for m in masks:
            prob = model((x[b] * m)[None]).softmax(1)[0, t[b]]
            expected[b] += prob * m
    expected = normalize_maps(expected / (50 * 0.5))
    got = rise(model, x, t, num_masks=50, grid=4, p=0.5, seed=7, batch_size=7)
    assert (got.double() - expected).abs().max() < 1e-5


def test_rise_finds_the_region_the_class_reads():
    from chip_ext.baselines import rise

    x = torch.ones(1, 3, 32, 32)
    sal = rise(QuadrantModel(), x, 0, num_masks=500, grid=4, p=0.5)
    peak = int(sal[0].argmax())
    assert peak // 32 < 16 and peak % 32 < 16  # the peak inside the quadrant the class reads
    assert float(sal[0, :16, :16].mean()) > float(sal[0, 16:, 16:].mean()) + 0.15


@pytest.mark.parametrize("kw, pattern", [({"num_masks": 0}, "num_masks"), ({"grid": 0}, "grid"),
                                         ({"p": 0.0}, "p must"), ({"batch_size": 0}, "batch_size")])
def test_rise_bad_arguments(kw, pattern):
    from chip_ext.baselines import rise

    with pytest.raises(ValueError, match=pattern):
        rise(QuadrantModel(), torch.ones(1, 3, 8, 8), 0, **kw)


def test_center_baseline_is_a_centred_gaussian_the_same_for_every_image():
    from chip_ext.baselines import center

    x = torch.randn(3, 3, 20, 30)
    m = center(x, torch.tensor([0, 1, 2]), sigma=0.25)
    assert m.shape == (3, 20, 30) and float(m.min()) >= 0 and float(m.max()) == 1.0
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])  # no model, no class
    y, xx = torch.meshgrid(torch.arange(20) - 9.5, torch.arange(30) - 14.5, indexing="ij")
    ref = torch.exp(-(y**2 + xx**2) / (2 * 7.5**2))
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    torch.testing.assert_close(m[0], ref.float(), atol=1e-6, rtol=0)
    assert torch.equal(m[0], m[0].flip(0)) and torch.equal(m[0], m[0].flip(1))  # symmetric about the centre


def test_center_baseline_boxes_a_centred_object_and_misses_a_corner_one():
    from chip_ext.baselines import center
    from chip_ext.localization import DEFAULT_THRESHOLDS, max_box_acc

    m = center(torch.zeros(2, 3, 64, 64))
    centred, corner = [[16, 16, 47, 47]], [[0, 0, 15, 15]]
    acc, _ = max_box_acc(m[:1], [centred], DEFAULT_THRESHOLDS)
    assert acc == 1.0
    acc, _ = max_box_acc(m[1:], [corner], DEFAULT_THRESHOLDS)
    assert acc == 0.0


@pytest.mark.parametrize("sigma", [0, -1.0, "wide", True])
def test_center_baseline_bad_sigma(sigma):
    from chip_ext.baselines import center

    with pytest.raises(ValueError, match="sigma must be > 0"):
        center(torch.zeros(1, 3, 8, 8), sigma=sigma)
