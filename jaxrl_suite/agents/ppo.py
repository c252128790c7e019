"""PPO (Schulman et al. 2017, arXiv 1707.06347), discrete and continuous actions, PureJaxRL-style.

The whole loop is pure JAX: rollouts of ``num_envs`` vectorised environments for ``num_steps``
steps, GAE, ``update_epochs`` epochs of ``num_minibatches`` shuffled minibatches, all under
``lax.scan``. Three entry points, all pure (jit them; vmap them over seeds)::

    agent = make_agent(PPOConfig.cartpole(), make("gymnax/CartPole-v1"))
    state = agent.init(key)                                   # PPOState (a pytree)
    chunk = jax.jit(agent.train_chunk, static_argnums=1)
    state, metrics = chunk(state, 10)                         # 10 updates; metrics [10, ...]
    state, metrics = jax.jit(agent.train)(key)                # PureJaxRL: everything, one jit
    states, metrics = jax.jit(jax.vmap(agent.train))(jax.random.split(key, 8))   # 8 seeds

``train_chunk(state, n)`` has the ``chunk(state, num_steps)`` signature of
:func:`trainkit.loop.fit` (one "step" = one PPO update = ``num_envs * num_steps`` env steps), so
trainkit logs, checkpoints and resumes between chunks; chunked and one-shot training run the
same update on the same state and give the same parameters.

Decisions (as in PureJaxRL ``ppo.py`` / ``ppo_continuous_action.py`` and CleanRL):

* separate actor and critic networks (:mod:`jaxrl_suite.networks`, default 2 x 64 tanh MLPs);
  with ``ppo_init`` kernels are orthogonal with gain ``sqrt(2)`` in hidden layers, ``0.01`` in
  the policy head and ``1`` in the value head, biases 0 (done by scaling the orthogonal draws of
  ``kernel_init="orthogonal"``; ReDo/ReGraMa resets re-draw with gain 1);
* continuous actions: diagonal Gaussian with a state-independent ``log_std`` parameter
  (initialised to ``init_log_std``), **no tanh squashing**: the sampled action is stored and
  scored unclipped, and clipped to ``[-1, 1]`` only when sent to the environment;
* truncation: GAE bootstraps from ``V(final_obs)`` on a time-limit truncation and from 0 on a
  termination (see :func:`gae`); PureJaxRL treats both as terminal;
* advantages normalised per minibatch (``norm_adv``), value clipping optional (``clip_value``),
  Adam with ``eps=1e-5`` after global-norm clipping, learning rate linearly annealed to 0 over
  the run per update (``anneal_lr``);
* ``normalize_obs``: observations go through :func:`jaxrl_suite.envs.normalization.normalize`
  with the running moments in ``PPOState.obs_norm``; within an update the moments are frozen
  (acting, stored observations, bootstrap values and learning all see one normalisation, so the
  stored log-probabilities stay consistent) and the rollout's observations are merged into them
  after it (the initial reset observations seed them). The evaluation policy takes
  ``agent.policy_params(state)`` (network params and the moments);
* with ``guard_nonfinite``, an update whose minibatch losses or resulting parameters are not all
  finite is discarded (parameters and optimizer state stay as before it; ``skipped`` and
  ``nonfinite_streak`` in the metrics, which :func:`trainkit.loop.fit` checks). *Decision*: one
  check per update rather than per minibatch (:func:`trainkit.guards.guarded_update`): the
  per-minibatch selects cost ~7% of PPO's CartPole throughput on CPU (benchmarks/jaxrl_ppo.py);
* neuron health (:func:`jaxrl_suite.health.health_report`) of actor and critic every
  ``health_every`` updates, on ``health_samples`` transitions of the rollout drawn without
  replacement (with a key folded from, not split off, the update's key, so training is the same
  with and without health), with the gradient of the PPO loss on them at the updated
  parameters; other rows hold NaN (not measured).
  Measured at in-chunk update indices ``i`` with ``(i + 1) % health_every == 0``: with chunk
  starts at multiples of ``health_every`` (trainkit aligns chunks to multiples of its
  ``chunk_size``), these are the global updates whose count is a multiple of ``health_every``;
* stable-gradients options (Castanyer et al. 2025, issue 18): ``optimizer`` (Adam, RAdam or
  PSGD Kron from :mod:`jaxrl_suite.optim`), ``grad_diagnostics`` (per-layer gradient norms
  and consecutive-minibatch gradient cosines, in-jit, every update) and ``hessian_samples``
  (PPO-loss Hessian trace and top eigenvalue in the health report); ``churn_samples``: how much
  each update changed the networks' outputs on a fixed reference batch of that many
  observations (drawn without replacement from the first update's rollout, as the actor saw
  them, and kept in :class:`PPOState`): the actor's penultimate features
  (``churn/repr_*``, :func:`jaxrl_suite.health.representation_churn`), the policy
  (``churn/policy_kl``, ``churn/policy_tv``: :func:`jaxrl_suite.health.policy_churn`;
  Gaussian KL for continuous actions) and the value (``churn/value``, mean ``|V_1 - V_0|``),
  between the parameters before the update and after it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrl_suite import health
from jaxrl_suite.agents.evaluation import episode_metrics
from jaxrl_suite.envs import normalization
from jaxrl_suite.envs.core import Env, EnvState
from jaxrl_suite.networks import NetworkConfig, make_network, map_leaves_at
from jaxrl_suite.optim import KronConfig, make_optimizer
from trainkit.config import Config, field
from trainkit.guards import GuardState, all_finite, init_guard

LOG_2PI = math.log(2.0 * math.pi)


def _ppo_net() -> NetworkConfig:
    return NetworkConfig(kind="mlp", depth=2, width=64, activation="tanh", kernel_init="orthogonal")


@dataclasses.dataclass(frozen=True)
class PPOConfig(Config):
    num_envs: int = field(4, ge=1, help="parallel environments")
    num_steps: int = field(128, ge=1, help="rollout length per environment and update")
    total_timesteps: int = field(500_000, ge=1, help="environment steps of the whole run")
    update_epochs: int = field(4, ge=1, help="passes over each rollout")
    num_minibatches: int = field(4, ge=1, help="minibatches per epoch")
    lr: float = field(2.5e-4, gt=0, help="Adam learning rate (peak, when annealed)")
    anneal_lr: bool = field(True, help="anneal the learning rate linearly to 0 over the run")
    adam_eps: float = field(1e-5, gt=0)
    max_grad_norm: float = field(0.5, gt=0, help="global gradient-norm clip")
    gamma: float = field(0.99, ge=0, le=1, help="discount")
    gae_lambda: float = field(0.95, ge=0, le=1)
    clip_eps: float = field(0.2, gt=0, help="surrogate (and value) clip range")
    clip_value: bool = field(True, help="clip the value update around the rollout values")
    ent_coef: float = field(0.01, ge=0)
    vf_coef: float = field(0.5, ge=0)
    norm_adv: bool = field(True, help="normalise advantages per minibatch")
    network: NetworkConfig = field(factory=_ppo_net, help="actor and critic architecture")
    optimizer: str = field("adam", choices=("adam", "radam", "kron"),
                           help="adam (eps adam_eps) | radam | kron (PSGD Kron, "
                                "jaxrl_suite.optim)")
    kron: KronConfig = field(factory=KronConfig, help="Kron settings (optimizer=kron)")
    grad_diagnostics: bool = field(False, help="log per-layer gradient norms grad/norm/<layer> "
                                               "and the cosine of consecutive minibatch "
                                               "gradients grad/cos/<layer> (update means)")
    hessian_samples: int = field(0, ge=0, help="with health_every: Hutchinson probes and power "
                                               "iterations for the PPO-loss Hessian trace and "
                                               "top eigenvalue (0 = off)")
    ppo_init: bool = field(True, help="orthogonal gains sqrt(2) / 0.01 (policy) / 1 (value); "
                                      "needs network.kernel_init='orthogonal'")
    init_log_std: float = field(0.0, help="initial log standard deviation (continuous actions)")
    normalize_obs: bool = field(False, help="normalise observations with running moments")
    churn_samples: int = field(0, ge=0, help="representation, policy and value churn of every "
                                             "update on a fixed batch of this many "
                                             "observations (0 = off)")
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
        if self.ppo_init and self.network.kernel_init != "orthogonal":
            raise self.invalid("ppo_init", "needs network.kernel_init='orthogonal' (or set "
                                           "ppo_init=false)")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @classmethod
    def cartpole(cls, **kw) -> "PPOConfig":
        """PureJaxRL's ``ppo.py`` CartPole-v1 settings (reaches ~500 within 5e5 steps)."""
        return cls(**kw)

    @classmethod
    def minatar(cls, **kw) -> "PPOConfig":
        """PureJaxRL's MinAtar settings (``ppo_minatar``-style; 1e7 steps)."""
        base = dict(num_envs=64, num_steps=128, total_timesteps=10_000_000, update_epochs=4,
                    num_minibatches=8, lr=5e-3, network=NetworkConfig(
                        kind="mlp", depth=2, width=64, activation="relu", kernel_init="orthogonal"))
        return cls(**{**base, **kw})

    @classmethod
    def brax(cls, **kw) -> "PPOConfig":
        """PureJaxRL's ``ppo_continuous_action.py`` brax settings (5e7 steps, 2 x 256 tanh)."""
        base = dict(num_envs=2048, num_steps=10, total_timesteps=50_000_000, update_epochs=4,
                    num_minibatches=32, lr=3e-4, anneal_lr=False, ent_coef=0.0,
                    normalize_obs=True,
                    network=NetworkConfig(kind="mlp", depth=2, width=256, activation="tanh",
                                          kernel_init="orthogonal"))
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw) -> "PPOConfig":
        """Seconds on a CPU: for tests."""
        base = dict(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 4, update_epochs=2,
                    num_minibatches=2, chunk_updates=2,
                    network=NetworkConfig(kind="mlp", depth=2, width=16, activation="tanh",
                                          kernel_init="orthogonal"))
        return cls(**{**base, **kw})


# --- pure pieces ----------------------------------------------------------------------------


def gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminated: jax.Array,
        done: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16) with
    terminations and truncations told apart.

    All inputs are ``[T, ...]`` (time-major). ``next_values[t] = V(s'_t)`` is the value of the
    *true* next observation of transition ``t`` (an environment's ``final_obs``: the last
    observation of an episode that ended at ``t``, else the next observation)::

        delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},        A_T = 0
        R_t     = A_t + V(s_t)                                            (value targets)

    so a truncated step (``done=1``, ``terminated=0``) bootstraps from ``V(final_obs)`` and cuts
    the trace, a terminated one bootstraps from 0, and the rollout's last step bootstraps from
    ``V(s'_{T-1})``. Returns ``(advantages, returns)``."""
    chex.assert_equal_shape([rewards, values, next_values, terminated, done])
    chex.assert_rank(rewards, {1, 2})

    def body(a_next, x):
        r, v, nv, term, d = x
        delta = r + gamma * (1.0 - term) * nv - v
        a = delta + gamma * lam * (1.0 - d) * a_next
        return a, a

    _, adv = jax.lax.scan(body, jnp.zeros_like(values[0]),
                          (rewards, values, next_values, terminated, done), reverse=True)
    return adv, adv + values


def clipped_surrogate_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                           clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clip policy loss (Schulman et al. 2017, eq. 7), to be minimised::

        rho_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
        L     = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)

    Also returns ``approx_kl = mean((rho - 1) - log rho)`` (the k3 estimator of
    KL(pi_old || pi)) and ``clip_frac = mean(|rho - 1| > eps)``."""
    chex.assert_equal_shape([log_prob, old_log_prob, advantages])
    log_ratio = log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    loss = -jnp.mean(jnp.minimum(ratio * advantages,
                                 jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages))
    return loss, {"approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
                  "clip_frac": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32))}


def value_loss(value: jax.Array, old_value: jax.Array, returns: jax.Array, clip_eps: float,
               clip: bool = True) -> jax.Array:
    """``0.5 * mean((V - R)^2)``; with ``clip`` the PPO2/PureJaxRL clipped form
    ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))``."""
    chex.assert_equal_shape([value, old_value, returns])
    err = jnp.square(value - returns)
    if clip:
        v_clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
        err = jnp.maximum(err, jnp.square(v_clipped - returns))
    return 0.5 * jnp.mean(err)


def categorical_log_prob(logits: jax.Array, action: jax.Array) -> jax.Array:
    """``log softmax(logits)[action]`` over the last axis; ``action`` int, shape ``logits[:-1]``."""
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, action[..., None].astype(jnp.int32), axis=-1)[..., 0]


def categorical_entropy(logits: jax.Array) -> jax.Array:
    """``-sum_a p_a log p_a`` over the last axis."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """Diagonal Gaussian: ``sum_i -0.5 ((a_i - mu_i) / sigma_i)^2 - log sigma_i - 0.5 log 2 pi``."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * jnp.square(z) - log_std - 0.5 * LOG_2PI, axis=-1)


def gaussian_entropy(log_std: jax.Array, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """``sum_i 0.5 + 0.5 log 2 pi + log sigma_i``, broadcast to ``batch_shape``."""
    return jnp.broadcast_to(jnp.sum(0.5 + 0.5 * LOG_2PI + log_std, axis=-1), batch_shape)


# --- the agent ------------------------------------------------------------------------------


@struct.dataclass
class PPOState:
    params: Any  # {"actor": ..., "critic": ..., ["log_std": [action_size]]}
    opt_state: Any
    env_state: EnvState  # leaves [num_envs, ...]
    key: jax.Array
    update: jax.Array  # int32: updates done
    env_steps: jax.Array  # int32: environment steps done (all envs)
    guard: GuardState
    obs_norm: Any  # normalization.RunningMeanStd, or None without normalize_obs
    churn_obs: Any = None  # [churn_samples, obs] reference batch (churn_samples > 0), else None


@struct.dataclass
class Transition:
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    done: jax.Array
    final_obs: jax.Array


@dataclasses.dataclass(frozen=True)
class PPOAgent:
    """Pure functions of one PPO configuration on one environment (see the module docstring)."""
    config: PPOConfig
    env: Env
    actor_graphdef: nnx.GraphDef
    critic_graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    init: Callable[[jax.Array], PPOState]
    train_chunk: Callable[..., tuple[PPOState, dict]]
    train: Callable[[jax.Array], tuple[PPOState, dict]]
    policy: Callable[[Any, jax.Array], jax.Array]  # deterministic: argmax / clipped mean
    init_params: Callable[[jax.Array], Any]

    @staticmethod
    def policy_params(state: PPOState) -> Any:
        """What :attr:`policy` takes: ``{"net": params, "obs_norm": moments or None}``."""
        return {"net": state.params, "obs_norm": state.obs_norm}

    @property
    def num_updates(self) -> int:
        return self.config.num_updates


def _scale_init(params: Any, model: Any, head_gain: float, hidden_gain: float) -> Any:
    fns = {l.kernel: (lambda k: k * hidden_gain) for l in model.neuron_layers()}
    fns[model.output_kernel] = lambda k: k * head_gain
    return map_leaves_at(params, fns)


def make_agent(config: PPOConfig, env: Env) -> PPOAgent:
    c = config
    discrete = env.discrete
    obs_dim = env.observation_size
    out_dim = env.num_actions if discrete else env.action_size
    B, M, T, N = c.batch_size, c.num_minibatches, c.num_steps, c.num_envs
    num_updates = c.num_updates

    def build(key):
        ka, kc = jax.random.split(key)
        actor = make_network(c.network, obs_dim, out_dim, nnx.Rngs(ka))
        critic = make_network(c.network, obs_dim, 1, nnx.Rngs(kc))
        agd, ap = nnx.split(actor, nnx.Param)
        cgd, cp = nnx.split(critic, nnx.Param)
        if c.ppo_init:
            ap = _scale_init(ap, actor, 0.01, math.sqrt(2.0))
            cp = _scale_init(cp, critic, 1.0, math.sqrt(2.0))
        params = {"actor": ap, "critic": cp}
        if not discrete:
            params["log_std"] = jnp.full((out_dim,), c.init_log_std, jnp.float32)
        return agd, cgd, params

    actor_gd, critic_gd, _ = build(jax.random.key(0))  # graph structure only

    if c.anneal_lr:
        per_update = M * c.update_epochs

        def lr(count):
            return c.lr * (1.0 - (count // per_update) / num_updates)
    else:
        lr = c.lr
    optimizer = optax.chain(optax.clip_by_global_norm(c.max_grad_norm),
                            make_optimizer(c.optimizer, lr, kron_config=c.kron,
                                           adam_eps=c.adam_eps))

    def actor_out(params, obs):
        return nnx.merge(actor_gd, params["actor"])(obs)

    def critic_out(params, obs):
        return nnx.merge(critic_gd, params["critic"])(obs)[..., 0]

    def dist_log_prob_entropy(params, out, action):
        if discrete:
            return categorical_log_prob(out, action), categorical_entropy(out)
        log_std = params["log_std"]
        return (gaussian_log_prob(out, log_std, action),
                gaussian_entropy(log_std, out.shape[:-1]))

    def sample(params, out, key):
        if discrete:
            action = jax.random.categorical(key, out)
        else:
            action = out + jnp.exp(params["log_std"]) * jax.random.normal(key, out.shape)
        return action, dist_log_prob_entropy(params, out, action)[0]

    def norm(obs_norm, obs):
        return obs if obs_norm is None else normalization.normalize(obs_norm, obs)

    def policy(pp, obs):
        out = actor_out(pp["net"], norm(pp["obs_norm"], obs))
        return jnp.argmax(out, axis=-1) if discrete else jnp.clip(out, -1.0, 1.0)

    def init_params(key):
        return build(key)[2]

    def init(key):
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        env_state = jax.vmap(env.reset)(jax.random.split(k_env, N))
        zero = jnp.zeros((), jnp.int32)
        obs_norm = None
        if c.normalize_obs:
            obs_norm = normalization.update(normalization.init(obs_dim), env_state.obs)
        churn_obs = (jnp.zeros((min(c.churn_samples, B), obs_dim), jnp.float32)
                     if c.churn_samples else None)
        return PPOState(params=params, opt_state=optimizer.init(params), env_state=env_state,
                        key=k_state, update=zero, env_steps=zero, guard=init_guard(),
                        obs_norm=obs_norm, churn_obs=churn_obs)

    v_step = jax.vmap(env.step)

    def loss_fn(params, mb):
        out = actor_out(params, mb.obs)
        log_prob, entropy = dist_log_prob_entropy(params, out, mb.action)
        adv = mb.advantages
        if c.norm_adv:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss, pg_aux = clipped_surrogate_loss(log_prob, mb.log_prob, adv, c.clip_eps)
        v_loss = value_loss(critic_out(params, mb.obs), mb.value, mb.returns, c.clip_eps,
                            c.clip_value)
        ent = jnp.mean(entropy)
        total = pg_loss + c.vf_coef * v_loss - c.ent_coef * ent
        return total, {"loss": total, "policy_loss": pg_loss, "value_loss": v_loss,
                       "entropy": ent, **pg_aux}

    def health_metrics(params, batch_and_key):
        # health_samples transitions of the rollout, drawn without replacement (the SVD of
        # srank dominates the cost; on a 2048-sample MinAtar batch it cost more than an update)
        batch, key = batch_and_key
        idx = jax.random.choice(key, B, (min(c.health_samples, B),), replace=False)
        sub = jax.tree.map(lambda x: x[idx], batch)  # batch: the flattened rollout [B, ...]
        grads = jax.grad(lambda p: loss_fn(p, sub)[0])(params)
        out = {}
        for name, gd in (("actor", actor_gd), ("critic", critic_gd)):
            rep = health.health_report(gd, params[name], sub.obs, grads[name],
                                       tau_dormant=c.tau_dormant, tau_grama=c.tau_grama)
            out.update({f"health/{name}/{k}": v.astype(jnp.float32) for k, v in rep.items()})
        if c.hessian_samples:
            k_tr, k_eig = jax.random.split(jax.random.fold_in(key, 7))
            ppo_loss = lambda p: loss_fn(p, sub)[0]
            out["health/hessian_trace"] = health.hutchinson_trace(ppo_loss, params, k_tr,
                                                                  c.hessian_samples)
            out["health/hessian_top_eig"] = health.hessian_top_eigenvalue(
                ppo_loss, params, k_eig, c.hessian_samples)
        return out

    def churn_metrics(before, after, obs):
        out0, acts0 = nnx.merge(actor_gd, before["actor"])(obs, return_activations=True)
        out1, acts1 = nnx.merge(actor_gd, after["actor"])(obs, return_activations=True)
        rep = health.representation_churn(acts0["features"], acts1["features"])
        if discrete:
            pol = health.policy_churn(out0, out1)
        else:
            pol = health.gaussian_policy_churn(out0, out1, before["log_std"], after["log_std"])
        value = jnp.mean(jnp.abs(critic_out(after, obs) - critic_out(before, obs)))
        return {**{f"churn/repr_{k}": v for k, v in rep.items()},
                **{f"churn/policy_{k}": v for k, v in pol.items()}, "churn/value": value}

    def update(state: PPOState, do_health: jax.Array):
        params = state.params
        key, k_roll, k_epochs = jax.random.split(state.key, 3)

        def env_step(carry, k):
            env_state = carry
            obs = norm(state.obs_norm, env_state.obs)
            out = actor_out(params, obs)
            value = critic_out(params, obs)
            action, log_prob = sample(params, out, k)
            env_action = action if discrete else jnp.clip(action, -1.0, 1.0)
            nxt = v_step(env_state, env_action)
            tr = Transition(obs=obs, action=action, log_prob=log_prob, value=value,
                            reward=nxt.reward, terminated=nxt.terminated, done=nxt.done,
                            final_obs=nxt.final_obs)
            raw_obs = env_state.obs if c.normalize_obs else None
            return nxt, (tr, nxt.stats, raw_obs)

        env_state, (traj, stats, traj_raw_obs) = jax.lax.scan(env_step, state.env_state,
                                                              jax.random.split(k_roll, T))
        next_values = critic_out(params, norm(state.obs_norm, traj.final_obs))
        adv, returns = gae(traj.reward, traj.value, next_values, traj.terminated, traj.done,
                           c.gamma, c.gae_lambda)
        batch = _Batch(obs=traj.obs, action=traj.action, log_prob=traj.log_prob,
                       value=traj.value, advantages=adv, returns=returns)
        batch = jax.tree.map(lambda x: x.reshape((B,) + x.shape[2:]), batch)

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
            epoch, (params, state.opt_state, prev0), jax.random.split(k_epochs, c.update_epochs))
        metrics = health.mean_over_minibatches(aux)
        guard = state.guard
        if c.guard_nonfinite:
            params, opt_state, guard, metrics["skipped"] = _guard_update(
                params, opt_state, state.params, state.opt_state, aux["loss"], guard)
            metrics["nonfinite_streak"] = guard.streak
        metrics.update(episode_metrics(stats))
        env_steps = state.env_steps + B
        metrics["env_steps"] = env_steps
        if c.health_every:
            metrics.update(jax.lax.cond(do_health, health_metrics, _nan_like(health_metrics),
                                        params, (batch, jax.random.fold_in(k_epochs, 1))))
        obs_norm = state.obs_norm
        if c.normalize_obs:  # the raw observations acted on in this rollout
            obs_norm = normalization.update(obs_norm, traj_raw_obs)
        churn_obs = state.churn_obs
        if c.churn_samples:
            churn_obs = health.churn_reference(churn_obs, batch.obs, state.update == 0,
                                               jax.random.fold_in(k_epochs, 2))
            metrics.update(churn_metrics(state.params, params, churn_obs))
        new_state = PPOState(params=params, opt_state=opt_state, env_state=env_state, key=key,
                             update=state.update + 1, env_steps=env_steps, guard=guard,
                             obs_norm=obs_norm, churn_obs=churn_obs)
        return new_state, metrics

    def train_chunk(state: PPOState, num_updates: int | None = None):
        n = int(num_updates or c.chunk_updates)
        idx = jnp.arange(n)
        do_health = ((idx + 1) % c.health_every == 0) if c.health_every else jnp.zeros(n, bool)
        return jax.lax.scan(update, state, do_health)

    def train(key):
        return train_chunk(init(key), num_updates)

    return PPOAgent(config=c, env=env, actor_graphdef=actor_gd, critic_graphdef=critic_gd,
                    optimizer=optimizer, init=init, train_chunk=train_chunk, train=train,
                    policy=policy, init_params=init_params)


@struct.dataclass
class _Batch:
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    advantages: jax.Array
    returns: jax.Array


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
    """A function with ``fn``'s output structure, every leaf NaN (the not-measured branch)."""
    def nan_fn(*args):
        shapes = jax.eval_shape(fn, *args)
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    return nan_fn


__all__ = ["PPOConfig", "PPOState", "PPOAgent", "make_agent", "gae", "clipped_surrogate_loss",
           "value_loss", "categorical_log_prob", "categorical_entropy", "gaussian_log_prob",
           "gaussian_entropy"]
