"""Evaluation episodes and rollout episode statistics, shared by every agent.

:func:`evaluate` runs ``num_envs`` copies of an environment with a (usually deterministic)
policy until each has finished one episode and returns the mean return and length. It is a
pure function of ``(params, key)``: jittable, and vmappable over seeds (batched params/keys)::

    ev = jax.jit(lambda p, k: evaluate(env, agent.policy, p, k, num_envs=16))
    ev(state.params, jax.random.key(1))   # {"eval/return": ..., "eval/length": ..., ...}

:func:`episode_metrics` turns the :class:`~jaxrl_suite.envs.EpisodeStats` of a rollout into the
mean return/length of the episodes that finished in it (what the agents log during training).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_suite.envs.core import Env, EpisodeStats

Policy = Callable[[Any, jax.Array], jax.Array]


def evaluate(env: Env, policy: Policy, params: Any, key: jax.Array, num_envs: int = 16,
             max_steps: int | None = None) -> dict[str, jax.Array]:
    """Mean undiscounted return and length of one episode in each of ``num_envs`` environments.

    Args:
      env: a :class:`~jaxrl_suite.envs.Env`.
      policy: ``policy(params, obs) -> action`` on a *batch*: ``obs`` is ``[num_envs, obs_dim]``,
        the result ``[num_envs]`` int actions (discrete) or ``[num_envs, action_size]`` floats
        in ``[-1, 1]`` (continuous). Pass a deterministic policy (greedy / mean action) for
        the usual evaluation; a stochastic one can close over nothing random here, since no key
        is given to it.
      params: whatever ``policy`` takes (the agent's params pytree).
      key: resets the environments (their dynamics' randomness lives in the env state).
      num_envs: number of evaluation episodes, run in parallel.
      max_steps: stop after this many steps even if some episode is still running (default: the
        environment's ``max_episode_steps``, after which every episode has ended by truncation).

    Returns:
      ``{"eval/return": mean return, "eval/length": mean length, "eval/finished": fraction of
      environments whose episode ended, "eval/returns": [num_envs] per-episode returns}``.
      Each environment counts only the rewards of its first episode (its later, auto-reset
      steps are masked). The loop is a ``lax.while_loop`` that stops once every episode ended.
    """
    limit = int(max_steps or env.spec.max_episode_steps)
    state = jax.vmap(env.reset)(jax.random.split(key, num_envs))
    step = jax.vmap(env.step)
    zeros = jnp.zeros((num_envs,), jnp.float32)

    def cond(carry):
        _, done, _, _, t = carry
        return jnp.logical_and(t < limit, jnp.logical_not(jnp.all(done)))

    def body(carry):
        state, done, ret, length, t = carry
        action = policy(params, state.obs)
        state = step(state, action)
        active = jnp.logical_not(done)
        ret = ret + jnp.where(active, state.reward, 0.0)
        length = length + active.astype(jnp.int32)
        done = jnp.logical_or(done, state.done > 0)
        return state, done, ret, length, t + 1

    carry = (state, jnp.zeros((num_envs,), bool), zeros, jnp.zeros((num_envs,), jnp.int32),
             jnp.zeros((), jnp.int32))
    _, done, ret, length, _ = jax.lax.while_loop(cond, body, carry)
    return {"eval/return": jnp.mean(ret), "eval/length": jnp.mean(length.astype(jnp.float32)),
            "eval/finished": jnp.mean(done.astype(jnp.float32)), "eval/returns": ret}


def episode_metrics(stats: EpisodeStats) -> dict[str, jax.Array]:
    """Mean return and length of the episodes that finished in a rollout.

    ``stats`` has leaves ``[T, num_envs]`` (the :class:`EpisodeStats` after every step)::

        episodes = sum finished,  episode_return = sum finished * returned_return / episodes

    ``episode_return``/``episode_length`` are NaN when no episode finished (nothing measured);
    ``episodes`` says how many did."""
    w = stats.finished
    n = jnp.sum(w)
    safe = jnp.maximum(n, 1.0)
    ret = jnp.sum(w * stats.returned_return) / safe
    length = jnp.sum(w * stats.returned_length.astype(jnp.float32)) / safe
    nan = jnp.float32(jnp.nan)
    return {"episode_return": jnp.where(n > 0, ret, nan),
            "episode_length": jnp.where(n > 0, length, nan), "episodes": n}


__all__ = ["evaluate", "episode_metrics", "Policy"]
