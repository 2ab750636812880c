"""chip_ext.distill end to end on small CNNs (CPU)."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import chip_ext
from chip_ext.fingerprints import model_fingerprint
from chip_ext.streaming import images_of
from chip_ext.split import SplitError
from conftest import devices


class Planted(nn.Module):
    """logits = W_true @ GAP(relu(conv(x))): the logits are an exactly known sparse linear map of the
    pooled features at the cut layer `features.1` (no bias)."""

    def __init__(self, K=6, C=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, K, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.randn(K, 3, 3, 3, generator=g))
            self.features[0].bias.copy_(torch.rand(K, generator=g))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(K, C, bias=False)
        W = torch.randn(C, K, generator=g)
        W[torch.rand(C, K, generator=g) < 0.5] = 0.0
        W[:, 0] = torch.tensor([1.5, 0.0, -0.7, 0.0])[:C]
        with torch.no_grad():
            self.fc.weight.copy_(W)
        self.W_true = W

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class PlantedDeep(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> Linear: the logits are an exactly known sparse linear map
    W_true of the pooled features at `features.3` (plus a bias when bias=True). Pooled activations
    share a large mean, so the Lasso's Gram matrix is ill-conditioned (issue 12's case)."""

    def __init__(self, K=16, C=5, seed=4, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, K, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(K, C, bias=bias)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.randn(8, 3, 3, 3, generator=g) / 27 ** 0.5)
            self.features[0].bias.copy_(0.1 * torch.randn(8, generator=g))
            self.features[2].weight.copy_(torch.randn(K, 8, 3, 3, generator=g) / 72 ** 0.5)
            self.features[2].bias.copy_(0.5 * torch.rand(K, generator=g))
            W = torch.randn(C, K, generator=g)
            W[torch.rand(C, K, generator=g) < 0.5] = 0.0
            self.fc.weight.copy_(W)
            if bias:
                self.fc.bias.copy_(torch.randn(C, generator=g))
        self.W_true = W

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def planted_images():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(4)]  # 16 images 12x12


class SmallCNN(nn.Module):
    def __init__(self, C=5):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(12, C)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


class F64(nn.Module):
    """Runs a module in float64 and returns float32: a float32 network's outputs depend on the batch
    size in the last bits (oneDNN picks kernels by shape, ~3e-8 here); this one's do not."""

    def __init__(self, module):
        super().__init__()
        self.m = module.double()

    def forward(self, x):
        return self.m(x.double()).float()


class InvariantCNN(SmallCNN):
    def __init__(self, C=5):
        super().__init__(C)
        self.conv1, self.conv2, self.head = F64(self.conv1), F64(self.conv2), F64(self.head)


def batches(n_batches=5, B=4, size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(n_batches)]


TIGHT = dict(tol=1e-13, max_iter=50_000)


def test_planted_recovery():
    model = Planted()
    # lam small enough to bias the values by ~3e-6, large enough that the Lasso's true zeros are
    # exact zeros (at lam=1e-9 they come out as ~1e-8: the exact solution's O(lam) leakage)
    imp = chip_ext.distill(model, batches(8, 4, 9), "features.1", num_perturbations=24,
                           target="logit", lam=1e-6, progress=False, **TIGHT)
    W = imp.weights["features.1"].double()
    assert torch.equal(W != 0, model.W_true != 0), (W, model.W_true)  # support exact, zeros exact
    torch.testing.assert_close(W, model.W_true.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias+fit_intercept"])
def test_planted_deep_map_at_default_solver_settings(bias):
    """Issue 12's case: K=16, C=5, 16 images, N=48, logit target, lam=1e-9, default tol and max_iter.
    The fixed-rho solver stopped at max_iter 1000 on every class, ~1% off here (3.9% on the issue's
    network); now every class converges to the planted map, and the intercept to the head's bias."""
    model = PlantedDeep(bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence warning
        imp = chip_ext.distill(model, planted_images(), "features.3", num_perturbations=48, target="logit",
                               lam=1e-9, seed=3, progress=False, fit_intercept=bias)
    report = imp.meta["solver"]["features.3"]
    assert report["converged"] and report["not_converged_classes"] == [] and report["message"] is None
    W, W_true = imp.weights["features.3"].double(), model.W_true.double()
    assert float((W - W_true).abs().max() / W_true.abs().max()) <= 1e-5
    if bias:
        torch.testing.assert_close(imp.intercepts["features.3"], model.fc.bias.detach(), rtol=0, atol=1e-5)
        assert imp.meta["fit_intercept"] is True
    else:
        assert imp.intercepts is None


def test_planted_statistics_agree_with_sklearn(tmp_path):
    """The solver on the planted run's real sums against scikit-learn's Lasso on a data set with exactly
    those statistics: fit_intercept False/True x positive False/True, lam from 1e-3 to 0.3 lambda_max."""
    from sklearn.linear_model import Lasso

    from chip_ext.packing import unpack_triu
    from chip_ext.reference import equivalent_data
    from chip_ext.solver import admm_lasso, lambda_max

    ck = tmp_path / "planted.ckpt"
    chip_ext.distill(PlantedDeep(bias=True), planted_images(), "features.3", num_perturbations=48, target="logit",
                     seed=3, progress=False, checkpoint=ck)
    G, b, _, n, zs, gs = torch.load(ck, weights_only=True)["layers"]["features.3"]["acc"]
    G, b, xm, ym = unpack_triu(G, 16) / n[:, None, None], b / n[:, None], zs / n[:, None], gs / n
    for fit_intercept in (False, True):
        means = dict(x_mean=xm, y_mean=ym) if fit_intercept else {}
        for positive in (False, True):
            for ratio in (1e-3, 1e-2, 0.1, 0.3):
                lam = ratio * lambda_max(b, positive=positive, **means)
                W, info = admm_lasso(G, b, lam, fit_intercept=fit_intercept, positive=positive, **means)
                assert bool(info.converged.all())
                for c in range(5):
                    if float(lam[c]) == 0.0:  # positive and no channel raises the score: w = 0 is optimal
                        assert positive and torch.all(W[c] == 0)
                        continue
                    X, y = equivalent_data(G[c], b[c], xm[c] if fit_intercept else None,
                                           ym[c] if fit_intercept else None)
                    ref = Lasso(alpha=float(lam[c]), fit_intercept=fit_intercept, positive=positive, tol=1e-13,
                                max_iter=10**6).fit(X.numpy(), y.numpy())
                    scale = max(float(abs(ref.coef_).max()), 1e-12)
                    err = float((W[c] - torch.from_numpy(ref.coef_)).abs().max()) / scale
                    assert err <= 1e-5, (fit_intercept, positive, ratio, c, err)
                    if fit_intercept:
                        assert abs(float(info.intercept[c]) - ref.intercept_) <= 1e-5 * max(1.0, abs(ref.intercept_))


def test_without_intercept_a_head_bias_leaks_into_the_weights():
    """fit_intercept=False (the paper's Lasso) lets the head's bias leak into W; the default (True,
    issue 13) recovers the planted map."""
    model = PlantedDeep(bias=True)
    imp = chip_ext.distill(model, planted_images(), "features.3", num_perturbations=48, target="logit",
                           lam=1e-9, progress=False, fit_intercept=False)
    W, W_true = imp.weights["features.3"].double(), model.W_true.double()
    assert float((W - W_true).abs().max() / W_true.abs().max()) > 0.1
    default = chip_ext.distill(model, planted_images(), "features.3", num_perturbations=48, target="logit",
                               lam=1e-9, progress=False)
    assert default.meta["fit_intercept"] is True and default.intercepts is not None
    W = default.weights["features.3"].double()
    assert float((W - W_true).abs().max() / W_true.abs().max()) <= 1e-5


def test_positive_weights_and_resolve_from_one_pass(tmp_path):
    """positive and fit_intercept only change the solve: a finished checkpoint re-solves with them,
    equal to a fresh distillation with them."""
    model, data = SmallCNN(), batches(4)
    ck = tmp_path / "run.ckpt"
    common = dict(num_perturbations=6, progress=False, lam_ratio=0.01, target="logit", **TIGHT)
    plain = chip_ext.distill(model, data, "relu2", checkpoint=ck, fit_intercept=False, **common)
    assert bool((plain.weights["relu2"] < 0).any())  # something for positive=True to change
    for kw in (dict(positive=True, fit_intercept=False), dict(fit_intercept=True),
               dict(positive=True, fit_intercept=True)):
        again = chip_ext.distill(model, [], "relu2", checkpoint=ck, **kw, **common)  # no images needed
        fresh = chip_ext.distill(model, data, "relu2", **kw, **common)
        torch.testing.assert_close(again.weights["relu2"], fresh.weights["relu2"], rtol=0, atol=1e-7)
        if kw.get("positive"):
            assert bool((again.weights["relu2"] >= 0).all()) and bool((again.weights["relu2"] > 0).any())
        assert (again.intercepts is not None) == kw.get("fit_intercept", False)
        assert again.meta["positive"] == kw.get("positive", False)


@pytest.mark.filterwarnings("ignore:.*the Lasso is underdetermined")
def test_classes_that_do_not_converge_are_reported_with_a_warning():
    """An underdetermined least-squares problem (6 gated samples, K=8, lam=0) stopped after 2
    iterations: no exact solution on its support to polish, so the classes are not converged."""
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"layer 'conv1': \d of 5 classes did not converge in max_iter=2 ADMM "
                                         r"iterations \(classes \[\d.*\]; worst: class \d, primal residual"):
        imp = chip_ext.distill(InvariantCNN(), [x], "conv1", num_perturbations=3, max_iter=2, lam=0.0,
                               progress=False)
    report = imp.meta["solver"]["conv1"]
    assert not report["converged"] and report["not_converged_classes"]
    assert report["factorizations"] >= 5


def test_old_checkpoint_format_is_refused(tmp_path):
    model = SmallCNN()
    ck = tmp_path / "run.ckpt"
    chip_ext.distill(model, batches(2), "relu2", num_perturbations=4, checkpoint=ck, progress=False)
    state = torch.load(ck, weights_only=True)
    assert state["version"] == 4 and len(state["layers"]["relu2"]["acc"]) == 6
    state["version"] = 2
    state["layers"]["relu2"]["acc"] = state["layers"]["relu2"]["acc"][:4]
    torch.save(state, ck)
    with pytest.raises(ValueError, match=r"format version 2; this chip_ext reads version 4: it was written by an "
                                         r"older chip_ext and lacks the first-moment sums"):
        chip_ext.distill(model, batches(2), "relu2", num_perturbations=4, checkpoint=ck, progress=False)


def test_importance_contents():
    model = SmallCNN()
    imp = chip_ext.distill(model, batches(), ["conv1", "relu2"], num_perturbations=6, classes=[4, 1],
                           class_names=[f"c{i}" for i in range(5)], progress=False)
    assert imp.layers == ["conv1", "relu2"] and imp.classes == [4, 1] and imp.class_names == ["c4", "c1"]
    assert imp.weights["conv1"].shape == (2, 8) and imp.weights["relu2"].shape == (2, 12)
    m = imp.meta
    assert m["images_seen"] == 20 and m["perturbations_per_image"] == 6 and m["seed"] == 0
    assert m["layer_shapes"] == {"conv1": [8, 10, 10], "relu2": [12, 10, 10]}
    assert m["lam_ratio"] == 0.03 and m["fit_intercept"] is True and m["model"] == model_fingerprint(model)
    assert math.isclose(m["sigma_used"]["relu2"], math.sqrt(12 / 4))
    assert set(m["timing_s"]) >= {"prefix", "gate_pool", "suffix", "accumulate", "solve"}
    assert m["solver"]["relu2"]["converged"]
    # lam_ratio=0.03 of lambda_max: at least one channel survives per class, not all of them
    nz = (imp.weights["relu2"] != 0).sum(dim=1)
    assert torch.all(nz >= 1) and torch.all(nz < 12)


def test_same_seed_identical_and_other_seed_differs():
    model = SmallCNN()
    kw = dict(num_perturbations=5, progress=False)
    a = chip_ext.distill(model, batches(), "relu2", seed=7, **kw).weights["relu2"]
    b = chip_ext.distill(model, batches(), "relu2", seed=7, **kw).weights["relu2"]
    c = chip_ext.distill(model, batches(), "relu2", seed=8, **kw).weights["relu2"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(batch_size=1), dict(batch_size=3),
                                    dict(memory_budget=2 * 12 * 10 * 10 * 4)])  # 2 copies per suffix call
def test_independent_of_batch_and_chunk_size(kwargs):
    """Gates keyed by image index and float64 sums: W depends on neither (given a network whose
    outputs do not depend on the batch size, see F64)."""
    model = InvariantCNN()
    common = dict(num_perturbations=7, progress=False, **TIGHT)
    ref = chip_ext.distill(model, batches(), ["conv1", "relu2"], **common)
    other = chip_ext.distill(model, batches(), ["conv1", "relu2"], **common, **kwargs)
    for layer in ref.layers:
        torch.testing.assert_close(other.weights[layer].double(), ref.weights[layer].double(),
                                   rtol=0, atol=1e-10)


class Crashing:
    """Yields the first `crash_after` batches, then raises, like a job killed mid-run."""

    def __init__(self, data, crash_after):
        self.data, self.crash_after = data, crash_after

    def __iter__(self):
        for i, x in enumerate(self.data):
            if i == self.crash_after:
                raise RuntimeError("simulated crash")
            yield x


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    model = SmallCNN()
    # the settings of v0.1's defaults (no intercept, 0.1 λ_max): the test is about the sums, and there
    # the float32 W comes out identical; the current defaults give a less regular problem where the
    # float64 rounding of the sums (order of additions) moves W by up to 1 float32 ulp (7e-9)
    common = dict(num_perturbations=6, progress=False, fit_intercept=False, lam_ratio=0.1, **TIGHT)
    data = batches(6)
    ref = chip_ext.distill(model, data, "relu2", **common)
    ck = tmp_path / "run.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        chip_ext.distill(model, Crashing(data, 3), "relu2", checkpoint=ck, checkpoint_every=0, **common)
    saved = torch.load(ck, weights_only=True)
    assert saved["seen"] == 12 and not saved["complete"]
    resumed = chip_ext.distill(model, data, "relu2", checkpoint=ck, checkpoint_every=0, **common)
    assert resumed.meta["resumed"] and resumed.meta["images_seen"] == 24
    torch.testing.assert_close(resumed.weights["relu2"].double(), ref.weights["relu2"].double(),
                               rtol=0, atol=1e-10)
    # a finished checkpoint re-solves without reading the loader (here: with another lambda)
    again = chip_ext.distill(model, [], "relu2", checkpoint=ck, **(common | {"lam_ratio": 0.5}))
    assert again.meta["images_seen"] == 24
    assert (again.weights["relu2"] != 0).sum() < (ref.weights["relu2"] != 0).sum()


def test_checkpoint_from_other_configuration_is_refused(tmp_path):
    model = SmallCNN()
    ck = tmp_path / "run.ckpt"
    chip_ext.distill(model, batches(2), "relu2", num_perturbations=4, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match=r"different configuration.*num_perturbations.*\(4, 5\)"):
        chip_ext.distill(model, batches(2), "relu2", num_perturbations=5, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match=r"different configuration.*'model'"):
        chip_ext.distill(SmallCNN(C=6), batches(2), "relu2", num_perturbations=4, checkpoint=ck, progress=False)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        chip_ext.distill(model, batches(2), "relu2", checkpoint=tmp_path / "junk.ckpt", progress=False)


def test_mode_restored_and_no_grad():
    model = SmallCNN().train()
    model.head.eval()
    chip_ext.distill(model, batches(1), "relu2", num_perturbations=3, progress=False)
    assert model.training and model.conv1.training and not model.head.training
    assert all(p.grad is None for p in model.parameters())


def test_loader_item_forms():
    x = torch.randn(2, 3, 8, 8)
    assert images_of(x, 0) is x
    assert images_of((x, torch.tensor([1, 2])), 0) is x
    assert images_of([x], 0) is x
    assert images_of({"image": x, "label": 3}, 0) is x
    assert images_of(x[0], 0).shape == (1, 3, 8, 8)
    model = SmallCNN()
    kw = dict(num_perturbations=4, progress=False, **TIGHT)
    a = chip_ext.distill(model, [(b, 0) for b in batches(2)], "relu2", **kw)
    b = chip_ext.distill(model, [{"image": b} for b in batches(2)], "relu2", **kw)
    torch.testing.assert_close(a.weights["relu2"], b.weights["relu2"], rtol=0, atol=0)


def test_progress_bar_reports_rates(capsys):
    chip_ext.distill(SmallCNN(), batches(2), "relu2", num_perturbations=3, progress=True)
    captured = capsys.readouterr()
    assert "distill" in captured.err and "img" in captured.err and "perturbed nets/s" in captured.err
    chip_ext.distill(SmallCNN(), batches(2), "relu2", num_perturbations=3, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_accumulators_that_do_not_fit_fail_before_accumulating(monkeypatch):
    import chip_ext.memory as memory_module

    monkeypatch.setattr(memory_module, "free_bytes", lambda device: 1_000)  # the sums need 3.6 KiB
    with pytest.raises(MemoryError, match=r"accumulators of layer 'relu2' need .* for C=5 classes and K=12 "
                                          r"channels .* but only .* is free on cpu\. Pass fewer classes="):
        chip_ext.distill(SmallCNN(), batches(1), "relu2", num_perturbations=3, progress=False)


# ------------------------------------------------------------------------------- bad inputs


class NaNAt(nn.Module):
    """A layer that writes NaN into the 6th row it sees: image 5 of the stream (the second batch's
    second image) in the prefix, or in a suffix with N=1."""

    def __init__(self, row=5):
        super().__init__()
        self.rows, self.row = 0, row

    def forward(self, x):
        first, self.rows = self.rows, self.rows + x.shape[0]
        if first <= self.row < self.rows:
            x = x.clone()
            x[self.row - first] = float("nan")
        return x


class Untouchable:
    """A loader that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("the loader was read before the arguments were checked")


@pytest.mark.parametrize("layers, kwargs, exc, pattern", [
    ("relu3", {}, SplitError, r"'relu3' is not a module of SmallCNN.*Did you mean 'relu2'"),
    ("head", {}, ValueError, r"layer 'head' outputs \[4, 5\]; CHIP needs a convolutional feature map"),
    ([], {}, ValueError, "layers must be a module name or a non-empty list"),
    ("relu2", dict(num_perturbations=0), ValueError, "num_perturbations must be an int >= 1; got 0"),
    ("relu2", dict(num_perturbations=1), ValueError, "num_perturbations must be >= 2: it counts the unperturbed"),
    ("relu2", dict(max_drop=0.0), ValueError, r"max_drop must be a finite number > 0 and <= 1.0; got 0.0"),
    ("relu2", dict(classes=[0, -1]), ValueError, r"classes must be model output indices >= 0; got \[-1\]"),
    ("relu2", dict(classes=[1, 2, 1]), ValueError, r"classes has duplicates: \[1\]"),
    ("relu2", dict(autocast_dtype="bf17"), ValueError, r"autocast_dtype must be None, torch.bfloat16 or torch.float16"),
    ("relu2", dict(autocast_dtype=torch.int8), ValueError, r"autocast_dtype must be None.*got torch.int8"),
    ("relu2", dict(num_perturbations=True), ValueError, "num_perturbations must be an int >= 1; got True"),
    ("relu2", dict(sigma=0.0), ValueError, "sigma must be a finite number > 0; got 0.0"),
    ("relu2", dict(rho=-1.0), ValueError, "rho must be a finite number > 0; got -1.0"),
    ("relu2", dict(lam=-0.5), ValueError, "lam must be a finite number >= 0; got -0.5"),
    ("relu2", dict(lam=float("inf")), ValueError, "lam must be a finite number >= 0; got inf"),
    ("relu2", dict(lam_ratio=float("inf")), ValueError, "lam_ratio must be a finite number >= 0; got inf"),
    ("relu2", dict(lam=0.1, lam_ratio=0.1), ValueError, "give lam .* or lam_ratio .*, not both"),
    ("relu2", dict(max_iter=0), ValueError, "max_iter must be an int >= 1; got 0"),
    ("relu2", dict(tol=0), ValueError, "tol must be a finite number > 0; got 0"),
    ("relu2", dict(max_drop=1.5), ValueError, r"max_drop must be a finite number > 0 and <= 1.0; got 1.5"),
    ("relu2", dict(classes=[]), ValueError, r"classes must be None \(all outputs\) or a non-empty list"),
    ("relu2", dict(classes=[1.7]), TypeError, r"classes must be integer class indices; got \[1.7\]"),
    ("relu2", dict(classes=[True]), TypeError, r"classes must be integer class indices; got \[True\]"),
    ("relu2", dict(classes=[0, 3], class_names=["a", "b", "c"]), ValueError,
     r"class_names must name all the model's outputs or the 2 chosen classes; got 3 names"),
    ("relu2", dict(positive=1), TypeError, "positive must be True or False; got 1"),
    ("relu2", dict(target="softmax"), ValueError, "target must be 'prob', 'logit' or a callable"),
    ("relu2", dict(batch_size=0), ValueError, "batch_size must be an int >= 1; got 0"),
    ("relu2", dict(device="meta"), ValueError, "device='meta' holds no data"),
])
def test_bad_arguments(layers, kwargs, exc, pattern):
    """Issue 14.4: each is refused before the first image is read (they used to fail after the pass)."""
    with pytest.raises(exc, match=pattern):
        # a layer's output shape is known only once an image went through it
        loader = batches(1) if layers == "head" else Untouchable()
        chip_ext.distill(SmallCNN(), loader, layers, progress=False, **kwargs)


def test_arguments_checked_at_the_first_batch():
    with pytest.raises(ValueError, match=r"classes \[5\] are out of range: the model has 5 outputs"):
        chip_ext.distill(SmallCNN(), batches(1), "relu2", classes=[0, 5], progress=False)
    with pytest.raises(ValueError, match=r"class_names must name all 5 outputs or the 5 chosen classes; got 3 names"):
        chip_ext.distill(SmallCNN(), batches(1), "relu2", class_names=["a", "b", "c"], progress=False)


def test_checkpoint_that_cannot_be_written_is_refused_before_the_pass(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint .*file/run.ckpt cannot be written: .*file is a file, not a folder"):
        chip_ext.distill(SmallCNN(), Untouchable(), "relu2", checkpoint=blocker / "run.ckpt", progress=False)
    with pytest.raises(ValueError, match=r"checkpoint .* is a folder"):
        chip_ext.distill(SmallCNN(), Untouchable(), "relu2", checkpoint=tmp_path, progress=False)
    # a read-only folder: root writes into one anyway (CI runs as root), so the refusal the OS would give
    # is raised by the probe file's creation
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "mkstemp", refuse)
        with pytest.raises(ValueError, match=r"checkpoint .*ro/run.ckpt cannot be written: Permission denied"):
            chip_ext.distill(SmallCNN(), Untouchable(), "relu2", checkpoint=tmp_path / "ro" / "run.ckpt",
                             progress=False)


def test_empty_loader():
    with pytest.raises(ValueError, match="the loader produced no images"):
        chip_ext.distill(SmallCNN(), [], "relu2", progress=False)


@pytest.mark.parametrize("item, pattern", [
    ("not an image", r"loader item 0 is a str; expected an image tensor"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), r"loader item 0 holds a 4-D torch.uint8 tensor"),
    (torch.zeros(8, 8), r"loader item 0 holds a 2-D"),
])
def test_non_image_batches(item, pattern):
    with pytest.raises(TypeError, match=pattern):
        chip_ext.distill(SmallCNN(), [item], "relu2", progress=False)


def test_nan_in_activations_names_the_image():
    model = SmallCNN()
    model.conv2 = nn.Sequential(NaNAt(), model.conv2)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in the activations of layer 'relu2' for image 5"):
        chip_ext.distill(model, batches(3), "relu2", num_perturbations=3, progress=False)


def test_nan_in_scores_names_the_image():
    model = SmallCNN()
    model.head = nn.Sequential(NaNAt(row=10), model.head)  # N=2: row 10 is image 5's unperturbed network
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in the scores after perturbing layer 'relu2' for image 5"):
        chip_ext.distill(model, batches(3), "relu2", num_perturbations=2, progress=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("where", ["middle", "last"])
def test_nan_is_found_one_batch_late_on_the_gpu_and_never_saved(device, where, tmp_path):
    """On a GPU a batch's NaN/Inf flag is read at the end of the next batch (no device sync per batch):
    the run still stops naming the image, also when the NaN is in the last batch, and a checkpoint
    written every batch never holds the bad batch's sums."""
    model = SmallCNN()
    data = batches(3)
    row = 5 if where == "middle" else 9  # batch 2 of 3, or batch 3 (the last)
    model.conv2 = nn.Sequential(NaNAt(row=row), model.conv2)
    ck = tmp_path / "run.ckpt"
    with pytest.raises(FloatingPointError, match=rf"NaN or Inf in the activations of layer 'relu2' for image {row}"):
        chip_ext.distill(model, data, "relu2", num_perturbations=3, progress=False, device=device,
                         checkpoint=ck, checkpoint_every=0)
    state = torch.load(ck, weights_only=True)  # checkpoint_every=0: one after every good batch
    assert state["position"] == 4 * (row // 4)  # the batches before the bad one, not it
    assert all(bool(torch.isfinite(t).all()) for t in state["layers"]["relu2"]["acc"])


def test_untraceable_model_says_why():
    class Branchy(SmallCNN):
        def forward(self, x):
            if x.sum() > 0:  # control flow on tensor values
                x = x * 2
            return super().forward(x)

    with pytest.raises(SplitError, match="torch.fx could not trace Branchy"):
        chip_ext.distill(Branchy(), batches(1), "relu2", progress=False)


def test_unclean_cut_lists_valid_ones():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            y = self.a(x)
            z = self.b(y) + y  # skip connection around b
            return self.head(z.mean(dim=(2, 3)))

    with pytest.raises(SplitError, match=r"cannot cut Skip cleanly at 'b': a computed before it is used after it.*Clean cut points near it: 'a'"):
        chip_ext.distill(Skip(), batches(1), "b", progress=False)


def test_fewer_samples_than_channels_warns():
    x = torch.randn(2, 3, 10, 10)
    with pytest.warns(UserWarning, match=r"layer 'conv1': 2 images x N=3 = 6 gated samples for K=8 channels: "
                                         r"the Lasso is underdetermined"):
        chip_ext.distill(InvariantCNN(), [x], "conv1", num_perturbations=3, progress=False)


def test_resume_with_other_weights_is_refused(tmp_path):
    """Issue 14.1: the same architecture with other weights resumed a checkpoint and mixed two
    networks' sums (max |dW| 0.033 where max |W| was 0.024). The fingerprint now hashes the values."""
    a, b = SmallCNN(), SmallCNN()
    with torch.no_grad():
        b.conv2.weight.add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(SmallCNN())  # same values, same fingerprint
    ck = tmp_path / "run.ckpt"
    data = batches(6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        chip_ext.distill(a, Crashing(data, 3), "relu2", num_perturbations=4, checkpoint=ck, checkpoint_every=0,
                         progress=False)
    with pytest.raises(ValueError, match=r"different configuration.*'model'"):
        chip_ext.distill(b, data, "relu2", num_perturbations=4, checkpoint=ck, progress=False)
    resumed = chip_ext.distill(a, data, "relu2", num_perturbations=4, checkpoint=ck, progress=False)
    assert resumed.meta["resumed"]


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        return self.head(self.drop(x.mean(dim=(2, 3))))


def test_distill_leaves_the_model_alone():
    """Issue 14.2-3: no eval()/train() flips and no .to() on the user's model, whatever happens:
    a forward hook sees the user's model in train mode during the pass, BatchNorm statistics do not
    change, and a pass that fails leaves the parameters where and what they were."""
    model = BNNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    seen = []
    model.bn.register_forward_hook(lambda m, i, o: seen.append((model.training, model.bn.training, m.training)))
    chip_ext.distill(model, batches(2), "relu", num_perturbations=4, progress=False)
    assert seen and all(user and bn and not view for user, bn, view in seen)  # the view ran in eval mode
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean/var, num_batches_tracked untouched
    with pytest.raises(RuntimeError, match="simulated crash"):
        chip_ext.distill(model, Crashing(batches(4), 1), "relu", num_perturbations=4, progress=False)
    assert [p for p in model.parameters()] == params and all(p.device.type == "cpu" for p in params)
    with pytest.raises(ValueError, match=r"device='meta' holds no data"):
        chip_ext.distill(model, batches(2), "relu", num_perturbations=4, progress=False, device="meta")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.conv.weight, before["conv.weight"])


def test_target_callable_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"target: the callable must map logits \[M, C_out\] = \[24, 5\] to scores "
                                         r"of the same shape; it returned \[24, 2\]"):
        chip_ext.distill(SmallCNN(), batches(1), "relu2", num_perturbations=6, progress=False,
                         target=lambda logits: logits[:, :2])


@pytest.mark.parametrize("B, N, copies, start", [(3, 5, 2, 0), (3, 5, 5, 1), (4, 3, 7, 1), (2, 4, 1, 3), (1, 1, 1, 1),
                                                 (5, 4, 9, 0)])
def test_suffix_pieces_cover_every_copy_once(B, N, copies, start):
    from chip_ext.memory import suffix_pieces

    seen = []
    for i0, i1, n0, n1 in suffix_pieces(B, N, copies, start):
        assert (i1 - i0) * (n1 - n0) <= copies and (i1 - i0 == 1 or (n0, n1) == (0, N))
        seen += [i * N + n for i in range(i0, i1) for n in range(n0, n1)]
    assert seen == list(range(start, B * N))


class Recorder(nn.Module):
    """Records the batch size of every call (the number of gated copies per suffix call)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return x


def test_memory_budget_counts_the_suffix_activations():
    """Issue 14.7: the budget sized the gated copies only, so a suffix that widens the activations
    (first-layer distillation: the suffix is nearly the whole network) ran out of memory on a GPU."""
    model = SmallCNN()
    rec = Recorder()
    wide = nn.Conv2d(12, 12 * 32, 1)  # 32x the cut's activations inside the suffix
    model.relu2 = nn.Sequential(nn.ReLU(), rec, wide, nn.Conv2d(12 * 32, 12, 1))
    copy = 12 * 10 * 10 * 4  # bytes of one gated copy at the cut (conv2's output)
    chip_ext.distill(model, batches(1), "conv2", num_perturbations=8, progress=False, memory_budget=8 * copy)
    assert rec.sizes[0] == 1  # the first copy is measured
    # one copy takes the gated input + wide's input and output (33x a copy): no call takes 8 copies now
    assert max(rec.sizes[1:]) < 8 and sum(rec.sizes) == 4 * 8


def test_sigma_per_layer_and_a_warning_when_h_collapses():
    """Issue 14.7: one absolute sigma for every layer: at the wider layer h of every perturbed network
    is ~0 and the fit sees only the unperturbed one; sigma can be given per layer, and distill warns."""
    model = SmallCNN()  # conv1: K=8, relu2: K=12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imp = chip_ext.distill(model, batches(2), ["conv1", "relu2"], num_perturbations=6, sigma=0.3, progress=False)
    messages = [str(w.message) for w in caught]
    for layer, K in (("conv1", 8), ("relu2", 12)):
        assert any(f"layer {layer!r}: the proximity weights" in m and f"sigma=0.3 at K={K}" in m for m in messages)
    assert imp.meta["sigma_used"] == {"conv1": 0.3, "relu2": 0.3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imp = chip_ext.distill(model, batches(2), ["conv1", "relu2"], num_perturbations=6,
                               sigma={"conv1": 1.5}, progress=False)
    assert imp.meta["sigma_used"] == {"conv1": 1.5, "relu2": math.sqrt(12 / 4)}
    with pytest.raises(ValueError, match=r"sigma has layers \['fc'\] that are not in layers"):
        chip_ext.distill(model, Untouchable(), "relu2", sigma={"fc": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"sigma\['relu2'\] must be a finite number > 0; got -1"):
        chip_ext.distill(model, Untouchable(), "relu2", sigma={"relu2": -1}, progress=False)


@pytest.mark.parametrize("sigma, target", [(None, "prob"), (1.2, "prob"), (None, "callable")])
def test_matches_a_brute_force_eq_11_with_sklearn(sigma, target):
    """Issue 14.12: ignoring the loyalty weights f or the proximity weights h, or a softmax over the
    chosen classes only, passed every other test. Here each perturbed network is run in full with a
    forward hook that gates the layer (the same gates), and eq. 11 is solved per class by
    scikit-learn's Lasso with sample_weight = f h; distill must give the same W."""
    from sklearn.linear_model import Lasso

    from chip_ext.gates import default_sigma, proximity, sample_gates

    model, layer, classes, N, lam = InvariantCNN(), "relu2", [1, 3], 12, 2e-4
    x = torch.randn(10, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    fn = (lambda logits: torch.sigmoid(logits) * 2.0) if target == "callable" else target
    imp = chip_ext.distill(model, [x[:4], x[4:]], layer, classes=classes, num_perturbations=N, sigma=sigma,
                           target=fn, lam=lam, progress=False, fit_intercept=False, **TIGHT)  # eq. 11 as written
    module = model.relu2
    gate = {}
    handle = module.register_forward_hook(lambda m, i, out: out * gate["d"][:, :, None, None] if "d" in gate else None)
    try:
        with torch.no_grad():
            feats = {}
            h2 = module.register_forward_hook(lambda m, i, o: feats.setdefault("A", o.detach().clone()))
            logits0 = model(x)
            h2.remove()
            A = feats["A"]
            K = A.shape[1]
            gates = sample_gates(range(10), N, K, seed=0, layer=layer, device="cpu")  # [10, N, K]
            scores = []
            for n in range(N):
                gate["d"] = gates[:, n].float()
                out = model(x)
                scores.append(torch.softmax(out, -1) if target == "prob" else fn(out))
            gate.pop("d")
    finally:
        handle.remove()
    g = torch.stack(scores, dim=1)  # [10, N, C_out]
    f = torch.softmax(logits0, -1)  # loyalty: the unperturbed probabilities over all outputs
    h = proximity(gates, sigma if sigma is not None else default_sigma(K))  # [10, N]
    z = gates.double() * A.double().mean(dim=(2, 3))[:, None, :]  # [10, N, K]
    for row, c in enumerate(classes):
        sw = (f[:, c, None] * h).reshape(-1).double().numpy()
        ref = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(
            z.reshape(-1, K).numpy(), g[..., c].reshape(-1).double().numpy(), sample_weight=sw).coef_
        got = imp.weights[layer][row].double().numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (c, got, ref)
        # the feature means behind the effect ranking: Σ f h z / Σ f h
        mean = (sw[:, None] * z.reshape(-1, K).numpy()).sum(0) / sw.sum()
        assert np.allclose(imp.feature_means[layer][row].double().numpy(), mean, rtol=1e-5, atol=0)
    # and each weight matters: dropping f or h, or a softmax over the chosen classes only, moves W
    for wrong in ("no f", "no h", "chosen softmax"):
        row, c = 1, classes[1]
        fw = torch.ones_like(f[:, c]) if wrong == "no f" else f[:, c]
        hw = torch.ones_like(h) if wrong == "no h" else h
        y = g[..., c]
        if wrong == "chosen softmax" and target == "prob":
            y = torch.softmax(torch.log(g[..., classes]), -1)[..., 1]
        sw = (fw[:, None] * hw).reshape(-1).double().numpy()
        other = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(
            z.reshape(-1, K).numpy(), y.reshape(-1).double().numpy(), sample_weight=sw).coef_
        got = imp.weights[layer][row].double().numpy()
        if wrong != "chosen softmax" or target == "prob":
            assert np.abs(got - other).max() > 1e-3 * np.abs(other).max(), wrong


@pytest.mark.parametrize("device", devices())
def test_same_importance_on_every_device(device, tmp_path):
    """distill(device=...) on the GPU (CUDA gate_pool / gram_accumulate, float32 per-batch stages, the
    solve on the GPU) gives the CPU's W, intercepts and λ from the same images and gates; the user's
    model stays where it was, and the GPU's checkpoint re-solves on the CPU to the same W.
    cuDNN's TF32 convolutions are switched off here: they change the network's own outputs (~1e-3),
    which is not what this compares."""
    model, data = SmallCNN(), batches(4)
    common = dict(num_perturbations=8, progress=False, lam_ratio=0.02, **TIGHT)
    cpu = chip_ext.distill(model, data, ["relu1", "relu2"], device="cpu", **common)
    ck = tmp_path / "run.ckpt"
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        dev = chip_ext.distill(model, data, ["relu1", "relu2"], device=device, checkpoint=ck, **common)
    assert next(model.parameters()).device.type == "cpu"
    assert dev.meta["device"].startswith(device)
    for layer in ("relu1", "relu2"):
        W, ref = dev.weights[layer].cpu().double(), cpu.weights[layer].double()
        assert float((W - ref).norm() / ref.norm()) < 1e-4, layer
        assert int(((W > 0) & (ref < 0)).sum() + ((W < 0) & (ref > 0)).sum()) == 0, layer  # no sign flips
        torch.testing.assert_close(dev.intercepts[layer].cpu().double(), cpu.intercepts[layer].double(),
                                   rtol=1e-4, atol=1e-6)
        # λ = lam_ratio · λ_max ∝ max |b|: the float32 stages move it as much as W (2e-5 seen on an H200)
        torch.testing.assert_close(torch.as_tensor(dev.meta["lam_per_class"][layer]).double(),
                                   torch.as_tensor(cpu.meta["lam_per_class"][layer]).double(), rtol=1e-4, atol=0)
    again = chip_ext.distill(model, [], ["relu1", "relu2"], device="cpu", checkpoint=ck, **common)
    for layer in ("relu1", "relu2"):
        W, ref = again.weights[layer].double(), dev.weights[layer].cpu().double()
        assert float((W - ref).norm() / ref.norm()) < 1e-6, layer


def test_an_empty_batch_is_skipped():
    """An empty first batch raised IndexError: index 0 is out of bounds."""
    data = batches(2)
    ref = chip_ext.distill(SmallCNN(), data, "relu2", num_perturbations=4, progress=False)
    empty = torch.empty(0, 3, 10, 10)
    imp = chip_ext.distill(SmallCNN(), [empty, data[0], empty, data[1]], "relu2", num_perturbations=4, progress=False)
    assert torch.equal(imp.weights["relu2"], ref.weights["relu2"]) and imp.meta["images_seen"] == 8


def test_no_channel_switched_off_warns():
    """max_drop too small for K: every gate is all ones and W was fitted without a word."""
    with pytest.warns(UserWarning, match=r"layer 'relu2': no perturbation of the first batch switched a channel off "
                                         r"\(max_drop=0.01 of K=12"):
        chip_ext.distill(SmallCNN(), batches(1), "relu2", num_perturbations=4, max_drop=0.01, progress=False)


def test_gates_that_do_not_fit_fail_before_they_are_allocated(monkeypatch):
    """N = 2,000,000 at K = 512 tried to allocate 8 GB of gates."""
    from chip_ext import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 64 << 20)
    with pytest.raises(MemoryError, match=r"the gates and proximity weights of 4 images x N=2000000 perturbations "
                                          r"x K=12 channels need 152.6 MiB, but only 64.0 MiB is free"):
        chip_ext.distill(SmallCNN(), batches(1), "relu2", num_perturbations=2_000_000, progress=False)


def test_images_of_another_dtype_than_the_model_say_so():
    """float64 images into a float32 model failed with 'Input type (double) and bias type (float)'."""
    with pytest.raises(TypeError, match=r"the loader's images are torch.float64 but the model's weights are "
                                        r"torch.float32.*images.to\(torch.float32\)"):
        chip_ext.distill(SmallCNN(), [b.double() for b in batches(1)], "relu2", num_perturbations=4, progress=False)
    with pytest.raises(TypeError, match=r"images are torch.float32 but the model's weights are torch.float16"):
        chip_ext.distill(SmallCNN().half(), batches(1), "relu2", num_perturbations=4, progress=False)


def test_classes_are_checked_after_one_suffix_copy():
    """Out-of-range classes were found only after the first batch's whole work."""
    calls = []
    model = SmallCNN()
    model.head.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    with pytest.raises(ValueError, match=r"classes \[7\] are out of range: the model has 5 outputs"):
        chip_ext.distill(model, batches(1), "relu2", classes=[0, 7], num_perturbations=50, progress=False,
                         fold=False)
    assert calls == [1]  # one gated copy ran, not the batch's 4 x 50
    from chip_ext.fold import Fold

    folded = []
    original = Fold.logits
    try:
        Fold.logits = lambda self, A, gates: folded.append(A.shape[0] * gates.shape[1]) or original(self, A, gates)
        with pytest.raises(ValueError, match=r"classes \[7\] are out of range"):
            chip_ext.distill(model, batches(1), "relu2", classes=[0, 7], num_perturbations=50, progress=False)
    finally:
        Fold.logits = original
    assert folded == [1]  # the folded path checks them on one network too


def test_uint8_images_normalised_on_the_device():
    """normalize=(mean, std): the loader's uint8 images go to the device as they are and are normalised
    there; W equals that of the same images normalised beforehand."""
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (4, 3, 10, 10), generator=g, dtype=torch.uint8) for _ in range(3)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    ready = [(x.float() / 255 - m) / s for x in raw]
    kw = dict(num_perturbations=6, progress=False, **TIGHT)
    ref = chip_ext.distill(SmallCNN(), ready, "relu2", **kw)
    got = chip_ext.distill(SmallCNN(), raw, "relu2", normalize=(mean, std), **kw)
    torch.testing.assert_close(got.weights["relu2"], ref.weights["relu2"], rtol=1e-4, atol=1e-6)
    floats = chip_ext.distill(SmallCNN(), [x.float() / 255 for x in raw], "relu2", normalize=(mean, std), **kw)
    torch.testing.assert_close(floats.weights["relu2"], ref.weights["relu2"], rtol=1e-4, atol=1e-6)
    assert got.meta["normalize"] == [list(mean), list(std)]
    with pytest.raises(TypeError, match=r"uint8 images: pass distill's normalize=\(mean, std\)"):
        chip_ext.distill(SmallCNN(), raw, "relu2", **kw)
    for bad, pattern in [((mean,), r"normalize must be \(mean, std\)"), ((mean, std[:2]), "one number per channel"),
                         ((mean, (0.2, 0.0, 0.2)), "std > 0"), ("imagenet", r"normalize must be \(mean, std\)")]:
        with pytest.raises(ValueError, match=pattern):
            chip_ext.distill(SmallCNN(), raw, "relu2", normalize=bad, **kw)
    with pytest.raises(ValueError, match="normalize has 1 channels but the images have 3"):
        chip_ext.distill(SmallCNN(), raw, "relu2", normalize=((0.5,), (0.5,)), **kw)


def test_device_batches_reads_nothing_ahead_off_the_gpu():
    from chip_ext.distillation.batches import device_batches, loader_images

    read = []

    def loader():
        for i in range(3):
            read.append(i)
            yield (torch.full((2, 3, 4, 4), float(i)), torch.zeros(2)) if i != 1 else torch.zeros(0, 3, 4, 4)

    it = device_batches(loader_images(loader()), torch.device("cpu"))
    first = next(it)
    assert read == [0] and float(first[0, 0, 0, 0]) == 0  # nothing read ahead on the CPU
    assert [float(x[0, 0, 0, 0]) for x in it] == [2.0]  # the empty batch is skipped


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_device_batches_copies_one_batch_ahead_on_a_side_stream():
    """On a GPU each batch arrives on the device equal to the host's, pinned or not, while the next
    batch's copy is already started (the loader read one batch ahead); work queued between batches
    does not disturb a copy in flight."""
    from chip_ext.distillation.batches import device_batches

    host = [torch.randn(64, 3, 224, 224) for _ in range(4)]
    host[1] = host[1].pin_memory()
    read = []

    def images():
        for i, x in enumerate(host):
            read.append(i)
            yield x

    device = torch.device("cuda")
    for i, y in enumerate(device_batches(images(), device)):
        assert read == list(range(min(i + 2, len(host))))
        assert y.device.type == "cuda"
        busy = y @ y.transpose(-1, -2)  # queued work on the current stream
        torch.testing.assert_close(y.cpu(), host[i], rtol=0, atol=0)
        del busy


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_host_batches_copied_ahead_give_the_device_batches_importance():
    """uint8 host batches (copied one batch ahead on a side stream, normalised on the GPU) give the W of the
    same batches handed over already on the GPU (up to the order of the GPU's float sums)."""
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (4, 3, 10, 10), generator=g, dtype=torch.uint8) for _ in range(5)]
    kw = dict(num_perturbations=6, progress=False, device="cuda", normalize=((0.5,) * 3, (0.25,) * 3), **TIGHT)
    host = chip_ext.distill(SmallCNN(), raw, "relu2", **kw)
    on_device = chip_ext.distill(SmallCNN(), [x.cuda() for x in raw], "relu2", **kw)
    torch.testing.assert_close(host.weights["relu2"], on_device.weights["relu2"], rtol=1e-5, atol=1e-7)
    assert host.meta["images_seen"] == on_device.meta["images_seen"] == 20


# ---- gram_accumulate once per many images (buffer.py) ----

def test_statistics_held_for_one_gram_call_give_the_same_sums(monkeypatch, tmp_path):
    """Many batches' statistics go to gram_accumulate in one call (G read and written once), with the
    same sums as one call per batch; a checkpoint written mid-stream holds every image before it."""
    from chip_ext.distillation import buffer
    from chip_ext.kernels import ops

    calls = []
    real = ops.gram_accumulate
    monkeypatch.setattr(ops, "gram_accumulate", lambda *a: (calls.append(a[6].shape[0]), real(*a))[1])
    model, data = InvariantCNN(), batches(n_batches=6, B=3)
    kw = dict(layers=["relu1", "relu2"], num_perturbations=8, progress=False, lam_ratio=0.01)
    held = chip_ext.distill(model, data, **kw)
    assert sorted(calls) == [18, 18]  # one call per layer for the 18 images

    calls.clear()
    monkeypatch.setattr(buffer, "GRAM_IMAGES_MAX", 1)
    each = chip_ext.distill(model, data, **kw)
    assert calls == [3] * 12  # one call per batch and layer
    for layer in kw["layers"]:
        torch.testing.assert_close(held.weights[layer], each.weights[layer], rtol=0, atol=1e-6)

    calls.clear()
    monkeypatch.setattr(buffer, "GRAM_IMAGES_MAX", 4)  # a call every 2 batches (6 images), the rest at the end
    ck = tmp_path / "run.ckpt"

    def interrupted():  # the process dies after 3 batches
        yield from data[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chip_ext.distill(model, interrupted(), checkpoint=ck, checkpoint_every=0.0, **kw)  # a save every batch
    assert calls == [3] * 6  # each save adds the held images first: the checkpoint holds 9 images
    calls.clear()
    resumed = chip_ext.distill(model, data, checkpoint=ck, checkpoint_every=3600.0, **kw)
    assert resumed.meta["resumed_at_image"] == 9
    assert calls == [6, 6, 3, 3]  # per layer: batches 4-5 once 4 images are in, batch 6 at the end
    for layer in kw["layers"]:
        torch.testing.assert_close(resumed.weights[layer], each.weights[layer], rtol=0, atol=1e-6)


def test_gram_limit_counts_the_statistics_bytes():
    from chip_ext.distillation.buffer import GRAM_IMAGES_MAX, gram_limit

    per_image = 4 * (512 + 100 + 1000 + 100 * 1000) + 100 * 512  # a, h, f, g float32 + gates bool
    assert gram_limit(512, 100, 1000, 64 * per_image) == 64
    assert gram_limit(512, 100, 1000, 1) == 1
    assert gram_limit(512, 100, 1000, 1 << 40) == GRAM_IMAGES_MAX


# ---- channels_last images (the model unchanged) ----

class FlattensItsInput(nn.Module):
    """x.view(B, -1) of the images: fails on channels_last images (the stride pattern), fine on NCHW."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = x.view(x.shape[0], -1).view(x.shape[0], 3, 8, 8)
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_channels_last_gives_the_sums_of_nchw_up_to_rounding():
    data = batches(n_batches=3, B=4)
    kw = dict(layers=["relu1", "relu2"], num_perturbations=8, progress=False)
    nhwc = chip_ext.distill(SmallCNN(), data, **kw)
    nchw = chip_ext.distill(SmallCNN(), data, channels_last=False, **kw)
    assert nhwc.meta["channels_last"] is True and nchw.meta["channels_last"] is False
    for layer in kw["layers"]:
        torch.testing.assert_close(nhwc.weights[layer], nchw.weights[layer], rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="channels_last must be True or False; got 'yes'"):
        chip_ext.distill(SmallCNN(), data, channels_last="yes", **kw)


def test_channels_last_falls_back_where_the_model_cannot_take_it(capfd):
    """A model that .view()s its input runs on the loader's NCHW images instead, says so in meta, prints nothing."""
    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    kw = dict(layers="conv", num_perturbations=8, progress=False)
    model = FlattensItsInput()
    fell_back = chip_ext.distill(model, data, **kw)
    assert fell_back.meta["channels_last"].startswith("off: the model failed on channels_last images (view size")
    assert capfd.readouterr().err == ""
    nchw = chip_ext.distill(model, data, channels_last=False, **kw)
    assert torch.equal(fell_back.weights["conv"], nchw.weights["conv"])
    two = {**kw, "layers": ["conv", "relu"]}  # switched off at the first layer: the second gets NCHW images too
    both, both_nchw = chip_ext.distill(model, data, **two), chip_ext.distill(model, data, channels_last=False, **two)
    for layer in two["layers"]:
        assert torch.equal(both.weights[layer], both_nchw.weights[layer])
