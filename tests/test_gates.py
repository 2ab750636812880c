import math

import pytest
import torch

from chip_ext.gates import default_sigma, image_seed, mix32, proximity, sample_gates
from conftest import devices

M32 = 0xFFFFFFFF


def py_mix32(x: int) -> int:
    """lowbias32 on Python ints (exact), the reference for the tensor version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def py_gates(index: int, N: int, K: int, seed: int, layer: str, max_drop: float) -> list[list[bool]]:
    """The documented gate stream in plain Python integers and sorted()."""
    s = image_seed(seed, layer, index)
    lo, hi = s & M32, (s >> 32) & M32
    rows = [[True] * K]
    for n in range(1, N):
        w = py_mix32(py_mix32(lo ^ py_mix32(n)) ^ hi)
        n_off = round(max_drop * py_mix32(w ^ 0x9E3779B9) / 2.0**32 * K)  # half to even, as torch.round
        keys = sorted((py_mix32(w ^ py_mix32((k + 0x85EBCA6B) & M32)), k) for k in range(K))
        off = {k for _, k in keys[:n_off]}
        rows.append([k not in off for k in range(K)])
    return rows


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


def test_mix32_matches_python_integers():
    x = torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789], dtype=torch.int64)
    assert mix32(x).tolist() == [py_mix32(int(v)) for v in x]
    assert len(set(mix32(torch.arange(100000)).tolist())) == 100000  # a bijection: no collisions


@pytest.mark.parametrize("device", devices())
def test_gates_match_the_documented_stream(device):
    """The tensor implementation on each device equals the pure-Python one, bit for bit."""
    got = sample_gates([0, 7, 123456], 9, 37, seed=5, layer="features.29", max_drop=0.7, device=device)
    assert got.device.type == device
    for row, index in enumerate([0, 7, 123456]):
        assert got[row].cpu().tolist() == py_gates(index, 9, 37, 5, "features.29", 0.7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_gates_identical_on_cpu_and_gpu_at_real_sizes():
    cpu = sample_gates(range(40, 72), 100, 2048, seed=3, layer="layer4")
    assert torch.equal(sample_gates(range(40, 72), 100, 2048, seed=3, layer="layer4", device="cuda").cpu(), cpu)
