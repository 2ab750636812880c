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


# ---- the sample_gates kernel (csrc/cpu/gates.cpp, csrc/cuda/gates.cu) against the PyTorch reference ----

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chip_ext.distillation.gates import _progression, sample_gates_reference, stream_base  # noqa: E402
from chip_ext.kernels import ops  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 5), N=st.integers(1, 12), K=st.integers(1, 300), max_drop=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**64 - 1), layer=st.text(max_size=12), start=st.integers(0, 2**62),
       stride=st.integers(1, 64))
def test_kernel_is_the_reference_bit_for_bit(B, N, K, max_drop, seed, layer, start, stride):
    idx = [start + i * stride for i in range(B)]
    gates = torch.empty(B, N, K, dtype=torch.bool)
    ops.sample_gates_into(gates, stream_base(seed, layer), start, stride, max_drop)
    assert torch.equal(gates, sample_gates_reference(idx, N, K, seed=seed, layer=layer, max_drop=max_drop))


@pytest.mark.parametrize("device", devices())
def test_kernel_at_real_sizes_and_the_documented_stream(device):
    """Consecutive indices (a loader's batch) take the kernel; it equals the reference at distill's sizes
    and the pure-Python stream on a few rows."""
    idx = list(range(1000, 1016))
    assert _progression(idx) == (1000, 1)
    got = sample_gates(idx, 100, 1280, seed=2, layer="bn2", device=device).cpu()
    assert torch.equal(got, sample_gates_reference(idx, 100, 1280, seed=2, layer="bn2"))
    small = sample_gates([5, 9, 13], 7, 29, seed=4, layer="layer4", max_drop=0.9, device=device).cpu()
    for row, index in enumerate([5, 9, 13]):
        assert small[row].tolist() == py_gates(index, 7, 29, 4, "layer4", 0.9)


def test_which_indices_take_the_kernel():
    assert _progression([3]) == (3, 1) and _progression([0, 8, 16]) == (0, 8)
    assert _progression([]) is None and _progression([0, 2, 3]) is None and _progression([5, 4]) is None
    assert _progression([1, 1]) is None  # a repeated index is no progression: the reference draws it
    twice = sample_gates([4, 4], 5, 9)
    assert torch.equal(twice[0], twice[1]) and torch.equal(twice[:1], sample_gates([4], 5, 9))  # same image, same gates


def test_kernel_bad_arguments_name_what_was_expected():
    with pytest.raises(TypeError, match="gates must be Bool"):
        ops.sample_gates_into(torch.empty(2, 3, 4), 0, 0, 1, 0.5)
    with pytest.raises(ValueError, match=r"gates must be a 3-D tensor \[B, N, K\]; got shape \[2, 3\]"):
        ops.sample_gates_into(torch.empty(2, 3, dtype=torch.bool), 0, 0, 1, 0.5)
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.sample_gates_into(torch.empty(4, 3, 2, dtype=torch.bool).transpose(0, 2), 0, 0, 1, 0.5)
    with pytest.raises(ValueError, match="stride .* must be >= 1; got 0"):
        ops.sample_gates_into(torch.empty(2, 3, 4, dtype=torch.bool), 0, 0, 0, 0.5)
    with pytest.raises(ValueError, match=r"max_drop must be in \[0, 1\]; got 1.5"):
        ops.sample_gates_into(torch.empty(2, 3, 4, dtype=torch.bool), 0, 0, 1, 1.5)


def test_kernel_under_torch_compile():
    base = stream_base(1, "x")  # host-side hashing of the layer name stays outside the graph

    def draw(g):
        return ops.sample_gates_into(g, base, 10, 2, 0.5)

    compiled = torch.compile(draw, backend="aot_eager", fullgraph=True)
    got = compiled(torch.empty(3, 6, 50, dtype=torch.bool))
    assert torch.equal(got, sample_gates_reference([10, 12, 14], 6, 50, seed=1, layer="x"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_kernel_identical_on_cpu_and_gpu_strided_and_wide():
    """Under torch.distributed a rank draws every world-th image: the stride path, and K beyond one block."""
    idx = list(range(3, 3 + 8 * 64, 8))
    cpu = sample_gates_reference(idx, 100, 4096, seed=7, layer="features.29")
    assert torch.equal(sample_gates(idx, 100, 4096, seed=7, layer="features.29", device="cuda").cpu(), cpu)
