"""Intervals and paired tests of the quality figures (`chip_ext.evaluation.stats`), against
independent computations: scipy's exact binomial test, a loop over resamples, and coverage on data
whose truth is known."""
import numpy as np
import pytest

from chip_ext.evaluation import stats


def test_sign_test_is_scipys_exact_binomial_test():
    from scipy.stats import binomtest

    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 60))
        a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
        r = stats.sign_test(a, b)
        m = r["a_better"] + r["b_better"]
        assert r["a_better"] == int(((a == 1) & (b == 0)).sum()) and r["b_better"] == int(((a == 0) & (b == 1)).sum())
        expected = binomtest(r["a_better"], m, 0.5).pvalue if m else 1.0
        assert r["p"] == pytest.approx(expected, rel=1e-12)
    assert stats.sign_test([1, 1, 0], [1, 1, 0]) == {"a_better": 0, "b_better": 0, "p": 1.0}


def test_max_over_thresholds_interval_is_the_loop_over_resamples():
    rng = np.random.default_rng(1)
    hits = rng.random((40, 7)) < np.linspace(0.2, 0.7, 7)
    other = rng.random((40, 5)) < 0.4
    r = stats.max_over_thresholds_interval(hits, boot=300, seed=3)
    d = stats.max_over_thresholds_interval(hits, other, boot=300, seed=3)
    idx = np.random.default_rng(3).integers(0, 40, size=(300, 40))  # the same draws
    draws = np.array([hits[i].mean(0).max() for i in idx])
    diffs = np.array([hits[i].mean(0).max() - other[i].mean(0).max() for i in idx])
    assert r["mean"] == hits.mean(0).max()
    assert [r["lo"], r["hi"]] == pytest.approx(np.percentile(draws, [2.5, 97.5]).tolist())
    assert d["mean"] == pytest.approx(hits.mean(0).max() - other.mean(0).max())
    assert [d["lo"], d["hi"]] == pytest.approx(np.percentile(diffs, [2.5, 97.5]).tolist())


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(200):
        v = rng.random(100) < 0.3
        r = stats.bootstrap_interval(v, boot=400, seed=int(rng.integers(1 << 30)))
        covered += r["lo"] <= 0.3 <= r["hi"]
    assert 0.88 <= covered / 200 <= 0.99
    # a paired difference of a method with itself is exactly zero
    v = rng.random(50)
    assert stats.paired(v, v) == {"mean": 0.0, "lo": 0.0, "hi": 0.0,
                                  "sign_test": {"a_better": 0, "b_better": 0, "p": 1.0}}


def test_a_clear_difference_is_significant_and_its_interval_excludes_zero():
    a = np.r_[np.ones(40), np.zeros(10)]
    b = np.r_[np.ones(20), np.zeros(30)]
    r = stats.paired(a, b)
    assert r["mean"] == pytest.approx(0.4) and r["lo"] > 0 and r["sign_test"]["p"] < 1e-5


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="values must be a non-empty 1-d array"):
        stats.bootstrap_interval([])
    with pytest.raises(ValueError, match=r"minus must have the shape of values \[3\]; got \[2\]"):
        stats.bootstrap_interval([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"hits must be \[n, T\]"):
        stats.max_over_thresholds_interval([1, 0, 1])
    with pytest.raises(ValueError, match="a and b must be 1-d of one length"):
        stats.sign_test([1, 0], [1])
    assert stats.format_interval({"mean": 0.5604, "lo": 0.5, "hi": 0.61}) == "0.560 [0.500, 0.610]"
