"""Batched, jitted sampling from the LM zoo with a KV cache.

    out = generate(model, prompt_ids, prompt_mask, key, max_new_tokens=64, temperature=1.0,
                   top_k=None, top_p=None, greedy=False, eos_ids=(2,), pad_id=0)
    out.tokens [B, N], out.logprobs [B, N], out.mask [B, N], out.lengths [B]

Prompts are left-padded (``prompt_mask`` 1 on real tokens), so every row's last prompt token
sits in the last column and all rows decode in lockstep. Positions count real tokens only
(``cumsum(mask) - 1``), as in training. The cache holds keys/values for ``P + N`` slots;
prefill writes the whole prompt in one call, then each decoding step writes one slot.

KV cache: one array per keys/values of shape [L, B, K, S, H] (layers, batch, key/value heads,
slots, head dim), head-major so that attention's dots see their batch dims (b, k) leading and
the contracted head dim last: no transposed copy of the cache is made per step. Each layer
writes its new keys/values with one ``dynamic_update_slice`` into the whole array, which XLA
does in place (benchmarks/RESULTS.md measured ~20% per step for in-place and another ~16% for
head-major over the old slice-and-restack [L, B, S, K, H] cache).

Prompt-length buckets: ``generate`` left-pads the prompt columns (mask 0) to
``bucket_width(P) = max(16, 2 ** ceil(log2(P)))`` before the jitted call, so all prompt widths
in (2^(j-1), 2^j] share one compilation (per batch size, ``max_new_tokens`` and setting).
Padding is invisible to the result: padded slots are masked keys (exact zeros in the
softmax) and positions count real tokens only. ``bucket=False`` compiles per exact width.

Sampling distribution, per step: logits / temperature, then top-k (keep the k largest), then
top-p (keep the smallest set of most likely tokens whose probability reaches p); a token is
drawn from the renormalised result and ``logprobs`` holds its log-probability under exactly
that distribution (what PPO's old-policy ratio needs). With ``greedy=True`` the argmax of the
raw logits is taken and ``logprobs`` is the log-softmax of the raw logits at that token.

Random streams: by default step ``t`` draws every row's token from ``fold_in(key, t)`` (one
draw over the batch). With ``row_ids`` (an int per row), row ``i`` draws from
``fold_in(fold_in(key, t), row_ids[i])``: a row's tokens then do not depend on which other rows
share its batch, so a batch can be divided among processes, each sampling its rows under their
indices in the whole batch, and give the tokens one process sampling all of it would
(:func:`llm_rl.rl.rollout` does this).

After a row emits an EOS id it is finished: later tokens are ``pad_id`` with mask 0 (the EOS
itself has mask 1). Decoding stops early once every row has finished.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_rl.models.layers import causal_padding_mask, default_positions
from trainkit.nn.layers import attend_cache


class GenerationOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad_id after EOS
    logprobs: jax.Array  # [B, N] float32, 0 where mask is 0
    mask: jax.Array  # [B, N] int32, 1 up to and including EOS
    lengths: jax.Array  # [B] number of generated tokens (incl. EOS)


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array


def init_cache(cfg, batch: int, slots: int, dtype: Any) -> KVCache:
    """Zeroed head-major cache [L, B, K, S, H] for ``slots`` positions."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def bucket_width(p: int) -> int:
    """Padded prompt width: ``max(16, 2 ** ceil(log2(p)))`` (see the module docstring)."""
    return max(16, 1 << max(int(p) - 1, 0).bit_length())


def forward_cached(model, ids: jax.Array, positions: jax.Array, key_mask: jax.Array,
                   cache: KVCache, write_index: jax.Array) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (float32) for ``ids`` [B, T] written at cache slots
    ``write_index .. write_index + T - 1``; queries attend to cache slots ``<= their own`` that
    ``key_mask`` [B, S] marks as real. Same layers as ``model(...)``, so outputs match it.
    Prefill is this call with the whole prompt (T = P, ``write_index`` 0); a decoding step is
    T = 1."""
    decoder = model.model
    mask = causal_padding_mask(key_mask, ids.shape[1], write_index)
    x = decoder.embed_tokens(ids.astype(jnp.int32))
    ck, cv = cache.k, cache.v
    zero = jnp.zeros((), jnp.int32)
    w = jnp.asarray(write_index, jnp.int32)
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), positions)
        # One in-place update of the whole cache per layer (slicing layers out and stacking
        # them back rebuilt the full cache every token).
        at = (jnp.int32(i), zero, zero, w, zero)
        ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3)[None].astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3)[None].astype(cv.dtype), at)
        x = x + attn.o_proj(attend_cache(q, ck[i], cv[i], mask))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = decoder.norm(x)
    logits = decoder.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h, out_dtype=jnp.float32)
    return logits, KVCache(ck, cv)


def process_logits(logits: jax.Array, temperature: float, top_k: int | None,
                   top_p: float | None) -> jax.Array:
    """Log-probabilities [B, V] of the sampling distribution (masked tokens at -inf)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logp, axis=-1)
        sorted_logp = jnp.take_along_axis(logp, order, axis=-1)
        mass_before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)
        keep_sorted = mass_before < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logp.shape[0])[:, None], order].set(keep_sorted)
        logp = jax.nn.log_softmax(jnp.where(keep, logp, -jnp.inf), axis=-1)
    return logp


def _check(temperature, top_k, top_p, max_new_tokens):
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy=True for argmax)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")


def generate(model, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, eos_ids: Sequence[int] = (),
             pad_id: int = 0, bucket: bool = True,
             row_ids: Sequence[int] | np.ndarray | None = None) -> GenerationOutput:
    """Sample continuations of left-padded prompts (see the module docstring). ``model`` is a
    :class:`~llm_rl.models.layers.CausalLM`; the work runs in one jitted function of its
    parameters, compiled once per batch size, prompt bucket (:func:`bucket_width`; the exact
    width with ``bucket=False``), ``max_new_tokens`` and setting. ``row_ids``: one random
    stream per row (module docstring)."""
    _check(temperature, top_k, top_p, max_new_tokens)
    graphdef, params = nnx.split(model)
    # Padded on the host (numpy): an eager jnp.pad would itself compile once per width.
    prompt_ids = np.asarray(prompt_ids, np.int32)
    prompt_mask = np.asarray(prompt_mask, np.int32)
    chex.assert_rank([prompt_ids, prompt_mask], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    if bucket:
        extra = ((0, 0), (bucket_width(prompt_ids.shape[1]) - prompt_ids.shape[1], 0))
        prompt_ids = np.pad(prompt_ids, extra, constant_values=int(pad_id))
        prompt_mask = np.pad(prompt_mask, extra)
    per_row = row_ids is not None
    if per_row:
        row_ids = np.asarray(row_ids, np.int32)
        if row_ids.shape != prompt_ids.shape[:1]:
            raise ValueError(f"row_ids has shape {row_ids.shape}; one id per prompt row "
                             f"({prompt_ids.shape[0]}) is needed")
    else:
        row_ids = np.zeros(prompt_ids.shape[:1], np.int32)  # unused
    return _generate(graphdef, params, prompt_ids, prompt_mask, key, row_ids, max_new_tokens,
                     float(temperature), top_k, top_p, bool(greedy),
                     tuple(int(e) for e in eos_ids), int(pad_id), per_row)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10, 11, 12, 13))
def _generate(graphdef, params, prompt_ids, prompt_mask, key, row_ids, max_new_tokens, temperature,
              top_k, top_p, greedy, eos_ids, pad_id, per_row) -> GenerationOutput:
    model = nnx.merge(graphdef, params)
    b, p = prompt_ids.shape
    n = max_new_tokens
    dtype = model.model.embed_tokens.embedding[...].dtype
    cache = init_cache(model.config, b, p + n, dtype)
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((b, n), jnp.int32)], axis=1)
    positions = default_positions(prompt_mask)
    logits, cache = forward_cached(model, prompt_ids, positions, key_mask, cache, 0)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits_last, step_key):
        if greedy:
            token = jnp.argmax(logits_last, axis=-1).astype(jnp.int32)
            logp_all = jax.nn.log_softmax(logits_last.astype(jnp.float32), axis=-1)
        else:
            logp_all = process_logits(logits_last, temperature, top_k, top_p)
            if per_row:  # each row its own stream, whatever else is in the batch
                keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_ids)
                token = jax.vmap(jax.random.categorical)(keys, logp_all).astype(jnp.int32)
            else:
                token = jax.random.categorical(step_key, logp_all, axis=-1).astype(jnp.int32)
        return token, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]

    class Carry(NamedTuple):
        t: jax.Array
        logits_last: jax.Array
        cache: KVCache
        position: jax.Array  # [B] position of the next token
        done: jax.Array  # [B] finished before this step
        tokens: jax.Array
        logprobs: jax.Array
        mask: jax.Array

    def step(c: Carry) -> Carry:
        token, logp = pick(c.logits_last, jax.random.fold_in(key, c.t))
        live = jnp.logical_not(c.done)
        token = jnp.where(live, token, pad_id)
        tokens = c.tokens.at[:, c.t].set(token)
        logprobs = c.logprobs.at[:, c.t].set(jnp.where(live, logp, 0.0))
        mask = c.mask.at[:, c.t].set(live.astype(jnp.int32))
        done = c.done | (live & jnp.isin(token, eos))
        logits_next, cache = forward_cached(model, token[:, None], c.position[:, None], key_mask,
                                            c.cache, p + c.t)
        return Carry(c.t + 1, logits_next[:, -1], cache, c.position + 1, done, tokens, logprobs, mask)

    init = Carry(jnp.zeros((), jnp.int32), logits[:, -1], cache, positions[:, -1] + 1,
                 jnp.zeros((b,), bool), jnp.full((b, n), pad_id, jnp.int32),
                 jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.int32))
    final = jax.lax.while_loop(lambda c: (c.t < n) & jnp.logical_not(jnp.all(c.done)), step, init)
    return GenerationOutput(final.tokens, final.logprobs, final.mask, final.mask.sum(axis=1))
