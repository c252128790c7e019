"""PPO environment steps per second: jaxrl_suite.agents.ppo against a PureJaxRL-style loop.

The reference is PureJaxRL's ``ppo.py`` written out in this script (flax.linen ``ActorCritic``
with two 64-unit tanh towers and orthogonal init, gymnax environments under its
``FlattenObservationWrapper``/``LogWrapper``, GAE with ``unroll=16``, ``TrainState`` with
``clip_by_global_norm`` + Adam, the whole run one ``jax.jit``), on the same hyperparameters
(``PPOConfig.cartpole()``: 4 envs x 128 steps, 4 epochs x 4 minibatches). Ours runs
``agent.train`` (one jit) with health diagnostics off, and on every ``--health-every`` updates,
and without its per-update non-finite guard (what the guard costs).

Each variant is compiled first; then the repeats are interleaved (A B C A B C ...), each timing
one complete ``train(key)`` of ``--updates`` updates, and the table gives the median env
steps/s and the ratio to the reference measured in the same process.

    python benchmarks/jaxrl_ppo.py [--env CartPole-v1] [--updates 100] [--repeats 7]
        [--num-envs 4] [--health-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


# --- the reference: PureJaxRL ppo.py, discrete actions ---------------------------------------


def make_purejaxrl_train(cfg, env_name: str):
    import flax.linen as nn
    import gymnax
    from flax.linen.initializers import constant, orthogonal
    from flax.training.train_state import TrainState
    from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper

    class ActorCritic(nn.Module):
        action_dim: int

        @nn.compact
        def __call__(self, x):
            a = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)),
                                 bias_init=constant(0.0))(x))
            a = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)),
                                 bias_init=constant(0.0))(a))
            logits = nn.Dense(self.action_dim, kernel_init=orthogonal(0.01),
                              bias_init=constant(0.0))(a)
            c = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)),
                                 bias_init=constant(0.0))(x))
            c = nn.tanh(nn.Dense(64, kernel_init=orthogonal(np.sqrt(2)),
                                 bias_init=constant(0.0))(c))
            v = nn.Dense(1, kernel_init=orthogonal(1.0), bias_init=constant(0.0))(c)
            return logits, jnp.squeeze(v, axis=-1)

    class Transition(NamedTuple):
        done: jnp.ndarray
        action: jnp.ndarray
        value: jnp.ndarray
        reward: jnp.ndarray
        log_prob: jnp.ndarray
        obs: jnp.ndarray
        info: dict

    env, env_params = gymnax.make(env_name)
    env = LogWrapper(FlattenObservationWrapper(env))
    n_envs, n_steps = cfg.num_envs, cfg.num_steps
    n_mb, epochs = cfg.num_minibatches, cfg.update_epochs
    num_updates = cfg.num_updates
    minibatch_size = n_envs * n_steps // n_mb

    def linear_schedule(count):
        frac = 1.0 - (count // (n_mb * epochs)) / num_updates
        return cfg.lr * frac

    def log_prob_of(logits, a):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), a[..., None], axis=-1)[..., 0]

    def entropy_of(logits):
        logp = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    def train(rng):
        network = ActorCritic(env.action_space(env_params).n)
        rng, _rng = jax.random.split(rng)
        params = network.init(_rng, jnp.zeros(env.observation_space(env_params).shape))
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                         optax.adam(learning_rate=linear_schedule, eps=1e-5))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        rng, _rng = jax.random.split(rng)
        obsv, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(_rng, n_envs), env_params)

        def _update_step(runner_state, unused):
            def _env_step(runner_state, unused):
                train_state, env_state, last_obs, rng = runner_state
                rng, _rng = jax.random.split(rng)
                logits, value = network.apply(train_state.params, last_obs)
                action = jax.random.categorical(_rng, logits)
                log_prob = log_prob_of(logits, action)
                rng, _rng = jax.random.split(rng)
                # gymnax >= 1.0 splits done; PureJaxRL treats either as terminal
                obsv, env_state, reward, terminated, truncated, info = jax.vmap(
                    env.step, in_axes=(0, 0, 0, None))(jax.random.split(_rng, n_envs),
                                                        env_state, action, env_params)
                done = jnp.logical_or(terminated, truncated)
                transition = Transition(done, action, value, reward, log_prob, last_obs, info)
                return (train_state, env_state, obsv, rng), transition

            runner_state, traj_batch = jax.lax.scan(_env_step, runner_state, None, n_steps)
            train_state, env_state, last_obs, rng = runner_state
            _, last_val = network.apply(train_state.params, last_obs)

            def _get_advantages(gae_and_next_value, transition):
                gae, next_value = gae_and_next_value
                delta = (transition.reward + cfg.gamma * next_value * (1 - transition.done)
                         - transition.value)
                gae = delta + cfg.gamma * cfg.gae_lambda * (1 - transition.done) * gae
                return (gae, transition.value), gae

            _, advantages = jax.lax.scan(_get_advantages, (jnp.zeros_like(last_val), last_val),
                                         traj_batch, reverse=True, unroll=16)
            targets = advantages + traj_batch.value

            def _update_epoch(update_state, unused):
                def _update_minbatch(train_state, batch_info):
                    traj_batch, gae, targets = batch_info

                    def _loss_fn(params):
                        logits, value = network.apply(params, traj_batch.obs)
                        log_prob = log_prob_of(logits, traj_batch.action)
                        value_pred_clipped = traj_batch.value + (
                            value - traj_batch.value).clip(-cfg.clip_eps, cfg.clip_eps)
                        value_loss = 0.5 * jnp.maximum(
                            jnp.square(value - targets),
                            jnp.square(value_pred_clipped - targets)).mean()
                        ratio = jnp.exp(log_prob - traj_batch.log_prob)
                        g = (gae - gae.mean()) / (gae.std() + 1e-8)
                        loss_actor = -jnp.minimum(
                            ratio * g, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * g
                        ).mean()
                        entropy = entropy_of(logits).mean()
                        total = loss_actor + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                        return total, (value_loss, loss_actor, entropy)

                    total_loss, grads = jax.value_and_grad(_loss_fn, has_aux=True)(
                        train_state.params)
                    return train_state.apply_gradients(grads=grads), total_loss

                train_state, traj_batch, advantages, targets, rng = update_state
                rng, _rng = jax.random.split(rng)
                batch_size = minibatch_size * n_mb
                permutation = jax.random.permutation(_rng, batch_size)
                batch = jax.tree.map(lambda x: x.reshape((batch_size,) + x.shape[2:]),
                                     (traj_batch, advantages, targets))
                shuffled = jax.tree.map(lambda x: jnp.take(x, permutation, axis=0), batch)
                minibatches = jax.tree.map(
                    lambda x: jnp.reshape(x, [n_mb, -1] + list(x.shape[1:])), shuffled)
                train_state, total_loss = jax.lax.scan(_update_minbatch, train_state, minibatches)
                return (train_state, traj_batch, advantages, targets, rng), total_loss

            update_state = (train_state, traj_batch, advantages, targets, rng)
            update_state, loss_info = jax.lax.scan(_update_epoch, update_state, None, epochs)
            train_state, rng = update_state[0], update_state[-1]
            return (train_state, env_state, last_obs, rng), traj_batch.info

        rng, _rng = jax.random.split(rng)
        runner_state, metric = jax.lax.scan(_update_step, (train_state, env_state, obsv, _rng),
                                            None, num_updates)
        return runner_state, metric

    return train


# --- timing ---------------------------------------------------------------------------------


def main() -> None:
    from jaxrl_suite.agents import ppo
    from jaxrl_suite.envs import make

    ap = argparse.ArgumentParser()
    ap.add_argument("--env", default="CartPole-v1", help="a discrete gymnax environment")
    ap.add_argument("--updates", type=int, default=100, help="PPO updates per timed run")
    ap.add_argument("--num-envs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--health-every", type=int, default=10)
    args = ap.parse_args()

    base = ppo.PPOConfig.cartpole(num_envs=args.num_envs)
    cfg = ppo.PPOConfig.cartpole(num_envs=args.num_envs,
                                 total_timesteps=args.updates * base.batch_size)
    steps = cfg.num_updates * cfg.batch_size
    env = make(f"gymnax/{args.env}")
    variants = {
        "purejaxrl (reference)": jax.jit(make_purejaxrl_train(cfg, args.env)),
        "ours, health off": jax.jit(ppo.make_agent(cfg, env).train),
        f"ours, health every {args.health_every}": jax.jit(ppo.make_agent(
            dataclasses_replace(cfg, health_every=args.health_every), env).train),
        "ours, health off, no nonfinite guard": jax.jit(ppo.make_agent(
            dataclasses_replace(cfg, guard_nonfinite=False), env).train),
    }
    compile_s = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(0)))
        compile_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(r + 1)))
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["purejaxrl (reference)"])
    print(f"gymnax/{args.env}: {cfg.num_updates} updates x {cfg.batch_size} env steps "
          f"({cfg.num_envs} envs x {cfg.num_steps}), {args.repeats} interleaved repeats, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| variant | env steps/s (median) | min..max | vs reference | first call s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {steps / med:,.0f} | {steps / max(ts):,.0f}..{steps / min(ts):,.0f} "
              f"| {ref / med:.2f}x | {compile_s[name]:.1f} |")


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


if __name__ == "__main__":
    main()
