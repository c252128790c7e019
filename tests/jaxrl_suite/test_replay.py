"""Replay buffer: circular order against a Python deque, sampling only filled slots, wrap-around."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_suite.agents import replay

EXAMPLE = {"obs": jnp.zeros((3,), jnp.float32), "action": jnp.zeros((), jnp.int32)}


def _batch(start, n):
    """Transitions numbered start+1 .. start+n (never 0, the value of unfilled storage)."""
    ids = np.arange(start + 1, start + n + 1)
    return {"obs": jnp.asarray(np.stack([ids, -ids, 2 * ids], 1), jnp.float32),
            "action": jnp.asarray(ids, jnp.int32)}


_add = jax.jit(replay.add_batch)


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 9), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_circular_order_matches_a_deque(capacity, sizes):
    sizes = [min(n, capacity) for n in sizes]
    buf = replay.init(EXAMPLE, capacity)
    model = collections.deque(maxlen=capacity)
    added = 0
    for n in sizes:
        buf = _add(buf, _batch(added, n))
        model.extend(range(added + 1, added + n + 1))
        added += n
        size, pos = int(buf.size), int(buf.position)
        assert size == len(model) == min(added, capacity)
        assert pos == added % capacity
        ids = np.asarray(buf.data["action"])
        # oldest first: slots [0, size) before the first wrap, then rotated by position
        ordered = ids[:size] if added < capacity else np.roll(ids, -pos)
        np.testing.assert_array_equal(ordered, np.array(model))
        np.testing.assert_array_equal(ids[size:], 0)  # untouched storage
        # every leaf row belongs to the same transition
        obs = np.asarray(buf.data["obs"])[:size]
        np.testing.assert_array_equal(obs[:, 0], ids[:size])
        np.testing.assert_array_equal(obs[:, 1], -ids[:size])


@settings(max_examples=20, deadline=None)
@given(capacity=st.integers(1, 16), added=st.integers(1, 40), seed=st.integers(0, 2 ** 31 - 1))
def test_sampling_never_returns_unfilled_slots(capacity, added, seed):
    buf = replay.init(EXAMPLE, capacity)
    done = 0
    while done < added:
        n = min(capacity, added - done)
        buf = _add(buf, _batch(done, n))
        done += n
    batch = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.key(seed), 64)
    live = set(range(max(1, added - capacity + 1), added + 1))  # the last `capacity` added
    got = np.asarray(batch["action"])
    assert got.shape == (64,) and batch["obs"].shape == (64, 3)
    assert set(got.tolist()) <= live
    np.testing.assert_array_equal(np.asarray(batch["obs"])[:, 0], got)


def test_wrap_around_by_hand():
    buf = replay.init(EXAMPLE, 5)
    buf = replay.add_batch(buf, _batch(0, 3))  # 1 2 3 . .
    buf = replay.add_batch(buf, _batch(3, 4))  # 6 7 3 4 5
    np.testing.assert_array_equal(np.asarray(buf.data["action"]), [6, 7, 3, 4, 5])
    assert int(buf.position) == 2 and int(buf.size) == 5
    buf = replay.add_batch(buf, _batch(7, 5))  # a full lap: 11 12 8 9 10
    np.testing.assert_array_equal(np.asarray(buf.data["action"]), [11, 12, 8, 9, 10])
    assert int(buf.position) == 2 and int(buf.size) == 5


def test_sampling_is_uniform_over_filled_slots():
    buf = replay.add_batch(replay.init(EXAMPLE, 10), _batch(0, 4))
    got = np.asarray(replay.sample(buf, jax.random.key(0), 40_000)["action"])
    counts = np.bincount(got, minlength=5)[1:]
    assert counts.sum() == 40_000
    # each of 4 slots: p = 1/4, sd of the count = sqrt(n p (1-p)) ~ 87; 5 sd bound
    np.testing.assert_array_less(np.abs(counts - 10_000), 5 * 87)


def test_vmap_over_buffers_and_errors():
    bufs = jax.vmap(lambda _: replay.init(EXAMPLE, 4))(jnp.arange(2))
    two = jax.tree.map(lambda a, b: jnp.stack([a, b]), _batch(0, 3), _batch(10, 3))
    bufs = jax.vmap(replay.add_batch)(bufs, two)
    np.testing.assert_array_equal(np.asarray(bufs.data["action"]), [[1, 2, 3, 0], [11, 12, 13, 0]])
    np.testing.assert_array_equal(np.asarray(bufs.size), [3, 3])
    with pytest.raises(ValueError, match="capacity"):
        replay.add_batch(replay.init(EXAMPLE, 2), _batch(0, 3))
    with pytest.raises(ValueError, match="capacity"):
        replay.init(EXAMPLE, 0)
    with pytest.raises(AssertionError):
        replay.add_batch(replay.init(EXAMPLE, 4), {"obs": jnp.zeros((2, 4)),
                                                   "action": jnp.zeros((2,), jnp.int32)})
