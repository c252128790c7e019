"""A uniform replay buffer in pure JAX: a circular array store that lives inside ``jit``/``scan``.

The buffer is a pytree (``flax.struct``), so it travels in a train state through ``lax.scan``,
``jax.vmap`` over seeds and checkpoints like any other array. Transitions are any pytree of
arrays (a dict ``{"obs", "action", "reward", ...}`` is usual); every leaf is stored as
``[capacity, *leaf_shape]``::

    buffer = replay.init(example_transition, capacity=100_000)   # example has no batch axis
    buffer = replay.add_batch(buffer, transitions)               # leaves [n, *leaf_shape]
    batch = replay.sample(buffer, key, batch_size=256)           # leaves [256, *leaf_shape]

Writing is circular: transition ``t`` (counting from 0 over every ``add_batch`` call) goes to
slot ``t mod capacity``, so once the buffer is full each new transition overwrites the oldest.
Slots are filled in order from 0, hence the filled slots are exactly ``[0, size)`` and
:func:`sample` draws indices uniformly from them (with replacement, like DQN/SAC replay).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    data: Any  # pytree of [capacity, ...] arrays
    position: jax.Array  # int32: the slot the next transition goes to
    size: jax.Array  # int32: number of filled slots, min(transitions added, capacity)

    @property
    def capacity(self) -> int:
        return int(jax.tree.leaves(self.data)[0].shape[0])


def init(example_transition: Any, capacity: int) -> ReplayBuffer:
    """An empty buffer for transitions shaped like ``example_transition`` (no batch axis).

    Leaves keep their dtypes; storage is zero-filled (never returned while the buffer is
    non-empty, see :func:`sample`)."""
    if int(capacity) < 1:
        raise ValueError(f"replay capacity must be >= 1, got {capacity}")
    if not jax.tree.leaves(example_transition):
        raise ValueError("example_transition has no array leaves")
    data = jax.tree.map(lambda x: jnp.zeros((int(capacity),) + jnp.shape(x), jnp.asarray(x).dtype),
                        example_transition)
    return ReplayBuffer(data=data, position=jnp.zeros((), jnp.int32),
                        size=jnp.zeros((), jnp.int32))


def add_batch(buffer: ReplayBuffer, transitions: Any) -> ReplayBuffer:
    """Write ``n`` transitions (leaves ``[n, *leaf_shape]``) at slots
    ``(position + i) mod capacity``, ``i = 0..n-1``; ``position <- (position + n) mod capacity``,
    ``size <- min(size + n, capacity)``.

    ``n`` must not exceed the capacity (a batch would overwrite its own first entries)."""
    capacity = buffer.capacity
    leaves = jax.tree.leaves(transitions)
    n = int(leaves[0].shape[0])
    if n > capacity:
        raise ValueError(f"add_batch of {n} transitions exceeds the replay capacity {capacity}")
    jax.tree.map(lambda d, x: chex.assert_shape(x, (n,) + d.shape[1:]), buffer.data, transitions)
    index = (buffer.position + jnp.arange(n, dtype=jnp.int32)) % capacity
    data = jax.tree.map(lambda d, x: d.at[index].set(x.astype(d.dtype), unique_indices=True),
                        buffer.data, transitions)
    return ReplayBuffer(data=data, position=(buffer.position + n) % capacity,
                        size=jnp.minimum(buffer.size + n, capacity))


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Any:
    """``batch_size`` transitions drawn uniformly with replacement from the filled slots
    ``[0, size)``. An empty buffer returns slot 0 (zeros): callers start sampling only after a
    warm-up has filled it."""
    index = jax.random.randint(key, (int(batch_size),), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda d: d[index], buffer.data)


__all__ = ["ReplayBuffer", "init", "add_batch", "sample"]
