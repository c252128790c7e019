"""Soft Actor-Critic (SAC v2), whole training loop under one ``jit``, vmappable over seeds.

Haarnoja, Zhou, Hartikainen, Tucker, Ha, Tan, Kumar, Zhu, Gupta, Abbeel, Levine (2018),
"Soft Actor-Critic Algorithms and Applications", arXiv 1812.05905 ("v2": learned temperature,
no separate V network). Equations below are that paper's.

* Critics: twin soft Q networks ``Q_1, Q_2`` with Polyak-averaged targets ``Qbar_i`` (``tau``),
  trained on ``J_Q = sum_i E[ 1/2 (Q_i(s, a) - y)^2 ]`` (Eq. 5) with the soft TD target
  (Eq. 3 inside Eq. 5, clipped double-Q)::

      y = r + gamma (1 - terminated) ( min_i Qbar_i(s', a') - alpha log pi(a'|s') ),  a' ~ pi(.|s')

  ``s'`` is the *final* observation of the step (``EnvState.final_obs``): on a time-limit
  truncation the target bootstraps from it; on termination it does not.
* Actor: a tanh-squashed Gaussian, ``a = tanh(u)``, ``u ~ N(mu(s), sigma(s)^2)``, trained on
  ``J_pi = E[ alpha log pi(a|s) - min_i Q_i(s, a) ]`` (Eq. 7, reparameterised), with the
  change-of-variables log-density of :func:`tanh_gaussian_log_prob` (Appendix C).
* Temperature: ``J(alpha) = E[ -alpha log pi(a|s) - alpha Hbar ]`` (Eq. 18), ``Hbar = -dim(A)``
  by default, optimised over ``log alpha``.

Loop (per iteration of :meth:`SAC.train_chunk`'s ``lax.scan``): every one of ``num_envs``
environments takes one step (uniform random actions until ``learning_starts`` env steps have
been collected, then actions sampled from the policy), the ``num_envs`` transitions go to the
replay buffer (:mod:`jaxrl_suite.agents.replay`), and once ``learning_starts`` is reached
``utd * num_envs`` gradient updates follow (so ``utd`` is the number of updates per collected
transition, the UTD / replay ratio). Each update samples its own batch, updates the critics,
then the actor (against the updated critics) and the temperature (with the actor's log-probs
before its update), then the target critics. Non-finite losses or gradients skip that
optimizer's step (:func:`trainkit.guards.guarded_update`), counted in the metrics.

Critic hooks for neuron-health work (GraMa / ReDo experiments), all inside the jit:

* ``health_every = F > 0``: on every F-th update, :func:`jaxrl_suite.health.health_report` of
  each critic on that update's batch (inputs ``[s, a]``, gradients of ``J_Q`` before the step),
  averaged over the two critics, is returned as ``critic/<metric>`` (the last report of a
  chunk; NaN when the chunk had none, ``health/reports`` counts them);
* ``reset = redo | regrama``: on every ``reset_every``-th update, after the critic step, each
  online critic is reset with :func:`jaxrl_suite.resets.redo_reset` (tau-dormant scores of its
  activations on the batch) or :func:`~jaxrl_suite.resets.regrama_reset` (GraMa scores of that
  update's gradients), including its Adam moments, under ``lax.cond``. *Decision*: target
  critics are not reset (they follow the online critics through Polyak averaging), as in
  ReDo's SAC experiments.

Usage::

    agent = make_agent(SACConfig.pendulum(), make("gymnax/Pendulum-v1"))
    state = jax.jit(agent.init)(jax.random.key(0))
    chunk = jax.jit(agent.train_chunk)
    for _ in range(10):
        state, metrics = chunk(state)        # chunk_steps iterations, scalar metrics
    jax.jit(jax.vmap(agent.train))(jax.random.split(key, 4))   # 4 seeds in one program
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrl_suite import health, resets
from jaxrl_suite.agents import evaluation, replay
from jaxrl_suite.envs.core import Env, EnvState
from jaxrl_suite.networks import NetworkConfig, make_network
from trainkit.config import Config, field
from trainkit.guards import GuardState, guarded_update, init_guard

RESETS = ("none", "redo", "regrama")
LOG_2 = math.log(2.0)


# --- pure functions -------------------------------------------------------------------------


def log1m_tanh_sq(u: jax.Array) -> jax.Array:
    """``log(1 - tanh(u)^2)`` computed stably: ``2 (log 2 - u - softplus(-2u))``.

    Exact identity (``1 - tanh^2 u = 4 / (e^u + e^-u)^2``); finite for every finite ``u``, where
    the naive form gives ``log 0 = -inf`` once ``tanh(u)`` rounds to 1 (``|u| > ~9`` in float32)."""
    return 2.0 * (LOG_2 - u - jax.nn.softplus(-2.0 * u))


def tanh_gaussian_log_prob(u: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """Log-density of ``a = tanh(u)``, ``u ~ N(mean, exp(log_std)^2)`` (independent dims), at the
    pre-squash value ``u`` (Haarnoja et al. 2018, Appendix C)::

        log pi(a) = sum_i [ log N(u_i; mean_i, sigma_i) - log(1 - tanh(u_i)^2) ]

    Args: ``u``, ``mean``, ``log_std`` of shape ``[..., action_dim]``. Returns ``[...]``."""
    chex.assert_equal_shape([u, mean, log_std])
    z = (u - mean) * jnp.exp(-log_std)
    normal = -0.5 * z ** 2 - log_std - 0.5 * math.log(2.0 * math.pi)
    return jnp.sum(normal - log1m_tanh_sq(u), axis=-1)


def sample_tanh_gaussian(key: jax.Array, mean: jax.Array, log_std: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """Reparameterised ``a = tanh(mean + exp(log_std) * eps)``, ``eps ~ N(0, I)``, and
    ``log pi(a)`` (:func:`tanh_gaussian_log_prob`). Gradients flow to ``mean`` and ``log_std``."""
    chex.assert_equal_shape([mean, log_std])
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
    return jnp.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)


def soft_td_target(reward: jax.Array, terminated: jax.Array, next_q: jax.Array,
                   next_log_prob: jax.Array, alpha: jax.Array | float, gamma: float) -> jax.Array:
    """Clipped double-Q soft TD target (Eq. 3 and 5 with twin critics)::

        y = r + gamma (1 - terminated) ( min_i next_q_i - alpha * next_log_prob )

    ``next_q``: ``[n_critics, B]`` target-critic values at ``(s', a')``; the rest ``[B]``.
    ``s'`` is the final observation of the step, so truncated steps (``terminated = 0``)
    bootstrap. With ``alpha = 0`` this is TD3's target (Fujimoto et al. 2018, Eq. 10)."""
    chex.assert_rank(next_q, 2)
    chex.assert_shape([reward, terminated, next_log_prob], (next_q.shape[1],))
    soft_v = jnp.min(next_q, axis=0) - alpha * next_log_prob
    return reward + gamma * (1.0 - terminated) * soft_v


def polyak(target: Any, online: Any, tau: float) -> Any:
    """``target <- tau * online + (1 - tau) * target`` leaf by leaf."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


# --- config ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SACConfig(Config):
    num_envs: int = field(1, ge=1, help="parallel environments (each iteration steps all)")
    total_steps: int = field(100_000, ge=1, help="env steps over all envs done by train(key)")
    chunk_steps: int = field(1000, ge=1, help="iterations (one step of every env) per "
                                               "train_chunk call")
    learning_starts: int = field(5_000, ge=0, help="env steps (all envs) with uniform random "
                                                   "actions before updates start")
    utd: int = field(1, ge=1, help="gradient updates per collected transition (update-to-data "
                                   "ratio): utd * num_envs updates per iteration")
    batch_size: int = field(256, ge=1)
    buffer_size: int = field(1_000_000, ge=1, help="replay capacity in transitions")
    gamma: float = field(0.99, ge=0, le=1)
    tau: float = field(0.005, gt=0, le=1, help="Polyak rate of the target critics")
    actor_lr: float = field(3e-4, gt=0)
    critic_lr: float = field(3e-4, gt=0)
    alpha_lr: float = field(3e-4, gt=0)
    init_alpha: float = field(1.0, gt=0, help="initial temperature")
    autotune: bool = field(True, help="learn alpha (Eq. 18); False keeps init_alpha")
    target_entropy: float | None = field(None, help="Hbar; none: -action_dim")
    log_std_min: float = field(-20.0, help="clip of the actor's log std (SAC's -20, 2)")
    log_std_max: float = field(2.0)
    actor: NetworkConfig = field(factory=NetworkConfig.sac_mlp, help="actor network")
    critic: NetworkConfig = field(factory=NetworkConfig.sac_mlp,
                                  help="network of each of the twin critics")
    health_every: int = field(0, ge=0, help="critic health report every this many updates "
                                            "(0: never)")
    tau_dormant: float = field(0.1, ge=0, help="tau of the tau-dormant fractions in health")
    tau_grama: float = field(0.1, ge=0, help="tau of the GraMa fractions in health")
    reset: str = field("none", choices=RESETS, help="critic neuron reset: none | redo | regrama")
    reset_every: int = field(1000, ge=1, help="reset period in gradient updates")
    reset_tau: float = field(0.1, ge=0, help="neurons with score <= reset_tau are reset")

    def validate(self) -> None:
        if self.log_std_min >= self.log_std_max:
            raise self.invalid("log_std_min", f"must be < log_std_max = {self.log_std_max}")
        if self.num_envs > self.buffer_size:
            raise self.invalid("buffer_size", f"must hold one step of all {self.num_envs} envs")

    @property
    def iterations(self) -> int:
        """Iterations (vectorised env steps) in ``train(key)``: whole chunks only."""
        return self.num_chunks * self.chunk_steps

    @property
    def num_chunks(self) -> int:
        return max(1, self.total_steps // (self.chunk_steps * self.num_envs))

    def reset_config(self) -> resets.ResetConfig | None:
        if self.reset == "none":
            return None
        return resets.ResetConfig(method=self.reset, tau=self.reset_tau, every=self.reset_every)

    @classmethod
    def smoke(cls) -> "SACConfig":
        """Seconds on a CPU: tiny nets, a short run (what the tests run)."""
        return cls(num_envs=2, total_steps=256, chunk_steps=32, learning_starts=64,
                   batch_size=32, buffer_size=1024, actor=NetworkConfig.tiny(),
                   critic=NetworkConfig.tiny())

    @classmethod
    def pendulum(cls) -> "SACConfig":
        """gymnax Pendulum-v1 (200-step episodes) in ~1e4 env steps: 2x256 nets, lr 1e-3,
        1000 warm-up steps (CleanRL/SB3-zoo-like settings for Pendulum)."""
        return cls(num_envs=1, total_steps=10_000, chunk_steps=1000, learning_starts=1000,
                   actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3, buffer_size=100_000)

    @classmethod
    def mujoco(cls) -> "SACConfig":
        """The paper's MuJoCo settings (Haarnoja et al. 2018, Table 1): 2x256 ReLU nets, Adam
        3e-4, batch 256, 1e6 replay, gamma 0.99, tau 0.005, one update per env step."""
        return cls(num_envs=1, total_steps=1_000_000, chunk_steps=1000, learning_starts=10_000)


# --- networks -------------------------------------------------------------------------------


def network_graphdef(config: NetworkConfig, in_dim: int, out_dim: int) -> nnx.GraphDef:
    """The graph of ``make_network(config, in_dim, out_dim)`` without allocating parameters."""
    abstract = nnx.eval_shape(lambda: make_network(config, in_dim, out_dim, nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)[0]


def init_network_params(config: NetworkConfig, in_dim: int, out_dim: int, key: jax.Array) -> Any:
    """Fresh parameters (pure-dict pytree, the form :mod:`jaxrl_suite.resets` edits)."""
    model = make_network(config, in_dim, out_dim, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


def stacked_init(config: NetworkConfig, in_dim: int, out_dim: int, key: jax.Array,
                 n: int) -> Any:
    """``n`` independently initialised networks with parameters stacked on a leading axis."""
    return jax.vmap(lambda k: init_network_params(config, in_dim, out_dim, k))(
        jax.random.split(key, n))


def per_member(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` applied independently to every member of a stacked ensemble (leading axis), so
    each member has its own optimizer state (its own Adam count), which the resets edit."""
    return optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))


@dataclasses.dataclass(frozen=True)
class TwinCritic:
    """Twin (or ``n``-fold) critics ``Q_i([s, a])`` with stacked parameters ``[n, ...]``."""

    config: NetworkConfig
    obs_dim: int
    action_dim: int
    n: int = 2

    @property
    def graphdef(self) -> nnx.GraphDef:
        return network_graphdef(self.config, self.obs_dim + self.action_dim, 1)

    @property
    def layers(self):
        """The neuron layers of one critic (the same in each)."""
        model = nnx.eval_shape(lambda: make_network(self.config, self.obs_dim + self.action_dim,
                                                    1, nnx.Rngs(0)))
        return model.neuron_layers()

    def init(self, key: jax.Array) -> Any:
        return stacked_init(self.config, self.obs_dim + self.action_dim, 1, key, self.n)

    def __call__(self, params: Any, obs: jax.Array, action: jax.Array) -> jax.Array:
        """``[n, B]`` values of every critic at ``(obs [B, obs_dim], action [B, act_dim])``."""
        x = jnp.concatenate([obs, action], axis=-1)
        graphdef = self.graphdef
        return jax.vmap(lambda p: nnx.merge(graphdef, p)(x)[..., 0])(params)

    def inputs(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        return jnp.concatenate([obs, action], axis=-1)


# --- critic health and resets (shared with TD3) ---------------------------------------------


def critic_health(critic: TwinCritic, params: Any, x: jax.Array, grads: Any, *,
                  tau_dormant: float, tau_grama: float) -> dict[str, jax.Array]:
    """:func:`jaxrl_suite.health.health_report` of every critic on inputs ``x``, averaged over
    the critics, keys prefixed with ``critic/``."""
    graphdef = critic.graphdef
    per = jax.vmap(lambda p, g: health.health_report(graphdef, p, x, g, tau_dormant=tau_dormant,
                                                     tau_grama=tau_grama))(params, grads)
    return {f"critic/{k}": jnp.mean(v.astype(jnp.float32)) for k, v in per.items()}


def strong_types(tree: Any) -> Any:
    """``tree`` with weakly-typed leaves made strong (same dtype). Some back ends' ``reset``
    return weak-typed leaves (gymnax Pendulum's ``last_u``) that ``step`` returns strong; a loop
    state must keep one type, or every ``jit`` of a chunk function compiles twice."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        return jnp.array(x, dtype=x.dtype)
    return jax.tree.map(one, tree)


def nan_like(tree: Any) -> Any:
    """NaNs (floats) with the shapes of ``jax.eval_shape`` output ``tree``."""
    return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, jnp.float32), tree)


def critic_reset(critic: TwinCritic, config: resets.ResetConfig, params: Any, opt_state: Any,
                 x: jax.Array, grads: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
    """Reset every critic's neurons (ReDo from activations on ``x``, ReGraMa from ``grads``),
    with their optimizer moments. Returns ``(params, opt_state, neurons reset in all critics)``.
    ``opt_state`` is the :func:`per_member` state (every leaf has the leading critic axis)."""
    graphdef, layers = critic.graphdef, critic.layers
    fn = resets.reset_fn(config)

    def one(p, s, g, k):
        if config.method == "redo":
            _, acts = nnx.merge(graphdef, p)(x, return_activations=True)
            scores = health.redo_scores(acts, layers)
        else:
            scores = health.grama_layer_scores(g, layers)
        p, s, info = fn(p, s, scores, k, layers=layers)
        return p, s, info.total

    keys = jax.random.split(key, critic.n)
    params, opt_state, totals = jax.vmap(one)(params, opt_state, grads, keys)
    return params, opt_state, jnp.sum(totals)


# --- the agent ------------------------------------------------------------------------------


@struct.dataclass
class SACState:
    actor: Any  # actor params (pure dict)
    critic: Any  # twin critic params, stacked [2, ...]
    target_critic: Any
    log_alpha: jax.Array
    actor_opt: Any
    critic_opt: Any  # per-critic Adam states (leading axis 2)
    alpha_opt: Any
    guards: dict[str, GuardState]  # non-finite skip counters per optimizer
    buffer: replay.ReplayBuffer
    env: EnvState  # num_envs environments (leading axis)
    key: jax.Array
    env_steps: jax.Array  # int32, transitions collected (all envs)
    updates: jax.Array  # int32, gradient updates done
    early_stop: Any = None  # the early-stop hook's state (LEAST memories); None without one


def stop_episodes(env: Env, next_state: EnvState, prev_stats: Any, stop: jax.Array,
                  key: jax.Array) -> EnvState:
    """End the running episodes of the vectorised environments where ``stop`` as *truncations*:
    ``truncated = 1`` (``terminated`` stays 0, so the stored transition bootstraps from
    ``final_obs``, the step's own next observation), the episode statistics close the episode,
    and those environments restart from ``env.reset`` with keys from ``key``. ``stop`` must be
    0 where the environment already ended the episode (``next_state.done``)."""
    n = stop.shape[0]
    fresh = strong_types(jax.vmap(env.reset)(jax.random.split(key, n)))
    stop_b = stop.astype(bool)

    def pick(a, b):
        return jnp.where(stop_b.reshape(stop_b.shape + (1,) * (a.ndim - 1)), a, b)

    stop_f = stop_b.astype(jnp.float32)
    return next_state.replace(
        obs=pick(fresh.obs, next_state.obs),
        truncated=jnp.maximum(next_state.truncated, stop_f),
        stats=jax.tree.map(pick, prev_stats.update(next_state.reward, stop_f), next_state.stats),
        inner=jax.tree.map(pick, fresh.inner, next_state.inner),
        time=jnp.where(stop_b, 0, next_state.time))


@dataclasses.dataclass(frozen=True)
class OffPolicyAgent:
    """The loop shared by SAC and TD3: collection into the replay buffer, ``utd * num_envs``
    updates per iteration after ``learning_starts``, chunk metrics, critic health and resets.
    Subclasses define ``init``, ``update``, ``explore`` (the behaviour policy), ``policy`` (the
    deterministic one), ``stop_signals`` and ``UPDATE_METRICS`` (the scalar metrics ``update``
    returns).

    ``early_stop`` (optional, e.g. :class:`jaxrl_suite.least.Least`): a hook with ``init()``
    (its state, kept in the agent state as ``early_stop``), ``step(hook_state, q, td_loss,
    step_index, done, entropy_per_dim, env_steps) -> (hook_state, stop [num_envs])`` called at
    every environment step, and ``metrics(hook_state)``. Stopped episodes become truncations
    (:func:`stop_episodes`). Without a hook (``None``) the loop is the plain agent's, bit for
    bit: the hook's randomness comes from ``fold_in`` of a key the loop draws anyway."""

    config: Any
    env: Env
    early_stop: Any = None

    UPDATE_METRICS = ()  # class constant, not a field

    def __post_init__(self):
        if self.env.discrete:
            raise ValueError(f"{type(self).__name__} needs continuous actions; "
                             f"{self.env.spec.name} is discrete")

    # shapes
    @property
    def obs_dim(self) -> int:
        return self.env.observation_size

    @property
    def action_dim(self) -> int:
        return self.env.action_size

    @property
    def critic(self) -> TwinCritic:
        return TwinCritic(self.config.critic, self.obs_dim, self.action_dim)

    @staticmethod
    def _transition(env_state: EnvState, action: jax.Array, next_state: EnvState) -> dict:
        """What is stored: ``s, a, r, s'`` (final obs: bootstrap on truncation), terminated."""
        return {"obs": env_state.obs, "action": action.astype(jnp.float32),
                "reward": next_state.reward, "next_obs": next_state.final_obs,
                "terminated": next_state.terminated}

    # the loop
    def collect(self, state: Any) -> tuple[Any, Any]:
        """One step of every environment (uniform random actions before ``learning_starts``
        env steps, :meth:`explore` after), its transitions added to the replay buffer. Returns
        the state and the environments' :class:`~jaxrl_suite.envs.EpisodeStats`."""
        c = self.config
        key, k_rand, k_pol = jax.random.split(state.key, 3)
        obs = state.env.obs
        random_a = jax.random.uniform(k_rand, (c.num_envs, self.action_dim), jnp.float32, -1, 1)
        policy_a = self.explore(state.actor, obs, k_pol)
        action = jnp.where(state.env_steps < c.learning_starts, random_a, policy_a)
        next_env = jax.vmap(self.env.step)(state.env, action)
        if self.early_stop is not None:
            state, next_env = self._early_stop(state, action, next_env, k_pol)
        buffer = replay.add_batch(state.buffer, self._transition(state.env, action, next_env))
        state = state.replace(env=next_env, buffer=buffer, key=key,
                              env_steps=state.env_steps + c.num_envs)
        return state, next_env.stats

    def _early_stop(self, state: Any, action: jax.Array, next_env: EnvState, key: jax.Array):
        """Feed the hook this step's ``Q(s, a)``, TD loss and policy entropy; stop (truncate and
        reset) the episodes it says to."""
        k_signals, k_reset = jax.random.split(jax.random.fold_in(key, 1))
        q, td, entropy = self.stop_signals(state, action, next_env, k_signals)
        hook, stop = self.early_stop.step(state.early_stop, q, td, state.env.time,
                                          next_env.done > 0, entropy, state.env_steps)
        next_env = stop_episodes(self.env, next_env, state.env.stats, stop, k_reset)
        return state.replace(early_stop=hook), next_env

    def _maybe_reset(self, critic, critic_opt, x, grads, updates, key):
        rc = self.config.reset_config()
        if rc is None:
            return critic, critic_opt, jnp.zeros((), jnp.int32)
        return reset_hook(self.critic, rc, critic, critic_opt, x, grads, updates, key)

    def _maybe_health(self, critic_params, x, grads, updates):
        c = self.config
        if c.health_every == 0:
            return {}
        return health_hook(self.critic, c, critic_params, x, grads, updates)

    def _iteration(self, carry, _):
        state, last_health, n_health = carry
        c = self.config
        key, k_upd = jax.random.split(state.key)
        state, stats = self.collect(state.replace(key=key))
        n_updates = c.utd * c.num_envs

        def do_updates(state):
            def body(inner, k):
                st, lh, nh = inner
                st, m, h = self.update(st, k)
                if h:
                    done = h.pop("_done")
                    lh = jax.tree.map(lambda new, old: jnp.where(done, new, old), h, lh)
                    nh = nh + done.astype(jnp.int32)
                return (st, lh, nh), m

            (st, lh, nh), m = jax.lax.scan(body, (state, last_health, n_health),
                                           jax.random.split(k_upd, n_updates))
            return st, lh, nh, jax.tree.map(jnp.sum, m), jnp.float32(n_updates)

        def no_updates(state):
            zeros = {k: jnp.zeros((), jnp.float32) for k in self.UPDATE_METRICS}
            return state, last_health, n_health, zeros, jnp.float32(0)

        ready = state.env_steps >= c.learning_starts
        state, last_health, n_health, sums, count = jax.lax.cond(ready, do_updates, no_updates,
                                                                 state)
        return (state, last_health, n_health), (sums, count, stats)

    def _health_template(self, state: Any) -> dict:
        c = self.config
        if c.health_every == 0:
            return {}
        x = jax.ShapeDtypeStruct((c.batch_size, self.obs_dim + self.action_dim), jnp.float32)
        shapes = jax.eval_shape(
            lambda p, x: critic_health(self.critic, p, x, p, tau_dormant=c.tau_dormant,
                                       tau_grama=c.tau_grama), state.critic, x)
        return nan_like(shapes)

    def train_chunk(self, state: Any, num_steps: int | None = None
                    ) -> tuple[Any, dict[str, jax.Array]]:
        """``num_steps`` iterations (static; default ``config.chunk_steps``) under ``lax.scan``
        (``jax.jit(agent.train_chunk, static_argnums=1)`` for the ``chunk(state, n)`` form of
        :func:`trainkit.loop.fit`, whose logger wants metrics stacked per step: add a leading
        axis). Returns the state and scalar metrics:
        means over the chunk's updates (``critic_loss``, ``actor_loss``, ``alpha``, ``entropy``,
        ``q_mean``, ... NaN if none happened), ``reset_neurons`` (sum), the finished training
        episodes' ``episode_return``/``episode_length``/``episodes``
        (:func:`jaxrl_suite.agents.evaluation.episode_metrics`), counters, and the last critic
        health report (``critic/...``, with ``health/reports``)."""
        carry = (state, self._health_template(state), jnp.zeros((), jnp.int32))
        (state, last_health, n_health), (sums, counts, stats) = jax.lax.scan(
            self._iteration, carry, None, length=int(num_steps or self.config.chunk_steps))
        total = jnp.sum(counts)
        metrics = {k: jnp.where(total > 0, jnp.sum(v) / jnp.maximum(total, 1.0), jnp.nan)
                   for k, v in sums.items() if k not in ("reset_neurons", "skipped")}
        metrics["reset_neurons"] = jnp.sum(sums["reset_neurons"])
        metrics["skipped_critic_updates"] = jnp.sum(sums["skipped"])
        metrics["updates_in_chunk"] = total
        metrics.update(evaluation.episode_metrics(stats))
        metrics["env_steps"] = state.env_steps
        metrics["updates"] = state.updates
        if self.config.health_every:
            metrics.update(last_health)
            metrics["health/reports"] = n_health
        if self.early_stop is not None:
            metrics.update(self.early_stop.metrics(state.early_stop))
        return state, metrics

    def train(self, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        """``init`` then ``num_chunks`` chunks in one program; metrics stacked per chunk."""
        state = self.init(key)
        return jax.lax.scan(lambda s, _: self.train_chunk(s), state, None,
                            length=self.config.num_chunks)

    def evaluate(self, state: Any, key: jax.Array, num_envs: int = 16) -> dict:
        """Episodes of the deterministic :meth:`policy`
        (:func:`jaxrl_suite.agents.evaluation.evaluate`)."""
        return evaluation.evaluate(self.env, self.policy, state.actor, key, num_envs=num_envs)


@dataclasses.dataclass(frozen=True)
class SAC(OffPolicyAgent):
    """Pure functions of one SAC configuration on one environment (build with
    :func:`make_agent`). ``init``, ``train_chunk``, ``train`` and ``policy`` are jittable and
    vmappable (over keys / states of several seeds)."""

    config: SACConfig
    env: Env

    UPDATE_METRICS = ("critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "q_mean",
                      "target_mean", "reset_neurons", "skipped")

    @property
    def actor_graphdef(self) -> nnx.GraphDef:
        return network_graphdef(self.config.actor, self.obs_dim, 2 * self.action_dim)

    @property
    def target_entropy(self) -> float:
        c = self.config.target_entropy
        return -float(self.action_dim) if c is None else float(c)

    def _txs(self):
        c = self.config
        return (optax.adam(c.actor_lr), per_member(optax.adam(c.critic_lr)), optax.adam(c.alpha_lr))

    # policy
    def actor_dist(self, actor_params: Any, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mean, log_std)`` of the pre-squash Gaussian, log std clipped."""
        out = nnx.merge(self.actor_graphdef, actor_params)(obs)
        mean, log_std = jnp.split(out, 2, axis=-1)
        return mean, jnp.clip(log_std, self.config.log_std_min, self.config.log_std_max)

    def policy(self, actor_params: Any, obs: jax.Array) -> jax.Array:
        """Deterministic action ``tanh(mean)`` (for evaluation)."""
        return jnp.tanh(self.actor_dist(actor_params, obs)[0])

    def sample_action(self, actor_params: Any, obs: jax.Array, key: jax.Array):
        return sample_tanh_gaussian(key, *self.actor_dist(actor_params, obs))

    def explore(self, actor_params: Any, obs: jax.Array, key: jax.Array) -> jax.Array:
        """The behaviour policy after warm-up: a sample of the squashed Gaussian."""
        return self.sample_action(actor_params, obs, key)[0]

    def stop_signals(self, state: SACState, action: jax.Array, next_env: EnvState,
                     key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """What an early-stop hook sees at a step: ``q = min_i Q_i(s, a)`` (online critics),
        the TD loss ``mean_i (Q_i(s, a) - y)^2`` against this step's soft target ``y`` (Eq. 3/5,
        target critics, ``a' ~ pi(.|s')``), ``[num_envs]`` each, and the policy entropy per
        action dimension ``-E log pi(a|s) / dim(A)`` (one sample per env, averaged)."""
        c = self.config
        k_next, k_ent = jax.random.split(key)
        obs, next_obs = state.env.obs, next_env.final_obs
        q = self.critic(state.critic, obs, action)
        next_a, next_logp = self.sample_action(state.actor, next_obs, k_next)
        next_q = self.critic(state.target_critic, next_obs, next_a)
        alpha = jnp.exp(state.log_alpha) if c.autotune else c.init_alpha
        y = soft_td_target(next_env.reward, next_env.terminated, next_q, next_logp, alpha,
                           c.gamma)
        _, logp = self.sample_action(state.actor, obs, k_ent)
        return (jnp.min(q, axis=0), jnp.mean((q - y[None]) ** 2, axis=0),
                -jnp.mean(logp) / self.action_dim)

    # init
    def init(self, key: jax.Array) -> SACState:
        c = self.config
        k_actor, k_critic, k_env, key = jax.random.split(key, 4)
        actor = init_network_params(c.actor, self.obs_dim, 2 * self.action_dim, k_actor)
        critic = self.critic.init(k_critic)
        log_alpha = jnp.asarray(math.log(c.init_alpha), jnp.float32)
        tx_actor, tx_critic, tx_alpha = self._txs()
        env_state = strong_types(jax.vmap(self.env.reset)(jax.random.split(k_env, c.num_envs)))
        example = self._transition(env_state, jnp.zeros((c.num_envs, self.action_dim)), env_state)
        buffer = replay.init(jax.tree.map(lambda x: x[0], example), c.buffer_size)
        zero = jnp.zeros((), jnp.int32)
        return SACState(actor=actor, critic=critic, target_critic=critic, log_alpha=log_alpha,
                        actor_opt=tx_actor.init(actor), critic_opt=tx_critic.init(critic),
                        alpha_opt=tx_alpha.init(log_alpha),
                        guards={"actor": init_guard(), "critic": init_guard(),
                                "alpha": init_guard()},
                        buffer=buffer, env=env_state, key=key, env_steps=zero, updates=zero,
                        early_stop=None if self.early_stop is None else self.early_stop.init())

    # one gradient update
    def critic_loss(self, critic_params, target_params, actor_params, log_alpha, batch, key):
        """``J_Q`` (Eq. 5) and aux ``(q, y)``; see the module docstring."""
        c = self.config
        next_a, next_logp = self.sample_action(actor_params, batch["next_obs"], key)
        next_q = self.critic(target_params, batch["next_obs"], next_a)
        alpha = jnp.exp(log_alpha) if c.autotune else c.init_alpha
        y = jax.lax.stop_gradient(soft_td_target(batch["reward"], batch["terminated"], next_q,
                                                 next_logp, alpha, c.gamma))
        q = self.critic(critic_params, batch["obs"], batch["action"])
        loss = 0.5 * jnp.sum(jnp.mean((q - y[None]) ** 2, axis=1))
        return loss, (q, y)

    def actor_loss(self, actor_params, critic_params, log_alpha, obs, key):
        """``J_pi`` (Eq. 7) and aux ``log pi`` of the sampled actions."""
        a, logp = self.sample_action(actor_params, obs, key)
        q = jnp.min(self.critic(critic_params, obs, a), axis=0)
        alpha = jax.lax.stop_gradient(jnp.exp(log_alpha)) if self.config.autotune \
            else self.config.init_alpha
        return jnp.mean(alpha * logp - q), logp

    def alpha_loss(self, log_alpha, logp):
        """``J(alpha) = -alpha (E log pi + Hbar)`` (Eq. 18) with ``alpha = exp(log_alpha)``."""
        return -jnp.exp(log_alpha) * (jnp.mean(jax.lax.stop_gradient(logp)) + self.target_entropy)

    def update(self, state: SACState, key: jax.Array) -> tuple[SACState, dict, dict]:
        """One gradient update on a fresh batch; returns ``(state, metrics, health or {})``."""
        c = self.config
        tx_actor, tx_critic, tx_alpha = self._txs()
        k_batch, k_critic, k_actor, k_reset = jax.random.split(key, 4)
        batch = replay.sample(state.buffer, k_batch, c.batch_size)
        updates = state.updates + 1

        (q_loss, (q, y)), q_grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
            state.critic, state.target_critic, state.actor, state.log_alpha, batch, k_critic)
        critic, critic_opt, g_critic, m_critic = guarded_update(
            tx_critic, q_grads, state.critic_opt, state.critic, q_loss, state.guards["critic"])

        (pi_loss, logp), pi_grads = jax.value_and_grad(self.actor_loss, has_aux=True)(
            state.actor, critic, state.log_alpha, batch["obs"], k_actor)
        actor, actor_opt, g_actor, _ = guarded_update(
            tx_actor, pi_grads, state.actor_opt, state.actor, pi_loss, state.guards["actor"])

        a_loss, a_grad = jax.value_and_grad(self.alpha_loss)(state.log_alpha, logp)
        if c.autotune:
            log_alpha, alpha_opt, g_alpha, _ = guarded_update(
                tx_alpha, a_grad, state.alpha_opt, state.log_alpha, a_loss, state.guards["alpha"])
        else:
            log_alpha, alpha_opt, g_alpha = state.log_alpha, state.alpha_opt, state.guards["alpha"]

        x = self.critic.inputs(batch["obs"], batch["action"])
        critic, critic_opt, n_reset = self._maybe_reset(critic, critic_opt, x, q_grads, updates,
                                                        k_reset)
        health_out = self._maybe_health(state.critic, x, q_grads, updates)
        target = polyak(state.target_critic, critic, c.tau)

        metrics = {"critic_loss": q_loss, "actor_loss": pi_loss, "alpha_loss": a_loss,
                   "alpha": jnp.exp(log_alpha), "entropy": -jnp.mean(logp),
                   "q_mean": jnp.mean(q), "target_mean": jnp.mean(y),
                   "reset_neurons": n_reset.astype(jnp.float32),
                   "skipped": m_critic["skipped"].astype(jnp.float32)}
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        state = state.replace(actor=actor, critic=critic, target_critic=target,
                              log_alpha=log_alpha, actor_opt=actor_opt, critic_opt=critic_opt,
                              alpha_opt=alpha_opt,
                              guards={"actor": g_actor, "critic": g_critic, "alpha": g_alpha},
                              updates=updates)
        return state, metrics, health_out


def reset_hook(critic: TwinCritic, rc: resets.ResetConfig, params, opt_state, x, grads,
               updates, key):
    """``lax.cond`` on ``updates % rc.every == 0``: :func:`critic_reset` or the identity."""
    def do(p, s):
        return critic_reset(critic, rc, p, s, x, grads, key)

    def skip(p, s):
        return p, s, jnp.zeros((), jnp.int32)

    return jax.lax.cond(updates % rc.every == 0, do, skip, params, opt_state)


def health_hook(critic: TwinCritic, c, params, x, grads, updates) -> dict:
    """``lax.cond`` on ``updates % c.health_every == 0``: :func:`critic_health` (with a
    ``_done`` flag) or NaNs."""
    def do(p, g):
        return critic_health(critic, p, x, g, tau_dormant=c.tau_dormant, tau_grama=c.tau_grama)

    def skip(p, g):
        return nan_like(jax.eval_shape(do, p, g))

    done = updates % c.health_every == 0
    out = jax.lax.cond(done, do, skip, params, grads)
    out["_done"] = done
    return out


def make_agent(config: SACConfig, env: Env, early_stop: Any = None) -> SAC:
    """The SAC agent of ``config`` on ``env`` (continuous actions in ``[-1, 1]``), with an
    optional early-stop hook (:class:`jaxrl_suite.least.Least`)."""
    return SAC(config, env, early_stop)


__all__ = ["SACConfig", "SACState", "SAC", "OffPolicyAgent", "make_agent", "tanh_gaussian_log_prob",
           "sample_tanh_gaussian", "soft_td_target", "log1m_tanh_sq", "polyak", "TwinCritic",
           "critic_health", "critic_reset", "per_member", "reset_hook", "health_hook",
           "strong_types", "stop_episodes"]
