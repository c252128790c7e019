"""The one functional environment interface every agent in jaxrl_suite is written against.

An environment is a pair of pure, jittable, vmappable functions over an immutable state::

    env = jaxrl_suite.envs.make("gymnax/CartPole-v1")
    state = env.reset(key)                      # EnvState
    state = env.step(state, action)             # EnvState (auto-resets finished episodes)

Conventions (the same for brax, MuJoCo Playground DMC and gymnax back ends):

* ``state.obs`` is the observation the agent acts on next. When an episode ends at this step
  the environment has already been reset, so ``state.obs`` is the *first* observation of the
  next episode and ``state.final_obs`` is the *last* observation of the finished one (the one
  to bootstrap from on truncation). When no episode ended, ``final_obs == obs``.
* ``state.reward`` is the reward of the transition just taken (float32, ``[]``).
* ``state.terminated``: the episode reached a terminal state (no bootstrapping, V = 0).
  ``state.truncated``: the episode was cut by a time limit (bootstrap from ``final_obs``).
  Both are float32 0/1 and never both 1 (termination wins). ``done = terminated | truncated``.
* ``state.stats`` holds running episode statistics (:class:`EpisodeStats`): the return and
  length of the episode in progress, and those of the most recently finished one, with
  ``finished`` = 1 on the step an episode ended (average ``returned_return`` weighted by
  ``finished`` to log mean episode return).
* Randomness for stochastic dynamics and resets lives in ``state.key``: ``step`` needs no key.
* Discrete actions are int32 scalars in ``[0, num_actions)``; continuous actions are float32
  vectors in ``[-1, 1]^action_size`` (back ends rescale to the task's own bounds).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class EpisodeStats:
    episode_return: jax.Array  # return of the episode in progress
    episode_length: jax.Array  # its length so far (int32)
    returned_return: jax.Array  # return of the last finished episode
    returned_length: jax.Array  # its length
    finished: jax.Array  # 1.0 on the step an episode ended

    @classmethod
    def zeros(cls) -> "EpisodeStats":
        z = jnp.zeros((), jnp.float32)
        zi = jnp.zeros((), jnp.int32)
        return cls(z, zi, z, zi, z)

    def update(self, reward: jax.Array, done: jax.Array) -> "EpisodeStats":
        ret = self.episode_return + reward
        length = self.episode_length + 1
        done_b = done.astype(bool)
        return EpisodeStats(
            episode_return=jnp.where(done_b, 0.0, ret),
            episode_length=jnp.where(done_b, 0, length),
            returned_return=jnp.where(done_b, ret, self.returned_return),
            returned_length=jnp.where(done_b, length, self.returned_length),
            finished=done.astype(jnp.float32),
        )


@struct.dataclass
class EnvState:
    obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array
    stats: EpisodeStats
    key: jax.Array
    inner: Any  # the back end's own state
    time: jax.Array  # steps taken in the current episode (int32), for time limits

    @property
    def done(self) -> jax.Array:
        return jnp.maximum(self.terminated, self.truncated)


@struct.dataclass
class EnvSpec:
    """Static description of an environment (hashable: safe as a jit static argument)."""
    name: str = struct.field(pytree_node=False)
    observation_size: int = struct.field(pytree_node=False)
    discrete: bool = struct.field(pytree_node=False)
    action_size: int = struct.field(pytree_node=False)  # continuous: vector length; discrete: 1
    num_actions: int = struct.field(pytree_node=False)  # discrete: number of actions; else 0
    max_episode_steps: int = struct.field(pytree_node=False)


@struct.dataclass
class Env:
    """A functional environment: ``reset(key) -> EnvState``, ``step(state, action) -> EnvState``.

    Build with :func:`jaxrl_suite.envs.make`; both functions are pure and jittable.
    """
    spec: EnvSpec = struct.field(pytree_node=False)
    reset: Callable[[jax.Array], EnvState] = struct.field(pytree_node=False)
    step: Callable[[EnvState, jax.Array], EnvState] = struct.field(pytree_node=False)

    @property
    def observation_size(self) -> int:
        return self.spec.observation_size

    @property
    def discrete(self) -> bool:
        return self.spec.discrete

    @property
    def action_size(self) -> int:
        return self.spec.action_size

    @property
    def num_actions(self) -> int:
        return self.spec.num_actions
