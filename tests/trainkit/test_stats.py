"""trainkit.stats against scipy's own intervals (independent implementations)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sst

from trainkit import stats
from trainkit.plots import mean_and_ci

samples = st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12).filter(
    lambda v: np.ptp(v) > 1e-3)


@settings(max_examples=50, deadline=None)
@given(samples, st.sampled_from([0.9, 0.95, 0.99]))
def test_mean_ci_is_scipys_t_interval(v, confidence):
    mean, half, n = stats.mean_ci(v, confidence)
    low, high = sst.t.interval(confidence, len(v) - 1, loc=np.mean(v), scale=sst.sem(v))
    assert n == len(v)
    np.testing.assert_allclose([mean - half, mean + half], [low, high], rtol=1e-9, atol=1e-9)


def test_mean_ci_leaves_out_nan_per_column_and_gives_no_interval_from_one_seed():
    v = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, np.nan], [2.0, 4.0, np.nan]])
    mean, half, n = stats.mean_ci(v)
    np.testing.assert_array_equal(n, [3, 1, 1])
    np.testing.assert_allclose(mean, [2.0, 4.0, 5.0])
    assert half[0] == pytest.approx(sst.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)) and half[1] == half[2] == 0.0
    # the plots helper (curves over seeds) is the same interval
    np.testing.assert_allclose(mean_and_ci(v)[1], half)


@settings(max_examples=50, deadline=None)
@given(samples, samples)
def test_difference_ci_is_welchs_interval(a, b):
    diff, low, high = stats.difference_ci(a, b)
    ref = sst.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    np.testing.assert_allclose([low, high], [ref.low, ref.high], rtol=1e-7, atol=1e-7)


def test_difference_ci_refuses_one_seed():
    with pytest.raises(ValueError, match=">= 2 finite values"):
        stats.difference_ci([1.0], [1.0, 2.0])


def test_bootstrap_ci_matches_scipys_percentile_bootstrap():
    v = np.random.default_rng(0).exponential(size=40)
    est, low, high = stats.bootstrap_ci(v, np.median, num_resamples=20_000)
    ref = sst.bootstrap((v,), np.median, n_resamples=20_000, method="percentile",
                        random_state=1).confidence_interval
    assert est == np.median(v)
    np.testing.assert_allclose([low, high], [ref.low, ref.high], rtol=0.05)


@pytest.mark.parametrize("method", ["basic", "percentile"])
def test_multi_sample_bootstrap_ci_matches_scipys_unpaired_bootstrap(method):
    """A skewed two-sample statistic (ratio of means) against scipy's independent resampling."""
    rng = np.random.default_rng(0)
    a, b = rng.exponential(size=30), rng.exponential(2.0, size=50)
    ratio = lambda x, y, axis=-1: np.mean(x, axis=axis) / np.mean(y, axis=axis)  # noqa: E731
    est, low, high = stats.multi_sample_bootstrap_ci((a, b), ratio, method=method,
                                                     num_resamples=20_000)
    ref = sst.bootstrap((a, b), ratio, n_resamples=20_000, method=method, paired=False,
                        random_state=1).confidence_interval
    assert est == pytest.approx(a.mean() / b.mean())
    np.testing.assert_allclose([low, high], [ref.low, ref.high], rtol=0.03)
    # the two methods differ for this skewed statistic: the test tells them apart
    other = "percentile" if method == "basic" else "basic"
    _, low2, _ = stats.multi_sample_bootstrap_ci((a, b), ratio, method=other, num_resamples=20_000)
    assert abs(low2 - low) > 0.03 * abs(low)


def test_multi_sample_bootstrap_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        stats.multi_sample_bootstrap_ci(([1.0, 2.0],), np.mean, method="bca")
    with pytest.raises(ValueError, match=">= 2 rows"):
        stats.multi_sample_bootstrap_ci(([1.0, 2.0], [3.0]), lambda x, y: 0.0)


def test_block_bootstrap_widens_the_interval_of_an_autocorrelated_series():
    """AR(1) with phi = 0.9: the iid interval (block 1) understates the spread of the mean;
    blocks longer than the correlation length recover most of it. The true standard error of
    the mean of an AR(1) series is sigma_x sqrt((1 + phi) / (1 - phi) / n) for large n."""
    rng = np.random.default_rng(0)
    phi, n = 0.9, 4000
    x = np.zeros(n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + rng.normal()
    sd_x = 1 / np.sqrt(1 - phi ** 2)
    true_half = 1.96 * sd_x * np.sqrt((1 + phi) / (1 - phi) / n)
    _, lo1, hi1 = stats.block_bootstrap_ci(x, 1, num_resamples=2000)
    _, lo50, hi50 = stats.block_bootstrap_ci(x, 50, num_resamples=2000)
    assert (hi1 - lo1) / 2 < 0.4 * true_half
    assert 0.7 * true_half < (hi50 - lo50) / 2 < 1.3 * true_half
