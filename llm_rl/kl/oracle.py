"""An exact gradient oracle for KL configurations, by enumerating every sequence.

A tiny autoregressive policy over ``vocab`` tokens (token 0 is EOS) and at most ``horizon``
steps: logits = theta[t, previous token] (position-and-bigram table; the previous token of
step 0 is a BOS index). Every possible response (ending at EOS or at the horizon) is
enumerated, so expectations are exact sums:

    KL(pi || ref) = sum_y pi(y) sum_t l_t(y),            the true gradient is grad(beta * KL);
    E[g_config]   = sum_y q(y) grad s_config(theta; y),  q = pi on-policy, mu off-policy,

where ``s_config`` is the per-sample surrogate that a trainer using
:func:`llm_rl.kl.kl_penalty` differentiates: the policy-gradient part of the reward
placement, ``w(y) * reward_penalty(y) * log pi(y)`` (w = stop_grad(pi(y)/mu(y)) off-policy,
1 on-policy), plus the penalty's ``loss``. The oracle calls the library's own ``kl_penalty``,
so it checks the code users run, not a copy of its formula.

:func:`analyze` reports bias (norm of E[g] - grad(beta KL), relative to |grad|, cosine) and
the exact per-sample variance E|g - E g|^2; :func:`sampled_moments` estimates the same by
Monte Carlo for comparison. ``python -m llm_rl.kl.oracle`` prints the table of every
estimator x placement x normalization.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from llm_rl.kl import ESTIMATORS, NORMALIZATIONS, PLACEMENTS, kl_penalty


@dataclasses.dataclass(frozen=True)
class TinyPolicySpace:
    """All responses of a tiny autoregressive policy, padded to ``horizon``."""

    vocab: int = 3
    horizon: int = 3

    def __post_init__(self):
        if self.vocab < 2 or self.horizon < 1:
            raise ValueError(f"need vocab >= 2 and horizon >= 1, got {self.vocab}, {self.horizon}")

    @property
    def param_shape(self) -> tuple[int, int, int]:
        return (self.horizon, self.vocab + 1, self.vocab)  # [t, previous token or BOS, next]

    def enumerate(self) -> tuple[np.ndarray, np.ndarray]:
        """tokens [N, H] int32 and mask [N, H]: every distinct response once."""
        seen, tokens, masks = set(), [], []
        for seq in itertools.product(range(self.vocab), repeat=self.horizon):
            length = seq.index(0) + 1 if 0 in seq else self.horizon
            key = seq[:length]
            if key in seen:
                continue
            seen.add(key)
            tokens.append(list(key) + [0] * (self.horizon - length))
            masks.append([1.0] * length + [0.0] * (self.horizon - length))
        return np.asarray(tokens, np.int32), np.asarray(masks, np.float32)

    def init(self, key: jax.Array, scale: float = 1.0) -> jax.Array:
        return scale * jax.random.normal(key, self.param_shape)

    def token_logprobs(self, theta: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """log pi(y_t | y_<t) for [N, H] tokens, 0 where mask is 0."""
        prev = jnp.concatenate([jnp.full(tokens.shape[:-1] + (1,), self.vocab), tokens[..., :-1]], -1)
        logits = theta[jnp.arange(self.horizon), prev]  # [N, H, V]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
        return logp * mask

    def sequence_probs(self, theta: jax.Array, tokens, mask) -> jax.Array:
        return jnp.exp(jnp.sum(self.token_logprobs(theta, tokens, mask), -1))


def exact_kl(space: TinyPolicySpace, theta: jax.Array, ref_theta: jax.Array) -> jax.Array:
    tokens, mask = space.enumerate()
    logp = space.token_logprobs(theta, tokens, mask)
    ref = space.token_logprobs(ref_theta, tokens, mask)
    return jnp.sum(jnp.exp(jnp.sum(logp, -1)) * jnp.sum(logp - ref, -1))


def true_gradient(space: TinyPolicySpace, theta, ref_theta, beta: float = 1.0) -> jax.Array:
    """grad_theta of beta * KL(pi_theta || pi_ref), exactly."""
    return jax.grad(lambda th: beta * exact_kl(space, th, ref_theta))(theta)


@dataclasses.dataclass(frozen=True)
class KLConfig:
    estimator: str
    placement: str
    normalization: str = "sum"
    rho_truncation: float | None = None

    @property
    def name(self) -> str:
        return f"{self.estimator}-{self.placement}-{self.normalization}"


def per_sample_gradients(space: TinyPolicySpace, config: KLConfig, theta, ref_theta, *,
                         beta: float = 1.0, behavior_theta=None) -> tuple[jax.Array, jax.Array]:
    """Gradient of the per-sample surrogate for every enumerated response, and the weight
    (probability under the sampling policy) of each: ([N, *param_shape], [N])."""
    tokens, mask = space.enumerate()
    off_policy = behavior_theta is not None
    sampler = behavior_theta if off_policy else theta

    def surrogate(th, tok, m):
        tok, m = tok[None], m[None]
        logp = space.token_logprobs(th, tok, m)
        ref = space.token_logprobs(ref_theta, tok, m)
        behavior = space.token_logprobs(behavior_theta, tok, m) if off_policy else None
        pen = kl_penalty(logp, ref, m, estimator=config.estimator, placement=config.placement,
                         beta=beta, normalization=config.normalization, behavior_logp=behavior,
                         rho_truncation=config.rho_truncation)
        seq_logp = jnp.sum(logp)
        weight = jax.lax.stop_gradient(jnp.exp(seq_logp - jnp.sum(behavior))) if off_policy else 1.0
        # A policy-gradient trainer maximises (R - reward_penalty) * log pi: the KL part of its
        # loss is +reward_penalty * log pi (importance-weighted when off-policy).
        return weight * pen.reward[0] * seq_logp + pen.loss

    grads = jax.vmap(jax.grad(surrogate), in_axes=(None, 0, 0))(theta, tokens, mask)
    weights = space.sequence_probs(sampler, tokens, mask)
    return grads, weights


def analyze(space: TinyPolicySpace, config: KLConfig, theta, ref_theta, *, beta: float = 1.0,
            behavior_theta=None) -> dict[str, float]:
    """Exact bias and variance of a configuration's gradient estimator (one sample)."""
    grads, weights = per_sample_gradients(space, config, theta, ref_theta, beta=beta,
                                          behavior_theta=behavior_theta)
    flat = grads.reshape(grads.shape[0], -1)
    expected = jnp.einsum("n,np->p", weights, flat)
    true = true_gradient(space, theta, ref_theta, beta).reshape(-1)
    diff = expected - true
    true_norm = jnp.linalg.norm(true)
    exp_norm = jnp.linalg.norm(expected)
    cosine = jnp.where(exp_norm > 1e-12, jnp.dot(expected, true) / (exp_norm * true_norm + 1e-30),
                       jnp.nan)
    variance = jnp.einsum("n,n->", weights, jnp.sum((flat - expected) ** 2, -1))
    return {"bias_norm": float(jnp.linalg.norm(diff)), "relative_bias": float(jnp.linalg.norm(diff) / true_norm),
            "cosine": float(cosine), "expected_norm": float(exp_norm), "true_norm": float(true_norm),
            "variance": float(variance)}


def sampled_moments(space: TinyPolicySpace, config: KLConfig, theta, ref_theta, key: jax.Array,
                    num_samples: int, *, beta: float = 1.0, behavior_theta=None
                    ) -> tuple[jax.Array, jax.Array]:
    """Monte Carlo mean gradient and per-sample variance from ``num_samples`` draws."""
    grads, weights = per_sample_gradients(space, config, theta, ref_theta, beta=beta,
                                          behavior_theta=behavior_theta)
    idx = jax.random.choice(key, weights.shape[0], (num_samples,), p=weights / weights.sum())
    sample = grads[idx].reshape(num_samples, -1)
    mean = sample.mean(0)
    return mean, jnp.sum(jnp.var(sample, axis=0, ddof=1))


def all_configs(normalizations=NORMALIZATIONS) -> list[KLConfig]:
    return [KLConfig(e, p, n) for e in ESTIMATORS for p in PLACEMENTS if p != "none"
            for n in normalizations]


def default_problem(seed: int = 0, vocab: int = 3, horizon: int = 3, scale: float = 1.0):
    space = TinyPolicySpace(vocab, horizon)
    k_theta, k_ref, k_old = jax.random.split(jax.random.key(seed), 3)
    theta = space.init(k_theta, scale)
    ref = space.init(k_ref, scale)
    behavior = theta + 0.5 * space.init(k_old, scale)  # an older, nearby policy
    return space, theta, ref, behavior


def table(seed: int = 0, vocab: int = 3, horizon: int = 3, off_policy: bool = False) -> str:
    """Markdown table of every configuration on the default problem."""
    space, theta, ref, behavior = default_problem(seed, vocab, horizon)
    rows = ["| estimator | placement | normalization | relative bias | cosine to grad KL | variance |",
            "|---|---|---|---|---|---|"]
    for cfg in all_configs():
        if off_policy and cfg.placement == "both":
            continue  # refused by kl_penalty: it would double-count the score term
        r = analyze(space, cfg, theta, ref, behavior_theta=behavior if off_policy else None)
        cos = "n/a (E[g] = 0)" if np.isnan(r["cosine"]) else f"{r['cosine']:.4f}"
        rows.append(f"| {cfg.estimator} | {cfg.placement} | {cfg.normalization} | "
                    f"{r['relative_bias']:.2e} | {cos} | {r['variance']:.4g} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="exact bias/variance of every KL configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=3)
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--off-policy", action="store_true")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    print(table(args.seed, args.vocab, args.horizon, args.off_policy))


if __name__ == "__main__":
    main()
