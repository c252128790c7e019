"""Absorbing-state (masked) discrete diffusion over token sequences, MDLM formulation.

Sahoo, Arriola, Schiff, Gokaslan, Marroquin, Chiu, Rush, Kuleshov (2024), "Simple and Effective
Masked Diffusion Language Models" (MDLM), arXiv 2406.07524. Used here to generate Discrete Latent
Codes (:mod:`generative.dlc`) unconditionally, or after a conditioning prefix (text-to-code).

Tokens are ``0..V-1`` plus one absorbing mask token ``m = mask_id`` (the model's input
vocabulary has ``K = V + 1`` entries; its output logits are over the same ``K``).

Forward process (MDLM eq. 2, Sec. 3.1): each position is masked independently::

    q(z_t^l | x^l) = Cat(z_t^l; alpha_t x^l + (1 - alpha_t) m),   alpha_t = 1 - t,  t in [0, 1]

(the log-linear schedule ``sigma(t) = -log(1 - t)``, ``alpha_t = exp(-sigma(t))``), so at time
``t`` a token is masked with probability ``t`` (:func:`mask_tokens`).

SUBS parameterisation (MDLM Sec. 3.2.3): the denoiser ``x_theta(z_t, t)`` is a distribution
over the ``V`` real tokens at every position, with (i) *zero masking probability*: the mask
token's logit is set to ``-inf`` before the softmax, and (ii) *carry-over unmasking*: at an
unmasked position ``x_theta^l = z_t^l`` (one-hot), whatever the network says
(:func:`subs_log_probs`).

Loss: the continuous-time negative ELBO (MDLM eq. 10-11)::

    NELBO(x) = E_{t ~ U[0,1]} E_{z_t ~ q(.|x)} [ alpha'_t / (1 - alpha_t)
                 sum_{l : z_t^l = m} log <x_theta^l(z_t, t), x^l> ]
             = E_t E_{z_t} [ (1/t) sum_{l : z_t^l = m} -log x_theta^l(z_t, t)[x^l] ]

for ``alpha_t = 1 - t`` (``alpha'_t = -1``): a masked cross-entropy weighted by ``1/t``
(:func:`nelbo_weight`, :func:`nelbo_terms`, :func:`diffusion_loss`). Enumerating mask patterns
gives a closed form used by the tests: with ``k = |M|`` masked positions,
``int_0^1 t^{k-1} (1-t)^{L-k} dt = B(k, L-k+1)``, so
``NELBO(x) = sum_{M != {}} B(|M|, L-|M|+1) sum_{l in M} -log x_theta^l(x_{~M})[x^l]``; with
the true conditionals of the data as denoiser this is the any-order chain rule averaged over
orders, i.e. ``E_x NELBO(x) = H(data)`` exactly.

Ancestral sampler (MDLM eq. 7 with SUBS; :func:`sample`): from time ``t`` to ``s < t``, a
masked position stays masked with probability ``(1 - alpha_s)/(1 - alpha_t) = s/t`` and
otherwise becomes a token drawn from ``x_theta^l(z_t, t)``; unmasked positions never change.
The last step goes to ``s = 0``, so no mask remains.

Why MDLM rather than SEDD (the DLC paper's code uses SEDD-absorb): both are the same
absorbing-state forward process; MDLM's objective is a Rao-Blackwellised, closed-form
weighted cross-entropy with the exact reverse posterior (MDLM reports matched or better
perplexity than SEDD-absorb on LM1B and OpenWebText), needs no score-entropy or ratio
parameterisation, and its sampler is plain ancestral sampling of one categorical per position.
Its NELBO also has the exact closed form above, which the tests check against.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

# A finite stand-in for -inf (MDLM uses -1e6): keeps gradients and softmaxes free of NaN.
NEG_INF = -1e6

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``denoise_fn(z_t [B, L] int32, t [B] float) -> logits [B, L, K]`` (``K = V + 1``)."""


# --- schedule ----------------------------------------------------------------------------------


def alpha(t: jax.Array) -> jax.Array:
    """``alpha_t = 1 - t``: probability that a token is still unmasked at time ``t``
    (the log-linear schedule ``alpha_t = exp(-sigma(t))``, ``sigma(t) = -log(1 - t)``)."""
    return 1.0 - t


def nelbo_weight(t: jax.Array) -> jax.Array:
    """``-alpha'_t / (1 - alpha_t) = 1/t`` for ``alpha_t = 1 - t`` (MDLM eq. 10-11)."""
    return 1.0 / t


def sample_times(key: jax.Array, batch_size: int, t_min: float = 1e-3,
                 antithetic: bool = True) -> jax.Array:
    """Times ``t ~ U[t_min, 1]`` for a batch. ``antithetic``: low-discrepancy stratified times
    ``t_b = t_min + (1 - t_min)((u + b/B) mod 1)`` with one shared ``u`` (MDLM's variance
    reduction). ``t_min`` (MDLM's ``sampling_eps``) bounds the ``1/t`` weight."""
    u = jax.random.uniform(key, (1 if antithetic else batch_size,))
    if antithetic:
        u = jnp.mod(u + jnp.arange(batch_size) / batch_size, 1.0)
    return t_min + (1.0 - t_min) * u


# --- forward process and SUBS ------------------------------------------------------------------


def mask_tokens(key: jax.Array, x0: jax.Array, t: jax.Array, mask_id: int,
                maskable: jax.Array | None = None) -> jax.Array:
    """Sample ``z_t ~ q(. | x0)``: each (maskable) position becomes ``mask_id`` with
    probability ``1 - alpha_t = t``, independently.

    Args:
      key: PRNG key.
      x0: int ``[B, L]`` clean tokens.
      t: ``[B]`` times (or a scalar).
      mask_id: the absorbing token.
      maskable: optional bool ``[B, L]`` or ``[L]``; False positions (a conditioning prefix)
        are never masked.
    Returns:
      int32 ``[B, L]``.
    """
    chex.assert_rank(x0, 2)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x0.shape[:1])
    move = jax.random.uniform(key, x0.shape) < (1.0 - alpha(t))[:, None]
    if maskable is not None:
        move = move & jnp.broadcast_to(maskable, x0.shape)
    return jnp.where(move, mask_id, x0).astype(jnp.int32)


def subs_log_probs(logits: jax.Array, z_t: jax.Array, mask_id: int) -> jax.Array:
    """SUBS parameterisation (MDLM Sec. 3.2.3) as log-probabilities ``[B, L, K]``.

    Zero masking probability: ``logits[..., mask_id] = -inf`` then log-softmax. Carry-over
    unmasking: where ``z_t^l != mask_id`` the row is the one-hot of ``z_t^l`` (log-prob 0 on it,
    ``-inf`` elsewhere). ``-inf`` is :data:`NEG_INF`."""
    chex.assert_rank(logits, 3)
    chex.assert_rank(z_t, 2)
    chex.assert_equal_shape_prefix([logits, z_t], 2)
    k = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    is_mask_col = jnp.arange(k) == mask_id
    logp = jax.nn.log_softmax(jnp.where(is_mask_col, NEG_INF, logits), axis=-1)
    carry = jnp.where(jax.nn.one_hot(z_t, k, dtype=bool), 0.0, NEG_INF)
    return jnp.where((z_t == mask_id)[..., None], logp, carry)


# --- loss --------------------------------------------------------------------------------------


def nelbo_terms(logits: jax.Array, x0: jax.Array, z_t: jax.Array, t: jax.Array,
                mask_id: int) -> jax.Array:
    """Per-sequence integrand of the NELBO at one ``(t, z_t)`` (MDLM eq. 11)::

        (1/t) sum_{l : z_t^l = m} -log x_theta^l(z_t, t)[x0^l]

    Args:
      logits: ``[B, L, K]`` network output at ``(z_t, t)``.
      x0: int ``[B, L]`` clean tokens; z_t: int ``[B, L]`` their masked version; t: ``[B]``.
    Returns:
      ``[B]``.
    """
    chex.assert_equal_shape([x0, z_t])
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x0.shape[:1])
    logp = subs_log_probs(logits, z_t, mask_id)
    nll = -jnp.take_along_axis(logp, x0[..., None].astype(jnp.int32), axis=-1)[..., 0]
    masked = (z_t == mask_id).astype(jnp.float32)
    return nelbo_weight(t) * jnp.sum(nll * masked, axis=-1)


def diffusion_loss(key: jax.Array, denoise_fn: DenoiseFn, x0: jax.Array, mask_id: int, *,
                   t_min: float = 1e-3, antithetic: bool = True,
                   maskable: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Monte-Carlo NELBO of a batch: one ``t`` (:func:`sample_times`) and one ``z_t`` per
    sequence, :func:`nelbo_terms` averaged.

    Returns ``(loss, aux)``: ``loss`` is the NELBO per (maskable) token in nats, i.e.
    ``mean_b NELBO_b / L_maskable``; ``aux`` has ``nelbo`` (per sequence, ``[B]``), ``t`` and
    ``mask_rate``."""
    chex.assert_rank(x0, 2)
    k_t, k_mask = jax.random.split(key)
    t = sample_times(k_t, x0.shape[0], t_min, antithetic)
    z_t = mask_tokens(k_mask, x0, t, mask_id, maskable)
    logits = denoise_fn(z_t, t)
    nelbo = nelbo_terms(logits, x0, z_t, t, mask_id)
    n_tokens = (x0.shape[1] if maskable is None
                else jnp.sum(jnp.broadcast_to(maskable, x0.shape), axis=-1))
    loss = jnp.mean(nelbo / n_tokens)
    return loss, {"nelbo": nelbo, "t": t, "mask_rate": jnp.mean(z_t == mask_id)}


# --- sampler -----------------------------------------------------------------------------------


def reverse_step(key: jax.Array, logits: jax.Array, z_t: jax.Array, t: jax.Array,
                 s: jax.Array, mask_id: int, temperature: float | jax.Array = 1.0) -> jax.Array:
    """One ancestral step ``z_t -> z_s`` (``s < t``, MDLM eq. 7 with SUBS).

    A masked position unmasks with probability ``(alpha_s - alpha_t)/(1 - alpha_t) = (t-s)/t``,
    to a token drawn from ``softmax(logits/temperature)`` restricted to the ``V`` real tokens;
    otherwise it stays masked. Unmasked positions are copied (carry-over)."""
    chex.assert_rank(logits, 3)
    k_unmask, k_tok = jax.random.split(key)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z_t.shape[:1])[:, None]
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), z_t.shape[:1])[:, None]
    p_unmask = (alpha(s) - alpha(t)) / (1.0 - alpha(t))
    unmask = jax.random.uniform(k_unmask, z_t.shape) < p_unmask
    is_mask_col = jnp.arange(logits.shape[-1]) == mask_id
    token_logits = jnp.where(is_mask_col, NEG_INF, logits.astype(jnp.float32) / temperature)
    drawn = jax.random.categorical(k_tok, token_logits, axis=-1).astype(jnp.int32)
    return jnp.where((z_t == mask_id) & unmask, drawn, z_t).astype(jnp.int32)


def sample(key: jax.Array, denoise_fn: DenoiseFn, L: int, steps: int, mask_id: int, *,
           batch_size: int = 1, prefix: jax.Array | None = None,
           temperature: float | jax.Array = 1.0, return_trajectory: bool = False):
    """Ancestral sampling of ``batch_size`` sequences of ``L`` tokens in ``steps`` steps.

    Starts from all-mask at ``t = 1`` and steps through ``t_k = 1 - k/steps`` down to 0 with
    :func:`reverse_step` (one ``denoise_fn`` call per step, in a ``lax.scan``).

    Args:
      key: PRNG key.
      denoise_fn: ``(z [B, P+L], t [B]) -> logits [B, P+L, K]``.
      L: number of tokens to generate.
      steps: number of reverse steps (>= 1).
      mask_id: the absorbing token.
      batch_size: sequences to draw.
      prefix: optional int ``[P]`` or ``[B, P]`` conditioning tokens placed before the ``L``
        generated ones; they are never masked, so never change, and the denoiser sees them.
      temperature: softmax temperature of the token draws.
      return_trajectory: also return the ``[steps + 1, B, P + L]`` states (``z_1 ... z_0``).
    Returns:
      int32 ``[B, L]`` (the generated part), and the trajectory if asked.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if prefix is None:
        prefix = jnp.zeros((batch_size, 0), jnp.int32)
    prefix = jnp.broadcast_to(jnp.asarray(prefix, jnp.int32),
                              (batch_size, jnp.shape(prefix)[-1]))
    z = jnp.concatenate([prefix, jnp.full((batch_size, L), mask_id, jnp.int32)], axis=1)
    times = 1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / steps

    def body(z, inputs):
        k, t, s = inputs
        t_b = jnp.full((batch_size,), t)
        z = reverse_step(k, denoise_fn(z, t_b), z, t, s, mask_id, temperature)
        return z, z

    keys = jax.random.split(key, steps)
    z, traj = jax.lax.scan(body, z, (keys, times[:-1], times[1:]))
    out = z[:, prefix.shape[1]:]
    if return_trajectory:
        full = jnp.concatenate([jnp.concatenate(
            [prefix, jnp.full((batch_size, L), mask_id, jnp.int32)], 1)[None], traj], axis=0)
        return out, full
    return out
