"""LEAST (jaxrl_suite.least) and its hook in SAC/TD3: hand-computed memories, medians, weights,
threshold and stop rule; adaptive K; warm-up; vmap; a stopped episode stored as a truncation
that bootstraps; LEAST-off / never-stopping hook identical to the plain agent; exact resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_suite import least
from jaxrl_suite.agents import sac
from jaxrl_suite.envs.core import Env
from tests.jaxrl_suite.walk_env import walk_env
from trainkit.checkpoint import Checkpointer


def _memory(rows, k_max=4, length=3):
    """A memory with episodes written one by one (q, g, length) in order."""
    m = least.init_memory(k_max, length)
    for q, g, n in rows:
        m = least.write_episodes(m, jnp.asarray([q], jnp.float32), jnp.asarray([g], jnp.float32),
                                 jnp.asarray([n]), jnp.asarray([True]))
    return m


def test_ring_valid_mask_and_medians_by_hand():
    rows = [([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 3),
            ([5.0, 6.0, 0.0], [3.0, 1.0, 0.0], 2),
            ([3.0, 9.0, 7.0], [2.0, 4.0, 2.0], 3),
            ([7.0, 0.0, 0.0], [5.0, 0.0, 0.0], 1),
            ([0.0, 4.0, 5.0], [6.0, 2.0, 4.0], 3)]  # the 5th overwrites the 1st (K_max = 4)
    m = _memory(rows)
    assert int(m.count) == 4 and int(m.position) == 1
    # K = 4: episodes 2..5; step 0: {5, 3, 7, 0} -> median 4; step 1: {6, 9, 4} -> 6;
    # step 2: {7, 5} -> 6
    eps, g, n = least.step_medians(m, 4)
    np.testing.assert_allclose(eps, [4.0, 6.0, 6.0])
    np.testing.assert_allclose(g, [4.0, 2.0, 3.0])
    np.testing.assert_array_equal(n, [4, 3, 2])
    # K = 2: the two newest (episodes 4 and 5): step 0 {7, 0} -> 3.5, step 1 {4}, step 2 {5}
    eps, _, n = least.step_medians(m, 2)
    np.testing.assert_allclose(eps, [3.5, 4.0, 5.0])
    np.testing.assert_array_equal(n, [2, 1, 1])
    # gathered at per-env step indices, the same numbers
    eps_t, _, _ = least.step_medians(m, 4, jnp.asarray([2, 0]))
    np.testing.assert_allclose(eps_t, [6.0, 4.0])
    # gbar over the valid entries of K = 2: (5 + 6 + 2 + 4) / 4
    np.testing.assert_allclose(least.mean_td_loss(m, 2), 17.0 / 4)


def test_weights_threshold_and_stop_rule_by_hand():
    w = least.omega(jnp.asarray([1.0, 3.0, 2.0, 0.0]), jnp.asarray(2.0), 0.5)
    # 1 + 0.5 (2 - g) / (2 + g)
    np.testing.assert_allclose(w, [1 + 0.5 / 3, 1 - 0.5 / 5, 1.0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(least.omega(jnp.zeros(1), jnp.zeros(()), 0.5), [1.0])
    tau = least.threshold(jnp.asarray([10.0, -10.0, 10.0]), jnp.asarray([1.2, 1.2, 0.8]))
    np.testing.assert_allclose(tau, [12.0, -8.0, 8.0], rtol=1e-6)
    q = jnp.asarray([11.0, 11.0, 11.0, 11.0])
    tau = jnp.asarray([12.0, 12.0, 12.0, jnp.nan])
    n_valid = jnp.asarray([3, 3, 1, 3])
    below = jnp.asarray([1, 0, 1, 1])
    active = jnp.asarray([True, True, True, True])
    stop, below2 = least.stop_decision(q, tau, n_valid, below, active=active, min_episodes=2,
                                       patience=2)
    np.testing.assert_array_equal(below2, [2, 1, 0, 0])  # too few episodes / NaN: reset
    np.testing.assert_array_equal(stop, [True, False, False, False])
    stop, _ = least.stop_decision(q, tau, n_valid, below, active=~active, min_episodes=2,
                                  patience=2)
    assert not stop.any()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=6), st.integers(1, 6))
def test_masked_median_matches_numpy(values, k):
    m = least.init_memory(6, 1)
    for v in values:
        m = least.write_episodes(m, jnp.asarray([[v]]), jnp.asarray([[abs(v)]]), jnp.asarray([1]),
                                 jnp.asarray([True]))
    eps, _, n = least.step_medians(m, k)
    newest = np.asarray(values[-6:], np.float32)[::-1][:k]
    np.testing.assert_allclose(eps[0], np.median(newest), rtol=1e-6, atol=1e-6)
    assert int(n[0]) == newest.size


def test_adaptive_k_at_entropy_extremes():
    k = least.adaptive_k(jnp.asarray([-50.0, -1.0, 0.0, 1.0, 50.0, jnp.nan]), 5, 21, -1.0, 1.0)
    np.testing.assert_array_equal(k, [5, 5, 13, 21, 21, 21])


# --- the hook inside the agents --------------------------------------------------------------

LIMIT = 6


def _walk_env() -> Env:
    return walk_env(LIMIT)  # never terminates: every episode end is a truncation


SMOKE = dataclasses.replace(sac.SACConfig.smoke(), total_steps=128, chunk_steps=16,
                            learning_starts=32)


def _hook(warmup=0, patience=1, k_min=1, k_max=4):
    return least.Least(least.LeastConfig(k_min=k_min, k_max=k_max, warmup_steps=warmup,
                                         patience=patience), SMOKE.num_envs, LIMIT)


def test_stopped_episode_is_a_truncation_that_bootstraps():
    """Force stops (omega_scale 0, patience 1, tau = +median: an episode below it stops) and
    check the stored transitions: stopped steps have terminated = 0 and s' = the step's own
    next observation (not the reset one), the env restarts, and the SAC target on such a
    transition is r + gamma (min Q(s', a') - alpha log pi) (hand-built two-step case)."""
    hook = least.Least(least.LeastConfig(k_min=1, k_max=4, warmup_steps=0, patience=1,
                                         omega_scale=0.0), 2, LIMIT)
    cfg = dataclasses.replace(SMOKE, learning_starts=10_000)  # random actions, no updates
    agent = sac.make_agent(cfg, _walk_env(), hook)

    def run(key):
        state = agent.init(key)
        return jax.lax.scan(lambda s, _: agent.collect(s), state, None, length=40)[0]

    state = jax.jit(run)(jax.random.key(0))
    data = jax.tree.map(np.asarray, state.buffer.data)
    n = 80
    assert int(state.early_stop.stopped) > 0
    # replay env by env: a stop shows as an episode restarting (obs t = 0) before LIMIT steps
    stops = 0
    for e in range(2):
        x, t = 0.0, 0
        for i in range(40):
            row = 2 * i + e
            np.testing.assert_allclose(data["obs"][row], [x, t], atol=1e-6)
            x = np.float32(x + data["action"][row, 0])
            t += 1
            np.testing.assert_allclose(data["next_obs"][row], [x, t], atol=1e-6)  # own s'
            assert data["terminated"][row] == 0.0  # never a termination
            nxt = 2 * (i + 1) + e
            if nxt < n and (t >= LIMIT or data["obs"][nxt][1] == 0.0):
                stops += t < LIMIT
                x, t = 0.0, 0
    assert stops == int(state.early_stop.stopped)
    # two-step hand case: a stopped transition's target bootstraps (terminated = 0)
    reward = jnp.asarray([0.5, 0.5])
    next_q = jnp.asarray([[2.0, 2.0], [3.0, 3.0]])
    next_logp = jnp.asarray([0.1, 0.1])
    y = sac.soft_td_target(reward, jnp.asarray([0.0, 1.0]), next_q, next_logp, 0.2, 0.9)
    np.testing.assert_allclose(y, [0.5 + 0.9 * (2.0 - 0.2 * 0.1), 0.5], rtol=1e-6)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_stop_during_warmup_and_idle_hook_changes_nothing():
    """A hook still in warm-up never stops, and the agent's own state (params, buffer, envs,
    keys) is bit for bit that of the agent without a hook (SAC; TD3 shares the loop)."""
    for mod, cfg in ((sac, SMOKE),):
        plain = jax.jit(mod.make_agent(cfg, _walk_env()).train)(jax.random.key(2))[0]
        hooked = jax.jit(mod.make_agent(cfg, _walk_env(), _hook(warmup=10**9)).train)(
            jax.random.key(2))[0]
        assert int(hooked.early_stop.stopped) == 0
        assert int(hooked.early_stop.episodes) == 2 * (64 // LIMIT)  # natural ends recorded
        assert int(hooked.early_stop.memory.count) == 4
        _assert_trees_equal(plain, hooked.replace(early_stop=None))


def test_memories_under_vmap_equal_separate_runs_and_resume_is_exact(tmp_path):
    agent = sac.make_agent(SMOKE, _walk_env(), _hook(warmup=40, patience=2))
    init, chunk = jax.jit(agent.init), jax.jit(agent.train_chunk)
    keys = jax.random.split(jax.random.key(5), 2)
    states = jax.jit(jax.vmap(agent.init))(keys)
    vchunk = jax.jit(jax.vmap(agent.train_chunk))
    for _ in range(4):
        states, _ = vchunk(states)
    singles = []
    for i in range(2):
        s = init(keys[i])
        for _ in range(4):
            s, m = chunk(s)
        singles.append(s)
        mine = jax.tree.map(lambda x, i=i: x[i], states.early_stop)
        # memories: same episodes, lengths and stop counts; values up to batched rounding
        for name in ("length", "position", "count"):
            np.testing.assert_array_equal(getattr(mine.memory, name),
                                          getattr(s.early_stop.memory, name))
        np.testing.assert_allclose(mine.memory.q, s.early_stop.memory.q, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(mine.stop_hist, s.early_stop.stop_hist)
    assert "least/stop_fraction" in m
    # resume: 2 chunks, checkpoint, restore into a fresh template, 2 more == 4 uninterrupted
    s = init(keys[0])
    for _ in range(2):
        s, _ = chunk(s)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
    assert ckpt.save(2, s, force=True)
    ckpt.close()
    _, restored, _ = Checkpointer(tmp_path / "ckpt", save_every=1).restore(init(keys[1]))
    for _ in range(2):
        restored, _ = chunk(restored)
    _assert_trees_equal(restored, singles[0])
