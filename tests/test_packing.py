import pytest
import torch

from chip_ext.packing import pack_triu, packed_size, size_from_packed, unpack_triu


@pytest.mark.parametrize("K", [1, 2, 5, 64])
def test_roundtrip_and_order(K):
    X = torch.randn(3, K, K, dtype=torch.float64)
    S = X + X.transpose(1, 2)
    packed = pack_triu(S)
    assert packed.shape == (3, packed_size(K))
    i, j = torch.triu_indices(K, K)
    assert torch.equal(packed[1], S[1, i, j])  # torch.triu_indices order
    assert torch.equal(unpack_triu(packed), S)
    assert size_from_packed(packed_size(K)) == K


def test_index_formula_matches_kernel_order():
    K = 7
    i, j = torch.triu_indices(K, K)
    formula = i * K - i * (i - 1) // 2 + (j - i)  # csrc/chip_ext.h packed_index
    assert torch.equal(formula, torch.arange(packed_size(K)))


def test_bad_sizes():
    with pytest.raises(ValueError, match="not K\\(K\\+1\\)/2"):
        size_from_packed(4)
    with pytest.raises(ValueError, match="needs 6"):
        unpack_triu(torch.zeros(5), K=3)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        pack_triu(torch.zeros(2, 3))
