"""Running observation moments (Chan et al. merge) and normalisation."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_suite.envs import normalization as nz

SIZE = 3


def batches_strategy():
    batch = st.integers(1, 7).flatmap(lambda n: hnp.arrays(
        np.float32, (n, SIZE), elements=st.floats(-100, 100, width=32)))
    return st.lists(batch, min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(batches=batches_strategy())
def test_merging_batches_one_by_one_equals_moments_of_concatenation(batches):
    update = jax.jit(nz.update)
    stats = nz.init(SIZE)
    for b in batches:
        stats = update(stats, b)
    allx = np.concatenate(batches).astype(np.float64)
    assert int(stats.count) == len(allx)
    scale = 1.0 + np.abs(allx).max()
    np.testing.assert_allclose(stats.mean, allx.mean(0), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(stats.var, allx.var(0), rtol=1e-4, atol=1e-5 * scale ** 2)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_first_update_is_exact_batch_moments(self):
        x = np.array([[1.0, -2.0], [3.0, 4.0], [8.0, 0.0]], np.float32)
        stats = self.variant(nz.update)(nz.init(2), x)
        # hand-computed: means (4, 2/3); population variances (26/3, 56/9)
        np.testing.assert_allclose(stats.mean, [4.0, 2.0 / 3.0], rtol=1e-6)
        np.testing.assert_allclose(stats.var, [26.0 / 3.0, 56.0 / 9.0], rtol=1e-6)
        assert stats.count.dtype == jnp.int32 and int(stats.count) == 3

    @chex.variants(with_jit=True, without_jit=True)
    def test_leading_axes_are_sample_axes(self):
        x = np.random.default_rng(0).normal(size=(4, 5, 2)).astype(np.float32)
        a = self.variant(nz.update)(nz.init(2), x)
        b = self.variant(nz.update)(nz.init(2), x.reshape(20, 2))
        chex.assert_trees_all_close(a, b, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_normalize_fresh_stats_is_identity_and_clip(self):
        x = jnp.array([[0.5, -3.0], [20.0, -20.0]])
        y = self.variant(lambda s, v: nz.normalize(s, v, clip=None))(nz.init(2), x)
        np.testing.assert_allclose(y, x, rtol=1e-6)
        stats = nz.RunningMeanStd(mean=jnp.array([1.0, 0.0]), var=jnp.array([4.0, 0.25]),
                                  count=jnp.array(10, jnp.int32))
        y = self.variant(lambda s, v: nz.normalize(s, v, clip=5.0))(stats, x)
        # (x - mean) / std = [[-0.25, -6], [9.5, -40]] -> clipped to +-5
        np.testing.assert_allclose(y, [[-0.25, -5.0], [5.0, -5.0]], rtol=1e-6)


def test_normalized_stream_has_zero_mean_unit_variance():
    """Stats accumulated over a stream of N(mu, sigma^2) batches standardise fresh samples."""
    mu = jnp.array([5.0, -3.0, 100.0])
    sigma = jnp.array([0.1, 2.0, 30.0])
    keys = jax.random.split(jax.random.key(0), 50)

    def body(stats, k):
        return nz.update(stats, mu + sigma * jax.random.normal(k, (64, 3))), None

    stats, _ = jax.lax.scan(body, nz.init(3), keys)
    fresh = mu + sigma * jax.random.normal(jax.random.key(1), (20000, 3))
    y = nz.normalize(stats, fresh)
    # 3200 samples in the stats: s.e. of the mean 1/sqrt(3200) ~ 0.018 sigma, of the variance
    # sqrt(2/3200) ~ 0.025 (relative): bounds at ~5 and ~3 standard errors
    np.testing.assert_allclose(jnp.mean(y, 0), 0.0, atol=0.1)
    np.testing.assert_allclose(jnp.var(y, 0), 1.0, atol=0.08)
    assert int(stats.count) == 50 * 64


def test_wrong_feature_size_raises():
    with pytest.raises(AssertionError):
        nz.update(nz.init(3), jnp.zeros((4, 2)))
