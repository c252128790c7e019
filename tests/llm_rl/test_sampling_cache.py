"""llm_rl.sampling's head-major KV cache and prompt buckets: cached logits equal a full
forward at every step, greedy tokens equal the previous [L, B, S, K, H] path, and prompt
widths inside one bucket share one compilation."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_rl.models import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from llm_rl.models.layers import causal_padding_mask, default_positions
from llm_rl.sampling import bucket_width, forward_cached, generate, init_cache

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def _model(family, **overrides):
    cfg_cls, cls = FAMILIES[family]
    cfg = cfg_cls.tiny(**overrides)
    return cls(cfg, rngs=nnx.Rngs(5)), cfg


def _prompts(vocab):
    ids = np.array([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7], [0, 0, 0, 0, 11]], np.int32) % vocab
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], np.int32)
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_logits_equal_a_full_forward_at_every_step(family):
    """Prefill the left-padded prompt in one call, then feed fixed tokens one at a time: the
    cached logits at every step equal the uncached forward over the whole sequence."""
    model, cfg = _model(family)
    ids, mask = _prompts(cfg.vocab_size)
    n = 5
    b, p = ids.shape
    follow = np.random.default_rng(0).integers(1, cfg.vocab_size, (b, n)).astype(np.int32)
    seq = np.concatenate([ids, follow], 1)
    seq_mask = np.concatenate([mask, np.ones_like(follow)], 1)
    full = model(jnp.asarray(seq), jnp.asarray(seq_mask))  # [B, P + N, V]
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda prm, t, pos, c, w: forward_cached(nnx.merge(graphdef, prm), t, pos,
                                                            jnp.asarray(seq_mask), c, w))
    cache = init_cache(cfg, b, p + n, jnp.float32)
    assert cache.k.shape == (cfg.num_hidden_layers, b, cfg.num_key_value_heads, p + n, cfg.head_dim)
    positions = np.asarray(default_positions(jnp.asarray(seq_mask)))
    logits, cache = step(params, ids, positions[:, :p], cache, 0)
    real = mask.astype(bool)  # logits at padded prompt slots are meaningless on both sides
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full[:, :p])[real], atol=2e-5)
    for t in range(n - 1):
        logits, cache = step(params, follow[:, t:t + 1], positions[:, p + t:p + t + 1], cache, p + t)
        np.testing.assert_allclose(logits[:, 0], full[:, p + t], atol=2e-5, err_msg=f"step {t}")


def _seq_major_forward(model, ids, positions, key_mask, ck, cv, w):
    """The previous library path, kept as the reference: cache [L, B, S, K, H], each layer's
    slice attended by trainkit's dot_product_attention (which transposes it)."""
    decoder = model.model
    mask = causal_padding_mask(key_mask, ids.shape[1], w)
    x = decoder.embed_tokens(ids)
    z = jnp.zeros((), jnp.int32)
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), positions)
        ck = jax.lax.dynamic_update_slice(ck, k[None], (jnp.int32(i), z, w, z, z))
        cv = jax.lax.dynamic_update_slice(cv, v[None], (jnp.int32(i), z, w, z, z))
        x = x + attn.attend(q, ck[i], cv[i], mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = decoder.norm(x)
    logits = decoder.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h)
    return logits[:, -1], ck, cv


def test_greedy_tokens_equal_the_previous_seq_major_path():
    model, cfg = _model("llama", tie_word_embeddings=True)
    ids, mask = _prompts(cfg.vocab_size)
    n = 6
    b, p = ids.shape
    graphdef, params = nnx.split(model)
    key_mask = jnp.asarray(np.concatenate([mask, np.ones((b, n), np.int32)], 1))
    fwd = jax.jit(lambda prm, *a: _seq_major_forward(nnx.merge(graphdef, prm), *a))
    shape = (cfg.num_hidden_layers, b, p + n, cfg.num_key_value_heads, cfg.head_dim)
    ck = cv = jnp.zeros(shape)
    pos = default_positions(jnp.asarray(mask))
    last, ck, cv = fwd(params, jnp.asarray(ids), pos, key_mask, ck, cv, jnp.int32(0))
    pos, old = pos[:, -1:] + 1, []
    for t in range(n):
        tok = jnp.argmax(last, -1).astype(jnp.int32)[:, None]
        old.append(np.asarray(tok[:, 0]))
        last, ck, cv = fwd(params, tok, pos, key_mask, ck, cv, jnp.int32(p + t))
        pos = pos + 1
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=n, greedy=True, bucket=False)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(old, 1))


def test_bucket_rule():
    assert [bucket_width(p) for p in (1, 5, 16, 17, 32, 33, 100)] == [16, 16, 16, 32, 32, 64, 128]


def _compiles(caplog, fn) -> int:
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        fn()
    return sum("XLA compilation of jit(_generate)" in r.getMessage() for r in caplog.records)


def test_prompt_buckets_share_one_compilation_and_give_the_same_tokens(caplog):
    """Widths 3, 9 and 16 share bucket 16 (one compilation); without buckets each width
    compiles; bucketed and exact-width calls sample the same tokens from the same key."""
    # A config no other test uses, so the first call is sure to compile.
    model, cfg = _model("qwen3", num_hidden_layers=1, vocab_size=97)
    rng = np.random.default_rng(1)
    prompts = {}
    for w in (3, 9, 16):
        ids = rng.integers(1, cfg.vocab_size, (2, w)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, :w // 2] = 0  # a left-padded row
        prompts[w] = (ids, mask)
    out = {}

    def run(widths, bucket):
        for w in widths:
            out[w, bucket] = generate(model, *prompts[w], jax.random.key(w), max_new_tokens=4,
                                      temperature=0.8, bucket=bucket)

    assert _compiles(caplog, lambda: run([3, 9, 16], True)) == 1
    assert _compiles(caplog, lambda: run([3, 9], False)) == 2
    for w in (3, 9):
        np.testing.assert_array_equal(np.asarray(out[w, True].tokens), np.asarray(out[w, False].tokens))
        np.testing.assert_allclose(np.asarray(out[w, True].logprobs), np.asarray(out[w, False].logprobs),
                                   atol=1e-5)
