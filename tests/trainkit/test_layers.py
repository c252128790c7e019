"""trainkit.nn.layers: the attention against a NumPy transcription of its formula, the
head-major cache attention against it, a DecoderBlock decoding token by token with its
cache against one full causal pass, and the dense contraction's custom CPU gradient against
NumPy's ``dx = g W^T``, ``dW = x^T g``."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings, strategies as st

from trainkit.nn.layers import DecoderBlock, attend_cache, contract, dot_product_attention


def np_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(H) + m) v per query head n, with key/value head n // G; q [B, T, N, H],
    k, v [B, S, K, H], mask [B, T, S] (False: the score is the float32 minimum)."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for head in range(n):
        s = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, head // g]) / np.sqrt(h)
        s = np.where(mask, s, np.finfo(np.float32).min)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsh->bth", p, v[:, :, head // g])
    return out


shapes = st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 6), st.integers(1, 2),
                   st.integers(1, 3), st.sampled_from([4, 8]))


@settings(max_examples=15, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_attention_and_cache_attention_match_the_formula(shape, seed):
    b, t, s, kh, g, h = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, kh * g, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kh, h)).astype(np.float32) for _ in range(2))
    mask = rng.random((b, t, s)) < 0.7
    mask[..., 0] = True  # every query sees a key (a row without one is a meaningless average)
    want = np_attention(q, k, v, mask)
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    head_major = lambda a: jnp.asarray(a.transpose(0, 2, 1, 3))  # noqa: E731  [B, K, S, H]
    got = attend_cache(jnp.asarray(q), head_major(k), head_major(v), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_block_cached_decode_equals_one_causal_pass():
    """Prefill 3 tokens, then decode the rest one by one into a longer cache (unused slots
    masked): every output equals the full pass's at that position."""
    b, length, width, slots = 2, 7, 16, 10
    block = DecoderBlock(width, 4, 32, eps=1e-6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (b, length, width))
    causal = jnp.tril(jnp.ones((length, length), bool))
    full, _ = block(x, jnp.broadcast_to(causal, (b, length, length)))
    cache = block.init_cache(b, slots)
    assert cache[0].shape == (b, 4, slots, 4)
    outs, start = [], 0
    for n in (3, 1, 1, 1, 1):
        visible = jnp.arange(slots)[None, :] <= start + jnp.arange(n)[:, None]
        y, cache = block(x[:, start:start + n], jnp.broadcast_to(visible, (b, n, slots)),
                         kv=cache, write_index=start)
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=2), st.lists(st.integers(1, 5), min_size=1, max_size=2),
       st.lists(st.integers(1, 5), min_size=1, max_size=2), st.booleans(), st.integers(0, 2**31 - 1))
def test_contract_gradient_is_the_transposed_products(lead, fan_in, fan_out, f32_out, seed):
    """For the loss sum(y * c): dx = c . W^T over the output dims and dW = x^T c over every
    token (the leading dims), written out in NumPy on the flattened shapes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + fan_in).astype(np.float32)
    w = rng.standard_normal(fan_in + fan_out).astype(np.float32)
    c = rng.standard_normal(lead + fan_out).astype(np.float32)
    out_dtype = jnp.float32 if f32_out else None
    n_in = len(fan_in)
    y, (dx, dw) = jax.value_and_grad(lambda x, w: (contract(x, w, n_in, out_dtype) * c).sum(), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w))
    tokens, k, o = int(np.prod(lead)), int(np.prod(fan_in)), int(np.prod(fan_out))
    x2, w2, c2 = x.reshape(tokens, k).astype(np.float64), w.reshape(k, o).astype(np.float64), c.reshape(tokens, o)
    np.testing.assert_allclose(float(y), float(((x2 @ w2) * c2).sum()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), (c2 @ w2.T).reshape(x.shape), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), (x2.T @ c2).reshape(w.shape), rtol=1e-4, atol=1e-5)


def test_contract_gradient_keeps_bfloat16_parameters_in_bfloat16():
    x = jnp.ones((3, 4), jnp.bfloat16)
    w = jnp.full((4, 2), 0.5, jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: contract(x, w, 1, jnp.float32).sum(), argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((4, 2), 3.0))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.full((3, 4), 1.0))
