"""llm_rl.algorithms against direct (loop / numpy) computations of the paper formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llm_rl import algorithms as A


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 4), size=st.integers(2, 6), seed=st.integers(0, 1000))
def test_group_advantages_match_formulas(groups, size, seed):
    r = np.random.default_rng(seed).normal(size=(groups, size)).astype(np.float32)
    flat = jnp.asarray(r.reshape(-1))
    mean = r.mean(1, keepdims=True)
    np.testing.assert_allclose(A.group_advantages(flat, size, "grpo").reshape(groups, size),
                               (r - mean) / (r.std(1, ddof=1, keepdims=True) + 1e-6), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(A.group_advantages(flat, size, "dr_grpo").reshape(groups, size), r - mean,
                               rtol=1e-5, atol=1e-6)
    loo = np.stack([[r[g, i] - np.delete(r[g], i).mean() for i in range(size)] for g in range(groups)])
    np.testing.assert_allclose(A.group_advantages(flat, size, "rloo").reshape(groups, size), loo,
                               rtol=1e-4, atol=1e-5)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        A.group_advantages(jnp.ones(5), 2, "grpo")
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        A.group_advantages(jnp.ones(4), 1, "rloo")
    with pytest.raises(ValueError, match="method="):
        A.group_advantages(jnp.ones(4), 2, "ppo")


MASK = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]], jnp.float32)


def test_aggregations():
    v = jnp.arange(12.0).reshape(3, 4)
    m = np.asarray(MASK)
    vm = np.asarray(v) * m
    np.testing.assert_allclose(A.aggregate(v, MASK, "seq_mean_token_mean"),
                               np.mean(vm.sum(1) / m.sum(1)))
    np.testing.assert_allclose(A.aggregate(v, MASK, "token_mean"), vm.sum() / m.sum())
    np.testing.assert_allclose(A.aggregate(v, MASK, "seq_sum"), vm.sum(1).mean())
    np.testing.assert_allclose(A.aggregate(v, MASK, "seq_sum_over_budget", budget=4), vm.sum(1).mean() / 4)
    with pytest.raises(ValueError, match="budget"):
        A.aggregate(v, MASK, "seq_sum_over_budget")


class SurrogateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_unclipped_gradient_at_ratio_one_is_reinforce(self):
        logp = jax.random.normal(jax.random.key(0), (3, 4)) - 1
        adv = jnp.array([1.0, -2.0, 0.5])
        loss_fn = self.variant(lambda lp: A.clipped_surrogate(lp, logp, adv, MASK, clip_eps=0.2,
                                                              aggregation="seq_sum")[0])
        g = jax.grad(loss_fn)(logp)
        # d/dlogp of mean_b -A_b sum_t m rho at rho = 1: -A_b m / B
        np.testing.assert_allclose(g, -adv[:, None] * MASK / 3, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_clipping_matches_the_ppo_objective(self):
        key = jax.random.key(1)
        old = jax.random.normal(key, (3, 4)) - 1
        logp = old + 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (3, 4))
        adv = jax.random.normal(jax.random.fold_in(key, 2), (3, 4))
        loss, metrics = self.variant(lambda: A.clipped_surrogate(
            logp, old, adv, MASK, clip_eps=0.2, aggregation="token_mean"))()
        ratio = np.exp(np.asarray(logp - old))
        obj = np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
        m = np.asarray(MASK)
        np.testing.assert_allclose(loss, -(obj * m).sum() / m.sum(), rtol=1e-5)
        assert 0.0 < float(metrics["clip_frac"]) < 1.0


def _gae_reference(r, v, m, gamma, lam):
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        running = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = v[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = r[b, t] + gamma * next_v - v[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_matches_reference_loop(seed, gamma, lam):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(3, 4)).astype(np.float32)
    v = rng.normal(size=(3, 4)).astype(np.float32)
    m = np.asarray(MASK)
    adv, ret = A.gae(jnp.asarray(r), jnp.asarray(v), MASK, gamma=gamma, lam=lam)
    want = _gae_reference(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, (want + v) * m, rtol=1e-4, atol=1e-5)


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    r = A.terminal_rewards(jnp.array([1.0, -1.0, 2.0]), MASK)
    v = jnp.full((3, 4), 0.25)
    adv, _ = A.gae(r, v, MASK, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, (jnp.array([1.0, -1.0, 2.0])[:, None] - 0.25) * MASK, rtol=1e-6)


def test_terminal_rewards_on_last_token():
    r = A.terminal_rewards(jnp.array([1.0, 2.0, 3.0]), MASK)
    np.testing.assert_array_equal(r, [[0, 0, 1, 0], [0, 0, 0, 2], [3, 0, 0, 0]])


def test_value_loss_clipping_and_whiten():
    v = jnp.array([[1.0, 2.0, 0.0, 0.0]])
    old = jnp.array([[0.0, 2.0, 0.0, 0.0]])
    ret = jnp.array([[2.0, 1.0, 0.0, 0.0]])
    m = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.2 -> (0.2-2)^2 = 3.24 -> max 3.24; token 1: 1.
    np.testing.assert_allclose(A.value_loss(v, old, ret, m, clip_eps=0.2), 0.5 * (3.24 + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(A.value_loss(v, old, ret, m, clip_eps=None), 0.5 * (1 + 1) / 2)
    w = A.whiten(jnp.array([[1.0, 3.0, 100.0]]), jnp.array([[1.0, 1.0, 0.0]]))
    np.testing.assert_allclose(w, [[-1.0, 1.0, 0.0]], atol=1e-6)
