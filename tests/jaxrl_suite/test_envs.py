"""jaxrl_suite.envs back ends (gymnax, brax, MuJoCo Playground DMC) against independent oracles.

Per back end one small environment is built and compiled once per module (brax and DMC compile
slowly): a batch of environments is reset and rolled out under ``jit(scan(vmap(step)))``; then
every transition is re-done with the *raw* back end (gymnax ``step_env``, brax ``env.step``,
playground ``env.step``, written here without our wrapper) from the inner state our wrapper
carried, and ``final_obs``/``reward``/``terminated`` must equal what the raw step gives; the
truncation flags and episode statistics must equal a plain Python reference loop over the
termination and reward streams.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_suite import envs

BATCH = 2


@dataclasses.dataclass
class Case:
    env: envs.Env
    limit: int
    actions: np.ndarray  # [T, B, ...]
    s0: envs.EnvState  # batched reset state
    traj: envs.EnvState  # [T, B] state after each step
    raw_step: Callable  # (inner, action) -> (obs, reward, done), single env, raw back end
    is_reset_obs: Callable  # [N, obs] -> [N] bool: in the back end's initial-state support


def _rollout(env, actions, seed=0):
    reset = jax.jit(jax.vmap(env.reset))

    @jax.jit
    def roll(state, acts):
        def body(s, a):
            s = jax.vmap(env.step)(s, a)
            return s, s
        return jax.lax.scan(body, state, acts)

    s0 = reset(jax.random.split(jax.random.key(seed), actions.shape[1]))
    _, traj = roll(s0, jnp.asarray(actions))
    return s0, traj


def _np(tree):
    """Arrays to numpy (PRNG key arrays stay as they are)."""
    return jax.tree.map(
        lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x),
        tree)


def _prev_states(case):
    """The state each step started from: [s0, traj[:-1]] (shape [T, B])."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b[:-1]]), case.s0, case.traj)


def _raw_replay(case):
    """Raw back-end step from the carried inner state, for every (t, b): obs, reward, done."""
    inner = _prev_states(case).inner
    f = jax.jit(jax.vmap(jax.vmap(case.raw_step)))
    return _np(f(inner, jnp.asarray(case.actions)))


def _reference_flags_and_stats(terminated, rewards, limit):
    """Python reference: truncation at the limit unless terminated; episode returns/lengths."""
    T, B = terminated.shape
    trunc = np.zeros((T, B), np.float32)
    returned = np.zeros((T, B), np.float64)
    lengths = np.zeros((T, B), np.int64)
    finished = np.zeros((T, B), np.float32)
    for b in range(B):
        t_in_ep, ret, last_ret, last_len = 0, 0.0, 0.0, 0
        for t in range(T):
            t_in_ep += 1
            ret += float(rewards[t, b])
            trunc[t, b] = float(t_in_ep >= limit and not terminated[t, b])
            if terminated[t, b] or trunc[t, b]:
                last_ret, last_len, ret, t_in_ep = ret, t_in_ep, 0.0, 0
                finished[t, b] = 1.0
            returned[t, b], lengths[t, b] = last_ret, last_len
    return trunc, returned, lengths, finished


# ----------------------------------------------------------------------------------------------
# one case per back end (module-scoped: built and compiled once)


@pytest.fixture(scope="module")
def cartpole():
    import gymnax

    limit, T = 20, 50
    env = envs.make("gymnax/CartPole-v1", max_episode_steps=limit)
    # env 0 alternates left/right (stays up: truncations); env 1 always pushes left (falls)
    actions = np.stack([np.arange(T) % 2, np.zeros(T)], axis=1).astype(np.int32)
    s0, traj = _rollout(env, actions)
    raw, params = gymnax.make("CartPole-v1")

    def raw_step(inner, a):
        obs, _, r, d, _ = raw.step_env(jax.random.key(0), inner, a, params)
        return obs, r, d

    return Case(env, limit, actions, s0, traj, raw_step,
                lambda o: np.all(np.abs(o) <= 0.05, axis=-1))


@pytest.fixture(scope="module")
def pendulum():
    import gymnax

    limit, T = 7, 16
    env = envs.make("gymnax/Pendulum-v1", max_episode_steps=limit)
    actions = np.asarray(jax.random.uniform(jax.random.key(3), (T, BATCH, 1), minval=-1.0,
                                            maxval=1.0))
    s0, traj = _rollout(env, actions)
    raw, params = gymnax.make("Pendulum-v1")

    def raw_step(inner, a):
        # independent oracle of the rescaling: Pendulum's torque bounds are [-2, 2]
        obs, _, r, d, _ = raw.step_env(jax.random.key(0), inner, 2.0 * a[0], params)
        return obs, r, d

    # reset: theta ~ U[-pi, pi], theta_dot ~ U[-1, 1]; obs = (cos, sin, theta_dot)
    return Case(env, limit, actions, s0, traj, raw_step,
                lambda o: (np.abs(o[..., 2]) <= 1.0)
                & np.isclose(o[..., 0] ** 2 + o[..., 1] ** 2, 1.0, atol=1e-5))


@pytest.fixture(scope="module")
def brax_pendulum():
    from brax import envs as brax_envs

    limit, T = 12, 30
    env = envs.make("brax/inverted_pendulum", max_episode_steps=limit)  # default backend
    # env 0: no force (the pole stays within 0.2 rad for 12 steps: truncations);
    # env 1: full force to one side (the pole tips over: terminations)
    actions = np.zeros((T, BATCH, 1), np.float32)
    actions[:, 1] = 1.0
    s0, traj = _rollout(env, actions)
    from jaxrl_suite.envs.brax_backend import DEFAULT_BACKEND

    raw = brax_envs.get_environment("inverted_pendulum", backend=DEFAULT_BACKEND)

    def raw_step(inner, a):
        s = raw.step(inner, a)
        return s.obs, s.reward, s.done

    # reset: q, qd ~ U[-0.01, 0.01] around init_q = 0; obs = (q, qd)
    return Case(env, limit, actions, s0, traj, raw_step,
                lambda o: np.all(np.abs(o) <= 0.01 + 1e-6, axis=-1))


@pytest.fixture(scope="module")
def dmc_cartpole():
    from mujoco_playground import registry

    limit, T = 5, 12
    env = envs.make("dmc/CartpoleBalance", max_episode_steps=limit)  # default impl (jax)
    actions = np.asarray(jax.random.uniform(jax.random.key(4), (T, BATCH, 1), minval=-1.0,
                                            maxval=1.0))
    s0, traj = _rollout(env, actions)
    raw = registry.load("CartpoleBalance", config_overrides={"impl": "jax"})

    def raw_step(inner, a):
        s = raw.step(inner, a)  # ctrlrange is [-1, 1]: no rescaling
        return s.obs, s.reward, s.done

    def is_reset(o):  # cart in [-0.1, 0.1], pole within 0.034 rad, velocities 0.01 N(0, 1)
        return ((np.abs(o[..., 0]) <= 0.1) & (o[..., 1] >= np.cos(0.0341))
                & (np.abs(o[..., 2]) <= np.sin(0.0341)) & np.all(np.abs(o[..., 3:]) < 0.07, -1))

    return Case(env, limit, actions, s0, traj, raw_step, is_reset)


CASES = [
    pytest.param("cartpole", id="gymnax-CartPole"),
    pytest.param("pendulum", id="gymnax-Pendulum"),
    pytest.param("brax_pendulum", id="brax-inverted_pendulum", marks=pytest.mark.slow),
    pytest.param("dmc_cartpole", id="dmc-CartpoleBalance", marks=pytest.mark.slow),
]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------------------------


def test_state_survives_a_checkpoint(case, tmp_path):
    """The whole env state (MJX data with its zero-size arrays, PRNG keys, statistics) goes
    through a trainkit checkpoint bit for bit (so it steps like the original: the step is a
    pure function of it; stepping it here again cost ~28 s of compilation for DMC)."""
    from trainkit.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    assert ckpt.save(1, case.s0)
    ckpt.close()
    _, restored, _ = Checkpointer(tmp_path / "ck", save_every=1).restore(case.s0)
    key_data = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x, t)
    chex.assert_trees_all_equal(key_data(restored), key_data(case.s0))


def test_shapes_and_dtypes(case):
    spec, traj = case.env.spec, case.traj
    T, B = case.actions.shape[:2]
    for s, lead in ((case.s0, (B,)), (traj, (T, B))):
        assert s.obs.shape == lead + (spec.observation_size,) and s.obs.dtype == jnp.float32
        assert s.final_obs.shape == s.obs.shape and s.final_obs.dtype == jnp.float32
        for x in (s.reward, s.terminated, s.truncated, s.stats.episode_return,
                  s.stats.returned_return, s.stats.finished):
            assert x.shape == lead and x.dtype == jnp.float32
        for x in (s.time, s.stats.episode_length, s.stats.returned_length):
            assert x.shape == lead and x.dtype == jnp.int32
    assert np.all(np.isfinite(np.asarray(traj.obs)))
    assert spec.max_episode_steps == case.limit
    if spec.discrete:
        assert spec.action_size == 1 and spec.num_actions >= 2
    else:
        assert spec.num_actions == 0 and case.actions.shape[-1] == spec.action_size


def test_transitions_match_raw_back_end(case):
    """final_obs, reward and terminated equal the raw back end's step from the same state."""
    obs, reward, done = _raw_replay(case)
    traj = _np(case.traj)
    np.testing.assert_allclose(traj.final_obs, obs.reshape(traj.final_obs.shape),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(traj.reward, reward, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(traj.terminated, np.asarray(done, np.float32))


def test_truncation_and_episode_stats_match_reference_loop(case):
    traj = _np(case.traj)
    trunc, returned, lengths, finished = _reference_flags_and_stats(
        traj.terminated, traj.reward, case.limit)
    np.testing.assert_array_equal(traj.truncated, trunc)
    assert not np.any((traj.truncated > 0) & (traj.terminated > 0))
    assert traj.truncated.sum() >= 1  # the limit was reached at least once
    np.testing.assert_array_equal(traj.stats.finished, finished)
    np.testing.assert_array_equal(traj.stats.returned_length, lengths)
    np.testing.assert_allclose(traj.stats.returned_return, returned, rtol=1e-5, atol=1e-5)
    # a truncation happens exactly max_episode_steps steps after the previous episode ended
    for b in range(traj.truncated.shape[1]):
        ends = np.flatnonzero(np.maximum(traj.terminated[:, b], traj.truncated[:, b]))
        starts = np.concatenate([[-1], ends[:-1]])
        for s, e in zip(starts, ends):
            if traj.truncated[e, b]:
                assert e - s == case.limit and traj.terminated[e, b] == 0


def test_done_steps_reset(case):
    traj = _np(case.traj)
    done = np.maximum(traj.terminated, traj.truncated) > 0
    assert done.sum() >= 1
    # not done: obs is the next obs itself (up to float rounding: XLA may fuse the two uses
    # of the same value differently), and the clock runs on
    np.testing.assert_allclose(traj.obs[~done], traj.final_obs[~done], rtol=1e-6, atol=1e-6)
    prev_time = np.concatenate([np.asarray(case.s0.time)[None], traj.time[:-1]])
    np.testing.assert_array_equal(traj.time[~done], prev_time[~done] + 1)
    # done: obs is a fresh initial observation, different from the pre-reset final_obs
    assert np.all(case.is_reset_obs(traj.obs[done]))
    assert not np.any(np.all(np.isclose(traj.obs[done], traj.final_obs[done]), axis=-1))
    np.testing.assert_array_equal(traj.time[done], 0)
    np.testing.assert_array_equal(traj.stats.episode_length[done], 0)
    np.testing.assert_array_equal(traj.stats.episode_return[done], 0.0)
    assert np.all(case.is_reset_obs(np.asarray(case.s0.obs)))


def test_terminations(cartpole):
    """CartPole pushed one way falls: terminated=1, truncated=0 (the raw env agrees, above)."""
    traj = _np(cartpole.traj)
    assert traj.terminated[:, 1].sum() >= 2  # env 1 falls again and again
    assert traj.terminated[:, 0].sum() == 0  # the balanced env only truncates
    first = int(np.flatnonzero(traj.terminated[:, 1])[0])
    assert first + 1 < cartpole.limit and traj.truncated[first, 1] == 0
    assert traj.stats.returned_length[first, 1] == first + 1
    # CartPole-v1 pays 1 per step including the terminal one
    assert traj.stats.returned_return[first, 1] == first + 1


@pytest.mark.slow
def test_brax_termination(brax_pendulum):
    traj = _np(brax_pendulum.traj)
    assert traj.terminated[:, 1].sum() >= 2
    assert traj.terminated[:, 0].sum() == 0
    first = int(np.flatnonzero(traj.terminated[:, 1])[0])
    assert first + 1 < brax_pendulum.limit and traj.truncated[first, 1] == 0
    # the terminal obs has the pole beyond 0.2 rad, the next obs is a reset one
    assert abs(traj.final_obs[first, 1, 1]) > 0.2 and abs(traj.obs[first, 1, 1]) <= 0.01 + 1e-6


@pytest.mark.slow
def test_dmc_never_terminates_except_on_nan(dmc_cartpole):
    traj = _np(dmc_cartpole.traj)
    assert traj.terminated.sum() == 0
    env = dmc_cartpole.env
    state = jax.tree.map(lambda x: x[0], dmc_cartpole.s0)  # env 0 after reset
    data = state.inner.data
    bad = state.replace(inner=state.inner.replace(data=data.replace(
        qpos=data.qpos.at[0].set(jnp.nan))))
    nxt = jax.jit(env.step)(bad, jnp.zeros((1,)))
    assert float(nxt.terminated) == 1.0 and float(nxt.truncated) == 0.0
    assert np.all(np.isfinite(np.asarray(nxt.obs))) and int(nxt.time) == 0
    assert np.isnan(np.asarray(nxt.final_obs)).any()


def test_pendulum_action_rescaling(pendulum):
    """-1/+1 map to Pendulum's torque bounds -2/+2; out-of-range actions are clipped."""
    import gymnax

    raw, params = gymnax.make("Pendulum-v1")
    env = pendulum.env
    state = jax.tree.map(lambda x: x[0], pendulum.s0)

    def raw_obs(torque):
        return np.asarray(raw.step_env(jax.random.key(0), state.inner, jnp.float32(torque),
                                       params)[0])

    step = jax.jit(env.step)
    for a, torque in ((-1.0, -2.0), (1.0, 2.0), (0.25, 0.5), (3.0, 2.0), (-7.0, -2.0)):
        got = np.asarray(step(state, jnp.array([a])).final_obs)
        np.testing.assert_allclose(got, raw_obs(torque), rtol=1e-6, atol=1e-6)
    # the bounds matter: +1 is not the raw torque 1
    assert not np.allclose(np.asarray(step(state, jnp.array([1.0])).final_obs), raw_obs(1.0))


def test_single_env_without_jit():
    env = envs.make("gymnax/CartPole-v1")
    assert env.spec.max_episode_steps == 500 and env.observation_size == 4
    assert env.discrete and env.num_actions == 2
    s = env.reset(jax.random.key(0))
    s = env.step(s, jnp.int32(1))
    assert s.obs.shape == (4,) and int(s.time) == 1 and float(s.stats.episode_return) == 1.0


@pytest.mark.parametrize("name, expected", [
    ("gymnax/CartPole-v2", "gymnax/CartPole-v1"),
    ("brax/hoper", "brax/hopper"),
    ("dmc/CartpoleBalanc", "dmc/CartpoleBalance"),
    ("hopper", "brax/hopper"),
    ("mujoco/CartpoleBalance", "dmc/CartpoleBalance"),
])
def test_unknown_name_lists_close_matches(name, expected):
    with pytest.raises(ValueError, match="unknown") as err:
        envs.make(name)
    assert expected in str(err.value)


def test_list_envs():
    names = envs.list_envs()
    assert set(names) == set(envs.BACKENDS) == {"gymnax", "brax", "dmc"}
    assert "gymnax/CartPole-v1" in names["gymnax"] and "brax/hopper" in names["brax"]
    assert len(names["dmc"]) == 25 and "dmc/CartpoleBalance" in names["dmc"]


def test_bad_backend_options_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        envs.make("brax/hopper", backend="bullet")
    with pytest.raises(ValueError, match="impl"):
        envs.make("dmc/CartpoleBalance", impl="warp")
    with pytest.raises(ValueError, match="max_episode_steps"):
        envs.make("brax/hopper", max_episode_steps=-3)
