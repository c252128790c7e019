"""KL regularisation for RL on LLMs: estimators and where they enter the objective.

The objective (Shah et al., "A Comedy of Estimators: On KL Regularization in RL Training of
LLMs", arXiv 2512.21852) is

    J(theta) = E_{y ~ pi_theta}[R(y)] - beta * KL(pi_theta || pi_ref),
    KL(pi || pi_ref) = E_{y ~ pi}[ sum_t l_t ],   l_t = log pi(y_t | y_<t) - log pi_ref(y_t | y_<t).

Per-token estimators of the per-token KL, each a function of l = l_t:

    k1 = l                    (unbiased: E_pi[k1] = KL)
    k2 = l^2 / 2              (biased as a value; its gradient l * grad(l) is the score term)
    k3 = exp(-l) - 1 + l      (Schulman's; unbiased and >= 0)

For an estimate k(y) = sum_t k_t, grad E_pi[k] = E[k * grad log pi(y)] + E[grad k]: a score-
function term and a pathwise term. Placement decides which term acts:

- ``"reward"``: beta * stop_grad(k(y)) is subtracted from the sequence reward; the policy-
  gradient loss then carries only the score-function term. Unbiased for k1 (grad KL =
  E[sum_t l_t * grad log pi(y)], the pathwise part of k1 having zero mean).
- ``"loss"``: beta * k(y) is added to the loss and differentiated: only the pathwise term.
  k1 gives zero expected gradient; k3 gives the gradient of the per-token *forward* KL.
- ``"both"``: both terms, i.e. exactly grad E[k]: unbiased whenever k is (k1, k3).
- ``"none"``: no KL term.

:mod:`llm_rl.kl.oracle` enumerates a tiny policy to give the exact expected gradient of each
configuration and its bias against grad KL; docs/kl_estimators.md holds the table.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

Estimator = Literal["k1", "k2", "k3"]
Placement = Literal["reward", "loss", "both", "none"]
Normalization = Literal["sum", "seq_mean", "token_mean"]

ESTIMATORS = ("k1", "k2", "k3")
PLACEMENTS = ("reward", "loss", "both", "none")
NORMALIZATIONS = ("sum", "seq_mean", "token_mean")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: must be one of {', '.join(allowed)}")


def estimate(logp: jax.Array, ref_logp: jax.Array, estimator: Estimator) -> jax.Array:
    """Per-token KL estimate from log-probs of the sampled tokens (same shape as inputs).

    With l = logp - ref_logp: k1 = l, k2 = l^2 / 2, k3 = exp(-l) - 1 + l (arXiv 2512.21852,
    Sec. 2; k3 from Schulman, "Approximating KL divergence", 2020)."""
    _check_choice("estimator", estimator, ESTIMATORS)
    chex.assert_equal_shape([logp, ref_logp])
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    # expm1 keeps k3 accurate (and >= 0) for small |l|.
    return jnp.expm1(-log_ratio) + log_ratio


class KLPenalty(NamedTuple):
    reward: jax.Array  # [B] detached amount to subtract from each sequence's reward
    loss: jax.Array  # scalar, differentiable, to add to the training loss
    kl: jax.Array  # [B] detached per-sequence estimate (for logging), before beta


def _importance_corrected(tokens: jax.Array, logp: jax.Array, ref_logp: jax.Array,
                          behavior_logp: jax.Array, estimator: str,
                          truncation: float | None) -> jax.Array:
    """Per-token loss terms for samples drawn by a behaviour policy mu, rho = pi / mu:
    k1 -> rho * k1, k2 -> stop_grad(rho) * k2, k3 -> rho * k3; each has expected gradient
    grad KL_t(pi || ref) per token (the prefix still comes from mu). With ``truncation``,
    rho -> min(rho, c) (less variance, some bias)."""
    rho = jnp.exp(logp - behavior_logp)
    if truncation is not None:
        rho = jnp.minimum(rho, truncation)
    if estimator == "k2":
        rho = jax.lax.stop_gradient(rho)
    return rho * tokens


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *,
               estimator: Estimator, placement: Placement, beta: float,
               normalization: Normalization = "sum", behavior_logp: jax.Array | None = None,
               rho_truncation: float | None = None) -> KLPenalty:
    """The KL term of the RL objective, in reward and/or in loss.

    Args:
      logp: [B, T] log pi_theta of the sampled tokens (differentiable).
      ref_logp: [B, T] log pi_ref of the same tokens (treated as constant).
      mask: [B, T] 1 for response tokens, 0 for prompt/padding.
      estimator: "k1" | "k2" | "k3".
      placement: "reward" | "loss" | "both" | "none".
      beta: KL coefficient.
      normalization: how per-token estimates become a per-sequence amount
        "sum": S_b = sum_t m_bt k_bt (the sequence KL; the paper's choice);
        "seq_mean": S_b = sum_t m_bt k_bt / sum_t m_bt;
        "token_mean": like seq_mean for the reward; the loss is
          sum_bt m_bt k_bt / sum_bt m_bt over the whole batch (verl/OpenRLHF style).
      behavior_logp: [B, T] log mu of the tokens when they were sampled by an older policy
        mu (asynchronous / off-policy rollouts). The loss then uses the importance-corrected
        per-token forms (rho k1, stop_grad(rho) k2, rho k3), whose gradient already holds the
        per-token score-function term; the reward value is unchanged. ``placement="both"``
        is refused here: it would count that score-function term twice.
      rho_truncation: optional c for rho -> min(rho, c).

    Stale vs on-policy "loss" placement: with ``behavior_logp`` the loss is beta * rho_t k_t,
    and even where rho = 1 in value (mu = pi) its gradient is (k_t + dk_t/dl) grad log pi_t:
    the pathwise term *plus* the per-token score term k_t grad log pi_t (for k1 and k3; k2's
    rho is detached, so k2 keeps dk/dl). Without ``behavior_logp`` the gradient is dk_t/dl
    grad log pi_t only. So ``placement="loss"`` is a different estimator on stale rollouts
    than on-policy: :mod:`llm_rl.rl` passes ``behavior_logp`` only when staleness >= 1, and
    comparisons of on-policy against asynchronous "loss" runs compare these two estimators
    (tests/llm_rl/test_kl.py pins both gradients).

    Returns:
      KLPenalty(reward [B] = beta * stop_grad(S_b) if placement in (reward, both) else 0,
                loss = beta * mean_b S_b (differentiable) if placement in (loss, both) else 0,
                kl [B] = stop_grad(S_b)).
    """
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    if behavior_logp is not None and placement == "both":
        raise ValueError("placement='both' with behavior_logp counts the score-function term "
                         "twice (the importance-corrected loss already carries it); use 'loss' "
                         "or 'reward'")
    chex.assert_rank(logp, 2)
    chex.assert_equal_shape([logp, ref_logp, mask])
    mask = mask.astype(logp.dtype)
    ref_logp = jax.lax.stop_gradient(ref_logp)
    per_token = estimate(logp, ref_logp, estimator) * mask
    lengths = jnp.sum(mask, axis=-1)

    def per_sequence(values):
        total = jnp.sum(values, axis=-1)
        return total if normalization == "sum" else total / jnp.maximum(lengths, 1.0)

    seq = per_sequence(per_token)
    zeros = jnp.zeros_like(seq)
    reward = beta * jax.lax.stop_gradient(seq) if placement in ("reward", "both") else zeros

    loss = jnp.zeros((), logp.dtype)
    if placement in ("loss", "both"):
        loss_tokens = per_token
        if behavior_logp is not None:
            chex.assert_equal_shape([logp, behavior_logp])
            loss_tokens = _importance_corrected(
                per_token, logp, ref_logp, jax.lax.stop_gradient(behavior_logp), estimator,
                rho_truncation) * mask
        if normalization == "token_mean":
            loss = beta * jnp.sum(loss_tokens) / jnp.maximum(jnp.sum(mask), 1.0)
        else:
            loss = beta * jnp.mean(per_sequence(loss_tokens))
    return KLPenalty(reward=reward, loss=loss, kl=jax.lax.stop_gradient(seq))
