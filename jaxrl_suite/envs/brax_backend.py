"""brax MuJoCo-style tasks (hopper, walker2d, halfcheetah, ant, humanoid, ...) behind :class:`Env`.

The *raw* brax environment is used (no ``EpisodeWrapper``/``AutoResetWrapper``): brax's
``done`` is termination only (hopper/walker2d/ant/humanoid falling, inverted pendulum
tipping over), the time limit (default 1000 agent steps, brax's usual ``episode_length``) is
our own ``time`` counter and gives ``truncated``, and finished episodes are auto-reset with a
fresh random initial state drawn from ``state.key`` (brax's ``AutoResetWrapper`` instead
restores one cached first state). The brax ``State`` (with its ``info``/``metrics``) is carried
untouched as ``EnvState.inner``. brax actions live in ``[-1, 1]^action_size`` already, so actions
are only clipped.

Physics back end (``make_brax(..., backend=...)``), measured with
``python benchmarks/envs.py --only inverted_pendulum`` / ``--only hopper`` on this project's
shared 2-core CPU machine (64 vmapped envs, random actions, ``jit(scan)`` of 200 steps, median of
5 interleaved repeats; load average ~10 from other jobs, so absolute numbers are low and noisy,
the ordering is what counts; first call = make + trace + compile + one run)::

    backend       inverted_pendulum           hopper
                  steps/s   first call s      steps/s   first call s
    spring        133,701       33            46,395        63
    mjx            57,602       83             3,839       143
    generalized    52,592       38             9,639        78
    positional     46,490       33            12,859        68

Decision: default ``backend="spring"``: it is the fastest on CPU for both tasks (2.3x the next
one on inverted_pendulum, 3.6x on hopper and 12x ``mjx`` there, where contacts dominate) and
compiles no slower than the others. Caveat: ``spring`` (impulse-based, spring contacts) is
brax's cheapest approximation, so its trajectories and returns are not those of MuJoCo; for
results comparable with MuJoCo/Gym numbers use ``backend="mjx"`` (MuJoCo's own physics via
MJX, what brax itself defaults to) at the cost above. ``generalized``/``positional`` are
in between in fidelity and slower than ``spring`` here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_suite.envs.core import Env, EnvSpec, EnvState, EpisodeStats

BRAX_PHYSICS = ("mjx", "generalized", "positional", "spring")
DEFAULT_BACKEND = "spring"
DEFAULT_MAX_EPISODE_STEPS = 1000


def brax_env_names() -> list[str]:
    """brax's registered environment names (without the ``brax/`` prefix)."""
    from brax import envs as brax_envs

    return sorted(n for n in brax_envs._envs if n != "fast")  # "fast" is brax's test stub


def make_brax(name: str, max_episode_steps: int | None = None, backend: str = DEFAULT_BACKEND,
              **env_kwargs) -> Env:
    """``brax/<name>`` as an :class:`Env`; ``env_kwargs`` go to the brax environment."""
    import difflib

    from brax import envs as brax_envs

    known = brax_env_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"unknown brax environment {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" (known: {', '.join(known)})")
    if backend not in BRAX_PHYSICS:
        raise ValueError(f"brax backend must be one of {', '.join(BRAX_PHYSICS)}, "
                         f"got {backend!r}")
    limit = int(max_episode_steps or DEFAULT_MAX_EPISODE_STEPS)
    if limit < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {limit}")
    env = brax_envs.get_environment(name, backend=backend, **env_kwargs)
    obs_size = env.observation_size
    if not isinstance(obs_size, int):
        raise ValueError(f"brax/{name} has structured observations {obs_size!r}; only vector "
                         f"observations are supported")
    action_size = int(env.action_size)

    def flat(obs):
        return jnp.asarray(obs, jnp.float32).reshape(obs_size)

    def reset(key):
        key, sub = jax.random.split(key)
        inner = env.reset(sub)
        obs = flat(inner.obs)
        zero = jnp.zeros((), jnp.float32)
        return EnvState(obs=obs, reward=zero, terminated=zero, truncated=zero, final_obs=obs,
                        stats=EpisodeStats.zeros(), key=key, inner=inner,
                        time=jnp.zeros((), jnp.int32))

    def step(state: EnvState, action):
        key, k_reset = jax.random.split(state.key)
        a = jnp.clip(jnp.asarray(action, jnp.float32).reshape(action_size), -1.0, 1.0)
        inner = env.step(state.inner, a)
        obs = flat(inner.obs)
        time = state.time + 1
        terminated = (jnp.asarray(inner.done, jnp.float32) > 0).astype(jnp.float32)
        truncated = jnp.where(terminated > 0, 0.0, (time >= limit).astype(jnp.float32))
        done = jnp.maximum(terminated, truncated)
        reset_inner = env.reset(k_reset)
        done_b = done.astype(bool)
        next_inner = jax.tree.map(lambda r, s: jnp.where(done_b, r, s), reset_inner, inner)
        reward = jnp.asarray(inner.reward, jnp.float32)
        return EnvState(obs=jnp.where(done_b, flat(reset_inner.obs), obs), reward=reward,
                        terminated=terminated, truncated=truncated, final_obs=obs,
                        stats=state.stats.update(reward, done), key=key, inner=next_inner,
                        time=jnp.where(done_b, 0, time))

    spec = EnvSpec(name=f"brax/{name}", observation_size=int(obs_size), discrete=False,
                   action_size=action_size, num_actions=0, max_episode_steps=limit)
    return Env(spec=spec, reset=reset, step=step)
