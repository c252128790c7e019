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

Text-to-code (Sec. 4 of the paper) puts a caption before the code as a never-masked prefix of
the code generator: :func:`caption_vocabulary`, :func:`encode_captions` and
:func:`decode_captions` turn captions into prefix ids after the code and mask tokens.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


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


# --- captions as prefix tokens (text-to-code) ----------------------------------------------------

CAPTION_PAD = "<pad>"


def caption_words(caption: str) -> list[str]:
    """The words of a caption: lower-cased, split on white space (the shapes captions,
    :func:`generative.datasets.shape_caption`, have no punctuation)."""
    return str(caption).lower().split()


def caption_vocabulary(captions) -> tuple[str, ...]:
    """The word list of a caption tokenizer: :data:`CAPTION_PAD` first, then every distinct
    word of ``captions`` in sorted order (so the ids do not depend on the order of the
    captions). Word ``j`` of the list gets id ``offset + j`` (:func:`encode_captions`)."""
    words = sorted({w for c in captions for w in caption_words(c)} - {CAPTION_PAD})
    if not words:
        raise ValueError("captions has no words; pass at least one non-empty caption")
    return (CAPTION_PAD, *words)


def encode_captions(captions, vocab: tuple[str, ...], length: int, offset: int = 0) -> np.ndarray:
    """Word ids of each caption as a never-masked prefix: int32 ``[N, length]``.

    ``ids[n, k] = offset + vocab.index(word_k)`` for the ``k``-th word of caption ``n``, then
    ``offset + 0`` (:data:`CAPTION_PAD`) up to ``length``. For text-to-code with a
    :class:`generative.code_denoiser.CodeDenoiser` over ``V`` code tokens, ``offset = V + 1``:
    the ids come after the code tokens ``0..V-1`` and the mask token ``V`` (its
    ``extra_tokens = len(vocab)``).

    Raises ValueError naming the caption and the word when a word is not in ``vocab``, and
    when a caption has more than ``length`` words.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if not vocab or vocab[0] != CAPTION_PAD:
        raise ValueError(f"vocab must start with {CAPTION_PAD!r} (see caption_vocabulary)")
    index = {w: i for i, w in enumerate(vocab)}
    captions = [captions] if isinstance(captions, str) else list(captions)
    out = np.full((len(captions), length), offset, np.int32)
    for n, caption in enumerate(captions):
        words = caption_words(caption)
        if len(words) > length:
            raise ValueError(f"caption {caption!r} has {len(words)} words; length={length}")
        for k, w in enumerate(words):
            if w not in index or w == CAPTION_PAD:
                raise ValueError(f"caption {caption!r}: unknown word {w!r} (not in the "
                                 f"{len(vocab) - 1}-word vocabulary)")
            out[n, k] = offset + index[w]
    return out


def decode_captions(ids, vocab: tuple[str, ...], offset: int = 0) -> list[str]:
    """Inverse of :func:`encode_captions`: int ``[N, length]`` ids -> captions (padding
    dropped, words joined by one space). Raises ValueError for an id outside
    ``[offset, offset + len(vocab))``."""
    ids = np.atleast_2d(np.asarray(ids))
    if ids.ndim != 2:
        raise ValueError(f"ids must be [N, length]; got shape {ids.shape}")
    rel = ids.astype(np.int64) - offset
    if rel.size and (rel.min() < 0 or rel.max() >= len(vocab)):
        raise ValueError(f"ids must be in [{offset}, {offset + len(vocab) - 1}]; got values in "
                         f"[{ids.min()}, {ids.max()}]")
    return [" ".join(vocab[j] for j in row if j != 0) for row in rel]
