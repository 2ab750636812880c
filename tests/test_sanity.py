"""Cascading model-parameter randomisation (`chip_ext.evaluation.sanity`): the stages, the copies it
randomises (never the user's model), and the similarity measures against scipy / scikit-image."""
import numpy as np
import pytest
import torch
from torch import nn

from chip_ext.evaluation import sanity


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                                    nn.ReLU(), nn.Conv2d(4, 6, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def test_stages_run_top_down_and_expand_block_stages():
    assert sanity.top_down_stages(Net()) == ["head", "blocks.2", "blocks.0", "stem"]


def test_cascade_randomises_cumulatively_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = Net()
    net.blocks[0][1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    for stage, randomized in sanity.cascading_randomization(net):
        now = randomized.state_dict()
        changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], now[k])}
        seen.append((stage, changed))
    for k, v in net.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    assert seen[0] == ("head", {"head"})
    assert seen[1][1] == {"head", "blocks.2"}
    assert seen[2][1] == {"head", "blocks.2", "blocks.0.0", "blocks.0.1"}  # conv and batch norm (its stats too)
    assert seen[3][1] == {"head", "blocks.2", "blocks.0.0", "blocks.0.1", "stem"}
    again = [dict(r.state_dict()) for _, r in sanity.cascading_randomization(net)][-1]
    assert all(torch.equal(again[k], v) for k, v in now.items())  # seeded: the same draws each time
    with pytest.raises(ValueError, match=r"stages \['nope'\] are not modules of the model"):
        next(sanity.cascading_randomization(net, ["nope"]))


def test_rank_correlation_is_scipys_spearman_with_ties_and_signs():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=(3, 8, 8)), 1)  # ties
    b = a + rng.normal(scale=0.5, size=a.shape)
    got = sanity.rank_correlation(torch.from_numpy(a), b)
    want = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    assert got == pytest.approx(want, abs=1e-12)
    got_abs = sanity.rank_correlation(a, -b, absolute=True)
    assert got_abs == pytest.approx([spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic
                                     for x, y in zip(a, b)], abs=1e-12)
    assert sanity.rank_correlation(a, -a) == pytest.approx([-1, -1, -1])
    three = rng.normal(size=(2, 3, 5, 5))  # [B, C, H, W]: channels summed (|.| first when absolute)
    assert sanity.rank_correlation(three, three.sum(1))[0] == pytest.approx(1)
    assert np.isnan(sanity.rank_correlation(np.ones((1, 4, 4)), a[:1, :4, :4])[0])
    with pytest.raises(ValueError, match="a and b must be maps of the same images and size"):
        sanity.rank_correlation(a, a[:2])


def test_ssim_is_scikit_images_on_normalised_maps():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((2, 16, 16))
    b = 5 * a + rng.normal(scale=0.3, size=a.shape)
    unit = lambda m: (m - m.min()) / (m.max() - m.min())  # noqa: E731
    got = sanity.ssim(a, b, absolute=False)
    assert got == pytest.approx([structural_similarity(unit(x), unit(y), data_range=1.0) for x, y in zip(a, b)])
    assert sanity.ssim(a, 3 * a + 1, absolute=False) == pytest.approx([1, 1])
