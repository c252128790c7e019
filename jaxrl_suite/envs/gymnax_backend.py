"""gymnax environments (CartPole, Acrobot, Pendulum, MinAtar, ...) behind :class:`Env`.

gymnax folds its time limit into ``done``; here the inner environment gets an effectively
infinite limit so its ``done`` means termination only, and the limit is applied by
:func:`jaxrl_suite.envs.core` conventions (``truncated``) from our own step counter.
Image-like observations (MinAtar ``[10, 10, C]``) are flattened to vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_suite.envs.core import Env, EnvSpec, EnvState, EpisodeStats

_NO_LIMIT = 2**30


def make_gymnax(name: str, max_episode_steps: int | None = None) -> Env:
    import gymnax
    from gymnax.environments import spaces

    if name not in gymnax.registered_envs:
        raise ValueError(f"unknown gymnax environment {name!r}; known: "
                         f"{', '.join(gymnax.registered_envs)}")
    env, params = gymnax.make(name)
    limit = int(max_episode_steps or params.max_steps_in_episode)
    params = params.replace(max_steps_in_episode=_NO_LIMIT)
    space = env.action_space(params)
    discrete = isinstance(space, spaces.Discrete)
    if discrete:
        action_size, num_actions = 1, int(space.n)
        low = high = None
    else:
        action_size, num_actions = int(jnp.prod(jnp.array(space.shape or (1,)))), 0
        low = jnp.broadcast_to(jnp.asarray(space.low, jnp.float32), (action_size,))
        high = jnp.broadcast_to(jnp.asarray(space.high, jnp.float32), (action_size,))
    obs_shape = env.observation_space(params).shape
    obs_size = int(jnp.prod(jnp.array(obs_shape)))
    action_shape = space.shape

    def flat(obs):
        return jnp.asarray(obs, jnp.float32).reshape(obs_size)

    def to_env_action(action):
        if discrete:
            return jnp.asarray(action, jnp.int32)
        a = jnp.clip(jnp.asarray(action, jnp.float32).reshape(action_size), -1.0, 1.0)
        a = low + (a + 1.0) * 0.5 * (high - low)  # [-1, 1] -> [low, high]
        return a.reshape(action_shape) if action_shape else a[0]

    def reset(key):
        key, sub = jax.random.split(key)
        obs, inner = env.reset_env(sub, params)
        # Some resets return weakly-typed leaves (Pendulum's last_u) that step returns strong:
        # make them strong so a jitted loop over the state compiles once.
        inner = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), inner)
        obs = flat(obs)
        zero = jnp.zeros((), jnp.float32)
        return EnvState(obs=obs, reward=zero, terminated=zero, truncated=zero, final_obs=obs,
                        stats=EpisodeStats.zeros(), key=key, inner=inner,
                        time=jnp.zeros((), jnp.int32))

    def step(state: EnvState, action):
        key, k_step, k_reset = jax.random.split(state.key, 3)
        obs, inner, reward, term, _ = env.step_env(k_step, state.inner, to_env_action(action),
                                                   params)
        obs = flat(obs)
        time = state.time + 1
        terminated = jnp.asarray(term, jnp.float32)
        truncated = jnp.where(terminated > 0, 0.0, (time >= limit).astype(jnp.float32))
        done = jnp.maximum(terminated, truncated)
        reset_obs, reset_inner = env.reset_env(k_reset, params)
        reset_obs = flat(reset_obs)
        done_b = done.astype(bool)
        next_inner = jax.tree.map(lambda r, s: jnp.where(done_b, r, s), reset_inner, inner)
        reward = jnp.asarray(reward, jnp.float32)
        return EnvState(obs=jnp.where(done_b, reset_obs, obs), reward=reward,
                        terminated=terminated, truncated=truncated, final_obs=obs,
                        stats=state.stats.update(reward, done), key=key, inner=next_inner,
                        time=jnp.where(done_b, 0, time))

    spec = EnvSpec(name=f"gymnax/{name}", observation_size=obs_size, discrete=discrete,
                   action_size=action_size, num_actions=num_actions, max_episode_steps=limit)
    return Env(spec=spec, reset=reset, step=step)
