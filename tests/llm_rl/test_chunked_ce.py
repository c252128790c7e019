"""Chunked cross-entropy (llm_rl.sft.chunked_token_nll): value and gradient equal the plain
log-softmax cross-entropy over the full logits, and the packed SFT loss through it equals
:func:`packed_nll`."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_rl.models import Qwen3Config, Qwen3ForCausalLM
from llm_rl.sft import chunked_token_nll, packed_nll, packed_nll_chunked


def _plain(hidden, kernel, targets, weights):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, kernel), axis=-1)
    return -jnp.sum(weights * jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])


_B, _T, _CHUNK = 2, 7, 4  # 14 tokens: 4 chunks, the last one half padding


@jax.jit
def _both(hidden, kernel, targets, weights):
    def chunked(h, k):
        return chunked_token_nll(h, lambda x: jnp.einsum("btd,dv->btv", x, k), targets, weights, _CHUNK)

    return (jax.value_and_grad(_plain, argnums=(0, 1))(hidden, kernel, targets, weights),
            jax.value_and_grad(chunked, argnums=(0, 1))(hidden, kernel))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2 ** 16), scale=st.floats(0.1, 8.0))
def test_value_and_gradient_equal_the_plain_cross_entropy(seed, scale):
    b, t, d, v = _B, _T, 8, 37
    ks = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(ks[0], (b, t, d))
    kernel = scale * jax.random.normal(ks[1], (d, v))
    targets = jax.random.randint(ks[2], (b, t), 0, v)
    weights = (jax.random.uniform(ks[3], (b, t)) < 0.7).astype(jnp.float32)
    (want, (wh, wk)), (got, (gh, gk)) = _both(hidden, kernel, targets, weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh, wh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gk, wk, rtol=1e-4, atol=1e-5)


def test_packed_sft_loss_through_the_model_equals_packed_nll():
    # tied: the embedding's gradient comes through both the input lookup and the chunked head
    cfg = Qwen3Config.tiny(num_hidden_layers=1, tie_word_embeddings=True)
    graphdef, params = nnx.split(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 11)), jnp.int32)
    seg = jnp.asarray([[1] * 6 + [2] * 5, [1] * 8 + [0] * 3], jnp.int32)
    pos = jnp.asarray([list(range(6)) + list(range(5)), list(range(8)) + [0] * 3], jnp.int32)
    loss_mask = jnp.asarray(rng.integers(0, 2, (2, 11)), jnp.int32)

    def plain(p):
        logits = nnx.merge(graphdef, p)(ids, positions=pos, segment_ids=seg)
        return packed_nll(logits, ids, loss_mask, seg)[0]

    def chunked(p):
        return packed_nll_chunked(nnx.merge(graphdef, p), ids, pos, loss_mask, seg, 4)[0]

    (want, wg), (got, gg) = jax.jit(lambda p: (jax.value_and_grad(plain)(p),
                                               jax.value_and_grad(chunked)(p)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(wg)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
