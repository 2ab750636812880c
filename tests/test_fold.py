"""chip_ext.fold: the exact fold of a suffix's head (per-channel ops with f(0) = 0, then a Linear) --
equal to the gated copies in float64 for random heads, refused for every op that would make it wrong,
and the same statistics and W through distill for the architecture families it applies to."""
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import chip_ext
from chip_ext.checkpoints import read_checkpoint
from chip_ext.distillation.fold import LAYOUT_AFTER_CALLS
from chip_ext.fold import find_fold
from chip_ext.maps import cached_split, inference_view


def gated_suffix(suffix, A, gates):
    """The unfolded way: the suffix on every gated copy A · d_sn -> [B·N, C_out]."""
    return suffix((A[:, None] * gates[..., None, None].to(A.dtype)).reshape(-1, *A.shape[1:]))


# per-channel ops that map 0 to 0, and ops that do not (or mix channels)
ALLOWED = {
    "relu": lambda K: nn.ReLU(), "relu6": lambda K: nn.ReLU6(), "gelu": lambda K: nn.GELU(),
    "silu": lambda K: nn.SiLU(), "leaky": lambda K: nn.LeakyReLU(0.1), "tanh": lambda K: nn.Tanh(),
    "maxpool": lambda K: nn.MaxPool2d(2, ceil_mode=True), "avgpool": lambda K: nn.AvgPool2d(2, ceil_mode=True),
    "adaptive": lambda K: nn.AdaptiveAvgPool2d((2, 2)), "adaptive_max": lambda K: nn.AdaptiveMaxPool2d(3),
    "dropout": lambda K: nn.Dropout(0.3), "identity": lambda K: nn.Identity(),
    "hardtanh": lambda K: nn.Hardtanh(-1.0, 0.5),
}
FORBIDDEN = {
    "batchnorm": lambda K: _bn(K), "conv1x1": lambda K: nn.Conv2d(K, K, 1), "sigmoid": lambda K: nn.Sigmoid(),
    "hardtanh_off_zero": lambda K: nn.Hardtanh(0.1, 1.0), "softmax_channels": lambda K: nn.Softmax(dim=1),
    "groupnorm": lambda K: nn.GroupNorm(1, K),
}


def _bn(K):
    bn = nn.BatchNorm2d(K)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


class Head(nn.Module):
    def __init__(self, K, ops, pool, tail, out=6):
        super().__init__()
        self.layer = nn.Conv2d(3, K, 3, padding=1)
        self.ops = nn.ModuleList(ops)
        self.pool = pool
        with torch.no_grad():
            probe = self._features(torch.zeros(1, K, 7, 7))
        self.fc = nn.Linear(probe.shape[1], out)
        self.tail = nn.Sequential(nn.ReLU(), nn.Linear(out, 4)) if tail else nn.Identity()

    def _features(self, x):
        for op in self.ops:
            x = op(x)
        return x.mean(dim=(2, 3)) if self.pool == "mean" else torch.flatten(x, 1)

    def forward(self, x):
        return self.tail(self.fc(self._features(self.layer(x))))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(ALLOWED) + sorted(FORBIDDEN)), max_size=4),
       st.sampled_from(["flatten", "mean"]), st.booleans(), st.integers(0, 2 ** 16))
def test_random_heads_fold_exactly_or_not_at_all(names, pool, tail, seed):
    torch.manual_seed(seed)
    K = 5
    ops = [(ALLOWED.get(n) or FORBIDDEN[n])(K) for n in names]
    model = Head(K, ops, pool, tail).double().eval()
    _, suffix = cached_split(inference_view(model), "layer")
    fold, why = find_fold(suffix)
    if any(n in FORBIDDEN for n in names):
        assert fold is None, (names, why)
        return
    assert fold is not None, (names, why)
    A = torch.randn(3, K, 7, 7, dtype=torch.float64)
    gates = torch.rand(3, 4, K) > 0.4
    gates[:, 0] = True
    want = gated_suffix(suffix, A, gates)
    for _ in range(LAYOUT_AFTER_CALLS + 1):  # the first calls by einsum, then from the laid-out weight
        torch.testing.assert_close(fold.logits(A, gates), want, rtol=1e-12, atol=1e-12)
    positions = fold.weight.shape[1] // K
    assert bool(fold._by_channel) == (positions > 1)  # a pooled head (one position) is one GEMM throughout


def test_what_does_not_fold_says_why():
    class Skip(nn.Module):  # the layer's output also reaches the logits another way
        def __init__(self):
            super().__init__()
            self.layer, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            a = self.layer(x)
            return self.fc(a.mean(dim=(2, 3))) + a.sum()

    _, suffix = cached_split(inference_view(Skip()), "layer")
    fold, why = find_fold(suffix)
    assert fold is None and "users" in why
    model = Head(4, [_bn(4)], "flatten", False)
    fold, why = find_fold(cached_split(inference_view(model), "layer")[1])
    assert fold is None and "BatchNorm2d" in why
    train = Head(4, [nn.Dropout(0.5)], "flatten", False).train()  # fold only sees the eval view's suffix
    fold, why = find_fold(cached_split(train, "layer")[1])
    assert fold is None and "training mode" in why


def _families():
    import timm

    torch.manual_seed(0)
    vgg = nn.Sequential()
    vgg.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                 nn.MaxPool2d(2))
    vgg.avgpool = nn.AdaptiveAvgPool2d((3, 3))
    vgg.classifier = nn.Sequential(nn.Linear(16 * 9, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 7))

    class VGGLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.avgpool, self.classifier = vgg.features, vgg.avgpool, vgg.classifier

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return [("vgg", VGGLike(), "features.3", "MaxPool2d -> AdaptiveAvgPool2d -> flatten -> Linear"),
            ("resnet18", torchvision.models.resnet18(num_classes=7), "layer4", "AdaptiveAvgPool2d -> flatten -> Linear"),
            ("efficientnet_lite0", timm.create_model("efficientnet_lite0", pretrained=False, num_classes=7), "bn2",
             "AdaptiveAvgPool2d -> Flatten -> Linear")]


@pytest.mark.filterwarnings("ignore:layer .* the Lasso is underdetermined")
@pytest.mark.parametrize("family", range(3), ids=["vgg", "resnet18", "efficientnet_lite0"])
def test_distill_folded_equals_unfolded(family, tmp_path):
    name, model, layer, ops = _families()[family]
    model.eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    kw = dict(num_perturbations=16, lam_ratio=0.01, progress=False, max_iter=20_000, tol=1e-10)
    folded = chip_ext.distill(model, images, layer, checkpoint=tmp_path / "f.ckpt", **kw)
    plain = chip_ext.distill(model, images, layer, checkpoint=tmp_path / "p.ckpt", fold=False, **kw)
    assert folded.meta["fold"] == {layer: f"folded: {ops}"}
    assert plain.meta["fold"] == {layer: "not folded: fold=False"}
    keys = ("layers", "classes", "num_perturbations", "sigma", "max_drop", "target", "seed", "model", "gates",
            "autocast", "shard_accumulators")  # the configuration a checkpoint is written with
    sums = [read_checkpoint(tmp_path / f, {k: folded.meta[k] for k in keys})["layers"][layer]["acc"]
            for f in ("f.ckpt", "p.ckpt")]
    for got, ref, what in zip(*sums, ("G", "b", "y", "n", "zs", "gs")):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-9 * float(ref.abs().max()), msg=f"{name}: {what}")
    if name == "vgg":  # K=16 against 8 x 16 samples: W is unique (the others are underdetermined here)
        scale = float(plain.weights[layer].abs().max())
        torch.testing.assert_close(folded.weights[layer], plain.weights[layer], rtol=0, atol=2e-3 * scale)
    torch.testing.assert_close(folded.feature_means[layer], plain.feature_means[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:layer .* the Lasso is underdetermined")
def test_a_layer_that_does_not_fold_runs_the_gated_copies():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=5).eval()
    imp = chip_ext.distill(model, [torch.randn(2, 3, 32, 32)], "blocks.6", num_perturbations=4, progress=False)
    assert imp.meta["fold"]["blocks.6"].startswith("not folded: conv_head (Conv2d)")
