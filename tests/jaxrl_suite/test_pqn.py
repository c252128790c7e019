"""PQN: Q(lambda) returns against loops (ours and purejaxql's recursion), epsilon schedule and
epsilon-greedy, chunked == one-shot, seeds under vmap, CartPole-v1 learning (slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_suite.agents import pqn
from jaxrl_suite.agents.evaluation import evaluate
from jaxrl_suite.envs import make


def q_lambda_loop(r, q, term, done, gamma, lam):
    """Reference from the definition: lambda-mixture of n-step returns, cut at episode ends.

    For each t, with the episode's (or rollout's) last step h >= t inside the rollout,
    G^(n)_t = sum_{k<n} gamma^k r_{t+k} + gamma^n * boot_{t+n-1} where boot_j = (1-term_j) q_j,
    and R_t = (1-lam) sum_{n=1}^{H-1} lam^{n-1} G^(n) + lam^{H-1} G^(H) with H = h - t + 1."""
    T, N = r.shape
    out = np.zeros((T, N))
    for n_env in range(N):
        for t in range(T):
            h = t
            while h < T - 1 and not done[h, n_env]:
                h += 1
            H = h - t + 1
            G = []
            acc = 0.0
            for n in range(1, H + 1):
                j = t + n - 1
                acc += gamma ** (n - 1) * r[j, n_env]
                G.append(acc + gamma ** n * (1 - term[j, n_env]) * q[j, n_env])
            R = sum((1 - lam) * lam ** (n - 1) * G[n - 1] for n in range(1, H))
            out[t, n_env] = R + lam ** (H - 1) * G[H - 1]
    return out


@pytest.mark.parametrize("jit", [False, True])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 10), N=st.integers(1, 3),
       gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_q_lambda_matches_n_step_mixture(jit, seed, T, N, gamma, lam):
    rng = np.random.default_rng(seed)
    r, q = rng.normal(size=(T, N)), rng.normal(size=(T, N))
    kind = rng.integers(0, 3, size=(T, N))  # 0 running, 1 terminated, 2 truncated
    term, done = (kind == 1).astype(float), (kind > 0).astype(float)
    fn = lambda *a: pqn.q_lambda_returns(*a, gamma, lam)
    args = [jnp.asarray(x, jnp.float32) for x in (r, q, term, done)]
    got = (jax.jit(fn) if jit else fn)(*args)
    np.testing.assert_allclose(got, q_lambda_loop(r, q, term, done, gamma, lam), rtol=1e-4,
                               atol=1e-4)


def test_q_lambda_equals_purejaxql_recursion_without_truncation():
    """purejaxql pqn_gymnax.py ``_get_target``, transcribed as a loop (done = terminated)."""
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 9, 4, 0.99, 0.95
    r = rng.normal(size=(T, N))
    done = (rng.random((T, N)) < 0.2).astype(float)
    q_next = rng.normal(size=(T, N))  # max_a Q(next obs of step t)
    ref = np.zeros((T, N))
    last_q = q_next[-1] * (1 - done[-1])
    lam_ret = r[-1] + gamma * last_q
    ref[-1] = lam_ret
    next_q = last_q
    for t in reversed(range(T - 1)):
        # purejaxql's next_q at step t is max Q of the *following* transition's obs (= s_{t+1})
        next_q = q_next[t]
        target_bootstrap = r[t] + gamma * (1 - done[t]) * next_q
        delta = lam_ret - next_q
        lam_ret = target_bootstrap + gamma * lam * delta
        lam_ret = (1 - done[t]) * lam_ret + done[t] * r[t]
        ref[t] = lam_ret
    got = pqn.q_lambda_returns(*(jnp.asarray(x, jnp.float32) for x in (r, q_next, done, done)),
                               gamma, lam)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_linear_epsilon_hand_values():
    steps = jnp.array([0, 5, 10, 20])
    np.testing.assert_allclose(pqn.linear_epsilon(steps, 1.0, 0.2, 10), [1.0, 0.6, 0.2, 0.2],
                               rtol=1e-6)
    np.testing.assert_allclose(pqn.linear_epsilon(steps, 1.0, 0.2, 0), [0.2] * 4)


def test_epsilon_greedy_frequencies():
    q = jnp.tile(jnp.array([[0.0, 3.0, 1.0, -1.0]]), (20000, 1))
    key = jax.random.key(0)
    assert np.all(np.asarray(pqn.epsilon_greedy(key, q, 0.0)) == 1)
    a = np.asarray(pqn.epsilon_greedy(key, q, 0.3))
    freq = np.bincount(a, minlength=4) / a.size
    expected = np.array([0.075, 0.775, 0.075, 0.075])  # 0.3 / 4 each, plus 0.7 on the argmax
    # 5 standard errors of a binomial proportion with n = 20000
    np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.775 * 0.225 / a.size))


def _leaves_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_chunked_equals_one_shot_and_vmap_equals_separate_with_health():
    env = make("gymnax/CartPole-v1")
    cfg = pqn.PQNConfig.smoke(health_every=2, eps_start=1.0, eps_finish=0.2, eps_decay=0.5)
    agent = pqn.make_agent(cfg, env)
    train = jax.jit(agent.train)
    full, full_m = train(jax.random.key(3))
    chunk = jax.jit(agent.train_chunk, static_argnums=1)
    state = agent.init(jax.random.key(3))
    for _ in range(2):
        state, _ = chunk(state, 2)
    _leaves_close(state.params, full.params, 1e-6)
    assert int(state.env_steps) == 4 * 32

    vstate, vm = jax.jit(jax.vmap(agent.train))(jnp.stack([jax.random.key(3), jax.random.key(4)]))
    s4, _ = train(jax.random.key(4))
    _leaves_close(jax.tree.map(lambda x: x[0], vstate.params), full.params, 1e-5)
    _leaves_close(jax.tree.map(lambda x: x[1], vstate.params), s4.params, 1e-5)
    for k in ("health/q/dormant/all", "health/q/grama/hidden/1", "health/q/srank"):
        v = np.asarray(vm[k])
        assert np.all(np.isnan(v[:, [0, 2]])) and np.all(np.isfinite(v[:, [1, 3]])), k
    # LayerNorm layers also report GraMa from the kernel gradient
    assert "health/q/grama_kernel/hidden/0" in vm
    assert np.all(np.isfinite(full_m["loss"]))
    # the agent's epsilon schedule: eps_decay=0.5 of 4 updates -> 1, 0.6, 0.2, 0.2
    np.testing.assert_allclose(full_m["epsilon"], [1.0, 0.6, 0.2, 0.2], rtol=1e-6)


def test_rejects_continuous_actions():
    with pytest.raises(ValueError, match="discrete"):
        pqn.make_agent(pqn.PQNConfig.smoke(), make("gymnax/Pendulum-v1"))


@pytest.mark.slow
@pytest.mark.xla_default
def test_pqn_learns_cartpole():
    """purejaxql's pqn_cartpole.yaml (5e5 steps) solves CartPole-v1 (Gallici et al. 2024)."""
    env = make("gymnax/CartPole-v1")
    agent = pqn.make_agent(pqn.PQNConfig.cartpole(), env)
    state, m = jax.jit(agent.train)(jax.random.key(0))
    greedy = evaluate(env, agent.policy, state.params, jax.random.key(1), num_envs=16)
    assert float(greedy["eval/return"]) >= 400, greedy["eval/return"]
    # training returns are measured with epsilon = 0.2 exploration still on
    assert np.nanmean(np.asarray(m["episode_return"])[-20:]) >= 300
