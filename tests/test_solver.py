"""admm_lasso against scikit-learn's Lasso with sample weights (the external reference)."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, LinearRegression

from chip_ext.solver import admm_lasso, lambda_max


def weighted_problems(C, K, S=200, seed=0):
    """C independent weighted regressions: X [S, K] (correlated, positive like pooled features),
    sparse true weights, per-sample weights. Returns numpy data and the normalised (G, b)."""
    rng = np.random.default_rng(seed)
    problems, Gs, bs = [], [], []
    for _ in range(C):
        X = np.abs(rng.standard_normal((S, K))) + 0.3 * rng.standard_normal((S, 1))
        w_true = np.where(rng.random(K) < 0.4, rng.standard_normal(K), 0.0)
        y = X @ w_true + 0.1 * rng.standard_normal(S)
        sw = rng.uniform(0.05, 2.0, S)
        Gs.append((X.T * sw) @ X / sw.sum())
        bs.append((X.T * sw) @ y / sw.sum())
        problems.append((X, y, sw))
    return problems, torch.tensor(np.stack(Gs)), torch.tensor(np.stack(bs))


def sklearn_lasso(X, y, sw, lam):
    model = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
    model.fit(X, y, sample_weight=sw)
    return model.coef_


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_matches_sklearn(ratio):
    problems, G, b = weighted_problems(C=4, K=12, seed=1)
    lam = ratio * lambda_max(b)  # per class
    W, info = admm_lasso(G, b, lam)
    assert bool(info.converged.all()), info.iterations
    for c, (X, y, sw) in enumerate(problems):
        ref = sklearn_lasso(X, y, sw, float(lam[c]))
        assert rel_err(W[c].numpy(), ref) < 1e-5, (c, W[c], ref)
        # exactly sparse: the zeros of the reference are exact zeros of W (and vice versa where clear)
        assert np.all(W[c].numpy()[np.abs(ref) == 0] == 0)
        assert np.all(ref[np.abs(W[c].numpy()) > 1e-6] != 0)


@pytest.mark.parametrize("scale", [1e-5, 1e-3, 1e3])
def test_matches_sklearn_at_any_scale_of_the_targets(scale):
    """CHIP's targets are probabilities, ~1/C for C=1000 classes, so W is small: the stopping rule
    must be relative to the problem's scale, not absolute (it was: 7% error at scale 1e-4)."""
    problems, G, b = weighted_problems(C=3, K=12, seed=4)
    lam = 0.1 * lambda_max(b * scale)
    W, info = admm_lasso(G, b * scale, lam)
    assert bool(info.converged.all()), info.iterations
    for c, (X, y, sw) in enumerate(problems):
        ref = sklearn_lasso(X, y * scale, sw, float(lam[c]))
        assert rel_err(W[c].numpy(), ref) < 1e-5, (scale, c)
    # the solution scales with b (and lambda): w(s b, s lam) = s w(b, lam)
    W1, _ = admm_lasso(G, b, lam / scale)
    assert rel_err((W / scale).numpy(), W1.numpy()) < 1e-6
    # and inversely with G
    W2, _ = admm_lasso(G * scale, b, lam / scale)
    assert rel_err((W2 * scale).numpy(), W1.numpy()) < 1e-6


def test_lambda_zero_is_weighted_least_squares():
    problems, G, b = weighted_problems(C=3, K=10, seed=2)
    W, info = admm_lasso(G, b, 0.0)
    assert bool(info.converged.all())
    for c, (X, y, sw) in enumerate(problems):
        ref = LinearRegression(fit_intercept=False).fit(X, y, sample_weight=sw).coef_
        assert rel_err(W[c].numpy(), ref) < 1e-5


def test_lambda_at_or_above_lambda_max_gives_zero():
    _, G, b = weighted_problems(C=3, K=8, seed=3)
    lmax = lambda_max(b)
    for scale in (1.0, 1.5):
        W, info = admm_lasso(G, b, lmax * scale)
        assert torch.count_nonzero(W) == 0
    W, _ = admm_lasso(G, b, lmax * 0.98)  # just below: something enters
    assert torch.count_nonzero(W) > 0


def test_cholesky_once_per_class(monkeypatch):
    _, G, b = weighted_problems(C=5, K=9, seed=4)
    calls, rows = [], []
    real = torch.linalg.cholesky_ex

    def counting(A, *args, **kwargs):
        calls.append(1)
        rows.append(A.shape[0])
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    W, info = admm_lasso(G, b, 0.05 * lambda_max(b), chunk_size=2)
    assert int(info.iterations.max()) > 5, "needs several iterations for the test to mean anything"
    assert len(calls) == 3 and sum(rows) == 5  # chunks of 2, 2, 1: one factorisation per class
    assert info.factorizations == 5


def test_chunking_does_not_change_the_result():
    _, G, b = weighted_problems(C=7, K=10, seed=5)
    lam = 0.1 * lambda_max(b)
    W1, _ = admm_lasso(G, b, lam, chunk_size=7)
    W2, _ = admm_lasso(G, b, lam, chunk_size=3)
    torch.testing.assert_close(W1, W2, rtol=0, atol=1e-12)


def test_info_reports_residuals_and_iterations():
    _, G, b = weighted_problems(C=2, K=6, seed=6)
    W, info = admm_lasso(G, b, 0.1 * lambda_max(b), max_iter=3, tol=1e-14)
    assert not bool(info.converged.any()) and torch.all(info.iterations == 3)
    assert torch.all(info.primal_residual >= 0) and torch.all(info.dual_residual >= 0)
    W, info = admm_lasso(G, b, 0.1 * lambda_max(b))
    assert bool(info.converged.all()) and torch.all(info.iterations < 1000)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(lam=-0.1), "lam must be finite and >= 0"),
    (dict(lam=0.1, rho=0.0), "rho must be finite and > 0"),
    (dict(lam=0.1, rho=-1.0), "rho must be finite and > 0"),
    (dict(lam=torch.ones(3)), r"lam must be a float or a Tensor\[C\] with C=2; got shape \[3\]"),
    (dict(lam=0.1, max_iter=0), "max_iter must be >= 1"),
])
def test_bad_arguments(kwargs, pattern):
    _, G, b = weighted_problems(C=2, K=4)
    with pytest.raises(ValueError, match=pattern):
        admm_lasso(G, b, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"G must be \[C, K, K\]; got \[2, 3, 4\]"):
        admm_lasso(torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match=r"b must be \[C, K\] = \[2, 3\] to match G; got \[2, 4\]"):
        admm_lasso(torch.eye(3, dtype=torch.float64).expand(2, 3, 3), torch.zeros(2, 4), 0.1)


def test_over_relaxation_changes_the_path_not_the_solution():
    problems, G, b = weighted_problems(C=3, K=12, seed=5)
    lam = 0.1 * lambda_max(b)
    W1, i1 = admm_lasso(G, b, lam, relaxation=1.0)
    W2, i2 = admm_lasso(G, b, lam, relaxation=1.7)
    assert rel_err(W2.numpy(), W1.numpy()) < 1e-5
    with pytest.raises(ValueError, match=r"relaxation must be in \(0, 2\); got 2.0"):
        admm_lasso(G, b, lam, relaxation=2.0)
