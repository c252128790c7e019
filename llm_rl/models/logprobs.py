"""Per-token log-probabilities of a sequence under a causal LM."""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp


def token_logprobs(model_or_logits_fn: Callable[..., jax.Array] | jax.Array, tokens: jax.Array,
                   mask: jax.Array) -> jax.Array:
    """``out[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])`` for ``t = 0 .. T-2``, shape [B, T-1].

    Shift convention: the logits at position ``t`` predict the token at ``t + 1``, so entry
    ``t`` scores ``tokens[:, t+1]``; the first token has no entry. ``out[b, t]`` is set to 0
    unless both the context position and the target are real tokens,
    ``mask[b, t] == mask[b, t+1] == 1`` (with left padding this drops the first real token,
    which has no context; with right padding, everything after the end).

    ``model_or_logits_fn`` is called as ``fn(tokens, mask)`` and returns logits [B, T, V] (a
    :class:`~llm_rl.models.layers.CausalLM` does); an array of logits is used as is. The log
    softmax is taken in float32, stably: ``logits[target] - logsumexp(logits)`` with the max
    subtracted inside ``logsumexp``.
    """
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    logits = model_or_logits_fn if isinstance(model_or_logits_fn, jax.Array) else \
        model_or_logits_fn(tokens, mask)
    chex.assert_rank(logits, 3)
    chex.assert_shape(logits, (*tokens.shape, None))
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:].astype(jnp.int32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    return jnp.where(valid, logp, 0.0)
