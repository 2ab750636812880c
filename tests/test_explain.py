"""chip_ext.explain: CHIP, Refined CHIP and Guided CHIP maps."""
import pytest
import torch

import chip_ext
from chip_ext import Importance, baselines as bl
from conftest import devices


@pytest.fixture(scope="module")
def model(resnet):
    return resnet


@pytest.fixture(scope="module")
def importance():
    g = torch.Generator().manual_seed(2)
    W = {"layer1": torch.randn(3, 64, generator=g), "layer4": torch.randn(3, 512, generator=g)}
    return Importance(W, [3, 7, 11], class_names=["three", "seven", "eleven"])


def images(B=2, size=64):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))


def hooked(model, layer, x):
    feats = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: feats.setdefault("A", o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return feats["A"]


@pytest.mark.parametrize("layer", ["layer1", "layer4"])
def test_chip_map_is_relu_of_weighted_channels(model, importance, layer):
    x, t = images(), [7, 11]
    A = hooked(model, layer, x)  # independently, from a forward hook
    W = importance.weights[layer][[1, 2]]
    manual = torch.relu(torch.einsum("bk,bkhw->bhw", W, A))
    manual = torch.nn.functional.interpolate(manual[:, None], size=(64, 64), mode="bilinear",
                                             align_corners=False)[:, 0]
    lo = manual.amin(dim=(1, 2), keepdim=True)
    hi = manual.amax(dim=(1, 2), keepdim=True)
    manual = (manual - lo) / (hi - lo)
    ours = chip_ext.explain(model, x, importance, layer=layer, target=t)
    assert ours.shape == (2, 64, 64) and ours.device == x.device
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-5)


def test_default_layer_is_last_in_forward_order(model):
    imp = Importance({"layer4": torch.rand(1, 512), "layer1": torch.rand(1, 64)}, [5])
    x = images()
    torch.testing.assert_close(chip_ext.explain(model, x, imp, target=5),
                               chip_ext.explain(model, x, imp, layer="layer4", target=5))


def test_refined_is_product_of_first_and_last(model, importance):
    x = images()
    first = chip_ext.explain(model, x, importance, layer="layer1", target="seven")
    last = chip_ext.explain(model, x, importance, layer="layer4", target="seven")
    refined = chip_ext.explain(model, x, importance, method="refined", target="seven")
    product = first * last
    lo = product.flatten(1).min(1).values[:, None, None]
    hi = product.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(refined, (product - lo) / (hi - lo))  # the product, min-max again
    assert float(product.flatten(1).max(1).values.min()) < 0.999  # the product alone does not reach 1
    assert torch.allclose(refined.flatten(1).max(1).values, torch.ones(2)) and float(refined.min()) == 0


def _minmax(m):
    lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
    return (m - lo) / (hi - lo)


def test_fused_is_the_geometric_or_arithmetic_mean_of_the_layers_maps(model, importance):
    x = images()
    first = chip_ext.explain(model, x, importance, layer="layer1", target="seven")
    last = chip_ext.explain(model, x, importance, layer="layer4", target="seven")
    geo = chip_ext.explain(model, x, importance, method="fused", target="seven", layers=["layer4", "layer1"])
    torch.testing.assert_close(geo, _minmax((first * last).sqrt()), rtol=0, atol=1e-5)
    mean = chip_ext.explain(model, x, importance, method="fused", target="seven", layers=["layer1", "layer4"],
                            rule="mean")
    torch.testing.assert_close(mean, _minmax(first + last), rtol=0, atol=1e-5)
    one = chip_ext.explain(model, x, importance, method="fused", target="seven", layers=["layer4"])
    torch.testing.assert_close(one, last, rtol=0, atol=1e-6)  # one layer: its CHIP map
    # the geometric mean's level sets are the product's: the same regions as Refined CHIP, other grey levels
    refined = chip_ext.explain(model, x, importance, method="refined", target="seven")
    torch.testing.assert_close(_minmax(geo ** 2), refined, rtol=0, atol=1e-4)


def test_fused_default_layers_are_the_last_and_the_first_at_its_resolution(model):
    g = torch.Generator().manual_seed(4)
    imp = Importance({"layer1": torch.randn(2, 64, generator=g), "layer4.0": torch.randn(2, 512, generator=g),
                      "layer4": torch.randn(2, 512, generator=g)}, [3, 7])
    x = images()
    from chip_ext.explanation.explain import fusion_layers

    assert fusion_layers(model, imp, size=(64, 64)) == ["layer4.0", "layer4"]  # layer1's map 16x16, theirs 2x2
    assert fusion_layers(model, imp) == ["layer4.0", "layer4"]  # a 224 probe: the same layers
    fused = chip_ext.explain(model, x, imp, method="fused", target=7)
    torch.testing.assert_close(fused, chip_ext.explain(model, x, imp, method="fused", target=7,
                                                       layers=["layer4", "layer4.0"]))
    two = Importance({"layer1": imp.weights["layer1"], "layer4": imp.weights["layer4"]}, [3, 7])
    torch.testing.assert_close(chip_ext.explain(model, x, two, method="fused", target=7),  # nothing to fuse
                               chip_ext.explain(model, x, two, layer="layer4", target=7), rtol=0, atol=1e-6)


def test_fused_bad_options(model, importance):
    x = images()
    with pytest.raises(ValueError, match="combines several layers: pass layers="):
        chip_ext.explain(model, x, importance, method="fused", layer="layer4")
    with pytest.raises(ValueError, match=r"layers \['layer2'\] are not in the importance"):
        chip_ext.explain(model, x, importance, method="fused", layers=["layer2", "layer4"])
    with pytest.raises(TypeError, match="layers must be a non-empty list of layer names; got 'layer4'"):
        chip_ext.explain(model, x, importance, method="fused", layers="layer4")
    with pytest.raises(ValueError, match=r"rule must be one of \('geometric', 'mean'\); got 'max'"):
        chip_ext.explain(model, x, importance, method="fused", rule="max")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['cell'\] for method='fused'"):
        chip_ext.explain(model, x, importance, method="fused", cell=2)


def test_guided_chip(model, importance):
    x, t = images(), [3, 7]
    gc = chip_ext.explain(model, x, importance, method="guided_chip", target=t)
    expected = bl.guided_backprop(model, x, t) * chip_ext.explain(model, x, importance, target=t)[:, None]
    assert gc.shape == (2, 3, 64, 64)
    torch.testing.assert_close(gc, expected)


def test_target_forms(model, importance):
    x = images()
    by_index = chip_ext.explain(model, x, importance, target=[7, 11])
    by_name = chip_ext.explain(model, x, importance, target=["seven", "eleven"])
    torch.testing.assert_close(by_index, by_name)
    torch.testing.assert_close(chip_ext.explain(model, x, importance, target=torch.tensor([7, 7])),
                               chip_ext.explain(model, x, importance, target="seven"))


def test_top1_target_must_be_distilled(model, importance):
    with pytest.raises(ValueError, match=r"was not distilled.*distilled classes: \[3, 7, 11\]. Pass target="):
        chip_ext.explain(model, images(), importance)  # random ResNet's top-1 is not among 3, 7, 11


def test_importance_and_model_must_agree(model):
    with pytest.raises(ValueError, match=r"layer 'layer4' of this model has 512 channels .* importance has K=100"):
        chip_ext.explain(model, images(), Importance({"layer4": torch.rand(1, 100)}, [1]), target=1)
    with pytest.raises(ValueError, match=r"importance has layer\(s\) \['blocks.6'\] that this model does not have"):
        chip_ext.explain(model, images(), Importance({"blocks.6": torch.rand(1, 320)}, [1]), target=1)
    with pytest.raises(ValueError, match=r"layer 'layer2' is not in the importance"):
        chip_ext.explain(model, images(), Importance({"layer4": torch.rand(1, 512)}, [1]), layer="layer2", target=1)


def test_bad_arguments(model, importance):
    with pytest.raises(ValueError, match="method must be one of"):
        chip_ext.explain(model, images(), importance, method="gradcam", target=3)
    with pytest.raises(ValueError, match="needs an importance with two layers"):
        chip_ext.explain(model, images(), Importance({"layer4": torch.rand(1, 512)}, [1]), method="refined", target=1)
    with pytest.raises(TypeError, match="importance must be a chip_ext.Importance"):
        chip_ext.explain(model, images(), {"layer4": torch.rand(1, 512)}, target=1)
    with pytest.raises(ValueError, match="target: class .cat. is not among the distilled class names"):
        chip_ext.explain(model, images(), importance, target="cat")


def test_with_a_distilled_importance(model):
    """End to end: distill two layers, then every method runs and gives maps in range."""
    data = [images(2, 48), images(2, 48)]
    imp = chip_ext.distill(model, data, ["layer1", "layer4"], num_perturbations=4, classes=[0, 1],
                           progress=False)
    x = images(2, 48)
    for method in ("chip", "refined"):
        m = chip_ext.explain(model, x, imp, method=method, target=[0, 1])
        assert m.shape == (2, 48, 48) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert chip_ext.explain(model, x, imp, method="guided_chip", target=0).shape == (2, 3, 48, 48)


def test_given_target_runs_only_the_prefix(model, importance):
    """With the class given, no forward beyond the layer is needed (refined once ran two full passes)."""
    calls = []
    h = model.fc.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        chip_ext.explain(model, images(), importance, method="refined", target="seven")
        assert calls == []
    finally:
        h.remove()


def test_threads_on_a_model_in_train_mode(model, importance):
    """Issue 14.2: two threads explaining with the same model in train mode gave 70-80 of 80 maps that
    differed from the serial result, changed BatchNorm's running statistics and left the model in
    eval mode. explain now runs an eval-mode view and never flips the model's mode."""
    import threading

    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        xs = [images(B=2, size=48 + 8 * (i % 3)) for i in range(8)]
        serial = [chip_ext.explain(model, x, importance, target=[3, 7]) for x in xs]
        results, errors = {}, []

        def work(tid):
            try:
                for rep in range(5):
                    for i, x in enumerate(xs):
                        results[(tid, rep, i)] = chip_ext.explain(model, x, importance, target=[3, 7])
            except Exception as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 80
        differ = sum(not torch.equal(m, serial[i]) for (_, _, i), m in results.items())
        assert differ == 0, f"{differ} of 80 maps differ from the serial result"
        assert model.training and all(m.training for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        model.eval()


def test_bad_images_and_targets(model, importance):
    x = images()
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images hold NaN or Inf \(images \[1\] of the batch\)"):
        chip_ext.explain(model, x, importance, target=3)
    with pytest.raises(ValueError, match=r"images hold NaN or Inf"):
        bl.gradcam(model, x, "layer4", target=3)
    with pytest.raises(TypeError, match=r"target must be integer class indices; got \[3.7, 7.0\]"):
        chip_ext.explain(model, images(), importance, target=[3.7, 7.0])
    with pytest.raises(TypeError, match=r"target must be integer class indices"):
        chip_ext.explain(model, images(), importance, target=7.0)
    with pytest.raises(TypeError, match=r"target must be integer class indices"):
        bl.gradcam(model, images(), "layer4", target=torch.tensor([1.5, 2.0]))


def test_image_chip_method_equals_the_function(model, importance):
    """method="image_chip" is chip_ext.image_chip's map: the same Lasso, the options passed through."""
    from chip_ext.image_chip import image_chip

    x = images()
    got = chip_ext.explain(model, x, importance, method="image_chip", layer="layer4", target=[3, 7],
                           num_perturbations=16, lam_ratio=0.05)
    want = image_chip(model, x, "layer4", [3, 7], num_perturbations=16, lam_ratio=0.05)
    assert got.shape == (2, 64, 64)
    assert torch.equal(got, want)
    # a class name resolves through the importance; any output class works without shrink
    by_name = chip_ext.explain(model, x, importance, method="image_chip", layer="layer4", target="seven",
                               num_perturbations=16, lam_ratio=0.05)
    assert torch.equal(by_name[1], want[1])
    other = chip_ext.explain(model, x, importance, method="image_chip", layer="layer4", target=500,
                             num_perturbations=16)
    assert torch.equal(other, image_chip(model, x, "layer4", 500, num_perturbations=16))


def test_image_chip_shrink_uses_the_class_weights_as_prior(model):
    """shrink=True is image_chip with prior = the importance's W rows of the targets, in its score units."""
    from chip_ext.image_chip import image_chip

    g = torch.Generator().manual_seed(5)
    imp = Importance({"layer4": torch.randn(2, 512, generator=g) * 1e-2}, [3, 7], meta={"target": "prob"})
    x = images()
    got = chip_ext.explain(model, x, imp, method="image_chip", layer="layer4", target=[7, 3], shrink=True,
                           num_perturbations=16)
    prior = imp.weights["layer4"][[1, 0]].double()
    want = image_chip(model, x, "layer4", [7, 3], num_perturbations=16, score="prob", prior=prior)
    assert torch.equal(got, want)
    assert not torch.equal(got, image_chip(model, x, "layer4", [7, 3], num_perturbations=16, score="prob"))
    with pytest.raises(ValueError, match=r"shrink=True needs the per-image score to be the importance's target "
                                         r"\('prob'"):
        chip_ext.explain(model, x, imp, method="image_chip", layer="layer4", target=3, shrink=True, score="logit")
    with pytest.raises(ValueError, match=r"shrink=True needs the target among the distilled classes \[3, 7\]"):
        chip_ext.explain(model, x, imp, method="image_chip", layer="layer4", target=500, shrink=True)


def test_image_chip_options_are_checked(model, importance):
    with pytest.raises(TypeError, match=r"options \['num_perturbations'\] are for method='image_chip', "
                                        r"'region_chip' or 'fused' only"):
        chip_ext.explain(model, images(), importance, target=3, num_perturbations=8)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lam'\] for method='image_chip'"):
        chip_ext.explain(model, images(), importance, method="image_chip", target=3, lam=0.1)
    with pytest.raises(TypeError, match="shrink must be True or False; got 'yes'"):
        chip_ext.explain(model, images(), importance, method="image_chip", target=3, shrink="yes")
    with pytest.raises(ValueError, match="num_perturbations must be an int >= 2; got 1"):
        chip_ext.explain(model, images(), importance, method="image_chip", target=3, num_perturbations=1)
    with pytest.raises(ValueError, match="layer 'layer2' is not in the importance"):
        chip_ext.explain(model, images(), importance, method="image_chip", layer="layer2", target=3)


def test_region_chip_method_equals_the_function(model, importance):
    """method="region_chip" is chip_ext.image_chip.region_chip's map; the importance gives the default layer
    and class names only, so any layer of the model works and its own options are checked."""
    from chip_ext.image_chip import region_chip

    x = images()
    got = chip_ext.explain(model, x, importance, method="region_chip", target="seven", num_perturbations=16, cell=1)
    want = region_chip(model, x, "layer4", 7, num_perturbations=16)
    assert got.shape == (2, 64, 64) and torch.equal(got, want)
    other = chip_ext.explain(model, x, importance, method="region_chip", layer="layer2", target=500,
                             num_perturbations=8, cell=4)
    assert torch.equal(other, region_chip(model, x, "layer2", 500, num_perturbations=8, cell=4))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['shrink'\] for method='region_chip'"):
        chip_ext.explain(model, x, importance, method="region_chip", target=3, shrink=True)
    with pytest.raises(ValueError, match="cell must be None or a positive int"):
        chip_ext.explain(model, x, importance, method="region_chip", target=3, cell=0)
    with pytest.raises(ValueError, match="'eight'"):
        chip_ext.explain(model, x, importance, method="region_chip", target="eight")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method, options", [
    ("chip", {}), ("refined", {}), ("image_chip", {"num_perturbations": 32}),
    ("region_chip", {"num_perturbations": 32, "cell": 1}),
])
def test_same_maps_on_every_device(model, importance, device, method, options):
    """A model and images on the GPU (the importance stays on the CPU, as loaded) give the CPU's maps,
    on the images' device. cuDNN's TF32 convolutions are off: they change the network itself."""
    import copy

    x = images()
    want = chip_ext.explain(model, x, importance, method=method, target=[3, 7], **options)
    on = copy.deepcopy(model).to(device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = chip_ext.explain(on, x.to(device), importance, method=method, target=[3, 7], **options)
    assert got.device.type == device and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)


def test_an_importance_of_other_weights_warns_once_and_the_same_weights_do_not():
    import copy
    import warnings

    torch.manual_seed(0)
    model = __import__("torchvision").models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    imp = chip_ext.distill(model, [x], "layer4", classes=[0, 1], num_perturbations=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chip_ext.explain(model, x, imp, target=0)  # the same weights: silent
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.weight.mul_(2)  # changed in place: the fingerprint is computed again
    with pytest.warns(UserWarning, match=r"the importance was distilled on a model with other weights"):
        chip_ext.explain(other, x, imp, target=0)
    with pytest.warns(UserWarning, match=r"other weights"):
        chip_ext.explain(_changed_in_place(model), x, imp, target=0)  # the same object, weights changed


def _changed_in_place(model):
    with torch.no_grad():
        model.layer4[0].conv1.weight.add_(1.0)
    return model


def test_a_dict_output_says_how_to_wrap_the_model():
    """A dict output gave AttributeError: 'dict' object has no attribute 'shape'."""
    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = __import__("torchvision").models.resnet18(num_classes=4)

        def forward(self, x):
            return {"logits": self.net(x), "features": x}

    model, x = Dict().eval(), torch.randn(1, 3, 32, 32)
    imp = Importance({"net.layer4": torch.randn(4, 512)}, [0, 1, 2, 3])
    pattern = (r"Dict.forward returns a dict with keys \['logits', 'features'\]; chip_ext needs a model that returns "
               r"one logits tensor \[B, C\]. Wrap it: chip_ext.select_output\(model, 'logits'\)")
    for call in (lambda m: chip_ext.explain(m, x, imp), lambda m: bl.gradcam(m, x, "net.layer4"),
                 lambda m: bl.guided_backprop(m, x)):
        with pytest.raises((TypeError, ValueError), match=pattern):
            call(model)
    wrapped = chip_ext.select_output(model, "logits")
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in model.named_modules()]
    maps = chip_ext.explain(wrapped, x, imp)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x)["logits"])
    assert maps.shape == (1, 32, 32)


def test_images_of_another_dtype_than_the_model_say_so(model, importance):
    """float64 images with a float32 model failed with torch's 'Input type (double) and bias type (float)'."""
    x = images().double()
    for call in (lambda: chip_ext.explain(model, x, importance, target=3), lambda: bl.gradcam(model, x, "layer4"),
                 lambda: bl.guided_backprop(model, x)):
        with pytest.raises(TypeError, match=r"the images are torch.float64 but the model's weights are "
                                            r"torch.float32.*images.to\(torch.float32\)"):
            call()
