"""Per-image CHIP: the CHIP Lasso on one image's own perturbations recovers a planted linear head."""
import pytest
import torch
from torch import nn

from chip_ext.image_chip import image_chip, image_chip_weights


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
