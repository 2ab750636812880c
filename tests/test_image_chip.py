"""Per-image CHIP: the CHIP Lasso on one image's own perturbations recovers a planted linear head."""
import pytest
import torch
from torch import nn

from chip_ext.image_chip import image_chip, image_chip_weights, region_chip, region_chip_weights


class LinearHead(nn.Module):
    """conv -> ReLU (the layer 'act') -> global average pooling -> linear: the logit of class c is
    exactly beta_c · GAP(A) + bias_c, so the per-image Lasso with an intercept and a tiny λ must
    return beta_c on every channel that is active in the image."""

    def __init__(self, K=6, C=3):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(K, C)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def net():
    torch.manual_seed(0)
    return LinearHead().double().eval()


def test_recovers_the_planted_head():
    model = net()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    t = torch.tensor([0, 2])
    W, A, got_t = image_chip_weights(model, x, "act", t, num_perturbations=64, lam_ratio=1e-8)
    active = A.mean(dim=(2, 3)) > 1e-9
    beta = model.fc.weight.detach()[t]
    assert torch.equal(got_t, t) and active.any()
    assert (W - beta)[active].abs().max() < 1e-5
    assert (W[~active] == 0).all()  # a channel that is off in the image has no evidence


def test_prior_equal_to_the_truth_is_kept():
    """With the penalty |w - prior|_1 and prior = beta, the residual is zero: w = beta at any λ."""
    model = net()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    t = torch.tensor([1, 1])
    beta = model.fc.weight.detach()[t]
    W, _, _ = image_chip_weights(model, x, "act", t, num_perturbations=32, lam_ratio=0.5, prior=beta)
    assert (W - beta).abs().max() < 1e-6  # the residual is rounding noise (1e-16): ADMM's tolerance
    wrong = beta + 0.3
    W, _, _ = image_chip_weights(model, x, "act", t, num_perturbations=32, lam_ratio=1.0, prior=wrong)
    assert torch.equal(W, wrong)  # λ = λ_max of the residual problem: no move away from the prior


def test_maps_and_target_default():
    model = net()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    maps = image_chip(model, x, "act", num_perturbations=16, score="prob", positive=True)
    assert maps.shape == (3, 12, 12) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    _, _, t = image_chip_weights(model, x, "act", num_perturbations=16)
    assert torch.equal(t, model(x).argmax(1))  # None: the top-1 class


@pytest.mark.parametrize("kw, pattern", [({"num_perturbations": 1}, "num_perturbations"),
                                         ({"lam_ratio": 0}, "lam_ratio"), ({"score": "softmax"}, "score"),
                                         ({"batch_size": 0}, "batch_size"),
                                         ({"prior": torch.zeros(2, 5)}, r"prior must be Tensor\[B, K\] = \[2, 6\]")])
def test_bad_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        image_chip_weights(net(), torch.randn(2, 3, 8, 8, dtype=torch.float64), "act", **kw)



class SpatialHead(nn.Module):
    """conv -> ReLU (the layer 'act') -> flatten -> linear: the logit of class c is exactly
    Σ_{k,y,x} V_c[k, y, x] A_k(y, x) + bias_c, linear in every position, so switching a set of cells off
    removes exactly their Σ_k V_c[k, cell] A_k(cell): region CHIP with an intercept and a tiny λ must
    return those sums (which are also HiResCAM's Σ_k ∂y/∂A_k · A_k, summed over each cell)."""

    def __init__(self, K=4, C=3, size=7):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(K * size * size, C)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("cell", [1, 2, 3])
def test_region_recovers_the_planted_cell_contributions(cell):
    torch.manual_seed(0)
    model = SpatialHead().double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    t = torch.tensor([2, 0])
    beta, got_t = region_chip_weights(model, x, "act", t, cell=cell, num_perturbations=160, lam_ratio=1e-9)
    A = model.act(model.conv(x)).detach()
    V = model.fc.weight.detach()[t].view(2, 4, 7, 7)
    per_position = (V * A).sum(1)  # [B, 7, 7]
    g = -(-7 // cell)  # 7 is not a multiple of 2 or 3: the last cells are cut short
    want = torch.zeros(2, g, g, dtype=torch.float64)
    for i in range(g):
        for j in range(g):
            want[:, i, j] = per_position[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].sum((1, 2))
    assert torch.equal(got_t, t) and beta.shape == (2, g, g)
    assert (beta - want).abs().max() < 1e-6 * want.abs().max()


def test_region_maps_and_target_default():
    torch.manual_seed(0)
    model = SpatialHead().double().eval()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    maps = region_chip(model, x, "act", num_perturbations=16, score="prob")
    assert maps.shape == (3, 7, 7) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    _, t = region_chip_weights(model, x, "act", num_perturbations=16)
    assert torch.equal(t, model(x).argmax(1))  # None: the top-1 class


def test_auto_cell_keeps_cells_at_most_perturbations():
    from chip_ext.image_chip import auto_cell

    assert auto_cell(14, 14, 256) == 1 and auto_cell(28, 28, 256) == 2 and auto_cell(7, 7, 16) == 2
    assert auto_cell(28, 28, 195) == 3 and auto_cell(1, 1, 2) == 1
    torch.manual_seed(0)
    model = SpatialHead().double().eval()
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    beta, _ = region_chip_weights(model, x, "act", num_perturbations=16)  # 49 positions > 16: cells of 2
    assert beta.shape == (1, 4, 4)


@pytest.mark.parametrize("kw, pattern", [({"cell": 0}, "cell must be None or a positive int"),
                                         ({"cell": 1.5}, "cell must be None or a positive int"),
                                         ({"num_perturbations": 1}, "num_perturbations"),
                                         ({"score": "softmax"}, "score")])
def test_region_bad_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        region_chip_weights(net(), torch.randn(2, 3, 8, 8, dtype=torch.float64), "act", **kw)


def test_region_needs_a_spatial_layer():
    torch.manual_seed(0)
    model = SpatialHead().double().eval()
    with pytest.raises(ValueError, match=r"layer 'fc' gives \[2, 3\]; region CHIP needs \[B, K, h, w\]"):
        region_chip_weights(model, torch.randn(2, 3, 7, 7, dtype=torch.float64), "fc", num_perturbations=4)


@pytest.mark.parametrize("fit", ["image", "region"])
def test_a_map_does_not_depend_on_the_rest_of_the_batch(fit):
    """The gates are keyed by each image's values: the same image gets the same map alone, first or last
    in a batch; another image gets another draw of the gates."""
    model = net()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = ((lambda im, t: image_chip(model, im, "act", t, num_perturbations=24)) if fit == "image" else
           (lambda im, t: region_chip(model, im, "act", t, num_perturbations=24, cell=2)))
    together = run(x, [0, 1, 2])
    alone = run(x[2:3], [2])
    reordered = run(x.flip(0), [2, 1, 0])
    torch.testing.assert_close(alone[0], together[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(reordered[0], together[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(reordered[2], together[0], rtol=0, atol=1e-12)
    from chip_ext.gates import content_keys

    keys = content_keys(x)
    assert len(set(keys)) == 3 and keys[2] == content_keys(x[2:3])[0] and all(0 <= k < 2 ** 63 for k in keys)
