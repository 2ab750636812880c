"""Every bad input raises a Python exception whose message names the argument and the values."""
import re

import pytest
import torch

import chip_ext
from conftest import HAS_GPU


def A_(B=2, K=4, H=3, W=3, dtype=torch.float32):
    return torch.randn(B, K, H, W, dtype=dtype)


def d_(B=2, N=3, K=4, dtype=torch.bool):
    return (torch.rand(B, N, K) < 0.5).to(dtype)


@pytest.mark.parametrize("A, gates, exc, pattern", [
    (torch.randn(2, 4, 3), d_(), ValueError, r"A must be a 4-D tensor \[B, K, H, W\]; got shape \[2, 4, 3\] \(3-D\)"),
    (A_(), torch.ones(2, 4, dtype=torch.bool), ValueError, r"gates must be a 3-D tensor \[B, N, K\]; got shape \[2, 4\]"),
    (A_(dtype=torch.float64), d_(), TypeError, r"A must be float32, float16 or bfloat16; got Double"),
    (A_(), d_(dtype=torch.int32), TypeError, r"gates must be bool, uint8 or floating point; got Int"),
    (A_(), d_(K=5), ValueError, r"gates must be \[B, N, K\] with B=2, K=4 to match A; got \[2, 3, 5\]"),
    (A_(), d_(B=3), ValueError, r"with B=2, K=4 to match A; got \[3, 3, 4\]"),
    (A_(B=0), d_(B=0), ValueError, r"A is an empty batch \(B=0"),
    (A_(H=0), d_(), ValueError, r"A must have K, H, W >= 1; got shape \[2, 4, 0, 3\]"),
    (A_(), d_(N=0), ValueError, r"gates must have N >= 1 perturbations; got \[2, 0, 4\]"),
])
def test_gate_pool_bad_inputs(A, gates, exc, pattern):
    with pytest.raises(exc, match=pattern):
        chip_ext.gate_pool(A, gates)


def gram_args(B=2, N=3, K=4, C=5):
    G, b, y, n, zs, gs = chip_ext.new_accumulators(C, K)
    return dict(G=G, b=b, y=y, n=n, zs=zs, gs=gs, a=torch.rand(B, K), gates=d_(B, N, K), h=torch.rand(B, N),
                f=torch.rand(B, C), g=torch.rand(B, N, C))


BAD_GRAM = [
    ("a", torch.rand(2, 4, 1), ValueError, r"a must be a 2-D tensor \[B, K\] \(pooled activations\); got shape \[2, 4, 1\]"),
    ("g", torch.rand(2, 3), ValueError, r"g must be a 3-D tensor \[B, N, C\] \(perturbed scores\); got shape \[2, 3\]"),
    ("a", torch.rand(2, 4, dtype=torch.float16), TypeError, r"a must be Float; got Half"),
    ("f", torch.rand(2, 5, dtype=torch.float64), TypeError, r"f must be Float; got Double"),
    ("G", torch.zeros(5, 10), TypeError, r"G is a running sum and must be float64 .*; got Float"),
    ("y", torch.zeros(5), TypeError, r"y is a running sum and must be float64"),
    ("b", torch.zeros(4, 5, dtype=torch.float64).t(), ValueError, r"b is updated in place and must be contiguous"),
    ("gates", d_(2, 3, 6), ValueError, r"gates must be \[B, N, K\] with B=2, K=4 to match a; got \[2, 3, 6\]"),
    ("h", torch.rand(2, 4), ValueError, r"h must be \[B, N\] = \[2, 3\] to match gates; got \[2, 4\]"),
    ("f", torch.rand(3, 5), ValueError, r"f must be \[B, C\] with B=2 to match a; got \[3, 5\]"),
    ("g", torch.rand(2, 3, 6), ValueError, r"g must be \[B, N, C\] = \[2, 3, 5\] to match gates and f; got \[2, 3, 6\]"),
    ("G", torch.zeros(5, 11, dtype=torch.float64), ValueError, r"G must be \[C, K\(K\+1\)/2\] = \[5, 10\] for C=5, K=4; got \[5, 11\]"),
    ("b", torch.zeros(5, 3, dtype=torch.float64), ValueError, r"b must be \[C, K\] = \[5, 4\]; got \[5, 3\]"),
    ("n", torch.zeros(4, dtype=torch.float64), ValueError, r"n must be \[C\] = \[5\]; got \[4\]"),
    ("zs", torch.zeros(5, 3, dtype=torch.float64), ValueError, r"zs must be \[C, K\] = \[5, 4\]; got \[5, 3\]"),
    ("zs", torch.zeros(5, dtype=torch.float64), ValueError, r"zs must be a 2-D tensor \[C, K\] \(sum of f h z\)"),
    ("gs", torch.zeros(6, dtype=torch.float64), ValueError, r"gs must be \[C\] = \[5\]; got \[6\]"),
    ("gs", torch.zeros(5), TypeError, r"gs is a running sum and must be float64"),
]


@pytest.mark.parametrize("name, value, exc, pattern", BAD_GRAM, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_GRAM)])
def test_gram_bad_inputs(name, value, exc, pattern):
    args = gram_args()
    args[name] = value
    with pytest.raises(exc, match=pattern):
        chip_ext.gram_accumulate(**args)


def test_gram_empty_batch():
    args = gram_args()
    for key in ("a", "gates", "h", "f", "g"):
        args[key] = args[key][:0]
    with pytest.raises(ValueError, match=r"a is an empty batch \(B=0"):
        chip_ext.gram_accumulate(**args)


def test_gram_accumulators_untouched_on_error():
    args = gram_args()
    args["G"].fill_(7.0)
    args["g"] = torch.rand(2, 3, 6)
    with pytest.raises(ValueError):
        chip_ext.gram_accumulate(**args)
    assert torch.all(args["G"] == 7.0) and torch.all(args["b"] == 0)


def test_mixed_devices_fake_kernels():
    """cpu + meta dispatches to the fake kernels (torch.compile's path): they refuse mixed devices too.
    The compiled kernels' own device check is exercised by test_mixed_devices_cuda on a GPU."""
    with pytest.raises(RuntimeError, match=re.escape("gates is on meta but A is on cpu")):
        chip_ext.gate_pool(A_(), d_().to("meta"))
    args = gram_args()
    args["h"] = args["h"].to("meta")
    with pytest.raises(RuntimeError, match=re.escape("h is on meta but G is on cpu")):
        chip_ext.gram_accumulate(**args)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible")
def test_mixed_devices_cuda():
    with pytest.raises(RuntimeError, match=re.escape("gates is on cpu but A is on cuda:0")):
        chip_ext.gate_pool(A_().cuda(), d_())
    args = {k: (v.cuda() if k != "f" else v) for k, v in gram_args().items()}
    with pytest.raises(RuntimeError, match=re.escape("f is on cpu but G is on cuda:0")):
        chip_ext.gram_accumulate(**args)
