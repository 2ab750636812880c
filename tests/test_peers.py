"""pytorch-grad-cam's CAM family through `chip_ext.peers`: the library's own maps, our conventions,
and the user's model left alone."""
import pytest
import torch

from chip_ext import baselines
from chip_ext.maps import normalize_maps
from chip_ext.peers import CAM_CLASSES, cam_method


def images(B=2, size=64, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CAM_CLASSES))
def test_every_peer_maps_in_range_and_leaves_the_model_alone(resnet, name):
    resnet.train()
    try:
        maps = cam_method(resnet, name, "layer4", batch_size=128)(images(), torch.tensor([1, 2]))
        assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
        assert float(maps.min()) >= 0 and torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
        assert resnet.training and all(m.training for m in resnet.modules())
        assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in resnet.modules())
    finally:
        resnet.eval()


def test_peer_gradcam_is_ours(resnet):
    """The same Grad-CAM through the library and through chip_ext.baselines (same conventions)."""
    x, t = images(), torch.tensor([3, 7])
    peer = cam_method(resnet, "gradcam_pytorch_grad_cam", "layer3")(x, t)
    ours = baselines.gradcam(resnet, x, "layer3", t)
    assert (peer - ours).abs().max() < 2e-3


def test_hirescam_is_the_library_formula(resnet):
    """HiResCAM = ReLU(sum_k grad_k * A_k) elementwise (no spatial averaging of the gradient)."""
    from chip_ext.maps import cached_split, inference_view

    x, t = images(), torch.tensor([3, 7])
    prefix, suffix = cached_split(inference_view(resnet), "layer3")
    A = prefix(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(suffix(A).gather(1, t[:, None]).sum(), A)
    expected = normalize_maps(torch.relu((g * A).sum(1)).detach(), (64, 64))
    got = cam_method(resnet, "hirescam", "layer3")(x, t)
    assert (got - expected).abs().max() < 2e-3


def test_class_agnostic_and_discriminative(resnet):
    x = images()
    eig = cam_method(resnet, "eigencam", "layer4")
    assert torch.equal(eig(x, torch.tensor([1, 2])), eig(x, torch.tensor([5, 9])))
    gpp = cam_method(resnet, "gradcam++", "layer4")
    assert not torch.allclose(gpp(x, torch.tensor([1, 2])), gpp(x, torch.tensor([5, 9])))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"name": "gradcam+++", "layer": "layer4"}, ValueError, "unknown pytorch-grad-cam method"),
    ({"name": "layercam", "layer": "layer9"}, ValueError, "not a module"),
    ({"name": "layercam", "layer": 4}, TypeError, "module name"),
    ({"name": "scorecam", "layer": "layer4", "batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_arguments(resnet, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cam_method(resnet, **kwargs)


@pytest.mark.parametrize("name", ["gradcam_pytorch_grad_cam", "gradcam++", "layercam", "xgradcam", "eigencam",
                                  "hirescam"])
def test_shared_gradients_give_the_librarys_maps(resnet, name):
    """shared=True: one prefix forward and a suffix backward per batch, the library's get_cam_image on
    them: the maps of the library's own full call."""
    x, t = images(B=3), torch.tensor([3, 7, 1])
    full = cam_method(resnet, name, "layer3")(x, t)
    fast = cam_method(resnet, name, "layer3", shared=True)
    assert (fast(x, t) - full).abs().max() < 1e-5
    t2 = torch.tensor([5, 5, 5])  # new targets: the cache is not reused
    assert (fast(x, t2) - cam_method(resnet, name, "layer3")(x, t2)).abs().max() < 1e-5


def test_shared_cache_sees_a_new_batch_and_an_in_place_change(resnet):
    t = torch.tensor([3, 7])
    fast = cam_method(resnet, "hirescam", "layer3", shared=True)
    for seed in (1, 2):
        x = images(seed=seed)  # the previous batch is freed: its memory may come back
        assert (fast(x, t) - cam_method(resnet, "hirescam", "layer3")(x, t)).abs().max() < 1e-5
    x.mul_(-1)
    assert (fast(x, t) - cam_method(resnet, "hirescam", "layer3")(x, t)).abs().max() < 1e-5


def test_multi_layer_peers_are_the_library_fusions_and_leave_the_model_alone(resnet):
    """RefineCAM: the product of its base method's maps at each layer (recomputed here from single
    layers); LayerCAM over several target layers: the library's own multi-layer map."""
    from chip_ext.peers import MULTI_LAYER, multi_layer_method

    x, t = images(), torch.tensor([3, 7])
    layers = ["layer3", "layer4"]
    single = {n: [cam_method(resnet, n, l)(x, t) for l in layers] for n in ("gradcam++",)}
    refine = multi_layer_method(resnet, "refinecam", layers)(x, t)
    torch.testing.assert_close(refine, normalize_maps(single["gradcam++"][0] * single["gradcam++"][1]),
                               rtol=0, atol=2e-3)
    # LayerCAM with several target layers, as the library computes it (its own fusion)
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from chip_ext.maps import inference_view

    view = inference_view(resnet, private=True)
    with LayerCAM(model=view, target_layers=[view.get_submodule(l) for l in layers]) as cam:
        library = cam(x, [ClassifierOutputTarget(int(c)) for c in t])
    fused = multi_layer_method(resnet, "layercam_multi", layers)(x, t)
    expected = normalize_maps(torch.from_numpy(library).float())
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    assert set(MULTI_LAYER) == {"refinecam", "refinecam_gradcam", "layercam_multi", "gradcam_multi"}
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in resnet.modules())
    with pytest.raises(TypeError, match="layers must be a non-empty list of module names; got 'layer4'"):
        multi_layer_method(resnet, "refinecam", "layer4")
    with pytest.raises(ValueError, match="layer 'layer9' is not a module of the model"):
        multi_layer_method(resnet, "layercam_multi", ["layer9"])
