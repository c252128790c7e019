"""DeepMind Control Suite tasks from MuJoCo Playground (``dmc/CartpoleBalance``, ...) behind :class:`Env`.

All 25 tasks of ``mujoco_playground.registry.dm_control_suite.ALL_ENVS`` load offline (their
MJCF files ship inside the package). The raw playground environment is wrapped like the other
back ends: playground's ``done`` (in DMC only a NaN in ``qpos``/``qvel``, i.e. the simulation
blew up) is ``terminated``; DMC tasks otherwise never terminate, and the episode ends by
``truncated`` after ``episode_length`` control steps (playground's default, 1000). With
``action_repeat`` k (the env config's value, 1 for every DMC task; overridable) one agent
step applies the action k times and sums the k rewards, as brax's ``EpisodeWrapper`` does
for playground training, so an episode is ``ceil(episode_length / k)`` agent steps.
Finished episodes are auto-reset with a fresh key. Observations (an array, or a dict of
arrays, flattened in sorted-key order) become one float32 vector. Actions in ``[-1, 1]`` are
clipped and mapped to the actuators' ``ctrlrange`` (``[-1, 1]`` for every DMC task).

Implementation (``impl``): the playground env configs default to ``impl="warp"`` (MuJoCo
Warp kernels called from JAX). Measured with ``python benchmarks/envs.py --only dmc`` on this
project's shared 2-core CPU machine (64 vmapped envs, random actions, ``jit(scan)`` of 200
steps, median of 5 interleaved repeats; load average ~10, so absolute numbers are low and
noisy), CartpoleBalance::

    loop                                   impl    steps/s    first call (compile) s
    playground's wrap_for_brax_training    jax     379,373        28
    playground's wrap_for_brax_training    warp      5,082        58
    ours (fresh random reset on done)      jax     103,851        55

Ours runs at ~0.27x playground's loop because it draws a fresh random initial state (a
``make_data`` + ``mjx.forward``, about one more physics step, plus a select over the whole
``mjx.Data``) on every step, where playground's ``BraxAutoResetWrapper`` restores one cached
first state per env (every episode of an env then starts from the same state).

Decision: ``impl="jax"`` (pure MJX), the only one offered: on CPU it is ~75x the throughput
of warp, compiles faster, keeps no kernel cache on disk, and composes with
``vmap``/``grad``/sharding like any JAX code. ``impl="warp"`` (meant for NVIDIA GPUs) raises:
with mujoco-mjx 3.17 a warp ``reset`` traced inside our vmapped ``step`` (needed for fresh
random initial states on auto-reset) leaks a batch tracer (``UnexpectedTracerError`` on the
first step). Importing playground initialises warp anyway, so its log output is reduced to
warnings and, unless ``WARP_CACHE_PATH`` is already set, its kernel cache goes to a temporary
directory instead of ``~/.cache/warp``.
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp

from jaxrl_suite.envs.core import Env, EnvSpec, EnvState, EpisodeStats

IMPLS = ("jax", "warp")
DEFAULT_IMPL = "jax"


def _quiet_warp() -> None:
    """Point warp's kernel cache to a temp dir (when unset) and drop its info logs."""
    os.environ.setdefault("WARP_CACHE_PATH", os.path.join(tempfile.gettempdir(), "warp-cache"))
    try:
        import warp
    except ImportError:  # warp is optional for impl="jax"
        return
    warp.config.log_level = warp.LOG_WARNING
    warp.config.quiet = True


def dmc_env_names() -> list[str]:
    """The DMC task names MuJoCo Playground registers (without the ``dmc/`` prefix)."""
    _quiet_warp()
    from mujoco_playground import registry

    return sorted(registry.dm_control_suite.ALL_ENVS)


def _flatten_obs(obs) -> jax.Array:
    if isinstance(obs, dict):
        return jnp.concatenate([jnp.asarray(obs[k], jnp.float32).reshape(-1)
                                for k in sorted(obs)])
    return jnp.asarray(obs, jnp.float32).reshape(-1)


def make_dmc(name: str, max_episode_steps: int | None = None, impl: str = DEFAULT_IMPL,
             action_repeat: int | None = None, config_overrides: dict | None = None) -> Env:
    """``dmc/<name>`` as an :class:`Env`.

    ``max_episode_steps`` defaults to ``ceil(episode_length / action_repeat)`` from the task's
    config; ``config_overrides`` go to ``registry.load`` (``impl`` is set from ``impl``).
    """
    import difflib

    known = dmc_env_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"unknown DMC environment {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" (known: {', '.join(known)})")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "warp":
        # mujoco-mjx 3.17's warp path leaks a BatchTracer (int32[1]) out of a vmapped reset when
        # reset is traced a second time inside step (our fresh-state auto-reset):
        # UnexpectedTracerError on the first step. Playground's own wrappers (which reset to a
        # cached first state) run, at ~1/75 of impl="jax"'s speed on CPU (benchmarks/envs.py).
        raise ValueError("impl='warp' is not supported by this back end (mujoco-mjx 3.17 leaks "
                         "a tracer when a warp reset runs inside a vmapped step); use "
                         "impl='jax'")
    from mujoco_playground import registry

    overrides = dict(config_overrides or {})
    overrides["impl"] = impl
    env = registry.load(name, config_overrides=overrides)
    cfg = env._config
    repeat = int(action_repeat or cfg.get("action_repeat", 1))
    if repeat < 1:
        raise ValueError(f"action_repeat must be >= 1, got {repeat}")
    limit = int(max_episode_steps or math.ceil(int(cfg.episode_length) / repeat))
    if limit < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {limit}")
    action_size = int(env.action_size)
    mj = env.mj_model
    limited = jnp.asarray(mj.actuator_ctrllimited, bool)
    low = jnp.where(limited, jnp.asarray(mj.actuator_ctrlrange[:, 0], jnp.float32), -1.0)
    high = jnp.where(limited, jnp.asarray(mj.actuator_ctrlrange[:, 1], jnp.float32), 1.0)
    obs_size = int(jax.eval_shape(lambda k: _flatten_obs(env.reset(k).obs),
                                  jax.random.key(0)).shape[0])

    def to_ctrl(action):
        a = jnp.clip(jnp.asarray(action, jnp.float32).reshape(action_size), -1.0, 1.0)
        return low + (a + 1.0) * 0.5 * (high - low)

    def reset(key):
        key, sub = jax.random.split(key)
        inner = env.reset(sub)
        obs = _flatten_obs(inner.obs)
        zero = jnp.zeros((), jnp.float32)
        return EnvState(obs=obs, reward=zero, terminated=zero, truncated=zero, final_obs=obs,
                        stats=EpisodeStats.zeros(), key=key, inner=inner,
                        time=jnp.zeros((), jnp.int32))

    def step(state: EnvState, action):
        key, k_reset = jax.random.split(state.key)
        ctrl = to_ctrl(action)
        inner, reward = state.inner, jnp.zeros((), jnp.float32)
        for _ in range(repeat):  # static, usually 1
            inner = env.step(inner, ctrl)
            reward = reward + jnp.asarray(inner.reward, jnp.float32)
        obs = _flatten_obs(inner.obs)
        time = state.time + 1
        terminated = (jnp.asarray(inner.done, jnp.float32) > 0).astype(jnp.float32)
        truncated = jnp.where(terminated > 0, 0.0, (time >= limit).astype(jnp.float32))
        done = jnp.maximum(terminated, truncated)
        reset_inner = env.reset(k_reset)
        done_b = done.astype(bool)
        next_inner = jax.tree.map(lambda r, s: jnp.where(done_b, r, s), reset_inner, inner)
        return EnvState(obs=jnp.where(done_b, _flatten_obs(reset_inner.obs), obs),
                        reward=reward, terminated=terminated, truncated=truncated,
                        final_obs=obs, stats=state.stats.update(reward, done), key=key,
                        inner=next_inner, time=jnp.where(done_b, 0, time))

    spec = EnvSpec(name=f"dmc/{name}", observation_size=obs_size, discrete=False,
                   action_size=action_size, num_actions=0, max_episode_steps=limit)
    return Env(spec=spec, reset=reset, step=step)
