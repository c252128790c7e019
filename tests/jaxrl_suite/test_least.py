"""LEAST (jaxrl_suite.least) and its hook in SAC/TD3: hand-computed memories, medians, weights,
threshold and stop rule; adaptive K; warm-up; vmap; a stopped episode stored as a truncation
that bootstraps; LEAST-off / never-stopping hook identical to the plain agent; exact resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
    # entropy of B_Q (K = 2): step 0 {7, 0} var 24.5, steps 1, 2 have one episode each
    np.testing.assert_allclose(least.q_entropy(m, 2), 0.5 * np.log(2 * np.pi * np.e * 24.5),
                               rtol=1e-6)
    v4 = np.mean([np.var(x, ddof=1) for x in ([5, 3, 7, 0], [6, 9, 4], [7, 5])])  # = 5.75
    np.testing.assert_allclose(least.q_entropy(m, 4), 0.5 * np.log(2 * np.pi * np.e * v4),
                               rtol=1e-6)


def test_weights_threshold_and_stop_rule_by_hand():
    # omega_i = clip(median G / G_i, 1 - c, 1 + c): current TD loss G_i, step median m_i
    g_now = jnp.asarray([2.0, 1.0, 4.0, 0.5, 0.0, 0.0, 1.0])
    g_med = jnp.asarray([2.0, 1.2, 3.0, 2.0, 1.0, 0.0, jnp.nan])
    w = least.omega(g_now, g_med, 0.5)
    np.testing.assert_allclose(w, [1.0, 1.2, 0.75, 1.5, 1.5, 1.0, np.nan], rtol=1e-6)
    # tau = omega eps (eps >= 0), eps / omega (eps < 0): omega > 1 is stricter either way
    tau = least.threshold(jnp.asarray([10.0, -10.0, 10.0, -10.0, 0.0]),
                          jnp.asarray([1.25, 1.25, 0.8, 0.8, 1.5]))
    np.testing.assert_allclose(tau, [12.5, -8.0, 8.0, -12.5, 0.0], rtol=1e-6)
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


def test_entropy_rule_moves_k_within_bounds():
    kw = {"k_min": 3, "k_max": 6, "k_step": 2, "overflow": 0.1}
    k, h_bar, n = jnp.asarray(4), jnp.asarray(0.0), jnp.asarray(0)
    k, h_bar, n = least.update_k(k, jnp.asarray(2.0), h_bar, n, **kw)  # first: only starts Hbar
    assert (int(k), float(h_bar), int(n)) == (4, 2.0, 1)
    k, h_bar, n = least.update_k(k, jnp.asarray(2.3), h_bar, n, **kw)  # 2.3 > 2 + 0.2: grow
    assert int(k) == 6 and int(n) == 2
    np.testing.assert_allclose(h_bar, 2.15)
    k, h_bar, n = least.update_k(k, jnp.asarray(9.0), h_bar, n, **kw)  # capped at k_max
    assert int(k) == 6
    k2, _, _ = least.update_k(k, jnp.asarray(2.0), jnp.asarray(2.0), n, **kw)  # not above: shrink
    assert int(k2) == 4
    k3, hb3, n3 = least.update_k(k, jnp.asarray(jnp.nan), h_bar, n, **kw)  # NaN: no change
    assert (int(k3), int(n3)) == (6, 3) and float(hb3) == float(h_bar)
    # negative entropies: "above" is Hbar + gamma |Hbar| = -1.8
    k4, _, _ = least.update_k(jnp.asarray(4), jnp.asarray(-1.75), jnp.asarray(-2.0),
                              jnp.asarray(5), **kw)
    assert int(k4) == 6
    k5, _, _ = least.update_k(jnp.asarray(4), jnp.asarray(-1.85), jnp.asarray(-2.0),
                              jnp.asarray(5), **kw)
    assert int(k5) == 3


# --- the hook inside the agents --------------------------------------------------------------

LIMIT = 6


def _walk_env() -> Env:
    return walk_env(LIMIT)  # never terminates: every episode end is a truncation


SMOKE = dataclasses.replace(sac.SACConfig.smoke(), total_steps=128, chunk_steps=16,
                            learning_starts=32)


def _hook(warmup=0, patience=1, k_min=1, k_max=4):
    """K starts at 2 and is re-checked every 16 env steps (so it moves within these runs)."""
    return least.Least(least.LeastConfig(k_min=k_min, k_max=k_max, k_init=2, k_every=16,
                                         warmup_steps=warmup, patience=patience),
                       SMOKE.num_envs, LIMIT)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


WARMUP = 40  # env steps (2 envs x 16 a chunk): chunk 1 (32 steps) is before it, 2-4 after


@pytest.fixture(scope="module")
def compiled():
    """The jitted pieces the hook tests share (compiling SAC dominates their time): the plain
    agent's chunk and the LEAST agent's (warm-up 40 steps, patience 2) chunk, on two seeds;
    plus each seed's states after 1..4 chunks."""
    plain = sac.make_agent(SMOKE, _walk_env())
    agent = sac.make_agent(SMOKE, _walk_env(), _hook(warmup=WARMUP, patience=2))
    out = {"agent": agent, "init": jax.jit(agent.init), "chunk": jax.jit(agent.train_chunk),
           "plain_init": jax.jit(plain.init), "plain_chunk": jax.jit(plain.train_chunk),
           "keys": jax.random.split(jax.random.key(5), 2)}
    runs = []
    for key in out["keys"]:
        s, states = out["init"](key), []
        for _ in range(4):
            s, m = out["chunk"](s)
            states.append(s)
        runs.append(states)
    out["runs"], out["last_metrics"] = runs, m
    return out


def test_no_stop_during_warmup_and_idle_hook_changes_nothing(compiled):
    """Before warm-up the hook never stops, records the natural episode ends, and the agent's
    own state (params, buffer, envs, keys) is bit for bit that of the agent without a hook
    (SAC; TD3 shares the loop); after warm-up the same hook does stop episodes."""
    key = compiled["keys"][0]
    plain, _ = compiled["plain_chunk"](compiled["plain_init"](key))
    hooked = compiled["runs"][0][0]
    assert int(hooked.env_steps) == 32 < WARMUP
    assert int(hooked.early_stop.stopped) == 0
    assert int(hooked.early_stop.episodes) == 2 * (16 // LIMIT)  # natural ends recorded
    assert int(hooked.early_stop.memory.count) == 4
    _assert_trees_equal(plain, hooked.replace(early_stop=None))
    after = compiled["runs"][0][3].early_stop
    assert int(after.stopped) > 0 and int(after.stop_hist.sum()) == int(after.stopped)


def test_stopped_episode_is_a_truncation_that_bootstraps(compiled):
    """Replay the stored transitions of the LEAST run (4 chunks, stops after warm-up) env by
    env: every step has terminated = 0 and s' = the step's own next observation (not the
    reset one), a stop shows as the env restarting before the time limit, and the stops
    counted so equal the hook's; the SAC target on such a transition is
    r + gamma (min Q(s', a') - alpha log pi) (hand-built two-step case)."""
    state = compiled["runs"][0][3]
    data = jax.tree.map(np.asarray, state.buffer.data)
    steps = int(state.env_steps) // 2
    assert int(state.early_stop.stopped) > 0
    stops = 0
    for e in range(2):
        x, t = 0.0, 0
        for i in range(steps):
            row = 2 * i + e
            np.testing.assert_allclose(data["obs"][row], [x, t], atol=1e-5)
            x = np.float32(x + data["action"][row, 0])
            t += 1
            np.testing.assert_allclose(data["next_obs"][row], [x, t], atol=1e-5)  # own s'
            assert data["terminated"][row] == 0.0  # never a termination
            nxt = 2 * (i + 1) + e
            if i + 1 < steps and (t >= LIMIT or data["obs"][nxt][1] == 0.0):
                stops += t < LIMIT
                x, t = 0.0, 0
    assert stops == int(state.early_stop.stopped)
    # two-step hand case: a stopped transition's target bootstraps (terminated = 0)
    reward = jnp.asarray([0.5, 0.5])
    next_q = jnp.asarray([[2.0, 2.0], [3.0, 3.0]])
    next_logp = jnp.asarray([0.1, 0.1])
    y = sac.soft_td_target(reward, jnp.asarray([0.0, 1.0]), next_q, next_logp, 0.2, 0.9)
    np.testing.assert_allclose(y, [0.5 + 0.9 * (2.0 - 0.2 * 0.1), 0.5], rtol=1e-6)


def test_memories_under_vmap_equal_separate_runs():
    """The hook alone, 2 envs x 60 steps of synthetic signals (Q rising with the step index
    plus noise, random TD losses, a 6-step limit, stopped episodes restarting), for 3 seeds:
    vmapped over seeds == each seed run separately (memories, K, counters), with stops and
    K moving in the runs."""
    hook = least.Least(least.LeastConfig(k_min=1, k_max=4, k_init=2, k_every=8, warmup_steps=10,
                                         patience=2), 2, LIMIT)

    def run(key):
        def body(carry, k):
            st, t, env_steps = carry
            kq, kg = jax.random.split(k)
            q = t.astype(jnp.float32) + jax.random.normal(kq, (2,))
            td = jax.random.uniform(kg, (2,))
            done = t + 1 >= LIMIT
            st, stop = hook.step(st, q, td, t, done, jnp.float32(0.0), env_steps)
            return (st, jnp.where(done | stop, 0, t + 1), env_steps + 2), stop

        carry = (hook.init(), jnp.zeros(2, jnp.int32), jnp.zeros((), jnp.int32))
        return jax.lax.scan(body, carry, jax.random.split(key, 60))[0][0]

    keys = jax.random.split(jax.random.key(3), 3)
    batched = jax.jit(jax.vmap(run))(keys)
    single = jax.jit(run)
    for i in range(3):
        _assert_trees_equal(jax.tree.map(lambda x, i=i: x[i], batched), single(keys[i]))
    assert int(batched.stopped.sum()) > 0
    assert (np.asarray(batched.h_count) >= 10).all() and (np.asarray(batched.k) != 2).any()


def test_resume_is_exact(compiled, tmp_path):
    """2 chunks, checkpoint, restore into a fresh template, 2 more == 4 uninterrupted (the
    LEAST memories and counters are part of the checkpointed agent state)."""
    assert "least/stop_fraction" in compiled["last_metrics"]
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
    assert ckpt.save(2, compiled["runs"][0][1], force=True)
    ckpt.close()
    _, restored, _ = Checkpointer(tmp_path / "ckpt", save_every=1).restore(
        compiled["init"](compiled["keys"][1]))
    for _ in range(2):
        restored, _ = compiled["chunk"](restored)
    _assert_trees_equal(restored, compiled["runs"][0][3])
