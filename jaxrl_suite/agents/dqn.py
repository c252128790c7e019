"""DQN (Mnih et al. 2015, Nature 518) with a JAX replay buffer, a target network and the
double-DQN target (van Hasselt et al. 2016, arXiv 1509.06461) as an option; fully jitted.

One *update* is ``steps_per_update`` epsilon-greedy steps of ``num_envs`` vectorised
environments (their transitions go to :mod:`jaxrl_suite.agents.replay`), then one gradient step
on a uniformly sampled minibatch once the buffer holds ``learning_starts`` transitions, then
(every ``target_update_every`` gradient steps) a Polyak update of the target network with rate
``tau`` (``tau=1``: a hard copy). The defaults are CleanRL's ``dqn_jax.py`` CartPole settings
(buffer 1e4, batch 128, lr 2.5e-4, target copy every 500 env steps, epsilon 1 -> 0.05 over half
the run, learning from 1e4 steps, one gradient step per 10 env steps) with 10 environments
stepping once per update as in purejaxql's ``dqn.py``. Entry points as in
:mod:`jaxrl_suite.agents.ppo` (``init``, ``train_chunk``, ``train``, greedy ``policy``).

*Decisions*: the Q-network is a :mod:`jaxrl_suite.networks` 2 x 128 ReLU MLP (CleanRL uses
120/84; our networks have one width); the TD target bootstraps from the true next observation
(``final_obs``) unless the episode *terminated*, so time-limit truncation is not a terminal
state; the warm-up gate and the target-update period are ``lax.cond`` on counters (under
``vmap`` over seeds they become selects that compute both branches; results are the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrl_suite import health
from jaxrl_suite.agents import replay
from jaxrl_suite.agents.evaluation import episode_metrics
from jaxrl_suite.agents.pqn import epsilon_greedy, linear_epsilon
from jaxrl_suite.envs.core import Env, EnvState
from jaxrl_suite.networks import NetworkConfig, make_network
from jaxrl_suite.optim import KronConfig, make_optimizer
from trainkit.config import Config, field
from trainkit.guards import GuardState, guarded_update, init_guard


def _dqn_net() -> NetworkConfig:
    return NetworkConfig(kind="mlp", depth=2, width=128, activation="relu")


@dataclasses.dataclass(frozen=True)
class DQNConfig(Config):
    num_envs: int = field(10, ge=1, help="parallel environments")
    steps_per_update: int = field(1, ge=1, help="vectorised env steps between gradient steps")
    total_timesteps: int = field(500_000, ge=1)
    buffer_size: int = field(10_000, ge=1)
    batch_size: int = field(128, ge=1)
    learning_starts: int = field(10_000, ge=0, help="transitions in the buffer before learning")
    lr: float = field(2.5e-4, gt=0)
    max_grad_norm: float = field(10.0, gt=0, help="global-norm clip (CleanRL does not clip)")
    gamma: float = field(0.99, ge=0, le=1)
    tau: float = field(1.0, gt=0, le=1, help="target update rate (1 = hard copy)")
    target_update_every: int = field(50, ge=1, help="gradient steps between target updates")
    eps_start: float = field(1.0, ge=0, le=1)
    eps_finish: float = field(0.05, ge=0, le=1)
    exploration_fraction: float = field(0.5, ge=0, le=1,
                                        help="fraction of total_timesteps to anneal epsilon over")
    loss: str = field("mse", choices=("mse", "huber"), help="TD loss (huber: delta 1)")
    double_dqn: bool = field(False, help="double DQN target: online argmax, target value")
    network: NetworkConfig = field(factory=_dqn_net)
    optimizer: str = field("adam", choices=("adam", "radam", "kron"),
                           help="adam | radam | kron (PSGD Kron, jaxrl_suite.optim)")
    kron: KronConfig = field(factory=KronConfig, help="Kron settings (optimizer=kron)")
    guard_nonfinite: bool = field(True)
    health_every: int = field(0, ge=0, help="neuron-health metrics every N updates (0 = off)")
    tau_dormant: float = field(0.1, ge=0)
    tau_grama: float = field(0.1, ge=0)
    chunk_updates: int = field(1000, ge=1, help="updates per train_chunk when none is given")

    def validate(self) -> None:
        if self.num_envs * self.steps_per_update > self.buffer_size:
            raise self.invalid("buffer_size", "must hold at least one update's transitions "
                                              f"({self.num_envs * self.steps_per_update})")
        if self.num_updates < 1:
            raise self.invalid("total_timesteps", "must be >= num_envs * steps_per_update")

    @property
    def transitions_per_update(self) -> int:
        return self.num_envs * self.steps_per_update

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.transitions_per_update

    @classmethod
    def cartpole(cls, **kw) -> "DQNConfig":
        """CleanRL ``dqn_jax.py`` CartPole-v1 settings (see the module docstring)."""
        return cls(**kw)

    @classmethod
    def minatar(cls, **kw) -> "DQNConfig":
        """MinAtar-scale settings (Young & Tian 2019 style: buffer 1e5, 5e6 steps)."""
        base = dict(num_envs=16, total_timesteps=5_000_000, buffer_size=100_000, batch_size=32,
                    learning_starts=5_000, lr=2.5e-4, target_update_every=125,
                    exploration_fraction=0.02, eps_finish=0.1, loss="huber",
                    network=NetworkConfig(kind="mlp", depth=2, width=256))
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw) -> "DQNConfig":
        base = dict(num_envs=4, total_timesteps=4 * 40, buffer_size=64, batch_size=16,
                    learning_starts=32, target_update_every=4, chunk_updates=10,
                    network=NetworkConfig(kind="mlp", depth=2, width=16))
        return cls(**{**base, **kw})


# --- pure pieces ----------------------------------------------------------------------------


def td_target(reward: jax.Array, terminated: jax.Array, next_q_target: jax.Array,
              gamma: float, next_q_online: jax.Array | None = None) -> jax.Array:
    """One-step Q-learning target (Mnih et al. 2015; van Hasselt et al. 2016 for the double form)::

        y = r + gamma * (1 - terminated) * max_a Q_target(s', a)                 (DQN)
        y = r + gamma * (1 - terminated) * Q_target(s', argmax_a Q_online(s', a))  (double DQN)

    ``next_q_*`` are ``[batch, num_actions]`` at the true next observation; the double form is
    used when ``next_q_online`` is given."""
    chex.assert_rank(next_q_target, 2)
    if next_q_online is None:
        v = jnp.max(next_q_target, axis=-1)
    else:
        a = jnp.argmax(next_q_online, axis=-1)
        v = jnp.take_along_axis(next_q_target, a[:, None], axis=-1)[:, 0]
    return reward + gamma * (1.0 - terminated) * v


def td_loss(q_taken: jax.Array, target: jax.Array, kind: str = "mse") -> jax.Array:
    """``mean((Q - y)^2)`` (``mse``, CleanRL) or ``mean(huber_1(Q - y))`` (``huber``, Mnih et al.'s
    error clipping)."""
    chex.assert_equal_shape([q_taken, target])
    err = q_taken - target
    if kind == "huber":
        return jnp.mean(optax.huber_loss(err, delta=1.0))
    return jnp.mean(jnp.square(err))


# --- the agent ------------------------------------------------------------------------------


@struct.dataclass
class DQNState:
    params: Any
    target_params: Any
    opt_state: Any
    buffer: replay.ReplayBuffer
    env_state: EnvState  # leaves [num_envs, ...]
    key: jax.Array
    update: jax.Array  # int32: updates done
    grad_steps: jax.Array  # int32
    env_steps: jax.Array  # int32
    guard: GuardState


@dataclasses.dataclass(frozen=True)
class DQNAgent:
    config: DQNConfig
    env: Env
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    init: Callable[[jax.Array], DQNState]
    train_chunk: Callable[..., tuple[DQNState, dict]]
    train: Callable[[jax.Array], tuple[DQNState, dict]]
    policy: Callable[[Any, jax.Array], jax.Array]  # greedy
    init_params: Callable[[jax.Array], Any]

    @staticmethod
    def policy_params(state: Any) -> Any:
        """What :attr:`policy` takes (the online Q-network's params)."""
        return state.params


def make_agent(config: DQNConfig, env: Env) -> DQNAgent:
    if not env.discrete:
        raise ValueError(f"DQN needs discrete actions; {env.spec.name} is continuous")
    c = config
    N = c.num_envs
    num_updates = c.num_updates

    def build(key):
        model = make_network(c.network, env.observation_size, env.num_actions, nnx.Rngs(key))
        return nnx.split(model, nnx.Param)

    graphdef, _ = build(jax.random.key(0))
    optimizer = optax.chain(optax.clip_by_global_norm(c.max_grad_norm),
                            make_optimizer(c.optimizer, c.lr, kron_config=c.kron))

    def q_fn(params, obs):
        return nnx.merge(graphdef, params)(obs)

    def policy(params, obs):
        return jnp.argmax(q_fn(params, obs), axis=-1)

    def init_params(key):
        return build(key)[1]

    obs0 = jnp.zeros((env.observation_size,), jnp.float32)
    example = {"obs": obs0, "action": jnp.zeros((), jnp.int32),
               "reward": jnp.zeros((), jnp.float32), "terminated": jnp.zeros((), jnp.float32),
               "next_obs": obs0}

    def init(key):
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        env_state = jax.vmap(env.reset)(jax.random.split(k_env, N))
        zero = jnp.zeros((), jnp.int32)
        return DQNState(params=params, target_params=params, opt_state=optimizer.init(params),
                        buffer=replay.init(example, c.buffer_size), env_state=env_state,
                        key=k_state, update=zero, grad_steps=zero, env_steps=zero,
                        guard=init_guard())

    v_step = jax.vmap(env.step)

    def loss_fn(params, target_params, batch):
        q = q_fn(params, batch["obs"])
        q_taken = jnp.take_along_axis(q, batch["action"][:, None], axis=-1)[:, 0]
        next_q_target = q_fn(target_params, batch["next_obs"])
        next_q_online = q_fn(params, batch["next_obs"]) if c.double_dqn else None
        y = jax.lax.stop_gradient(td_target(batch["reward"], batch["terminated"], next_q_target,
                                            c.gamma, next_q_online))
        loss = td_loss(q_taken, y, c.loss)
        return loss, {"loss": loss, "q": jnp.mean(q_taken)}

    def health_metrics(params, target_params, batch):
        grads = jax.grad(lambda p: loss_fn(p, target_params, batch)[0])(params)
        rep = health.health_report(graphdef, params, batch["obs"], grads,
                                   tau_dormant=c.tau_dormant, tau_grama=c.tau_grama)
        return {f"health/q/{k}": v.astype(jnp.float32) for k, v in rep.items()}

    def update(state: DQNState, do_health: jax.Array):
        key, k_roll, k_sample = jax.random.split(state.key, 3)
        eps = linear_epsilon(state.env_steps, c.eps_start, c.eps_finish,
                             c.exploration_fraction * c.total_timesteps)

        def env_step(env_state, k):
            action = epsilon_greedy(k, q_fn(state.params, env_state.obs), eps)
            nxt = v_step(env_state, action)
            tr = {"obs": env_state.obs, "action": action, "reward": nxt.reward,
                  "terminated": nxt.terminated, "next_obs": nxt.final_obs}
            return nxt, (tr, nxt.stats)

        env_state, (trs, stats) = jax.lax.scan(env_step, state.env_state,
                                               jax.random.split(k_roll, c.steps_per_update))
        buffer = replay.add_batch(
            state.buffer, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), trs))
        env_steps = state.env_steps + c.transitions_per_update
        batch = replay.sample(buffer, k_sample, c.batch_size)

        def learn(operand):
            params, opt_state, guard, grad_steps = operand
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state.target_params, batch)
            if c.guard_nonfinite:
                params, opt_state, guard, _ = guarded_update(optimizer, grads, opt_state, params,
                                                             aux["loss"], guard)
            else:
                updates, opt_state = optimizer.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            return (params, opt_state, guard, grad_steps + 1), aux

        def skip(operand):
            return operand, {"loss": jnp.float32(jnp.nan), "q": jnp.float32(jnp.nan)}

        learning = buffer.size >= max(c.learning_starts, 1)
        (params, opt_state, guard, grad_steps), aux = jax.lax.cond(
            learning, learn, skip, (state.params, state.opt_state, state.guard, state.grad_steps))
        sync = jnp.logical_and(learning, grad_steps % c.target_update_every == 0)
        target_params = jax.lax.cond(
            sync, lambda: optax.incremental_update(params, state.target_params, c.tau),
            lambda: state.target_params)
        metrics = dict(aux)
        metrics.update(episode_metrics(stats))
        metrics.update(env_steps=env_steps, grad_steps=grad_steps, epsilon=eps,
                       nonfinite_streak=guard.streak)
        if c.health_every:
            metrics.update(jax.lax.cond(do_health, health_metrics, _nan_like(health_metrics),
                                        params, target_params, batch))
        return DQNState(params=params, target_params=target_params, opt_state=opt_state,
                        buffer=buffer, env_state=env_state, key=key, update=state.update + 1,
                        grad_steps=grad_steps, env_steps=env_steps, guard=guard), metrics

    def train_chunk(state: DQNState, num_updates: int | None = None):
        n = int(num_updates or c.chunk_updates)
        idx = jnp.arange(n)
        do_health = ((idx + 1) % c.health_every == 0) if c.health_every else jnp.zeros(n, bool)
        return jax.lax.scan(update, state, do_health)

    def train(key):
        return train_chunk(init(key), num_updates)

    return DQNAgent(config=c, env=env, graphdef=graphdef, optimizer=optimizer, init=init,
                    train_chunk=train_chunk, train=train, policy=policy, init_params=init_params)


def _nan_like(fn: Callable) -> Callable:
    def nan_fn(*args):
        shapes = jax.eval_shape(fn, *args)
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    return nan_fn


__all__ = ["DQNConfig", "DQNState", "DQNAgent", "make_agent", "td_target", "td_loss"]
