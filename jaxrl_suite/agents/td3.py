"""TD3: Twin Delayed Deep Deterministic policy gradient, whole loop under one ``jit``.

Fujimoto, van Hoof, Meger (2018), "Addressing Function Approximation Error in Actor-Critic
Methods", arXiv 1802.09477 (Algorithm 1). Equations are that paper's.

* Twin critics and clipped double-Q target with target policy smoothing (Eq. 10 and 14)::

      a~ = clip( pi'(s') + clip(eps, -c, c), -1, 1 ),   eps ~ N(0, sigma~^2)
      y  = r + gamma (1 - terminated) min_i Q'_i(s', a~)

  (``s'`` is the step's final observation: time-limit truncations bootstrap, terminations do
  not), each critic trained on ``E[(Q_i(s, a) - y)^2]``, summed over the two (Algorithm 1);
* delayed updates: every ``policy_delay``-th critic update, the deterministic actor
  ``a = tanh(f(s))`` follows ``grad_a Q_1(s, a)`` (loss ``-E Q_1(s, pi(s))``) and the target
  actor and critics move by Polyak averaging (``tau``);
* exploration: ``a = clip(pi(s) + N(0, sigma^2), -1, 1)`` after ``learning_starts`` uniform
  random steps.

The loop, metrics, critic health reports and neuron resets are those of
:class:`jaxrl_suite.agents.sac.OffPolicyAgent` (see :mod:`jaxrl_suite.agents.sac`); the replay
buffer is :mod:`jaxrl_suite.agents.replay`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrl_suite import resets
from jaxrl_suite.agents import replay
from jaxrl_suite.agents.sac import (RESETS, OffPolicyAgent, init_network_params,
                                    network_graphdef, per_member, polyak, soft_td_target,
                                    strong_types)
from jaxrl_suite.envs.core import Env, EnvState
from jaxrl_suite.networks import NetworkConfig
from trainkit.config import Config, field
from trainkit.guards import GuardState, guarded_update, init_guard


def smoothed_target_action(key: jax.Array, target_action: jax.Array, noise: float,
                           noise_clip: float) -> jax.Array:
    """Target policy smoothing (Eq. 14): ``clip(a' + clip(N(0, noise^2), -c, c), -1, 1)``."""
    eps = jnp.clip(noise * jax.random.normal(key, target_action.shape, target_action.dtype),
                   -noise_clip, noise_clip)
    return jnp.clip(target_action + eps, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class TD3Config(Config):
    num_envs: int = field(1, ge=1, help="parallel environments (each iteration steps all)")
    total_steps: int = field(100_000, ge=1, help="env steps over all envs done by train(key)")
    chunk_steps: int = field(1000, ge=1, help="iterations per train_chunk call")
    learning_starts: int = field(5_000, ge=0, help="env steps with uniform random actions "
                                                   "before updates start")
    utd: int = field(1, ge=1, help="gradient updates per collected transition")
    batch_size: int = field(256, ge=1)
    buffer_size: int = field(1_000_000, ge=1)
    gamma: float = field(0.99, ge=0, le=1)
    tau: float = field(0.005, gt=0, le=1, help="Polyak rate of the target actor and critics")
    actor_lr: float = field(3e-4, gt=0)
    critic_lr: float = field(3e-4, gt=0)
    policy_delay: int = field(2, ge=1, help="critic updates per actor/target update (d)")
    exploration_noise: float = field(0.1, ge=0, help="std of the Gaussian exploration noise")
    policy_noise: float = field(0.2, ge=0, help="std of the target smoothing noise (sigma~)")
    noise_clip: float = field(0.5, ge=0, help="clip of the target smoothing noise (c)")
    actor: NetworkConfig = field(factory=NetworkConfig.sac_mlp)
    critic: NetworkConfig = field(factory=NetworkConfig.sac_mlp)
    health_every: int = field(0, ge=0, help="critic health report every this many updates")
    tau_dormant: float = field(0.1, ge=0)
    tau_grama: float = field(0.1, ge=0)
    reset: str = field("none", choices=RESETS, help="critic neuron reset: none | redo | regrama")
    reset_every: int = field(1000, ge=1, help="reset period in gradient updates")
    reset_tau: float = field(0.1, ge=0)

    def validate(self) -> None:
        if self.num_envs > self.buffer_size:
            raise self.invalid("buffer_size", f"must hold one step of all {self.num_envs} envs")

    @property
    def num_chunks(self) -> int:
        return max(1, self.total_steps // (self.chunk_steps * self.num_envs))

    def reset_config(self) -> resets.ResetConfig | None:
        if self.reset == "none":
            return None
        return resets.ResetConfig(method=self.reset, tau=self.reset_tau, every=self.reset_every)

    @classmethod
    def smoke(cls) -> "TD3Config":
        return cls(num_envs=2, total_steps=256, chunk_steps=32, learning_starts=64,
                   batch_size=32, buffer_size=1024, actor=NetworkConfig.tiny(),
                   critic=NetworkConfig.tiny())

    @classmethod
    def pendulum(cls) -> "TD3Config":
        """gymnax Pendulum-v1, ~1e4 env steps, lr 1e-3 (CleanRL/SB3-zoo-like)."""
        return cls(total_steps=10_000, chunk_steps=1000, learning_starts=1000, actor_lr=1e-3,
                   critic_lr=1e-3, buffer_size=100_000)

    @classmethod
    def mujoco(cls) -> "TD3Config":
        """The paper's settings (Fujimoto et al. 2018, Appendix C, with 256-wide nets as in the
        authors' final code): Adam 3e-4, batch 256, d = 2, sigma = 0.1, sigma~ = 0.2, c = 0.5,
        tau = 0.005, 25k random warm-up steps."""
        return cls(total_steps=1_000_000, chunk_steps=1000, learning_starts=25_000)


@struct.dataclass
class TD3State:
    actor: Any
    target_actor: Any
    critic: Any  # twin critics, stacked [2, ...]
    target_critic: Any
    actor_opt: Any
    critic_opt: Any
    guards: dict[str, GuardState]
    buffer: replay.ReplayBuffer
    env: EnvState
    key: jax.Array
    env_steps: jax.Array
    updates: jax.Array
    early_stop: Any = None  # the early-stop hook's state (see OffPolicyAgent)


@dataclasses.dataclass(frozen=True)
class TD3(OffPolicyAgent):
    """TD3 on one environment (:func:`make_agent`): ``init``, ``train_chunk``, ``train``,
    ``policy`` are pure, jittable and vmappable."""

    config: TD3Config
    env: Env

    UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "target_mean", "actor_updates",
                      "reset_neurons", "skipped")

    @property
    def actor_graphdef(self) -> nnx.GraphDef:
        return network_graphdef(self.config.actor, self.obs_dim, self.action_dim)

    def policy(self, actor_params: Any, obs: jax.Array) -> jax.Array:
        """The deterministic policy ``tanh(f(s))`` in ``[-1, 1]``."""
        return jnp.tanh(nnx.merge(self.actor_graphdef, actor_params)(obs))

    def explore(self, actor_params: Any, obs: jax.Array, key: jax.Array) -> jax.Array:
        a = self.policy(actor_params, obs)
        noise = self.config.exploration_noise * jax.random.normal(key, a.shape, a.dtype)
        return jnp.clip(a + noise, -1.0, 1.0)

    def stop_signals(self, state: TD3State, action: jax.Array, next_env: EnvState,
                     key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """What an early-stop hook sees: ``q = min_i Q_i(s, a)``, the TD loss
        ``mean_i (Q_i(s, a) - y)^2`` with ``y = r + gamma (1 - terminated) min_i Q'_i(s', pi'(s'))``
        (the target policy without smoothing noise: the hook wants the estimate, not the
        regulariser), and the entropy per dimension of the Gaussian exploration noise,
        ``1/2 log(2 pi e sigma^2)``: a constant, so an entropy-adaptive K is fixed for TD3."""
        del key
        c = self.config
        obs, next_obs = state.env.obs, next_env.final_obs
        q = self.critic(state.critic, obs, action)
        next_q = self.critic(state.target_critic, next_obs,
                             self.policy(state.target_actor, next_obs))
        y = soft_td_target(next_env.reward, next_env.terminated, next_q,
                           jnp.zeros_like(next_env.reward), 0.0, c.gamma)
        sigma = max(c.exploration_noise, 1e-6)
        entropy = jnp.float32(0.5 * math.log(2 * math.pi * math.e * sigma ** 2))
        return jnp.min(q, axis=0), jnp.mean((q - y[None]) ** 2, axis=0), entropy

    def _txs(self):
        c = self.config
        return optax.adam(c.actor_lr), per_member(optax.adam(c.critic_lr))

    def init(self, key: jax.Array) -> TD3State:
        c = self.config
        k_actor, k_critic, k_env, key = jax.random.split(key, 4)
        actor = init_network_params(c.actor, self.obs_dim, self.action_dim, k_actor)
        critic = self.critic.init(k_critic)
        tx_actor, tx_critic = self._txs()
        env_state = strong_types(jax.vmap(self.env.reset)(jax.random.split(k_env, c.num_envs)))
        example = self._transition(env_state, jnp.zeros((c.num_envs, self.action_dim)), env_state)
        buffer = replay.init(jax.tree.map(lambda x: x[0], example), c.buffer_size)
        zero = jnp.zeros((), jnp.int32)
        return TD3State(actor=actor, target_actor=actor, critic=critic, target_critic=critic,
                        actor_opt=tx_actor.init(actor), critic_opt=tx_critic.init(critic),
                        guards={"actor": init_guard(), "critic": init_guard()},
                        buffer=buffer, env=env_state, key=key, env_steps=zero, updates=zero,
                        early_stop=None if self.early_stop is None else self.early_stop.init())

    def critic_loss(self, critic_params, target_critic, target_actor, batch, key):
        """``sum_i E[(Q_i(s, a) - y)^2]`` with the smoothed clipped double-Q target ``y``."""
        c = self.config
        next_a = smoothed_target_action(key, self.policy(target_actor, batch["next_obs"]),
                                        c.policy_noise, c.noise_clip)
        next_q = self.critic(target_critic, batch["next_obs"], next_a)
        y = jax.lax.stop_gradient(soft_td_target(
            batch["reward"], batch["terminated"], next_q, jnp.zeros_like(batch["reward"]), 0.0,
            c.gamma))
        q = self.critic(critic_params, batch["obs"], batch["action"])
        return jnp.sum(jnp.mean((q - y[None]) ** 2, axis=1)), (q, y)

    def actor_loss(self, actor_params, critic_params, obs):
        """``-E Q_1(s, pi(s))`` (deterministic policy gradient through the first critic)."""
        q = self.critic(critic_params, obs, self.policy(actor_params, obs))
        return -jnp.mean(q[0])

    def update(self, state: TD3State, key: jax.Array) -> tuple[TD3State, dict, dict]:
        c = self.config
        tx_actor, tx_critic = self._txs()
        k_batch, k_noise, k_reset = jax.random.split(key, 3)
        batch = replay.sample(state.buffer, k_batch, c.batch_size)
        updates = state.updates + 1

        (q_loss, (q, y)), q_grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
            state.critic, state.target_critic, state.target_actor, batch, k_noise)
        critic, critic_opt, g_critic, m_critic = guarded_update(
            tx_critic, q_grads, state.critic_opt, state.critic, q_loss, state.guards["critic"])
        x = self.critic.inputs(batch["obs"], batch["action"])
        critic, critic_opt, n_reset = self._maybe_reset(critic, critic_opt, x, q_grads, updates,
                                                        k_reset)
        health_out = self._maybe_health(state.critic, x, q_grads, updates)

        def delayed(args):
            actor, actor_opt, g_actor, target_actor, target_critic = args
            pi_loss, pi_grads = jax.value_and_grad(self.actor_loss)(actor, critic, batch["obs"])
            actor, actor_opt, g_actor, _ = guarded_update(tx_actor, pi_grads, actor_opt, actor,
                                                          pi_loss, g_actor)
            return (actor, actor_opt, g_actor, polyak(target_actor, actor, c.tau),
                    polyak(target_critic, critic, c.tau)), pi_loss

        def skip(args):
            return args, jnp.zeros((), jnp.float32)

        args = (state.actor, state.actor_opt, state.guards["actor"], state.target_actor,
                state.target_critic)
        do_actor = updates % c.policy_delay == 0
        (actor, actor_opt, g_actor, target_actor, target_critic), pi_loss = jax.lax.cond(
            do_actor, delayed, skip, args)

        metrics = {"critic_loss": q_loss, "actor_loss": pi_loss, "q_mean": jnp.mean(q),
                   "target_mean": jnp.mean(y), "actor_updates": do_actor,
                   "reset_neurons": n_reset, "skipped": m_critic["skipped"]}
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        state = state.replace(actor=actor, target_actor=target_actor, critic=critic,
                              target_critic=target_critic, actor_opt=actor_opt,
                              critic_opt=critic_opt,
                              guards={"actor": g_actor, "critic": g_critic}, updates=updates)
        return state, metrics, health_out

    def train_chunk(self, state: TD3State, num_steps: int | None = None
                    ) -> tuple[TD3State, dict[str, jax.Array]]:
        """As :meth:`OffPolicyAgent.train_chunk`; ``actor_loss`` is the mean over the delayed
        actor updates only, ``actor_updates`` their count in the chunk."""
        state, metrics = super().train_chunk(state, num_steps)
        total = metrics["updates_in_chunk"]
        n = jnp.where(total > 0, jnp.round(metrics.pop("actor_updates") * total), 0.0)
        # the chunk mean counts skipped actor steps as 0: rescale to the mean over actor updates
        metrics["actor_loss"] = jnp.where(n > 0, metrics["actor_loss"] * total
                                          / jnp.maximum(n, 1.0), jnp.nan)
        metrics["actor_updates"] = n
        return state, metrics


def make_agent(config: TD3Config, env: Env, early_stop: Any = None) -> TD3:
    """The TD3 agent of ``config`` on ``env`` (continuous actions in ``[-1, 1]``), with an
    optional early-stop hook (:class:`jaxrl_suite.least.Least`)."""
    return TD3(config, env, early_stop)


__all__ = ["TD3Config", "TD3State", "TD3", "make_agent", "smoothed_target_action"]
