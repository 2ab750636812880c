"""The float64 references themselves, against loops that follow DESIGN §1 literally."""
import pytest
import torch

from chip_ext.packing import unpack_triu
from chip_ext.reference import gate_pool_reference, gram_accumulate_reference


def test_gate_pool_reference_against_loops():
    B, N, K, H, W = 2, 3, 4, 3, 5
    A = torch.randn(B, K, H, W, dtype=torch.float64)
    gates = torch.rand(B, N, K) < 0.5
    gated, z = gate_pool_reference(A, gates)
    for s in range(B):
        for n in range(N):
            for k in range(K):
                d = float(gates[s, n, k])
                assert torch.equal(gated[s * N + n, k], A[s, k] * d)
                assert abs(float(z[s, n, k]) - d * float(A[s, k].mean())) < 1e-6


def test_gram_reference_against_loops():
    B, N, K, C = 2, 3, 4, 3
    a = torch.rand(B, K)
    gates = torch.rand(B, N, K) < 0.6
    h, f, g = torch.rand(B, N), torch.rand(B, C), torch.rand(B, N, C)
    G = torch.zeros(C, K * (K + 1) // 2, dtype=torch.float64)
    b = torch.zeros(C, K, dtype=torch.float64)
    y = torch.zeros(C, dtype=torch.float64)
    n = torch.zeros(C, dtype=torch.float64)
    zs = torch.zeros(C, K, dtype=torch.float64)
    gs = torch.zeros(C, dtype=torch.float64)
    gram_accumulate_reference(G, b, y, n, zs, gs, a, gates, h, f, g)

    G_loop = torch.zeros(C, K, K, dtype=torch.float64)
    b_loop = torch.zeros(C, K, dtype=torch.float64)
    y_loop = torch.zeros(C, dtype=torch.float64)
    n_loop = torch.zeros(C, dtype=torch.float64)
    zs_loop = torch.zeros(C, K, dtype=torch.float64)
    gs_loop = torch.zeros(C, dtype=torch.float64)
    for c in range(C):
        for s in range(B):
            for p in range(N):
                z = gates[s, p].double() * a[s].double()  # z_sn = d_sn ⊙ a_s
                w = float(f[s, c]) * float(h[s, p])  # loyalty x proximity
                G_loop[c] += w * torch.outer(z, z)
                b_loop[c] += w * float(g[s, p, c]) * z
                y_loop[c] += w * float(g[s, p, c]) ** 2
                n_loop[c] += w
                zs_loop[c] += w * z
                gs_loop[c] += w * float(g[s, p, c])
    torch.testing.assert_close(unpack_triu(G, K), G_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, b_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n, n_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zs, zs_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, gs_loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("centred", [False, True])
def test_equivalent_data_has_the_given_statistics(centred):
    from chip_ext.reference import equivalent_data

    g = torch.Generator().manual_seed(0)
    Z = torch.rand(300, 6, generator=g, dtype=torch.float64) + 1.0
    w = torch.rand(300, generator=g, dtype=torch.float64)
    t = Z @ torch.randn(6, generator=g, dtype=torch.float64) + 0.1 * torch.randn(300, generator=g, dtype=torch.float64)
    G = (Z.T * w) @ Z / w.sum()
    b = (Z.T * w) @ t / w.sum()
    mu, ybar = w @ Z / w.sum(), w @ t / w.sum()
    X, y = equivalent_data(G, b, mu if centred else None, ybar if centred else None)
    n = X.shape[0]
    if centred:
        assert n == 12
        torch.testing.assert_close(X.mean(0), mu)
        torch.testing.assert_close(y.mean(), ybar)
        Xc, yc = X - mu, y - ybar
        torch.testing.assert_close(Xc.T @ Xc / n, G - torch.outer(mu, mu))
        torch.testing.assert_close(Xc.T @ yc / n, b - mu * ybar)
    else:
        torch.testing.assert_close(X.T @ X / n, G)
        torch.testing.assert_close(X.T @ y / n, b)
    with pytest.raises(ValueError, match="positive definite"):
        equivalent_data(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
