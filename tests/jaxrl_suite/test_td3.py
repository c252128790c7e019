"""TD3: smoothing noise bounds, the critic loss against a numpy forward pass and hand target,
delayed actor/target updates, and the ReGraMa reset + health hooks inside the jitted loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_suite.agents import replay, td3
from jaxrl_suite.envs import make
from trainkit.config import ConfigError

SMOKE = td3.TD3Config.smoke()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), noise=st.floats(0.0, 2.0), clip=st.floats(0.0, 1.0))
def test_smoothed_target_action_bounds(seed, noise, clip):
    a = jnp.linspace(-1.0, 1.0, 64).reshape(32, 2)
    out = np.asarray(td3.smoothed_target_action(jax.random.key(seed), a, noise, clip))
    a = np.asarray(a)
    assert np.all(np.abs(out) <= 1.0)
    assert np.all(np.abs(out - a) <= clip + 1e-6)
    if noise == 0.0:
        np.testing.assert_array_equal(out, a)


def test_smoothing_noise_is_a_clipped_gaussian():
    a = jnp.zeros((50_000, 1))
    out = np.asarray(td3.smoothed_target_action(jax.random.key(0), a, 0.2, 0.3))[:, 0]
    # P(|N(0, 0.2^2)| >= 0.3) = 2 * (1 - Phi(1.5)) = 0.1336: the mass piled at +-0.3
    assert abs(np.mean(np.abs(out) >= 0.3 - 1e-7) - 0.1336) < 0.01
    assert abs(np.mean(out)) < 0.005


def _np_mlp(p, x):
    """numpy forward pass of a networks.MLP (relu hidden layers, linear head)."""
    h = x
    for i in range(len(p["hidden"])):
        h = np.maximum(h @ np.asarray(p["hidden"][i]["dense"]["kernel"], np.float64)
                       + np.asarray(p["hidden"][i]["dense"]["bias"], np.float64), 0.0)
    return h @ np.asarray(p["head"]["kernel"], np.float64) + np.asarray(p["head"]["bias"])


@pytest.fixture(scope="module")
def agent():
    return td3.make_agent(SMOKE, make("gymnax/Pendulum-v1"))


def test_critic_loss_against_numpy_forward_and_hand_target(agent):
    cfg = SMOKE
    state = agent.init(jax.random.key(0))
    # move the target critics away from the online ones so the test tells them apart
    target = jax.tree.map(lambda x: x * 1.1 + 0.01, state.critic)
    rng = np.random.default_rng(1)
    n = 16
    batch = {"obs": rng.normal(size=(n, 3)).astype(np.float32),
             "action": rng.uniform(-1, 1, size=(n, 1)).astype(np.float32),
             "reward": rng.normal(size=n).astype(np.float32),
             "next_obs": rng.normal(size=(n, 3)).astype(np.float32),
             "terminated": (rng.uniform(size=n) < 0.3).astype(np.float32)}
    quiet = td3.make_agent(dataclasses.replace(cfg, policy_noise=0.0), agent.env)
    loss, (q, y) = quiet.critic_loss(state.critic, target, state.actor,
                                     jax.tree.map(jnp.asarray, batch), jax.random.key(2))
    member = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
    want_loss = 0.0
    q_hand = np.zeros((2, n))
    for k in range(n):
        s, a, s2 = batch["obs"][k], batch["action"][k], batch["next_obs"][k]
        a2 = np.tanh(_np_mlp(state.actor, s2))  # target actor = actor at init
        q_next = [_np_mlp(member(target, i), np.concatenate([s2, a2]))[0] for i in range(2)]
        if batch["terminated"][k]:
            y_k = batch["reward"][k]
        else:
            y_k = batch["reward"][k] + cfg.gamma * min(q_next)
        np.testing.assert_allclose(y[k], y_k, rtol=1e-4, atol=1e-4)
        for i in range(2):
            q_hand[i, k] = _np_mlp(member(state.critic, i), np.concatenate([s, a]))[0]
    want_loss = np.sum(np.mean((q_hand - np.asarray(y, np.float64)[None]) ** 2, axis=1))
    np.testing.assert_allclose(q, q_hand, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4)


def test_actor_and_targets_move_only_every_policy_delay_updates(agent):
    state = agent.init(jax.random.key(0))
    buf = state.buffer
    rng = np.random.default_rng(0)
    fake = {"obs": rng.normal(size=(64, 3)), "action": rng.uniform(-1, 1, size=(64, 1)),
            "reward": rng.normal(size=64), "next_obs": rng.normal(size=(64, 3)),
            "terminated": np.zeros(64)}
    state = state.replace(buffer=replay.add_batch(buf, jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32), fake)))
    update = jax.jit(agent.update)
    changed = lambda a, b: any(not np.array_equal(x, y) for x, y in
                               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    s1, m1, _ = update(state, jax.random.key(1))  # update 1: critics only
    assert changed(s1.critic, state.critic)
    assert not changed(s1.actor, state.actor) and float(m1["actor_updates"]) == 0
    assert not changed(s1.target_critic, state.target_critic)
    assert not changed(s1.target_actor, state.target_actor)
    s2, m2, _ = update(s1, jax.random.key(2))  # update 2 = policy_delay: actor and targets
    assert changed(s2.actor, s1.actor) and float(m2["actor_updates"]) == 1
    assert changed(s2.target_critic, s1.target_critic)
    assert changed(s2.target_actor, s1.target_actor)
    np.testing.assert_allclose(  # Polyak with tau towards the updated online nets
        s2.target_actor["head"]["bias"],
        (1 - SMOKE.tau) * s1.target_actor["head"]["bias"] + SMOKE.tau * s2.actor["head"]["bias"],
        rtol=1e-6)


def test_regrama_reset_and_health_in_the_jitted_loop(agent):
    cfg = dataclasses.replace(SMOKE, health_every=4, reset="regrama", reset_every=8,
                              reset_tau=0.0)
    agent = td3.make_agent(cfg, agent.env)
    state = agent.init(jax.random.key(3))
    critic = jax.tree.map(lambda x: x, state.critic)
    critic["hidden"][1]["dense"]["bias"] = critic["hidden"][1]["dense"]["bias"].at[:, 5].set(-1e3)
    state = state.replace(critic=critic, target_critic=critic)
    chunk = jax.jit(agent.train_chunk)
    state, m1 = chunk(state)  # updates 1, 2: no reset yet
    np.testing.assert_array_equal(state.critic["hidden"][1]["dense"]["bias"][:, 5], -1e3)
    assert float(m1["reset_neurons"]) == 0 and int(m1["health/reports"]) == 0
    state, m2 = chunk(state)  # updates 3..66: resets at 8, ..., 64; reports at 4, ..., 64
    assert int(m2["health/reports"]) == 16
    assert float(m2["reset_neurons"]) >= 2  # the dead neuron of each critic, GraMa score 0
    assert np.all(np.abs(np.asarray(state.critic["hidden"][1]["dense"]["bias"][:, 5])) < 1.0)
    assert float(m2["actor_updates"]) == 32 and np.isfinite(float(m2["actor_loss"]))
    assert 0.0 <= float(m2["critic/grama/all"]) <= 1.0


def test_config_validation():
    with pytest.raises(ConfigError, match="policy_delay"):
        td3.TD3Config(policy_delay=0)
    with pytest.raises(ConfigError, match="reset"):
        td3.TD3Config(reset="often")
    with pytest.raises(ValueError, match="continuous"):
        td3.make_agent(SMOKE, make("gymnax/CartPole-v1"))


# --- the deterministic policy gradient ----------------------------------------------------------


def _dpg_reference(agent, actor, critic, obs, member_index=0, h=1e-3):
    """-(1/N) sum_s J_pi(s)^T dQ_i(s, a)/da |_{a = pi(s)} (Silver et al. 2014, Thm 1; TD3 uses
    the first critic): dQ/da by central differences of the numpy critic in float64, J_pi by
    autodiff of the policy alone."""
    member = jax.tree.map(lambda x: np.asarray(x[member_index], np.float64), critic)
    total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), actor)
    for s in obs:
        a = np.tanh(_np_mlp(actor, s))
        dq = np.array([(_np_mlp(member, np.concatenate([s, a + h * e]))[0]
                        - _np_mlp(member, np.concatenate([s, a - h * e]))[0]) / (2 * h)
                       for e in np.eye(a.shape[0])])
        jac = jax.jacrev(lambda p: agent.policy(p, jnp.asarray(s[None], jnp.float32))[0])(actor)
        total = jax.tree.map(lambda t, j: t - np.tensordot(dq, np.asarray(j, np.float64), 1),
                             total, jac)
    return jax.tree.map(lambda t: t / len(obs), total)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_actor_gradient_is_the_deterministic_policy_gradient(agent):
    state = agent.init(jax.random.key(4))
    obs = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
    got = _flat(jax.grad(agent.actor_loss)(state.actor, state.critic, jnp.asarray(obs)))
    want = _flat(_dpg_reference(agent, state.actor, state.critic, obs))
    assert np.linalg.norm(want) > 1e-4
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # through the first critic, not the second
    other = _flat(_dpg_reference(agent, state.actor, state.critic, obs, member_index=1))
    assert np.abs(other - want).max() > 10 * 2e-3 * np.abs(want).max()


def test_delayed_update_steps_the_actor_along_the_dpg(agent):
    """The actor's first (Adam) step at update ``policy_delay`` is -lr g / (|g| + eps) with g
    the gradient of ``actor_loss`` (pinned to the DPG by the test above) on the batch, through
    the just-updated critic: an update that ascends, skips or uses the stale critic fails."""
    state = agent.init(jax.random.key(5))
    rng = np.random.default_rng(3)
    one = {"obs": rng.normal(size=3), "action": rng.uniform(-1, 1, size=1),
           "reward": rng.normal(size=()), "next_obs": rng.normal(size=3), "terminated": 0.0}
    # one transition repeated: every sampled batch is known
    fake = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32),
                                                   (64,) + np.shape(x)), one)
    state = state.replace(buffer=replay.add_batch(state.buffer, fake))
    update = jax.jit(agent.update)
    s1, _, _ = update(state, jax.random.key(1))
    s2, m2, _ = update(s1, jax.random.key(2))
    assert float(m2["actor_updates"]) == 1
    obs = jnp.broadcast_to(jnp.asarray(one["obs"], jnp.float32), (SMOKE.batch_size, 3))
    g = jax.grad(agent.actor_loss)(s1.actor, s2.critic, obs)
    want = jax.tree.map(lambda p, gi: p - SMOKE.actor_lr * gi / (jnp.abs(gi) + 1e-8), s1.actor, g)
    np.testing.assert_allclose(_flat(s2.actor), _flat(want), rtol=1e-5, atol=1e-7)
    assert np.abs(_flat(s2.actor) - _flat(s1.actor)).max() > 0.5 * SMOKE.actor_lr


@pytest.mark.slow
def test_td3_learns_pendulum():
    """TD3 on Pendulum-v1 (known: about -200 within ~1e4 env steps) at a CI budget: 6000 env
    steps, 2x128 nets, batch 128, 500 random steps. Threshold as SAC's test, fixed before the
    run: the deterministic policy's evaluation return at least halves the cost of the uniform
    random policy measured here (about -1200), and the last training episodes beat it."""
    from jaxrl_suite.networks import NetworkConfig
    from tests.jaxrl_suite.test_sac import random_policy_return

    env = make("gymnax/Pendulum-v1")
    net = NetworkConfig(kind="mlp", depth=2, width=128)
    cfg = dataclasses.replace(td3.TD3Config.pendulum(), total_steps=6000, learning_starts=500,
                              batch_size=128, buffer_size=6000, actor=net, critic=net)
    agent = td3.make_agent(cfg, env)
    state, metrics = jax.jit(agent.train)(jax.random.key(0))
    result = jax.jit(agent.evaluate)(state, jax.random.key(1))
    random_return = random_policy_return(env, jax.random.key(2))
    assert int(state.env_steps) == cfg.num_chunks * cfg.chunk_steps == 6000
    assert random_return < -900.0, random_return  # the baseline is the known random level
    assert float(result["eval/return"]) > 0.5 * random_return, (result, random_return)
    assert float(metrics["episode_return"][-1]) > random_return
