import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainkit.guards import NonFiniteError, all_finite, check_streak, guarded_update, init_guard


def _setup():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    opt = optax.adam(0.1)
    return params, opt, opt.init(params)


class GuardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_finite_step_equals_plain_optax(self):
        params, opt, opt_state = _setup()
        grads = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
        step = self.variant(lambda g, s, p, l, gs: guarded_update(opt, g, s, p, l, gs))
        new_params, new_state, guard, metrics = step(grads, opt_state, params, jnp.float32(1.0),
                                                     init_guard())
        updates, ref_state = opt.update(grads, opt_state, params)
        chex.assert_trees_all_close(new_params, optax.apply_updates(params, updates))
        chex.assert_trees_all_close(new_state, ref_state)
        assert int(metrics["skipped"]) == 0 and int(guard.total) == 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_nan_gradient_is_skipped_and_counted(self):
        params, opt, opt_state = _setup()
        step = self.variant(lambda g, s, p, l, gs: guarded_update(opt, g, s, p, l, gs))
        good = jax.tree.map(jnp.ones_like, params)
        bad = {"w": good["w"].at[1, 2].set(jnp.nan), "b": good["b"]}
        guard = init_guard()
        p, s, guard, m = step(good, opt_state, params, jnp.float32(0.0), guard)
        p2, s2, guard, m = step(bad, s, p, jnp.float32(0.0), guard)
        chex.assert_trees_all_equal(p2, p)  # parameters untouched
        chex.assert_trees_all_equal(s2, s)  # optimizer moments and count untouched
        chex.assert_tree_all_finite(p2)
        assert int(m["skipped"]) == 1 and int(guard.streak) == 1 and int(guard.total) == 1
        _, _, guard, m = step(bad, s2, p2, jnp.float32(0.0), guard)
        assert int(guard.streak) == 2 and int(guard.total) == 2
        _, _, guard, m = step(good, s2, p2, jnp.float32(0.0), guard)
        assert int(guard.streak) == 0 and int(guard.total) == 2 and int(m["skipped"]) == 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_nonfinite_loss_alone_skips(self):
        params, opt, opt_state = _setup()
        step = self.variant(lambda g, s, p, l, gs: guarded_update(opt, g, s, p, l, gs))
        grads = jax.tree.map(jnp.ones_like, params)
        p, _, guard, _ = step(grads, opt_state, params, jnp.float32(jnp.inf), init_guard())
        chex.assert_trees_all_equal(p, params)
        assert int(guard.total) == 1


def test_all_finite_ignores_integer_leaves():
    assert bool(all_finite({"a": jnp.ones(3), "n": jnp.arange(3)}))
    assert not bool(all_finite({"a": jnp.array([1.0, -jnp.inf])}))
    assert bool(all_finite({}))


def test_check_streak_raises_with_clear_message():
    check_streak({"nonfinite_streak": np.array([0, 1, 2])}, 3, step=10)
    with pytest.raises(NonFiniteError, match=r"stopped at step 12: 3 consecutive.*step 10"):
        check_streak({"nonfinite_streak": np.array([[1], [2], [3]])}, 3, step=12,
                     last_good_checkpoint=10)


def test_run_steps_stacks_metrics_and_stops_on_a_nonfinite_streak():
    """trainkit.loop.run_steps: the state threads through every key, each step's metrics come
    back stacked; a streak of skipped steps raises at the next check."""
    from trainkit.loop import run_steps

    def step(state, key):
        return state + 1, {"loss": state * 2.0, "nonfinite_streak": jnp.int32(0)}

    keys = jax.random.split(jax.random.key(0), 7)
    state, hist = run_steps(step, jnp.int32(0), keys, progress=False)
    assert int(state) == 7
    np.testing.assert_array_equal(hist["loss"], 2.0 * np.arange(7))

    def bad(state, key):  # step i reports a streak of i - 2
        return state + 1, {"nonfinite_streak": jnp.maximum(state - 1, 0)}

    with pytest.raises(NonFiniteError, match="stopped at step 50"):  # first check
        run_steps(bad, jnp.int32(0), jax.random.split(jax.random.key(0), 80), progress=False,
                  max_nonfinite=10)
