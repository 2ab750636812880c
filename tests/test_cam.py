"""chip_ext.cam: CHIP behind pytorch-grad-cam's interface, run through pytorch-grad-cam's own flow."""
import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

import chip_ext
from chip_ext.cam import CHIPCAM, ImageCHIPCAM, RegionCHIPCAM


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = __import__("torchvision").models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    imp = chip_ext.distill(model, [x], ["layer3", "layer4"], num_perturbations=8, progress=False)
    return model, x, imp


def test_chipcam_is_chip_explain_in_grad_cam_clothes(setup):
    model, x, imp = setup
    with CHIPCAM(model=model, target_layers=[model.layer4], importance=imp) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(3)])
    ref = chip_ext.explain(model, x, imp, layer="layer4", target=[1, 3]).numpy()
    assert maps.dtype == np.float32 and maps.shape == (2, 64, 64)
    np.testing.assert_array_equal(maps, ref)
    top1 = CHIPCAM(model, [model.layer4], imp)(x, targets=None)  # None: each image's top-1 class
    np.testing.assert_array_equal(top1, chip_ext.explain(model, x, imp, layer="layer4").numpy())
    two = CHIPCAM(model, [model.layer3, model.layer4], imp)(x, [ClassifierOutputTarget(0)] * 2)
    mean = (chip_ext.explain(model, x, imp, layer="layer3", target=0) +
            chip_ext.explain(model, x, imp, layer="layer4", target=0)) / 2
    np.testing.assert_allclose(two, chip_ext.maps.normalize_maps(mean).numpy(), atol=1e-6)


def test_grad_cam_flow_overlay_and_road(setup):
    """pytorch-grad-cam's own helpers on our maps: show_cam_on_image and its ROAD metric with a softmax target."""
    from pytorch_grad_cam.metrics.road import ROADCombined

    model, x, imp = setup
    targets = [ClassifierOutputSoftmaxTarget(2), ClassifierOutputSoftmaxTarget(4)]
    for cls, kw in ((CHIPCAM, {"importance": imp}), (ImageCHIPCAM, {"num_perturbations": 16}),
                    (RegionCHIPCAM, {"num_perturbations": 32})):
        with cls(model=model, target_layers=[model.layer3], **kw) as cam:
            maps = cam(input_tensor=x, targets=targets)
        assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
        rgb = (x[0].permute(1, 2, 0).numpy() - x[0].min().item()) / (x[0].max() - x[0].min()).item()
        overlay = show_cam_on_image(rgb.astype(np.float32), maps[0], use_rgb=True)
        assert overlay.shape == (64, 64, 3) and overlay.dtype == np.uint8
        scores = ROADCombined(percentiles=[20, 80])(x, maps, targets, model)
        assert scores.shape == (2,) and np.isfinite(scores).all()


def test_image_and_region_cams_equal_chip_ext(setup):
    model, x, _ = setup
    t = [ClassifierOutputTarget(1), ClassifierOutputTarget(1)]
    got = ImageCHIPCAM(model, [model.layer4], num_perturbations=16)(x, t)
    ref = chip_ext.image_chip.image_chip(model, x, "layer4", 1, num_perturbations=16).numpy()
    np.testing.assert_array_equal(got, ref)
    got = RegionCHIPCAM(model, [model.layer3], num_perturbations=32)(x, t)
    ref = chip_ext.image_chip.region_chip(model, x, "layer3", 1, num_perturbations=32).numpy()
    np.testing.assert_array_equal(got, ref)


def test_smoothing_options(setup):
    model, x, imp = setup
    t = [ClassifierOutputTarget(0)] * 2
    cam = CHIPCAM(model, [model.layer3], imp)
    aug = cam(x, t, aug_smooth=True)
    eig = cam(x, t, eigen_smooth=True)
    plain = cam(x, t)
    for m in (aug, eig):
        assert m.shape == (2, 64, 64) and m.min() >= 0 and m.max() <= 1 and not np.array_equal(m, plain)
    assert ImageCHIPCAM(model, [model.layer4], num_perturbations=8)(x, t, eigen_smooth=True).shape == (2, 64, 64)
    with pytest.raises(ValueError, match="eigen_smooth projects channel-weighted activations"):
        RegionCHIPCAM(model, [model.layer3], num_perturbations=8)(x, t, eigen_smooth=True)


def test_bad_inputs_and_the_model_is_left_alone(setup):
    model, x, imp = setup
    trained = __import__("torchvision").models.resnet18(num_classes=5).train()
    CHIPCAM(trained, [trained.layer4], Importance_like(imp))(x[:1], None)
    assert trained.training  # pytorch-grad-cam calls model.eval(); chip_ext never changes the model
    with pytest.raises(ValueError, match=r"target_layers \['layer2'\] are not in the importance"):
        CHIPCAM(model, [model.layer2], imp)
    with pytest.raises(ValueError, match="target_layers holds modules that are not in the model"):
        CHIPCAM(model, [torch.nn.Conv2d(1, 1, 1)], imp)
    with pytest.raises(TypeError, match="target_layers must be a non-empty list of modules"):
        CHIPCAM(model, model.layer4, imp)
    with pytest.raises(TypeError, match="integer class `category`"):
        CHIPCAM(model, [model.layer4], imp)(x, [lambda out: out.sum()] * 2)
    with pytest.raises(ValueError, match=r"targets must hold one target per image \(2\); got 1"):
        CHIPCAM(model, [model.layer4], imp)(x, [ClassifierOutputTarget(0)])
    with pytest.raises(TypeError, match="importance must be a chip_ext.Importance"):
        CHIPCAM(model, [model.layer4], {"layer4": 1})


def Importance_like(imp):
    """The same importance without its model fingerprint (another model object with other weights)."""
    return chip_ext.Importance(imp.weights, imp.classes, feature_means=imp.feature_means)
