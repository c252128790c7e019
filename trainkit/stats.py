"""Interval estimates shared by every experiment's report (one place, one convention).

Seeds are independent runs; a report's verdict must rest on an interval over seeds, never on
configurations x seeds pooled as if independent, nor on a population (``ddof=0``) standard
deviation.

- :func:`mean_ci`: mean over axis 0 (seeds) with the Student-t interval
  ``mean +- t_{1-a/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation (``ddof=1``);
  NaN entries are left out column by column.
- :func:`difference_ci`: ``mean(a) - mean(b)`` for two independent groups of seeds, with
  Welch's interval: ``se = sqrt(s_a^2/n_a + s_b^2/n_b)``, degrees of freedom
  ``se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))`` (Welch-Satterthwaite).
- :func:`bootstrap_ci`: percentile bootstrap of any statistic of iid samples.
- :func:`multi_sample_bootstrap_ci`: a statistic of several independent samples (e.g. a
  difference of Frechet distances: reference, set A, set B), each resampled on its own; the
  *basic* interval ``[2 t - q_{1-a/2}, 2 t - q_{a/2}]`` (``t`` the estimate, ``q`` quantiles of
  the resampled statistic) or the percentile interval ``[q_{a/2}, q_{1-a/2}]``.
- :func:`block_bootstrap_ci`: moving-block bootstrap of the mean of an autocorrelated series
  (training-step losses): resampling blocks of ``block`` consecutive values keeps the
  correlation inside each block, where an iid bootstrap would understate the spread
  (Kunsch 1989).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def t_quantile(dof: int | np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Two-sided Student-t quantile ``t_{(1+confidence)/2, dof}``: ``scipy.stats.t.ppf``'s own
    kernel, the inverse of the t CDF, from ``scipy.special`` (``scipy.stats`` takes ~1 s to
    import, paid by every report)."""
    from scipy import special

    return special.stdtrit(dof, (1.0 + confidence) / 2.0)


def mean_ci(values, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, half_width, n)`` over axis 0 (seeds) of ``values`` ([seeds] or [seeds, ...]).

    NaN entries are left out per column (``n`` counts the finite ones); the mean is NaN where
    ``n == 0`` and the half-width 0 where ``n < 2`` (no interval from one seed)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    mean = np.where(n > 0, np.where(finite, values, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
    sq = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
    sd = np.sqrt(sq / np.maximum(n - 1, 1))
    half = np.where(n >= 2, t_quantile(np.maximum(n - 1, 1), confidence) * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, half, n


def difference_ci(a, b, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)``: Welch's interval for two independent groups of seeds
    (NaN values dropped). Needs at least 2 finite values in each group."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"difference_ci needs >= 2 finite values per group, got {len(a)} and {len(b)}")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    se = float(np.sqrt(va + vb))
    if se == 0.0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(t_quantile(dof, confidence)) * se
    return diff, diff - half, diff + half


def bootstrap_ci(values, statistic: Callable[[np.ndarray], float] = np.mean, *,
                 num_resamples: int = 10_000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(statistic(values), low, high)``: percentile bootstrap over the first axis of
    ``values`` (iid samples: seeds, or problems of one run)."""
    values = np.asarray(values)
    if len(values) < 2:
        raise ValueError(f"bootstrap_ci needs >= 2 samples, got {len(values)}")
    return multi_sample_bootstrap_ci((values,), statistic, method="percentile",
                                     num_resamples=num_resamples, confidence=confidence, seed=seed)


def block_bootstrap_ci(series, block: int, *, num_resamples: int = 10_000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of an autocorrelated 1-D series by the moving-block bootstrap:
    each resample concatenates ``ceil(n / block)`` blocks of ``block`` consecutive values,
    starting at uniform positions in ``[0, n - block]``, cut to length ``n``. ``block = 1`` is
    the iid bootstrap of the mean."""
    series = np.asarray(series, dtype=np.float64).ravel()
    n = len(series)
    if not 1 <= block <= n:
        raise ValueError(f"block must be in [1, {n}] for a series of {n} values, got {block}")
    rng = np.random.default_rng(seed)
    num_blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(num_resamples, num_blocks))
    idx = (starts[:, :, None] + np.arange(block)).reshape(num_resamples, -1)[:, :n]
    means = series[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(series.mean()), float(low), float(high)


def multi_sample_bootstrap_ci(samples, statistic: Callable[..., float], *,
                              method: str = "basic", num_resamples: int = 2000,
                              confidence: float = 0.95,
                              seed: int = 0) -> tuple[float, float, float]:
    """``(statistic(*samples), low, high)`` for independent samples (arrays, resampled along
    their first axis, each on its own: rows may be feature vectors).

    ``method="basic"`` (reverse percentile): ``[2 t - q_{1-a/2}, 2 t - q_{a/2}]``; it moves the
    interval against the bootstrap's own shift, which matters for biased statistics such as a
    Frechet distance. ``method="percentile"``: ``[q_{a/2}, q_{1-a/2}]``. Same conventions as
    ``scipy.stats.bootstrap(..., paired=False)`` with these methods (pinned by a test)."""
    samples = [np.asarray(s) for s in samples]
    if method not in ("basic", "percentile"):
        raise ValueError(f"method must be 'basic' or 'percentile', got {method!r}")
    if not samples or any(len(s) < 2 for s in samples):
        raise ValueError(f"every sample needs >= 2 rows, got sizes {[len(s) for s in samples]}")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(*samples))
    boot = np.empty(num_resamples)
    for r in range(num_resamples):
        boot[r] = statistic(*(s[rng.integers(0, len(s), size=len(s))] for s in samples))
    alpha = (1.0 - confidence) / 2.0
    q_low, q_high = np.quantile(boot, [alpha, 1.0 - alpha])
    if method == "percentile":
        return estimate, float(q_low), float(q_high)
    return estimate, float(2 * estimate - q_high), float(2 * estimate - q_low)
