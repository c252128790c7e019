"""A one-dimensional walk with hand-checkable transitions, shared by the off-policy tests."""

import math

import jax.numpy as jnp

from jaxrl_suite.envs.core import Env, EnvSpec, EnvState, EpisodeStats


def walk_env(limit: int, goal: float = math.inf) -> Env:
    """x' = x + a, reward x', terminated when x' > goal (never by default), truncated after
    ``limit`` steps; obs (x, t)."""
    def obs_of(x, t):
        return jnp.stack([x, t.astype(jnp.float32)])

    def reset(key):
        zero = jnp.zeros((), jnp.float32)
        t = jnp.zeros((), jnp.int32)
        return EnvState(obs=obs_of(zero, t), reward=zero, terminated=zero, truncated=zero,
                        final_obs=obs_of(zero, t), stats=EpisodeStats.zeros(), key=key,
                        inner=zero, time=t)

    def step(state, action):
        x = state.inner + action[0]
        t = state.time + 1
        term = (x > goal).astype(jnp.float32)
        trunc = jnp.where(term > 0, 0.0, (t >= limit).astype(jnp.float32))
        done = jnp.maximum(term, trunc) > 0
        final = obs_of(x, t)
        z = jnp.zeros((), jnp.float32)
        return EnvState(obs=jnp.where(done, obs_of(z, jnp.zeros((), jnp.int32)), final),
                        reward=x, terminated=term, truncated=trunc, final_obs=final,
                        stats=state.stats.update(x, jnp.maximum(term, trunc)), key=state.key,
                        inner=jnp.where(done, 0.0, x), time=jnp.where(done, 0, t))

    spec = EnvSpec(name="test/walk", observation_size=2, discrete=False, action_size=1,
                   num_actions=0, max_episode_steps=limit)
    return Env(spec=spec, reset=reset, step=step)
