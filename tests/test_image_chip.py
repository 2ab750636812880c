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


# --------------------------------------------- an independent reference on a non-linear head

class DeepHead(nn.Module):
    """conv -> ReLU ('act', the layer) -> conv -> ReLU -> global pooling -> linear: a non-linear head,
    so the proximity weights and the score change the fit (every planted head above is linear)."""

    def __init__(self, K=5, C=4):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(K, 7, 3, padding=1)
        self.fc = nn.Linear(7, C)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(self.act(self.conv(x)))).mean(dim=(2, 3)))


def _reference_fit(model, image, t, masks, z, sigma, score, lam_ratio):
    """The per-image Lasso rebuilt from its definition: the full model with the layer's output multiplied
    by each mask (a forward hook, no split), the target's score, h = exp(-||d - 1||² / σ²), and
    scikit-learn's Lasso with sample_weight=h and an intercept, λ = lam_ratio · λ_max (weighted, centred)."""
    import numpy as np
    from sklearn.linear_model import Lasso

    N = masks.shape[0]
    handle = model.act.register_forward_hook(lambda m, i, o: o * masks)
    try:
        with torch.no_grad():
            out = model(image.expand(N, -1, -1, -1))
    finally:
        handle.remove()
    y = (torch.softmax(out, dim=1) if score == "prob" else out)[:, t].numpy()
    gates = z["gates"]
    h = np.exp(-((1 - gates) ** 2).sum(1) / sigma ** 2)
    X = z["X"]
    xm, ym = h @ X / h.sum(), h @ y / h.sum()
    lam = lam_ratio * np.abs(((X - xm) * (h * (y - ym))[:, None]).sum(0) / h.sum()).max()
    ref = Lasso(alpha=lam, fit_intercept=True, tol=1e-14, max_iter=1_000_000).fit(X, y, sample_weight=h)
    return torch.tensor(ref.coef_)


@pytest.mark.parametrize("score", ["logit", "prob"])
def test_image_chip_matches_an_independent_weighted_lasso(score):
    """Catches a fit that ignores the proximity weights, and "prob" normalised over the perturbations
    instead of the classes."""
    from chip_ext.gates import content_keys, sample_gates

    torch.manual_seed(0)
    model = DeepHead().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 3])
    N, K, lam_ratio = 48, 5, 0.01
    W, A, _ = image_chip_weights(model, x, "act", t, num_perturbations=N, lam_ratio=lam_ratio, score=score)
    gates = sample_gates(content_keys(x), N, K, seed=0, layer="act", max_drop=0.5).double()
    a = A.double().mean(dim=(2, 3))
    for i in range(2):
        z = {"gates": gates[i].numpy(), "X": (gates[i] * a[i]).numpy()}
        ref = _reference_fit(model, x[i:i + 1], int(t[i]), gates[i][:, :, None, None], z, (K / 4) ** 0.5,
                             score, lam_ratio)
        assert torch.allclose(W[i], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())), (i, W[i], ref)


def test_region_chip_matches_an_independent_weighted_lasso_on_a_non_square_map():
    """Catches the cell grid with height and width swapped (every test map was square), the default
    proximity width taken from the channel count instead of the cell count, and ignored weights."""
    from chip_ext.gates import content_keys, sample_gates

    torch.manual_seed(1)
    model = DeepHead().double().eval()
    x = torch.randn(1, 3, 12, 16, dtype=torch.float64)  # the layer's map is 12 x 16: 2 x 2 cells, a 6 x 8 grid
    t = torch.tensor([2])
    N, lam_ratio = 64, 0.03
    beta, _ = region_chip_weights(model, x, "act", t, num_perturbations=N, lam_ratio=lam_ratio)
    assert beta.shape == (1, 6, 8)
    gates = sample_gates(content_keys(x), N, 48, seed=0, layer="act#cells", max_drop=0.5).double()[0]
    cells = gates.view(N, 6, 8)
    masks = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]  # [N, 1, 12, 16], row-major cells
    z = {"gates": gates.numpy(), "X": gates.numpy()}
    ref = _reference_fit(model, x, 2, masks, z, (48 / 4) ** 0.5, "logit", lam_ratio)
    assert torch.allclose(beta.flatten(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())), (beta.flatten(), ref)
