"""PQN: Parallelised Q-Network (Gallici et al. 2024, "Simplifying Deep Temporal Difference
Learning", arXiv 2407.04811; reference code purejaxql ``pqn_gymnax.py``).

Q-learning without replay buffer and without target network: ``num_envs`` vectorised
environments act epsilon-greedily for ``num_steps`` steps, Q(lambda) returns are computed over
that rollout with the current network, and the LayerNorm Q-network is regressed on them for
``num_epochs`` epochs of ``num_minibatches`` shuffled minibatches (RAdam, global-norm clipping,
learning rate linearly decayed to ~0). Same entry points as :mod:`jaxrl_suite.agents.ppo`::

    agent = make_agent(PQNConfig.cartpole(), make("gymnax/CartPole-v1"))
    state, metrics = jax.jit(agent.train)(key)
    state, metrics = jax.jit(agent.train_chunk, static_argnums=1)(agent.init(key), 10)

*Decisions*: the network is :mod:`jaxrl_suite.networks` (``mlp`` with ``layer_norm=True``,
Flax's default LeCun-normal init, as purejaxql's ``QNetwork``), without purejaxql's unused
BatchNorm on the input. Truncated episodes bootstrap from ``max_a Q(final_obs, a)``; purejaxql
treats every ``done`` as terminal (:func:`q_lambda_returns` equals its recursion when nothing
is truncated; the tests check both). Health metrics as in PPO (``health_every``).

Stable-gradients options (Castanyer et al. 2025, issue 18): ``optimizer`` picks RAdam (default),
Adam or PSGD Kron (:mod:`jaxrl_suite.optim`); ``network.kind="multiskip_paper"`` the multi-skip
residual MLP; ``grad_diagnostics`` logs per-layer gradient norms ``grad/norm/<layer>`` and the
cosine of consecutive minibatch gradients ``grad/cos/<layer>`` every update (in-jit);
``hessian_samples`` adds the TD-loss Hessian trace (Hutchinson) and top eigenvalue (power
iteration) to the health report; ``churn_samples`` logs, every update, how much the update
changed the network's outputs on a fixed reference batch of that many observations (drawn
without replacement from the first update's rollout and kept in :class:`PQNState`): the
penultimate features (:func:`jaxrl_suite.health.representation_churn`, ``churn/repr_*``), the
Q-values and the greedy action (:func:`jaxrl_suite.health.q_churn`, ``churn/q``,
``churn/greedy_changed``), between the parameters before the update's first minibatch and
after its last.
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
from jaxrl_suite.agents.evaluation import episode_metrics
from jaxrl_suite.envs.core import Env, EnvState
from jaxrl_suite.networks import NetworkConfig, make_network
from jaxrl_suite.optim import KronConfig, make_optimizer
from trainkit.config import Config, field
from trainkit.guards import GuardState, all_finite, init_guard


def _pqn_net() -> NetworkConfig:
    return NetworkConfig(kind="mlp", depth=2, width=256, layer_norm=True, activation="relu",
                         kernel_init="lecun_normal")


@dataclasses.dataclass(frozen=True)
class PQNConfig(Config):
    num_envs: int = field(32, ge=1, help="parallel environments")
    num_steps: int = field(64, ge=1, help="rollout length per environment and update")
    total_timesteps: int = field(500_000, ge=1)
    eps_start: float = field(1.0, ge=0, le=1)
    eps_finish: float = field(0.2, ge=0, le=1)
    eps_decay: float = field(0.2, ge=0, le=1, help="fraction of the updates over which epsilon "
                                                   "decays linearly from eps_start to eps_finish")
    num_minibatches: int = field(16, ge=1)
    num_epochs: int = field(4, ge=1)
    lr: float = field(1e-4, gt=0)
    lr_linear_decay: bool = field(True, help="decay the learning rate linearly to 1e-20")
    max_grad_norm: float = field(10.0, gt=0)
    reward_scale: float = field(0.1, gt=0, help="rewards are multiplied by this for learning")
    gamma: float = field(0.99, ge=0, le=1)
    q_lambda: float = field(0.95, ge=0, le=1)
    network: NetworkConfig = field(factory=_pqn_net)
    optimizer: str = field("radam", choices=("radam", "adam", "kron"),
                           help="radam (purejaxql) | adam | kron (PSGD Kron, jaxrl_suite.optim; "
                                "Castanyer et al. 2025 use lr / 3 with it)")
    kron: KronConfig = field(factory=KronConfig, help="Kron settings (optimizer=kron)")
    grad_diagnostics: bool = field(False, help="log per-layer gradient norms grad/norm/<layer> "
                                               "and the cosine of consecutive minibatch "
                                               "gradients grad/cos/<layer> (update means)")
    hessian_samples: int = field(0, ge=0, help="with health_every: Hutchinson probes and power "
                                               "iterations for the TD-loss Hessian trace and top "
                                               "eigenvalue (0 = off)")
    churn_samples: int = field(0, ge=0, help="representation and Q churn of every update on a "
                                             "fixed batch of this many observations (0 = off)")
    guard_nonfinite: bool = field(True, help="skip an update whose losses or new parameters "
                                             "are non-finite")
    health_every: int = field(0, ge=0, help="neuron-health metrics every N updates (0 = off)")
    health_samples: int = field(256, ge=1, help="rollout samples (drawn without replacement) the "
                                                "health metrics are computed on")
    tau_dormant: float = field(0.1, ge=0)
    tau_grama: float = field(0.1, ge=0)
    chunk_updates: int = field(10, ge=1, help="updates per train_chunk when none is given")

    def validate(self) -> None:
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise self.invalid("num_minibatches", f"must divide num_envs * num_steps = "
                                                  f"{self.num_envs * self.num_steps}")
        if self.num_updates < 1:
            raise self.invalid("total_timesteps", f"must be >= num_envs * num_steps = "
                                                  f"{self.num_envs * self.num_steps}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @classmethod
    def cartpole(cls, **kw) -> "PQNConfig":
        """purejaxql ``config/alg/pqn_cartpole.yaml``."""
        return cls(**kw)

    @classmethod
    def minatar(cls, **kw) -> "PQNConfig":
        """purejaxql ``config/alg/pqn_minatar.yaml`` (1e7 steps)."""
        base = dict(num_envs=128, num_steps=32, total_timesteps=10_000_000, eps_finish=0.05,
                    eps_decay=0.1, num_minibatches=32, num_epochs=2, lr=5e-4, reward_scale=1.0,
                    q_lambda=0.65)
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw) -> "PQNConfig":
        base = dict(num_envs=4, num_steps=8, total_timesteps=4 * 8 * 4, num_minibatches=2,
                    num_epochs=2, chunk_updates=2,
                    network=NetworkConfig(kind="mlp", depth=2, width=16, layer_norm=True))
        return cls(**{**base, **kw})


# --- pure pieces ----------------------------------------------------------------------------


def linear_epsilon(step: jax.Array, start: float, finish: float, duration: float) -> jax.Array:
    """``eps(step) = start + (finish - start) * min(step / duration, 1)``; ``finish`` for any step
    when ``duration <= 0`` (the schedule of DQN, Mnih et al. 2015, and of purejaxql)."""
    step = jnp.asarray(step, jnp.float32)
    if duration <= 0:
        return jnp.full(step.shape, finish, jnp.float32)
    frac = jnp.clip(step / duration, 0.0, 1.0)
    return (start + (finish - start) * frac).astype(jnp.float32)


def epsilon_greedy(key: jax.Array, q_values: jax.Array, epsilon: jax.Array) -> jax.Array:
    """``argmax_a Q`` per row, replaced with probability ``epsilon`` by a uniform action.
    ``q_values`` is ``[batch, num_actions]``; returns int32 ``[batch]``."""
    chex.assert_rank(q_values, 2)
    k_explore, k_action = jax.random.split(key)
    greedy = jnp.argmax(q_values, axis=-1).astype(jnp.int32)
    random = jax.random.randint(k_action, greedy.shape, 0, q_values.shape[-1], jnp.int32)
    explore = jax.random.uniform(k_explore, greedy.shape) < epsilon
    return jnp.where(explore, random, greedy)


def q_lambda_returns(rewards: jax.Array, next_q_max: jax.Array, terminated: jax.Array,
                     done: jax.Array, gamma: float, lam: float) -> jax.Array:
    """Peng's Q(lambda) returns over a rollout, as PQN uses them (Gallici et al. 2024; written
    from purejaxql's ``_get_target``), with terminations and truncations told apart.

    Inputs ``[T, ...]`` time-major; ``next_q_max[t] = max_a Q(s'_t, a)`` at the true next
    observation ``s'_t`` of transition ``t`` (``final_obs``)::

        lam_t = lam * (1 - done_t),   R_T := next_q_max[T-1]   (bootstrap at the rollout's end)
        R_t   = r_t + gamma * (1 - terminated_t) * ((1 - lam_t) * next_q_max[t] + lam_t * R_{t+1})

    A terminated step's target is ``r_t``; a truncated one's is ``r_t + gamma max_a Q(s'_t, a)``
    (purejaxql makes both ``r_t``). Without truncations it is purejaxql's recursion
    ``R_t = r_t + gamma (1 - d_t) (lam R_{t+1} + (1 - lam) max_a Q(s_{t+1}, a))``."""
    chex.assert_equal_shape([rewards, next_q_max, terminated, done])

    def body(r_next, x):
        r, q, term, d = x
        lam_t = lam * (1.0 - d)
        ret = r + gamma * (1.0 - term) * ((1.0 - lam_t) * q + lam_t * r_next)
        return ret, ret

    _, returns = jax.lax.scan(body, next_q_max[-1], (rewards, next_q_max, terminated, done),
                              reverse=True)
    return returns


# --- the agent ------------------------------------------------------------------------------


@struct.dataclass
class PQNState:
    params: Any
    opt_state: Any
    env_state: EnvState  # leaves [num_envs, ...]
    key: jax.Array
    update: jax.Array  # int32: updates done
    env_steps: jax.Array  # int32
    guard: GuardState
    churn_obs: Any = None  # [churn_samples, obs] reference batch (churn_samples > 0), else None


@struct.dataclass
class _Batch:
    obs: jax.Array
    action: jax.Array
    target: jax.Array


@dataclasses.dataclass(frozen=True)
class PQNAgent:
    config: PQNConfig
    env: Env
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    init: Callable[[jax.Array], PQNState]
    train_chunk: Callable[..., tuple[PQNState, dict]]
    train: Callable[[jax.Array], tuple[PQNState, dict]]
    policy: Callable[[Any, jax.Array], jax.Array]  # greedy
    init_params: Callable[[jax.Array], Any]

    @staticmethod
    def policy_params(state: Any) -> Any:
        """What :attr:`policy` takes (the online Q-network's params)."""
        return state.params


def make_agent(config: PQNConfig, env: Env) -> PQNAgent:
    if not env.discrete:
        raise ValueError(f"PQN needs discrete actions; {env.spec.name} is continuous")
    c = config
    B, M, T, N = c.batch_size, c.num_minibatches, c.num_steps, c.num_envs
    num_updates = c.num_updates

    def build(key):
        model = make_network(c.network, env.observation_size, env.num_actions, nnx.Rngs(key))
        return nnx.split(model, nnx.Param)

    graphdef, _ = build(jax.random.key(0))
    lr = (optax.linear_schedule(c.lr, 1e-20, num_updates * M * c.num_epochs)
          if c.lr_linear_decay else c.lr)
    optimizer = optax.chain(optax.clip_by_global_norm(c.max_grad_norm),
                            make_optimizer(c.optimizer, lr, kron_config=c.kron))

    def q_fn(params, obs):
        return nnx.merge(graphdef, params)(obs)

    def policy(params, obs):
        return jnp.argmax(q_fn(params, obs), axis=-1)

    def init_params(key):
        return build(key)[1]

    def init(key):
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        env_state = jax.vmap(env.reset)(jax.random.split(k_env, N))
        zero = jnp.zeros((), jnp.int32)
        churn_obs = (jnp.zeros((min(c.churn_samples, B), env.observation_size), jnp.float32)
                     if c.churn_samples else None)
        return PQNState(params=params, opt_state=optimizer.init(params), env_state=env_state,
                        key=k_state, update=zero, env_steps=zero, guard=init_guard(),
                        churn_obs=churn_obs)

    v_step = jax.vmap(env.step)

    def loss_fn(params, mb):
        q = q_fn(params, mb.obs)
        q_a = jnp.take_along_axis(q, mb.action[:, None], axis=-1)[:, 0]
        loss = 0.5 * jnp.mean(jnp.square(q_a - mb.target))
        return loss, {"loss": loss, "q": jnp.mean(q_a)}

    def health_metrics(params, batch_and_key):
        # health_samples transitions of the rollout, drawn without replacement (the SVD of
        # srank dominates the cost; on a 2048-sample MinAtar batch it cost more than an update)
        batch, key = batch_and_key
        idx = jax.random.choice(key, B, (min(c.health_samples, B),), replace=False)
        sub = jax.tree.map(lambda x: x[idx], batch)  # batch: the flattened rollout [B, ...]
        grads = jax.grad(lambda p: loss_fn(p, sub)[0])(params)
        rep = health.health_report(graphdef, params, sub.obs, grads, tau_dormant=c.tau_dormant,
                                   tau_grama=c.tau_grama)
        if c.hessian_samples:
            k_tr, k_eig = jax.random.split(jax.random.fold_in(key, 7))
            td = lambda p: loss_fn(p, sub)[0]
            rep["hessian_trace"] = health.hutchinson_trace(td, params, k_tr, c.hessian_samples)
            rep["hessian_top_eig"] = health.hessian_top_eigenvalue(td, params, k_eig,
                                                                   c.hessian_samples)
        return {f"health/q/{k}": v.astype(jnp.float32) for k, v in rep.items()}

    def churn_metrics(before, after, obs):
        q0, acts0 = nnx.merge(graphdef, before)(obs, return_activations=True)
        q1, acts1 = nnx.merge(graphdef, after)(obs, return_activations=True)
        rep = health.representation_churn(acts0["features"], acts1["features"])
        return {**{f"churn/repr_{k}": v for k, v in rep.items()},
                **{f"churn/{k}": v for k, v in health.q_churn(q0, q1).items()}}

    def update(state: PQNState, do_health: jax.Array):
        params = state.params
        key, k_roll, k_epochs = jax.random.split(state.key, 3)
        eps = linear_epsilon(state.update, c.eps_start, c.eps_finish, c.eps_decay * num_updates)

        def env_step(env_state, k):
            action = epsilon_greedy(k, q_fn(params, env_state.obs), eps)
            nxt = v_step(env_state, action)
            return nxt, ((env_state.obs, action, nxt.reward, nxt.terminated, nxt.done,
                          nxt.final_obs), nxt.stats)

        env_state, ((obs, action, reward, term, done, final_obs), stats) = jax.lax.scan(
            env_step, state.env_state, jax.random.split(k_roll, T))
        next_q_max = jnp.max(q_fn(params, final_obs), axis=-1)
        target = q_lambda_returns(c.reward_scale * reward, next_q_max, term, done, c.gamma,
                                  c.q_lambda)
        batch = jax.tree.map(lambda x: x.reshape((B,) + x.shape[2:]),
                             _Batch(obs=obs, action=action, target=target))

        def minibatch_step(carry, mb):
            params, opt_state, prev = carry
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            if c.grad_diagnostics:
                aux = {**aux, **health.minibatch_gradient_flow(grads, prev)}
                prev = (grads, jnp.ones((), bool))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, prev), aux

        def epoch(carry, k):
            perm = jax.random.permutation(k, B)
            mbs = jax.tree.map(lambda x: x[perm].reshape((M, B // M) + x.shape[1:]), batch)
            return jax.lax.scan(minibatch_step, carry, mbs)

        prev0 = ((jax.tree.map(jnp.zeros_like, params), jnp.zeros((), bool))
                 if c.grad_diagnostics else None)
        (params, opt_state, _), aux = jax.lax.scan(
            epoch, (params, state.opt_state, prev0), jax.random.split(k_epochs, c.num_epochs))
        metrics = health.mean_over_minibatches(aux)
        guard = state.guard
        if c.guard_nonfinite:
            params, opt_state, guard, metrics["skipped"] = _guard_update(
                params, opt_state, state.params, state.opt_state, aux["loss"], guard)
            metrics["nonfinite_streak"] = guard.streak
        metrics.update(episode_metrics(stats))
        env_steps = state.env_steps + B
        metrics["env_steps"] = env_steps
        metrics["epsilon"] = eps
        if c.health_every:
            metrics.update(jax.lax.cond(do_health, health_metrics, _nan_like(health_metrics),
                                        params, (batch, jax.random.fold_in(k_epochs, 1))))
        churn_obs = state.churn_obs
        if c.churn_samples:
            churn_obs = health.churn_reference(churn_obs, batch.obs, state.update == 0,
                                               jax.random.fold_in(k_epochs, 2))
            metrics.update(churn_metrics(state.params, params, churn_obs))
        return PQNState(params=params, opt_state=opt_state, env_state=env_state, key=key,
                        update=state.update + 1, env_steps=env_steps, guard=guard,
                        churn_obs=churn_obs), metrics

    def train_chunk(state: PQNState, num_updates: int | None = None):
        n = int(num_updates or c.chunk_updates)
        idx = jnp.arange(n)
        do_health = ((idx + 1) % c.health_every == 0) if c.health_every else jnp.zeros(n, bool)
        return jax.lax.scan(update, state, do_health)

    def train(key):
        return train_chunk(init(key), num_updates)

    return PQNAgent(config=c, env=env, graphdef=graphdef, optimizer=optimizer, init=init,
                    train_chunk=train_chunk, train=train, policy=policy, init_params=init_params)


def _guard_update(params, opt_state, old_params, old_opt_state, losses, guard: GuardState):
    """Keep the update's new parameters and optimizer state only if every minibatch loss and
    every new parameter is finite; otherwise return the old ones (the whole update is skipped:
    a non-finite gradient anywhere in the epochs leaves non-finite parameters behind, since
    global-norm clipping turns it into NaN updates). Counts skips in ``guard`` like
    :func:`trainkit.guards.guarded_update`, once per update instead of once per minibatch."""
    ok = jnp.logical_and(jnp.all(jnp.isfinite(losses)), all_finite(params))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    bad = jnp.logical_not(ok).astype(jnp.int32)
    guard = GuardState(streak=(guard.streak + 1) * bad, total=guard.total + bad)
    return (keep(params, old_params), keep(opt_state, old_opt_state), guard,
            bad.astype(jnp.float32))


def _nan_like(fn: Callable) -> Callable:
    def nan_fn(*args):
        shapes = jax.eval_shape(fn, *args)
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    return nan_fn


__all__ = ["PQNConfig", "PQNState", "PQNAgent", "make_agent", "linear_epsilon",
           "epsilon_greedy", "q_lambda_returns"]
