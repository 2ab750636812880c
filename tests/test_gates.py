import math

import pytest
import torch

from chip_ext.gates import default_sigma, image_seed, proximity, sample_gates


def test_row_zero_is_unperturbed_and_counts_are_exact():
    K, N = 40, 200
    d = sample_gates(range(3), N, K, seed=1, layer="x")
    assert d.dtype == torch.bool and d.shape == (3, N, K)
    assert d[:, 0].all()
    off = K - d[:, 1:].sum(-1)  # channels off per perturbation
    assert off.min() >= 0 and off.max() <= round(0.5 * K)
    # drop fractions r ~ U(0, 0.5): mean of round(rK) is about K/4
    assert abs(off.float().mean().item() - K / 4) < 1.5


def test_channels_chosen_uniformly():
    d = sample_gates(range(50), 200, 10, seed=0, layer="x")[:, 1:]
    freq = (~d).float().mean(dim=(0, 1))  # how often each channel is off
    assert (freq - freq.mean()).abs().max() < 0.03


def test_keyed_by_seed_layer_and_index_only():
    a = sample_gates([5, 6, 7], 16, 12, seed=3, layer="conv")
    b = torch.cat([sample_gates([i], 16, 12, seed=3, layer="conv") for i in (5, 6, 7)])
    assert torch.equal(a, b)  # batch composition does not matter
    assert not torch.equal(a, sample_gates([5, 6, 7], 16, 12, seed=4, layer="conv"))
    assert not torch.equal(a, sample_gates([5, 6, 7], 16, 12, seed=3, layer="conv2"))
    assert image_seed(0, "a", 1) != image_seed(0, "a", 2)


def test_proximity():
    d = torch.ones(2, 3, 8, dtype=torch.bool)
    d[0, 1, :2] = False
    h = proximity(d, sigma=2.0)
    assert h[0, 0] == 1.0 and math.isclose(float(h[0, 1]), math.exp(-2 / 4), rel_tol=1e-6)
    assert math.isclose(default_sigma(512) ** 2, 128)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        proximity(d, 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_perturbations must be >= 1"):
        sample_gates([0], 0, 4)
    with pytest.raises(ValueError, match=r"max_drop must be in \[0, 1\]"):
        sample_gates([0], 3, 4, max_drop=1.5)
