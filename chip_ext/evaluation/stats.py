"""Uncertainty of quality figures over images: percentile bootstrap intervals, paired differences
between two methods scored on the same images, and the exact sign test.

Every figure `evaluate` reports is a mean over images (a box right or wrong, a deletion AUC) or the best
such mean over thresholds (MaxBoxAcc). Its 95% interval comes from resampling the images with
replacement (`boot` draws, fixed seed: the same draws for every method, so paired differences are paired);
a statistic that is a maximum over thresholds is re-maximised in every draw.
"""
from __future__ import annotations

import math

import numpy as np

BOOT = 2000


def _draw_counts(n: int, boot: int, seed: int) -> np.ndarray:
    """[boot, n] how often each image is drawn in each bootstrap resample (the same for a seed)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(boot, n))
    counts = np.zeros((boot, n), dtype=np.float64)
    np.add.at(counts, (np.arange(boot)[:, None], idx), 1.0)
    return counts


def bootstrap_interval(values, minus=None, *, boot: int = BOOT, seed: int = 0) -> dict:
    """{"mean", "lo", "hi"}: the mean of `values` [n] (minus the mean of `minus` [n] over the same
    resampled images: a paired difference) and its 95% percentile bootstrap interval (NaNs ignored)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-d array (one number an image); got shape {list(values.shape)}")
    if minus is not None:
        minus = np.asarray(minus, dtype=float)
        if minus.shape != values.shape:
            raise ValueError(f"minus must have the shape of values {list(values.shape)}; got {list(minus.shape)}")
    rng = np.random.default_rng(seed)
    n = len(values)

    def stat(idx):
        v = np.nanmean(values[idx])
        return v - np.nanmean(minus[idx]) if minus is not None else v

    point = stat(np.arange(n))
    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(boot)])
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi)}


def max_over_thresholds_interval(hits, minus=None, *, boot: int = BOOT, seed: int = 0) -> dict:
    """MaxBoxAcc with its interval: hits [n, T] (0/1 an image and threshold) -> {"mean": the best
    accuracy over thresholds, "lo", "hi"}, the maximum taken again in every resample. With `minus`
    ([n, T'] of another method on the same images) the paired difference of the two maxima."""
    hits = np.asarray(hits, dtype=float)
    if hits.ndim != 2 or len(hits) == 0:
        raise ValueError(f"hits must be [n, T] with n > 0; got shape {list(hits.shape)}")
    if minus is not None:
        minus = np.asarray(minus, dtype=float)
        if minus.ndim != 2 or len(minus) != len(hits):
            raise ValueError(f"minus must be [n={len(hits)}, T]; got shape {list(minus.shape)}")
    n = len(hits)
    w = _draw_counts(n, boot, seed) / n  # [boot, n]

    def best(h):
        return h.mean(0).max(), (w @ h).max(1)

    point, draws = best(hits)
    if minus is not None:
        p2, d2 = best(minus)
        point, draws = point - p2, draws - d2
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi)}


def sign_test(a, b) -> dict:
    """The exact two-sided sign test of paired per-image scores a [n], b [n]: {"a_better": images where
    a > b, "b_better": where b > a (ties dropped), "p": P(a split at least this uneven | no difference)}.
    For 0/1 hits this is the exact McNemar test on the images one method gets right and the other wrong."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-d of one length; got {list(a.shape)} and {list(b.shape)}")
    ok = ~(np.isnan(a) | np.isnan(b))
    plus, minus = int((a[ok] > b[ok]).sum()), int((a[ok] < b[ok]).sum())
    m = plus + minus
    if m == 0:
        return {"a_better": 0, "b_better": 0, "p": 1.0}
    k = min(plus, minus)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0 ** m
    return {"a_better": plus, "b_better": minus, "p": float(min(1.0, 2 * tail))}


def paired(a, b, *, boot: int = BOOT, seed: int = 0) -> dict:
    """a [n] minus b [n] on the same images: {"mean", "lo", "hi"} (bootstrap) and the sign test."""
    out = bootstrap_interval(a, minus=b, boot=boot, seed=seed)
    out["sign_test"] = sign_test(a, b)
    return out


def format_interval(r: dict, digits: int = 3) -> str:
    """"0.560 [0.505, 0.614]" from {"mean", "lo", "hi"}."""
    return f"{r['mean']:.{digits}f} [{r['lo']:.{digits}f}, {r['hi']:.{digits}f}]"
