"""Policy-gradient losses for LLM RL as pure functions: GRPO, Dr. GRPO, RLOO, REINFORCE with
a group baseline, and PPO-clip with a value head (token-level GAE).

Shapes: a batch holds B responses, B = num_prompts * group_size, grouped contiguously
(responses of prompt p are rows p*G .. p*G+G-1). Per-token arrays are [B, T] with ``mask``
1 on response tokens. Any KL configuration from :func:`llm_rl.kl.kl_penalty` composes with
these: subtract ``penalty.reward`` from the rewards before computing advantages and add
``penalty.loss`` to the loss.

References:
- GRPO: Shao et al. 2024 (DeepSeekMath), Eq. 3: A_i = (r_i - mean(r)) / std(r), loss
  -1/G sum_i 1/|o_i| sum_t min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i).
- Dr. GRPO: Liu et al. 2025 ("Understanding R1-Zero-Like Training"), Sec. 3.1: no std
  division, and token sums divided by a constant (the generation budget) instead of |o_i|.
- RLOO: Ahmadian et al. 2024, A_i = r_i - 1/(G-1) sum_{j != i} r_j.
- REINFORCE with group baseline: A_i = r_i - mean(r), loss -A_i sum_t log pi(o_i,t).
- PPO: Schulman et al. 2017, Eq. 7 (clip) and GAE (Schulman et al. 2016, Eq. 16):
  delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lambda)^l delta_{t+l}.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

AdvantageMethod = Literal["grpo", "dr_grpo", "rloo", "reinforce"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_sum", "seq_sum_over_budget"]


def group_advantages(rewards: jax.Array, group_size: int, method: AdvantageMethod,
                     eps: float = 1e-6) -> jax.Array:
    """Sequence-level advantages [B] from rewards [B] grouped by prompt.

    grpo:       (r_i - mean_g r) / (std_g r + eps), std with ddof=1 (as TRL and verl)
    dr_grpo:    r_i - mean_g r
    reinforce:  r_i - mean_g r
    rloo:       r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g r)
    """
    chex.assert_rank(rewards, 1)
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} responses is not a multiple of "
                         f"group_size={group_size}")
    if method not in ("grpo", "dr_grpo", "rloo", "reinforce"):
        raise ValueError(f"method={method!r} is invalid: must be grpo, dr_grpo, rloo or reinforce")
    if group_size < 2 and method in ("grpo", "rloo"):
        raise ValueError(f"{method} needs group_size >= 2, got {group_size}")
    groups = rewards.reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    if method == "grpo":
        adv = centered / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    elif method == "rloo":
        adv = centered * group_size / (group_size - 1)
    else:
        adv = centered
    return adv.reshape(-1)


def aggregate(values: jax.Array, mask: jax.Array, mode: Aggregation,
              budget: int | None = None) -> jax.Array:
    """Reduce per-token values [B, T] to a scalar.

    seq_mean_token_mean: mean_b (sum_t m v / sum_t m)         (GRPO)
    token_mean:          sum_bt m v / sum_bt m                 (DAPO, verl default)
    seq_sum:             mean_b sum_t m v                      (REINFORCE / RLOO)
    seq_sum_over_budget: mean_b sum_t m v / budget             (Dr. GRPO; budget = max tokens)
    """
    chex.assert_equal_shape([values, mask])
    mask = mask.astype(values.dtype)
    masked = values * mask
    if mode == "seq_mean_token_mean":
        return jnp.mean(masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0))
    if mode == "token_mean":
        return masked.sum() / jnp.maximum(mask.sum(), 1.0)
    if mode == "seq_sum":
        return jnp.mean(masked.sum(-1))
    if mode == "seq_sum_over_budget":
        if budget is None or budget < 1:
            raise ValueError("seq_sum_over_budget needs a positive budget (max response tokens)")
        return jnp.mean(masked.sum(-1)) / budget
    raise ValueError(f"aggregation={mode!r} is invalid: must be seq_mean_token_mean, token_mean, "
                     "seq_sum or seq_sum_over_budget")


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                      mask: jax.Array, *, clip_eps: float | None, aggregation: Aggregation,
                      budget: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clip policy loss  -min(rho A, clip(rho, 1-eps, 1+eps) A),  rho = exp(logp - old_logp).

    ``advantages`` is [B] (sequence-level, broadcast over tokens) or [B, T] (token-level).
    With ``clip_eps=None`` the loss is the plain importance-weighted -rho A, whose gradient
    at rho = 1 is the REINFORCE gradient -A grad log pi. Returns (loss, metrics) with the
    clipped fraction and the k3 estimate of KL(old || new)."""
    chex.assert_rank(logp, 2)
    chex.assert_equal_shape([logp, old_logp, mask])
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], logp.shape)
    chex.assert_equal_shape([logp, advantages])
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    if clip_eps is None:
        per_token = -unclipped
        clipped_frac = jnp.zeros(())
    else:
        clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
        per_token = -jnp.minimum(unclipped, clipped)
        clipped_frac = aggregate((clipped < unclipped).astype(logp.dtype), mask, "token_mean")
    loss = aggregate(per_token, mask, aggregation, budget)
    approx_kl = aggregate(jnp.expm1(log_ratio) - log_ratio, mask, "token_mean")
    return loss, {"clip_frac": jax.lax.stop_gradient(clipped_frac),
                  "approx_kl_old_new": jax.lax.stop_gradient(approx_kl)}


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Token-level generalised advantage estimation over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t,  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1},
    so the value after the last response token is 0 (the episode ends there). Returns
    (advantages [B, T], returns = advantages + values), both zero outside the mask."""
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    mask = mask.astype(rewards.dtype)
    values = jax.lax.stop_gradient(values) * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def back(carry, xs):
        delta, nm = xs
        adv = delta + gamma * lam * nm * carry
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[0], rewards.dtype),
                          (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask


def terminal_rewards(sequence_rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Place each sequence's reward [B] on its last response token: [B, T]."""
    chex.assert_rank(mask, 2)
    positions = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1)
    return jnp.where(positions[None] == last[:, None], sequence_rewards[:, None], 0.0)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               *, clip_eps: float | None = 0.2) -> jax.Array:
    """0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), token-mean over the mask."""
    chex.assert_equal_shape([values, old_values, returns, mask])
    returns = jax.lax.stop_gradient(returns)
    err = jnp.square(values - returns)
    if clip_eps is not None:
        old_values = jax.lax.stop_gradient(old_values)
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        err = jnp.maximum(err, jnp.square(clipped - returns))
    return 0.5 * aggregate(err, mask, "token_mean")


def whiten(values: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (PPO advantage normalisation)."""
    mask = mask.astype(values.dtype)
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (values * mask).sum() / n
    var = (jnp.square(values - mean) * mask).sum() / n
    return (values - mean) * jax.lax.rsqrt(var + eps) * mask
