"""Discrete Latent Codes: tokens from SEM outputs, composition, sampling (pure functions).

Lavoie, Noukhovitch, Courville (2025), "Compositional Discrete Latent Code for High Fidelity,
Productive Diffusion Models", arXiv 2507.12318. An image's DLC is a sequence of ``L`` tokens in
``{0..V-1}``: the argmax of each group of its SEM embedding (:mod:`generative.sem`)::

    T_i = argmax_v z_{i v},   i = 1..L

(the same for the pre-softmax ``z`` and for ``SEM(z)`` at any temperature ``tau > 0``).
Composition (Sec. 3, "compositional DLC"): encode ``N`` images, average their per-position
token distributions ``p^{(n)}_i = SEM(z^{(n)})_i`` with weights ``w_n`` (sum 1)::

    p_i = sum_n w_n p^{(n)}_i

and sample a new code ``T_i ~ Cat(p_i)`` independently per position (with an optional
temperature), which the image generator then decodes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def tokens(z: jax.Array) -> jax.Array:
    """``T_i = argmax_v z_{i v}``: int32 ``[..., L]`` from ``[..., L, V]`` SEM logits or
    probabilities (ties go to the smallest index)."""
    chex.assert_rank(z, {2, 3, 4})
    return jnp.argmax(z, axis=-1).astype(jnp.int32)


def token_distribution(z: jax.Array, tau: float | jax.Array = 1.0) -> jax.Array:
    """Per-position token distribution ``softmax(z_i / tau)`` of ``[..., L, V]`` SEM logits
    (the SEM output itself; use it for :func:`compose`)."""
    chex.assert_rank(z, {2, 3, 4})
    return jax.nn.softmax(z / tau, axis=-1)


def compose(dists: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``p_i = sum_n w_n p^{(n)}_i``: the weighted average of ``N`` codes' distributions.

    Args:
      dists: ``[N, L, V]`` per-position distributions (rows on the simplex).
      weights: ``[N]`` non-negative mixing weights (normalised here); uniform if None.
    Returns:
      ``[L, V]``, rows on the simplex.
    """
    chex.assert_rank(dists, 3)
    n = dists.shape[0]
    if weights is None:
        weights = jnp.full((n,), 1.0 / n, dists.dtype)
    chex.assert_shape(weights, (n,))
    weights = weights / jnp.sum(weights)
    return jnp.einsum("n,nlv->lv", weights, dists)


def sample_code(key: jax.Array, dist: jax.Array, temperature: float | jax.Array = 1.0,
                num_samples: int | None = None) -> jax.Array:
    """Sample ``T_i ~ Cat(p_i^{1/temperature} / Z)`` independently per position.

    Args:
      key: PRNG key.
      dist: ``[L, V]`` distributions. ``temperature -> 0`` gives the argmax code, 1 samples
        ``dist`` itself.
      num_samples: draw ``[num_samples, L]`` codes instead of one ``[L]`` code.
    Returns:
      int32 ``[L]`` (or ``[num_samples, L]``).
    """
    chex.assert_rank(dist, 2)
    logits = jnp.log(jnp.maximum(dist, jnp.finfo(dist.dtype).tiny)) / temperature
    shape = dist.shape[:1] if num_samples is None else (num_samples, dist.shape[0])
    return jax.random.categorical(key, logits, axis=-1, shape=shape).astype(jnp.int32)
