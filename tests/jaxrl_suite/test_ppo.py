"""PPO: pure pieces against loops and closed forms; seeds under vmap; chunked == one-shot;
trainkit resume; health metrics in the jitted loop; CartPole-v1 learning (slow)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_suite.agents import ppo
from jaxrl_suite.agents.evaluation import episode_metrics, evaluate
from jaxrl_suite.envs import make
from jaxrl_suite.envs.core import EpisodeStats
from jaxrl_suite.networks import NetworkConfig
from trainkit.config import ConfigError


def gae_loop(r, v, nv, term, done, gamma, lam):
    """Reference: plain Python over time, per environment column."""
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        a_next = 0.0
        for t in reversed(range(T)):
            bootstrap = 0.0 if term[t, n] else nv[t, n]
            delta = r[t, n] + gamma * bootstrap - v[t, n]
            a_next = delta + (0.0 if done[t, n] else gamma * lam * a_next)
            adv[t, n] = a_next
    return adv, adv + v


@pytest.mark.parametrize("jit", [False, True])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), N=st.integers(1, 3),
       gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_matches_loop_with_truncations(jit, seed, T, N, gamma, lam):
    rng = np.random.default_rng(seed)
    r, v, nv = (rng.normal(size=(T, N)).astype(np.float32) for _ in range(3))
    kind = rng.integers(0, 3, size=(T, N))  # 0 running, 1 terminated, 2 truncated
    term = (kind == 1).astype(np.float32)
    done = (kind > 0).astype(np.float32)
    fn = lambda *a: ppo.gae(*a, gamma, lam)
    adv, ret = (jax.jit(fn) if jit else fn)(r, v, nv, term, done)
    adv_ref, ret_ref = gae_loop(r, v, nv, term, done, gamma, lam)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-4, atol=1e-4)


def test_gae_hand_cases():
    g, lam = 0.9, 0.5
    # one env, 3 steps: step 0 truncated (bootstrap V(final_obs)=10), step 1 runs, step 2 terminates
    r = jnp.array([[1.0], [2.0], [3.0]])
    v = jnp.array([[0.5], [1.0], [2.0]])
    nv = jnp.array([[10.0], [4.0], [99.0]])  # 99 must be ignored (terminated)
    term = jnp.array([[0.0], [0.0], [1.0]])
    done = jnp.array([[1.0], [0.0], [1.0]])
    adv, ret = ppo.gae(r, v, nv, term, done, g, lam)
    a2 = 3.0 - 2.0
    a1 = (2.0 + g * 4.0 - 1.0) + g * lam * a2
    a0 = 1.0 + g * 10.0 - 0.5  # truncated: bootstrap, and the trace is cut
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[:, 0], [a0 + 0.5, a1 + 1.0, a2 + 2.0], rtol=1e-6)


def test_clipped_surrogate_and_value_loss_hand_cases():
    old = jnp.zeros(4)
    logp = jnp.log(jnp.array([1.5, 0.5, 1.1, 0.7]))  # ratios
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    loss, aux = ppo.clipped_surrogate_loss(logp, old, adv, 0.2)
    # min(rho A, clip(rho) A): 1.2, 0.5, -1.1, -0.8
    np.testing.assert_allclose(loss, -np.mean([1.2, 0.5, -1.1, -0.8]), rtol=1e-6)
    np.testing.assert_allclose(aux["clip_frac"], 0.75)  # 1.5, 0.5, 0.7 lie outside [0.8, 1.2]
    rho = np.array([1.5, 0.5, 1.1, 0.7])
    np.testing.assert_allclose(aux["approx_kl"], np.mean(rho - 1 - np.log(rho)), rtol=1e-5)

    value, old_v, ret = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]), jnp.array([3.0, 0.5])
    # unclipped: (2-3)^2=1, (0-0.5)^2=.25; clipped preds 1.2, 0.8: (1.2-3)^2=3.24, (0.8-.5)^2=.09
    np.testing.assert_allclose(ppo.value_loss(value, old_v, ret, 0.2, clip=True),
                               0.5 * (3.24 + 0.25) / 2, rtol=1e-6)
    np.testing.assert_allclose(ppo.value_loss(value, old_v, ret, 0.2, clip=False),
                               0.5 * (1.0 + 0.25) / 2, rtol=1e-6)


def test_distributions_against_closed_forms():
    key = jax.random.key(0)
    mean = jax.random.normal(key, (5, 3))
    log_std = jnp.array([-0.5, 0.0, 0.3])
    a = jax.random.normal(jax.random.key(1), (5, 3))
    ref = jnp.sum(jax.scipy.stats.norm.logpdf(a, mean, jnp.exp(log_std)), axis=-1)
    np.testing.assert_allclose(ppo.gaussian_log_prob(mean, log_std, a), ref, rtol=1e-5)
    ent = 0.5 * jnp.log(2 * math.pi * math.e * jnp.exp(2 * log_std)).sum()
    np.testing.assert_allclose(ppo.gaussian_entropy(log_std, (5,)), np.full(5, ent), rtol=1e-5)
    logits = jnp.array([[0.0, 1.0, -2.0]])
    p = np.exp([0.0, 1.0, -2.0]) / np.exp([0.0, 1.0, -2.0]).sum()
    np.testing.assert_allclose(ppo.categorical_log_prob(logits, jnp.array([1])), np.log(p[1:2]),
                               rtol=1e-6)
    np.testing.assert_allclose(ppo.categorical_entropy(logits), [-(p * np.log(p)).sum()],
                               rtol=1e-6)


def test_episode_metrics_weights_finished_episodes():
    z = jnp.zeros((3, 2))
    stats = EpisodeStats(episode_return=z, episode_length=z.astype(jnp.int32),
                         returned_return=jnp.array([[5.0, 7.0], [5.0, 9.0], [11.0, 9.0]]),
                         returned_length=jnp.array([[5, 7], [5, 9], [11, 9]]),
                         finished=jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    m = episode_metrics(stats)
    np.testing.assert_allclose(m["episode_return"], (5 + 9 + 11) / 3, rtol=1e-6)
    assert float(m["episodes"]) == 3
    assert np.isnan(episode_metrics(stats.replace(finished=z))["episode_return"])


def test_config_validation():
    with pytest.raises(ConfigError, match="num_minibatches"):
        ppo.PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
    with pytest.raises(ConfigError, match="ppo_init"):
        ppo.PPOConfig(network=NetworkConfig(kernel_init="lecun_normal"))
    with pytest.raises(ConfigError, match="clip_eps"):
        ppo.PPOConfig(clip_eps=0.0)


def _leaves_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


SMOKE4 = dict(total_timesteps=4 * 16 * 4)  # 4 updates of the smoke config


@pytest.fixture(scope="module")
def cartpole():
    """One agent (health every 2 updates) and its jitted entry points, shared by the tests
    below so that each program compiles once."""
    env = make("gymnax/CartPole-v1")
    agent = ppo.make_agent(ppo.PPOConfig.smoke(health_every=2, **SMOKE4), env)
    train = jax.jit(agent.train)
    return dict(env=env, agent=agent, train=train, init=jax.jit(agent.init),
                chunk=jax.jit(agent.train_chunk, static_argnums=1),
                run3=train(jax.random.key(3)))


def test_ppo_init_gains(cartpole):
    params = cartpole["init"](jax.random.key(0)).params
    k = np.asarray(params["actor"]["hidden"][1]["dense"]["kernel"])  # 16 x 16, orthogonal * sqrt 2
    np.testing.assert_allclose(k.T @ k, 2.0 * np.eye(16), atol=1e-5)
    head = np.asarray(params["actor"]["head"]["kernel"])  # 16 x 2: orthonormal columns * 0.01
    np.testing.assert_allclose(head.T @ head, 1e-4 * np.eye(2), atol=1e-8)
    vhead = np.asarray(params["critic"]["head"]["kernel"])
    np.testing.assert_allclose(vhead.T @ vhead, np.eye(1), atol=1e-5)


def test_chunked_equals_one_shot(cartpole):
    chunk = cartpole["chunk"]
    full_state, full_m = cartpole["run3"]
    state = cartpole["init"](jax.random.key(3))
    rows = []
    for _ in range(2):
        state, m = chunk(state, 2)
        rows.append(m)
    _leaves_close(state.params, full_state.params, 1e-6)
    _leaves_close(state.opt_state, full_state.opt_state, 1e-6)
    np.testing.assert_allclose(np.concatenate([r["loss"] for r in rows]), full_m["loss"],
                               rtol=1e-5)
    assert int(state.update) == 4 and int(state.env_steps) == 4 * 64
    assert not np.allclose(jax.tree.leaves(full_state.params)[0],  # the parameters moved
                           jax.tree.leaves(cartpole["init"](jax.random.key(3)).params)[0])


def test_vmap_over_seeds_equals_separate_runs_with_health_metrics(cartpole):
    agent, train = cartpole["agent"], cartpole["train"]
    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    vstate, m = jax.jit(jax.vmap(agent.train))(keys)
    s4, _ = train(jax.random.key(4))
    _leaves_close(jax.tree.map(lambda x: x[0], vstate.params), cartpole["run3"][0].params, 1e-5)
    _leaves_close(jax.tree.map(lambda x: x[1], vstate.params), s4.params, 1e-5)
    # health metrics, computed inside the vmapped scan at updates 2 and 4 only
    names = [k for k in m if k.startswith("health/")]
    assert "health/actor/dormant/all" in names and "health/critic/srank" in names
    assert "health/actor/grama/hidden/0" in names and "health/critic/grad_norm/global" in names
    for k in names:
        v = np.asarray(m[k])  # [seeds, updates]
        assert v.shape == (2, 4)
        assert np.all(np.isnan(v[:, [0, 2]])), k  # updates 1 and 3: not measured
        assert np.all(np.isfinite(v[:, [1, 3]])), k
    frac = np.asarray(m["health/actor/dormant/all"])[:, 1]
    assert np.all((frac >= 0) & (frac <= 1))
    assert np.all(np.asarray(m["health/critic/srank"])[:, 1] >= 1)


def test_health_metrics_do_not_change_training(cartpole):
    off = ppo.make_agent(ppo.PPOConfig.smoke(**SMOKE4), cartpole["env"])
    s_off, m_off = jax.jit(off.train)(jax.random.key(3))
    assert not any(k.startswith("health/") for k in m_off)
    _leaves_close(s_off.params, cartpole["run3"][0].params, 1e-6)


def test_trainkit_fit_resume_matches_uninterrupted(cartpole, tmp_path):
    from trainkit.loop import LoopSettings, fit
    from trainkit.run import RunDir

    chunk = cartpole["chunk"]
    run = RunDir(tmp_path / "run")
    key = jax.random.key(3)
    kw = dict(chunk_size=2, save_every=2, key_metric="loss")
    fit(run, cartpole["init"](key), chunk, LoopSettings(num_steps=2, **kw))[1].close()
    # a new process rebuilds the initial state as the template and resumes from step 2
    state, logger = fit(run, cartpole["init"](key), chunk, LoopSettings(num_steps=4, **kw),
                        resume=True)
    logger.close()
    ref = cartpole["run3"][0]
    _leaves_close(state.params, ref.params, 1e-6)
    np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(ref.key))
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(rows) == 4


def test_continuous_ppo_with_obs_norm():
    env = make("gymnax/Pendulum-v1")
    agent = ppo.make_agent(ppo.PPOConfig.smoke(normalize_obs=True, init_log_std=1.0, **SMOKE4),
                           env)
    state, m = jax.jit(agent.train)(jax.random.key(4))
    assert state.params["log_std"].shape == (env.action_size,)
    assert np.all(np.isfinite(m["loss"]))
    assert not np.allclose(state.params["log_std"], 1.0)  # the log-std is learned
    # moments of the reset observations plus every observation acted on: 4 + 4 * 16 * 4
    assert int(state.obs_norm.count) == 4 + 4 * 16 * 4
    # Pendulum observations are (cos, sin, angular velocity): |mean| <= 1 for the first two
    assert np.all(np.abs(state.obs_norm.mean[:2]) <= 1) and np.all(state.obs_norm.var > 0)
    # the deterministic policy is the mean action clipped to [-1, 1]
    pp = agent.policy_params(state)
    obs = jax.random.normal(jax.random.key(1), (7, env.observation_size)) * 10
    a = jax.jit(agent.policy)(pp, obs)
    assert a.shape == (7, env.action_size) and float(jnp.max(jnp.abs(a))) <= 1.0
    out = jax.jit(lambda p, k: evaluate(env, agent.policy, p, k, num_envs=3))(
        pp, jax.random.key(2))
    assert float(out["eval/length"]) == 200.0 and float(out["eval/finished"]) == 1.0


def test_nonfinite_updates_are_skipped():
    """Every reward NaN -> every update's losses are NaN: parameters and optimizer state must
    stay exactly the initial ones, and the skips are counted for trainkit's streak check."""
    from jaxrl_suite.envs.core import Env

    base = make("gymnax/CartPole-v1")

    def step(state, action):
        nxt = base.step(state, action)
        return nxt.replace(reward=jnp.full_like(nxt.reward, jnp.nan))

    env = Env(spec=base.spec, reset=base.reset, step=step)
    agent = ppo.make_agent(ppo.PPOConfig.smoke(total_timesteps=4 * 16 * 2), env)
    init, (state, m) = jax.jit(lambda k: (agent.init(k), agent.train(k)))(jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves((state.params, state.opt_state)),
                   jax.tree.leaves((init.params, init.opt_state))))
    np.testing.assert_array_equal(m["skipped"], [1.0, 1.0])
    np.testing.assert_array_equal(m["nonfinite_streak"], [1, 2])
    assert int(state.env_steps) == 2 * 64  # the environments still moved on
    from trainkit.guards import NonFiniteError, check_streak
    with pytest.raises(NonFiniteError):
        check_streak(jax.tree.map(np.asarray, m), 2, step=2)


def test_evaluate_against_python_loop():
    env = make("gymnax/CartPole-v1", max_episode_steps=50)

    def policy(params, obs):  # push in the direction of the pole's angular velocity
        return (obs[:, 3] * params > 0).astype(jnp.int32)

    out = jax.jit(lambda p, k: evaluate(env, policy, p, k, num_envs=4))(1.0, jax.random.key(0))
    # reference: step each environment alone until its first episode ends
    states = jax.vmap(env.reset)(jax.random.split(jax.random.key(0), 4))
    rets, lens = [], []
    step = jax.jit(env.step)
    for i in range(4):
        s = jax.tree.map(lambda x: x[i], states)
        ret, n = 0.0, 0
        while True:
            s = step(s, policy(1.0, s.obs[None])[0])
            ret += float(s.reward)
            n += 1
            if float(s.done):
                break
        rets.append(ret)
        lens.append(n)
    np.testing.assert_allclose(out["eval/returns"], rets)
    np.testing.assert_allclose(out["eval/length"], np.mean(lens))
    assert float(out["eval/finished"]) == 1.0


@pytest.mark.slow
def test_ppo_solves_cartpole():
    """PureJaxRL's CartPole-v1 config reaches ~500 within 5e5 env steps (its README plot)."""
    env = make("gymnax/CartPole-v1")
    agent = ppo.make_agent(ppo.PPOConfig.cartpole(), env)
    state, m = jax.jit(agent.train)(jax.random.key(0))
    ret = np.asarray(m["episode_return"])
    last = ret[-50:]
    assert np.nanmean(last) >= 400, np.nanmean(last)
    greedy = evaluate(env, agent.policy, agent.policy_params(state), jax.random.key(1),
                      num_envs=16)
    assert float(greedy["eval/return"]) >= 400
