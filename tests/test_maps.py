"""chip_ext.maps: the shared-activations context that lets every method on a batch use one prefix forward."""
import threading

import torch

import chip_ext
from chip_ext import Importance, baselines, evaluation
from chip_ext.maps import inference_view, layer_activations, shared_activations


def counting(model, layer):
    calls = []
    # fx tracing (the first split at a layer) calls the hook with proxies: count real forwards only
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0]) if isinstance(i[0], torch.Tensor) else None)
    return calls, handle


def imp_for(model):
    g = torch.Generator().manual_seed(0)
    return Importance({"layer1": torch.randn(3, 64, generator=g), "layer4": torch.randn(3, 512, generator=g)},
                      [0, 1, 2])


def test_methods_share_one_prefix_forward_and_give_the_same_maps(resnet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 2])
    imp = imp_for(resnet)

    def all_maps():
        return [chip_ext.explain(resnet, x, imp, target=t), chip_ext.explain(resnet, x, imp, method="refined", target=t),
                baselines.gradcam(resnet, x, "layer4", t), baselines.cam(resnet, x, "layer4", t),
                chip_ext.explain(resnet, x, imp, method="image_chip", layer="layer4", target=t, num_perturbations=8)]

    calls, handle = counting(resnet, "layer4")
    try:
        alone = all_maps()
        assert len(calls) == 5  # each method ran the prefix to layer4 itself (image_chip's suffix starts after it)
        calls.clear()
        with shared_activations():
            shared = all_maps()
        assert len(calls) == 1, calls
    finally:
        handle.remove()
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)


def test_a_new_or_modified_images_tensor_is_computed_again(resnet):
    view = inference_view(resnet)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with shared_activations():
        a1 = layer_activations(view, x, "layer2")
        assert layer_activations(view, x, "layer2") is a1
        y = x.clone()
        a2 = layer_activations(view, y, "layer2")
        assert a2 is not a1 and torch.equal(a2, a1)
        x.mul_(2)  # in place: the held activations are stale
        a3 = layer_activations(view, x, "layer2")
        assert a3 is not a1 and not torch.equal(a3, a1)
    # outside the block nothing is held
    assert layer_activations(view, x, "layer2") is not layer_activations(view, x, "layer2")


def test_the_memo_is_per_thread(resnet):
    view = inference_view(resnet)
    x = torch.randn(1, 3, 32, 32)
    seen = {}
    with shared_activations():
        mine = layer_activations(view, x, "layer1")

        def other():
            seen["a"] = layer_activations(view, x, "layer1")  # no block in this thread: computed anew

        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert seen["a"] is not mine and torch.equal(seen["a"], mine)


def test_evaluate_runs_each_layer_prefix_once_per_batch(resnet):
    """evaluate: chip, refined, gradcam, cam at layer4 on a 4-image data set in 2 batches -> one forward of
    the prefix per batch for the maps (plus evaluate's own forward of the whole model for the top-5)."""
    import numpy as np

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))
            return x, i % 3, np.array([[8, 8, 40, 40]])

    ds = Data()
    imp = imp_for(resnet)
    methods = evaluation.standard_methods(resnet, ["chip", "refined", "gradcam", "cam"], importance=imp,
                                          layer="layer4")
    calls, handle = counting(resnet, "layer4")
    try:
        evaluation.evaluate(resnet, ds, methods, lambda v: v, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2 * 2, calls  # per batch: evaluate's logits + one shared prefix


def test_two_models_on_the_same_images_keep_their_own_activations(resnet):
    import torchvision

    other = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with shared_activations():
        a = layer_activations(inference_view(resnet), x, "layer1")
        b = layer_activations(inference_view(other), x, "layer1")
    assert not torch.equal(a, b)
    with torch.no_grad():
        want = other.layer1(other.maxpool(other.relu(other.bn1(other.conv1(x)))))
    torch.testing.assert_close(b, want)


def test_a_nested_block_shares_the_outer_one(resnet):
    """explain(shrink=True) opens a block of its own; inside evaluate's it must not drop evaluate's activations."""
    view = inference_view(resnet)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with shared_activations():
        outer = layer_activations(view, x, "layer2")
        with shared_activations():
            assert layer_activations(view, x, "layer2") is outer
        assert layer_activations(view, x, "layer2") is outer


def test_a_constant_map_becomes_zeros_after_upsampling():
    """ResNet-18 on 32x32: layer4 is 1x1, every map there is constant. Bilinear upsampling left ~1e-9
    ripples that min-max stretched to full contrast (three distinct values, rows 17-31 at 1.0)."""
    torch.manual_seed(0)
    model = __import__("torchvision").models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    imp = Importance({"layer4": torch.rand(3, 512) + 0.1}, [0, 1, 2])
    maps = {
        "chip": chip_ext.explain(model, x, imp, layer="layer4", target=0),
        "gradcam": baselines.gradcam(model, x, "layer4", 0),
        "cam": baselines.cam(model, x, "layer4", 0),
        "image_chip": chip_ext.explain(model, x, imp, method="image_chip", layer="layer4", target=0,
                                       num_perturbations=8),
    }
    for name, m in maps.items():
        assert m.shape == (2, 32, 32), name
        assert torch.equal(m, torch.zeros_like(m)), f"{name}: {m.unique()[:5].tolist()}"


def test_normalize_maps_keeps_small_real_contrast_and_zeros_rounding_ripples():
    from chip_ext.maps import normalize_maps

    ramp = torch.linspace(0, 1e-3, 16).reshape(1, 4, 4)  # small values, real contrast
    out = normalize_maps(ramp)
    assert out.min() == 0 and out.max() == 1
    flat = torch.full((1, 7, 7), 0.37)
    flat[0, 3, 3] += 6e-8  # two float32 ulps of 0.37: a rounding ripple, not a signal
    assert torch.equal(normalize_maps(flat, (32, 32)), torch.zeros(1, 32, 32))
    one = torch.full((1, 1, 1), 5.0)
    assert torch.equal(normalize_maps(one, (32, 32)), torch.zeros(1, 32, 32))


def test_split_on_binds_the_cached_graphs_to_another_view():
    """distill on another device runs a copy of the model: the graphs traced once on the shared view are
    bound to the copy's modules, not traced again."""
    from chip_ext.maps import split_on

    model = __import__("torchvision").models.resnet18(num_classes=3).eval()
    copy = inference_view(model, private=True)  # another view of the model, as a device copy is
    prefix, suffix = split_on(model, copy, "layer3")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), model(x))
    assert prefix.get_submodule("conv1") is copy.conv1 and suffix.get_submodule("fc") is copy.fc
    shared = split_on(model, inference_view(model), "layer3")
    assert shared[0] is split_on(model, inference_view(model), "layer3")[0]  # the cached pair itself
