"""Deletion / insertion (RISE protocol) on hand-built cases with known answers, and ROAD through
pytorch-grad-cam."""
import math

import pytest
import torch
from torch import nn

from chip_ext import faithfulness as F


class RegionFraction(nn.Module):
    """P(class 0) = the fraction of pixels of region R (rows 0..7) whose channel 0 still holds the
    value of the reference image (clamped to [1e-6, 1 - 1e-6]); logits = [log q, log(1 - q)].
    Default reference: all ones."""

    def __init__(self, ref=None):
        super().__init__()
        self.ref = ref

    def forward(self, x):
        ref = torch.ones_like(x[:1]) if self.ref is None else self.ref
        same = ((x[:, 0, :8, :] - ref[:, 0, :8, :]).abs() < 1e-3).float()
        q = same.mean(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([q.log(), (1 - q).log()], dim=1)


def test_auc_of_known_curves():
    assert torch.allclose(F.auc(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])),
                          torch.tensor([1.0, 0.25, 0.5]))


def test_deletion_known_answer():
    """R has 128 pixels = 2 steps of 64. The perfect map (R first) takes P from 1 to 0 in two steps
    and keeps it 0 for the other two: curve 1, .5, 0, 0, 0, AUC = (.5 + .5·(1 + 0)) / 4 = 0.25.
    The reversed map keeps R for two steps: 1, 1, 1, .5, 0 -> AUC = (1 + 1 + .5 + .5) / 4 = 0.75."""
    x = torch.ones(1, 3, 16, 16)
    perfect = torch.zeros(1, 16, 16)
    perfect[:, :8] = 1
    model = RegionFraction()
    curve = F.perturbation_curve(model, x, perfect, 0, mode="deletion", step=64)
    assert torch.allclose(curve, torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0]]), atol=1e-5)
    scores = F.deletion_insertion(model, x, perfect, 0, step=64, batch_size=3)
    assert abs(float(scores["deletion"]) - 0.25) < 1e-5
    assert abs(float(F.deletion_insertion(model, x, 1 - perfect, 0, step=64)["deletion"]) - 0.75) < 1e-5


def test_insertion_known_answer():
    """Insertion starts from the blurred image. A ±1 checkerboard blurs to values of magnitude < 1
    everywhere, so no pixel of R matches the original at the start: P starts at 0 and rises as R
    comes back: perfect map 0, .5, 1, 1, 1 -> AUC 0.75; reversed 0, 0, 0, .5, 1 -> 0.25."""
    r = torch.arange(16)
    x = ((r[:, None] + r[None, :]) % 2 * 2 - 1).float().expand(1, 3, 16, 16).contiguous()
    assert float(F.blur(x).abs().max()) < 0.9
    model = RegionFraction(x)
    perfect = torch.zeros(1, 16, 16)
    perfect[:, :8] = 1
    ins = F.perturbation_curve(model, x, perfect, 0, mode="insertion", step=64)
    assert torch.allclose(ins, torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]]), atol=1e-5)
    assert abs(float(F.deletion_insertion(model, x, 1 - perfect, 0, step=64)["insertion"]) - 0.25) < 1e-5


def test_blur_is_a_normalised_gaussian():
    x = torch.zeros(1, 2, 31, 31)
    x[0, :, 15, 15] = 1
    y = F.blur(x)
    assert abs(float(y[0, 0].sum()) - 1) < 1e-6 and torch.equal(y[0, 0], y[0, 1])
    r = torch.arange(11.0) - 5
    g = torch.exp(-r * r / 50)
    assert abs(float(y[0, 0, 15, 15]) - float((g[5] / g.sum()) ** 2)) < 1e-6


def test_step_count_and_ties():
    """ceil(HW / step) steps; a constant map removes pixels in raster order (stable sort)."""
    x = torch.ones(1, 3, 16, 16)
    curve = F.perturbation_curve(RegionFraction(), x, torch.zeros(1, 16, 16), 0, step=100)
    assert curve.shape == (1, math.ceil(256 / 100) + 1)
    assert torch.allclose(curve, torch.tensor([[1.0, 28 / 128, 1e-6, 1e-6]]), atol=1e-5)


def test_road_ranks_a_perfect_map_above_its_reverse():
    model = RegionFraction()
    x = torch.ones(1, 3, 32, 32)
    good = torch.zeros(1, 32, 32)
    good[:, :8] = 1
    a = F.road(model, x, good, torch.tensor([0]))
    b = F.road(model, x, 1 - good, torch.tensor([0]))
    assert a.shape == (1,) and float(a) > float(b)
    assert torch.equal(a, F.road(model, x, good, torch.tensor([0])))  # seeded noise


@pytest.mark.parametrize("kw, pattern", [({"maps": torch.zeros(1, 8, 8)}, "maps must be"),
                                         ({"step": 0}, "step must"), ({"mode": "both"}, "mode must")])
def test_bad_arguments(kw, pattern):
    args = {"maps": torch.zeros(1, 16, 16), "step": 64, "mode": "deletion"} | kw
    with pytest.raises(ValueError, match=pattern):
        F.perturbation_curve(RegionFraction(), torch.ones(1, 3, 16, 16), args["maps"], 0, mode=args["mode"],
                             step=args["step"])


def test_the_given_target_is_followed_not_the_top1():
    """Every test image was classified right, so following the top-1 class instead of the given target
    went unseen. Here the top-1 is class 0 throughout the first steps; class 1's probability is 1 - q:
    deleting R (the perfect map for class 0) raises it: curve 0, .5, 1, 1, 1 -> AUC 0.75 (class 0: 0.25)."""
    x = torch.ones(1, 3, 16, 16)
    perfect = torch.zeros(1, 16, 16)
    perfect[:, :8] = 1
    curve = F.perturbation_curve(RegionFraction(), x, perfect, 1, mode="deletion", step=64)
    assert torch.allclose(curve, torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]]), atol=1e-5)
    scores = F.deletion_insertion(RegionFraction(), x, perfect, torch.tensor([1]), step=64)
    assert abs(float(scores["deletion"]) - 0.75) < 1e-5
