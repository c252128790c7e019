"""PPO-clip with a value head (token-level GAE) for RL fine-tuning of a causal LM on verifiable
tasks, with any KL configuration, on-policy or with stale (asynchronous) rollouts.

The same host/device split as :mod:`llm_rl.rl` (an experiment swaps one for the other): the
prompts of an iteration are drawn from the seed and the iteration exactly as there, ``G``
responses per prompt are sampled by the *behaviour* policy (the current parameters, or those
of ``staleness`` updates ago), graded on the host, and one jitted update takes one guarded
gradient step on the policy and one on the critic.

Per-token rewards (response tokens t = 0 .. N-1, ``m_t`` the response mask):

    r_t = R * [t is the last response token]                    (algorithms.terminal_rewards)
        - KL reward part (placement "reward" / "both"), either
          per sequence:  beta * S  on the last token, S = kl_penalty(...).kl
                         (``kl_as_token_reward=False``), or
          per token:     beta * k_t * m_t (/ |o| for the seq_mean / token_mean normalisations),
                         k_t = kl.estimate(log pi_t, log pi_ref_t) (``kl_as_token_reward=True``;
                         what verl and OpenRLHF PPO do).

Both variants subtract the same total beta * S from the episode. With gamma = lam = 1,
A_t + V_t (the return) is  R - beta * sum_{l >= t} k_l  per token and  R - beta * sum_l k_l
per sequence: they agree at t = 0 and differ at t > 0 by  beta * sum_{l < t} k_l,  a function
of the prefix only. That is a baseline for the action at t (E[f(prefix) grad log pi(y_t |
prefix)] = 0), so the two give the same expected policy gradient (not the same advantages);
the per-token form drops that past-KL noise from the advantage (usually less variance) and
gives the critic a Markov target (it need not remember the KL already paid). Whitening,
clipping and gamma, lam < 1 make the two differ beyond that. Placement "loss" adds
``kl_penalty(...).loss`` to the policy loss as in :mod:`llm_rl.rl`, importance-corrected when
the rollouts are stale; "both" does both.

Value alignment. Sequences are ``[prompt (P tokens, left-padded) | response (N tokens)]``; the
critic (:class:`~llm_rl.models.layers.ValueModel`) gives ``values[:, j]`` = V(tokens[:, :j+1]).
Response token t sits at position P + t, and the state in which it is chosen is the prefix
that ends at position P + t - 1, so  V(s_t) = values[:, P - 1 + t],  i.e. the response values
are  values[:, P-1 : P-1+N]  (the value at the last prompt token is V(s_0); the value at the
last sequence position, after the final token, is never used: the episode ends there and GAE
takes V = 0 after the last response token). This is the same shift as the log-probs
(``logp[:, P-1+t]`` scores token P + t, :func:`llm_rl.rl.response_logprobs`).

One update (Schulman et al. 2017, Alg. 1, with one epoch and one minibatch):

1. ref, current-policy log-probs and old values V_old (current critic) at the start, all
   detached; r_t as above; (A, returns) = gae(r, V_old, m, gamma, lam); A optionally whitened
   over the batch's response tokens (returns are not).
2. policy: clipped_surrogate(logp, behaviour_logp, A) (+ KL loss), one guarded step;
   critic: value_loss(V, V_old, returns, clip_eps=value_clip_eps), one guarded step with its
   own optimizer (so no value coefficient is needed: the critic's learning rate plays its
   role, and the two never share parameters).

With one step per batch the ratio against the behaviour policy is 1 on-policy and the value
clip is inactive (V = V_old at the step); both matter with stale rollouts (the ratio) or if the
update is ever run for several epochs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llm_rl import algorithms, tasks
from llm_rl.kl import ESTIMATORS, NORMALIZATIONS, PLACEMENTS, estimate, kl_penalty
from llm_rl.rl import response_logprobs, rollout
from trainkit.guards import GuardState, guarded_update, init_guard


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """Everything a PPO iteration needs besides the models (plain values, hashable).

    The fields shared with :class:`llm_rl.rl.RLSettings` mean the same; ``advantage`` is
    absent (advantages come from GAE), ``aggregation`` defaults to the per-token mean of PPO
    implementations (verl, OpenRLHF)."""

    estimator: str = "k3"
    placement: str = "reward"  # reward | loss | both | none
    beta: float = 0.05
    normalization: str = "sum"
    kl_as_token_reward: bool = False  # reward placement: per token (verl) or per sequence
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip_eps: float | None = 0.2
    aggregation: str = "token_mean"
    clip_eps: float | None = 0.2
    num_prompts: int = 8
    group_size: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    staleness: int = 0
    task: str = "arithmetic"
    task_kwargs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def __post_init__(self):
        for name, value, allowed in (("estimator", self.estimator, ESTIMATORS),
                                     ("placement", self.placement, PLACEMENTS),
                                     ("normalization", self.normalization, NORMALIZATIONS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid: must be one of "
                                 f"{', '.join(allowed)}")
        if self.staleness > 0 and self.placement == "both":
            raise ValueError("placement='both' with stale rollouts would count the KL score "
                             "term twice; use 'reward' or 'loss' when staleness > 0")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, "
                             f"lam={self.lam}")
        if self.task not in tasks.TASKS:
            raise ValueError(f"task={self.task!r} is invalid: must be one of "
                             f"{', '.join(tasks.TASKS)}")


class PPOState(NamedTuple):
    params: Any  # policy (same name as RLState.params, so evaluation code works on both)
    critic_params: Any
    opt_state: Any
    critic_opt_state: Any
    guard: GuardState
    critic_guard: GuardState
    step: jax.Array
    stale: tuple  # policy parameters of the last `staleness` versions, oldest first


def init_state(params: Any, critic_params: Any, optimizer: optax.GradientTransformation,
               critic_optimizer: optax.GradientTransformation, staleness: int) -> PPOState:
    copy = lambda: jax.tree.map(jnp.array, params)
    return PPOState(params, critic_params, optimizer.init(params),
                    critic_optimizer.init(critic_params), init_guard(), init_guard(),
                    jnp.zeros((), jnp.int32), tuple(copy() for _ in range(staleness)))


# --- pure pieces -----------------------------------------------------------------------------


def response_values(values: jax.Array, prompt_len: int, num_response: int) -> jax.Array:
    """V(s_t) for response tokens t = 0 .. N-1 from critic outputs [B, P+N] over the whole
    sequence: ``values[:, P-1+t]``, the critic's output at the token *before* response token t
    (the prefix in which token t is chosen). Shape [B, N]."""
    chex.assert_rank(values, 2)
    chex.assert_shape(values, (None, prompt_len + num_response))
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token (the state of the first "
                         "response token)")
    return values[:, prompt_len - 1:prompt_len - 1 + num_response]


def _response_values(critic_graphdef, critic_params, sequences, seq_mask, prompt_len):
    """V(s_t) [B, N] for the response tokens of ``sequences`` under the critic."""
    values = nnx.merge(critic_graphdef, critic_params)(sequences, seq_mask)
    return response_values(values, prompt_len, sequences.shape[1] - prompt_len)


def token_rewards(rewards: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                  settings: PPOSettings):
    """Per-token rewards [B, N] (task reward on the last response token, minus the KL reward
    part per sequence or per token, see the module docstring) and the
    :class:`~llm_rl.kl.KLPenalty` of ``logp`` (detached; its ``loss`` is not used here)."""
    s = settings
    mask = mask.astype(jnp.float32)
    logp, ref_logp = jax.lax.stop_gradient(logp), jax.lax.stop_gradient(ref_logp)
    penalty = kl_penalty(logp, ref_logp, mask, estimator=s.estimator, placement=s.placement,
                         beta=s.beta, normalization=s.normalization)
    if s.kl_as_token_reward and s.placement in ("reward", "both"):
        per_token = estimate(logp, ref_logp, s.estimator) * mask
        if s.normalization != "sum":  # the same per-sequence total as penalty.reward
            per_token = per_token / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        token_r = algorithms.terminal_rewards(rewards, mask) - s.beta * per_token
    else:
        token_r = algorithms.terminal_rewards(rewards - penalty.reward, mask)
    return token_r * mask, penalty


def advantages_and_returns(rewards: jax.Array, values: jax.Array, logp: jax.Array,
                           ref_logp: jax.Array, mask: jax.Array, settings: PPOSettings):
    """(advantages [B, N] (whitened if ``settings.whiten_advantages``), returns [B, N]
    = raw GAE advantages + values, per-token rewards [B, N], KL penalty) from sequence
    rewards [B], old values V(s_t) [B, N] and detached log-probs [B, N]."""
    chex.assert_rank(rewards, 1)
    chex.assert_equal_shape([values, logp, ref_logp, mask])
    token_r, penalty = token_rewards(rewards, logp, ref_logp, mask, settings)
    adv, returns = algorithms.gae(token_r, values, mask, gamma=settings.gamma, lam=settings.lam)
    if settings.whiten_advantages:
        adv = algorithms.whiten(adv, mask)
    return adv, returns, token_r, penalty


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect critic,
    0: no better than a constant); 0 when the returns do not vary."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)

    def var(x):
        mean = (x * mask).sum() / n
        return (jnp.square(x - mean) * mask).sum() / n

    var_ret = var(returns)
    ratio = var(returns - values) / jnp.maximum(var_ret, 1e-12)
    return jnp.where(var_ret > 1e-12, 1.0 - ratio, 0.0)


# --- the iteration ---------------------------------------------------------------------------


def make_iteration(policy_graphdef, ref_params, critic_graphdef,
                   policy_optimizer: optax.GradientTransformation,
                   critic_optimizer: optax.GradientTransformation, tokenizer,
                   settings: PPOSettings) -> Callable[[PPOState, int], tuple[PPOState, dict]]:
    """``iterate(state, n) -> (state, metrics stacked over the n iterations)``: the ``chunk``
    for :func:`trainkit.loop.fit`, as :func:`llm_rl.rl.make_iteration`."""
    s = settings
    stale = s.staleness > 0

    @jax.jit
    def update(state: PPOState, sequences, seq_mask, behavior_logp, resp_mask, rewards):
        prompt_len = sequences.shape[1] - resp_mask.shape[1]
        mask = resp_mask.astype(jnp.float32)
        ref_logp = jax.lax.stop_gradient(
            response_logprobs(policy_graphdef, ref_params, sequences, seq_mask, prompt_len, s.temperature))
        now_logp = jax.lax.stop_gradient(
            response_logprobs(policy_graphdef, state.params, sequences, seq_mask, prompt_len, s.temperature))
        old_values = jax.lax.stop_gradient(
            _response_values(critic_graphdef, state.critic_params, sequences, seq_mask, prompt_len))
        adv, returns, _, penalty = advantages_and_returns(rewards, old_values, now_logp,
                                                          ref_logp, mask, s)

        def policy_loss_fn(params):
            logp = response_logprobs(policy_graphdef, params, sequences, seq_mask, prompt_len, s.temperature)
            pg, pg_metrics = algorithms.clipped_surrogate(
                logp, behavior_logp, adv, mask, clip_eps=s.clip_eps, aggregation=s.aggregation,
                budget=s.max_new_tokens)
            kl_loss = kl_penalty(logp, ref_logp, mask, estimator=s.estimator,
                                 placement=s.placement, beta=s.beta,
                                 normalization=s.normalization,
                                 behavior_logp=behavior_logp if stale else None).loss
            return pg + kl_loss, (pg_metrics, kl_loss)

        def critic_loss_fn(critic_params):
            values = _response_values(critic_graphdef, critic_params, sequences, seq_mask,
                                      prompt_len)
            return algorithms.value_loss(values, old_values, returns, mask,
                                         clip_eps=s.value_clip_eps)

        (loss, (pg_metrics, kl_loss)), grads = jax.value_and_grad(
            policy_loss_fn, has_aux=True)(state.params)
        params, opt_state, guard, gm = guarded_update(policy_optimizer, grads, state.opt_state,
                                                      state.params, loss, state.guard)
        v_loss, critic_grads = jax.value_and_grad(critic_loss_fn)(state.critic_params)
        critic_params, critic_opt_state, critic_guard, cgm = guarded_update(
            critic_optimizer, critic_grads, state.critic_opt_state, state.critic_params, v_loss,
            state.critic_guard)

        n_tokens = jnp.maximum(mask.sum(), 1.0)
        log_ratio = (now_logp - ref_logp) * mask
        metrics = {
            "loss": loss, "kl_loss": kl_loss, "grad_norm": optax.global_norm(grads),
            "reward": rewards.mean(), "advantage_abs": (jnp.abs(adv) * mask).sum() / n_tokens,
            "kl_penalty_reward": penalty.reward.mean(),
            # Per-sequence KL(pi || ref) estimates on the batch (k1 and k3, summed over tokens).
            "kl_k1": log_ratio.sum(-1).mean(),
            "kl_k3": ((jnp.expm1(-log_ratio) + log_ratio) * mask).sum(-1).mean(),
            "neg_logp_per_token": -(now_logp * mask).sum() / n_tokens,
            "response_length": mask.sum(-1).mean(),
            "staleness_log_ratio": jnp.abs((now_logp - behavior_logp) * mask).sum() / n_tokens,
            "value_loss": v_loss, "critic_grad_norm": optax.global_norm(critic_grads),
            "value_mean": (old_values * mask).sum() / n_tokens,
            "return_mean": (returns * mask).sum() / n_tokens,
            "explained_variance": explained_variance(old_values, returns, mask),
            **pg_metrics, **gm,
            "critic_skipped": cgm["skipped"],
            # trainkit.loop.fit stops on `nonfinite_streak`: the worse of the two models.
            "nonfinite_streak": jnp.maximum(gm["nonfinite_streak"], cgm["nonfinite_streak"]),
            "policy_nonfinite_streak": gm["nonfinite_streak"],
            "critic_nonfinite_streak": cgm["nonfinite_streak"],
            "critic_nonfinite_total": cgm["nonfinite_total"],
        }
        stale_params = state.stale[1:] + (state.params,) if stale else ()
        new_state = PPOState(params, critic_params, opt_state, critic_opt_state, guard,
                             critic_guard, state.step + 1, stale_params)
        return new_state, metrics

    def iterate(state: PPOState, n: int) -> tuple[PPOState, dict]:
        rows = []
        for _ in range(n):
            behavior = state.stale[0] if stale else state.params
            # The same prompts and generation keys as llm_rl.rl at the same seed and step.
            r = rollout(policy_graphdef, behavior, tokenizer, s, int(state.step))
            state, metrics = update(state, r.sequences, r.seq_mask, r.behavior_logp, r.resp_mask,
                                    r.rewards)
            rows.append(jax.device_get(metrics))
        return state, {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    iterate.update = update  # the jitted update alone (benchmarks, tests)
    return iterate
