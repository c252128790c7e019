"""SEM and DLC pure functions: simplex properties, temperature limits, composition, sampling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from generative import dlc
from generative.sem import SEMConfig, SEMHead, simplicial_embedding
from trainkit.config import ConfigError

SETTINGS = settings(max_examples=15, deadline=None)

# A few shapes only (each new shape recompiles); values vary freely through the seed.
shapes = st.sampled_from([(1, 1, 2), (2, 3, 5), (3, 4, 9)])  # batch, L, V
sizes = st.sampled_from([(1, 1, 2), (3, 4, 5), (5, 2, 8)])  # n codes, L, V
seeds = st.integers(0, 2 ** 31 - 1)


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np_sem(z, L, V, tau):
    g = np.asarray(z, np.float64).reshape(*z.shape[:-1], L, V) / tau
    e = np.exp(g - g.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class SEMTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(shape=shapes, seed=seeds, tau=st.floats(0.05, 5.0))
    def test_rows_on_simplex_and_match_numpy(self, shape, seed, tau):
        b, L, V = shape
        z = _normal(seed, (b, L * V), 3.0)
        p = self.variant(simplicial_embedding, static_argnums=(1, 2))(z, L, V, tau)
        chex.assert_shape(p, (b, L, V))
        assert np.all(np.asarray(p) >= 0)
        np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(p, _np_sem(np.asarray(z), L, V, tau), atol=1e-5)

    @SETTINGS
    @given(shape=shapes, seed=seeds)
    def test_small_tau_approaches_one_hot_of_argmax(self, shape, seed):
        b, L, V = shape
        z = _normal(seed, (b, L * V))
        groups = np.sort(np.asarray(z).reshape(b, L, V), -1)
        gap = float((groups[..., -1] - groups[..., -2]).min())  # > 0 almost surely
        one_hot = jax.nn.one_hot(dlc.tokens(z.reshape(b, L, V)), V)
        prev = np.inf
        for scale in (2.0, 8.0, 30.0):
            tau = gap / scale
            err = float(jnp.abs(simplicial_embedding(z, L, V, tau) - one_hot).max())
            # each non-max entry is <= exp(-gap / tau); the max entry is 1 minus their sum
            assert err <= (V - 1) * np.exp(-scale) + 1e-6
            assert err <= prev + 1e-7
            prev = err

    @SETTINGS
    @given(shape=shapes, seed=seeds, tau=st.floats(0.01, 100.0))
    def test_tokens_invariant_to_tau(self, shape, seed, tau):
        b, L, V = shape
        z = _normal(seed, (b, L * V))
        want = np.argmax(np.asarray(z).reshape(b, L, V), -1)
        np.testing.assert_array_equal(dlc.tokens(simplicial_embedding(z, L, V, tau)), want)
        np.testing.assert_array_equal(dlc.tokens(z.reshape(b, L, V)), want)
        assert dlc.tokens(z.reshape(b, L, V)).dtype == jnp.int32

    def test_wrong_width_is_rejected(self):
        with pytest.raises(AssertionError):
            simplicial_embedding(jnp.ones((2, 10)), 3, 4, 1.0)


class SEMHeadTest(chex.TestCase):
    def test_head_is_linear_layernorm_sem(self):
        cfg = SEMConfig(num_groups=3, group_size=5, tau=0.5)
        head = SEMHead(7, cfg, rngs=nnx.Rngs(0))
        h = jax.random.normal(jax.random.key(1), (4, 7))
        probs, z = head(h, return_logits=True)
        chex.assert_shape(probs, (4, 3, 5))
        chex.assert_shape(z, (4, 3, 5))
        # by hand: W h + b, LayerNorm over all L*V entries (scale 1, bias 0 at init), SEM
        lin = np.asarray(h) @ np.asarray(head.proj.kernel[...]) + np.asarray(head.proj.bias[...])
        ln = (lin - lin.mean(-1, keepdims=True)) / np.sqrt(lin.var(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(z.reshape(4, 15), ln, atol=1e-4)
        np.testing.assert_allclose(probs, _np_sem(ln, 3, 5, 0.5), atol=1e-5)
        np.testing.assert_array_equal(dlc.tokens(probs), dlc.tokens(z))
        no_ln = SEMHead(7, SEMConfig(num_groups=3, group_size=5, layer_norm=False),
                        rngs=nnx.Rngs(0))
        _, z2 = no_ln(h, return_logits=True)
        np.testing.assert_allclose(z2.reshape(4, 15), lin, atol=1e-5)

    def test_config_validation(self):
        with pytest.raises(ConfigError, match="tau"):
            SEMConfig(tau=0.0)
        with pytest.raises(ConfigError, match="group_size"):
            SEMConfig(group_size=1)
        assert SEMConfig.tiny().num_groups == 4


# --- composition and sampling ----------------------------------------------------------------------


def _random_dists(seed, n, L, V):
    return jax.nn.softmax(_normal(seed, (n, L, V), 2.0), -1)


class ComposeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(size=sizes, seed=seeds)
    def test_compose_identical_is_identity(self, size, seed):
        n, L, V = size
        d = _random_dists(seed, 1, L, V)[0]
        stacked = jnp.broadcast_to(d, (n, L, V))
        w = jnp.asarray(np.random.default_rng(seed + 1).uniform(0.1, 1.1, n), jnp.float32)
        np.testing.assert_allclose(self.variant(dlc.compose)(stacked), d, atol=1e-6)
        np.testing.assert_allclose(self.variant(dlc.compose)(stacked, w), d, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(size=sizes, seed=seeds)
    def test_compose_is_the_weighted_average(self, size, seed):
        n, L, V = size
        d = _random_dists(seed, n, L, V)
        w = np.random.default_rng(seed + 1).uniform(0.1, 1.1, n)
        got = self.variant(dlc.compose)(d, jnp.asarray(w, jnp.float32))
        want = np.einsum("n,nlv->lv", w / w.sum(), np.asarray(d, np.float64))
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(self.variant(dlc.compose)(d), np.asarray(d).mean(0),
                                   atol=1e-6)
        onehot_w = jnp.zeros(n).at[n - 1].set(3.0)  # selects the last code's distribution
        np.testing.assert_allclose(self.variant(dlc.compose)(d, onehot_w), d[n - 1], atol=1e-6)

    def test_token_distribution_is_sem_of_logits(self):
        z = jax.random.normal(jax.random.key(0), (2, 3, 4))
        np.testing.assert_allclose(dlc.token_distribution(z, 0.7),
                                   simplicial_embedding(z.reshape(2, 12), 3, 4, 0.7), atol=1e-6)


class SampleCodeTest(chex.TestCase):
    def test_frequencies_match_the_distribution(self):
        # Empirical frequencies of N draws vs p (and vs p^(1/T)/Z at T=2): each cell within
        # 5 binomial standard deviations.
        d = _random_dists(0, 1, 3, 4)[0]
        d = d.at[1].set(jnp.array([0.0, 0.5, 0.5, 0.0]))  # zero-probability tokens stay unseen
        n = 40_000
        for temperature in (1.0, 2.0):
            codes = dlc.sample_code(jax.random.key(1), d, temperature, num_samples=n)
            chex.assert_shape(codes, (n, 3))
            assert codes.dtype == jnp.int32
            p = np.asarray(d, np.float64) ** (1 / temperature)
            p /= p.sum(-1, keepdims=True)
            freq = np.stack([np.bincount(np.asarray(codes[:, i]), minlength=4) / n
                             for i in range(3)])
            sd = np.sqrt(p * (1 - p) / n)
            assert np.all(np.abs(freq - p) <= 5 * sd + 1e-12), (freq, p)
            assert freq[1, 0] == 0 and freq[1, 3] == 0

    def test_low_temperature_gives_the_argmax_code(self):
        d = _random_dists(2, 1, 6, 5)[0]
        codes = dlc.sample_code(jax.random.key(3), d, 1e-4, num_samples=50)
        np.testing.assert_array_equal(codes, np.broadcast_to(np.argmax(np.asarray(d), -1),
                                                             (50, 6)))
        chex.assert_shape(dlc.sample_code(jax.random.key(3), d), (6,))

    def test_composition_of_two_point_masses_mixes_them(self):
        # codes a and b as one-hot distributions: the composed code takes each position from
        # a or b with probability 1/2 (and never anything else)
        a = jnp.array([0, 1, 2, 3])
        b = jnp.array([3, 3, 0, 1])
        dists = jax.nn.one_hot(jnp.stack([a, b]), 4)
        codes = np.asarray(dlc.sample_code(jax.random.key(4), dlc.compose(dists),
                                           num_samples=4000))
        assert np.all((codes == np.asarray(a)) | (codes == np.asarray(b)))
        from_a = (codes == np.asarray(a)).mean(0)
        assert np.all(np.abs(from_a - 0.5) <= 5 * np.sqrt(0.25 / 4000))
