"""llm_rl.sampling: the KV-cached sampler against full recomputation and the exact
sampling distribution; greedy parity with transformers lives in the parity tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_rl.models import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from llm_rl.sampling import generate, process_logits


def _model(family="qwen3", tie=False):
    if family == "qwen3":
        cfg = Qwen3Config.tiny()
        cls = Qwen3ForCausalLM
    else:
        cfg = LlamaConfig.tiny()
        cls = LlamaForCausalLM
    import dataclasses
    cfg = dataclasses.replace(cfg, tie_word_embeddings=tie)
    return cls(cfg, rngs=nnx.Rngs(3)), cfg


def _prompts(vocab):
    ids = np.array([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7], [0, 0, 0, 0, 11]], np.int32) % vocab
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def _greedy_by_recompute(model, ids, mask, n):
    """Reference: no cache, rerun the whole (left-padded) sequence for every new token.
    (Jitted per length: eager NNX compiles every op for every new shape, ~10x slower.)"""
    last_logits = nnx.jit(lambda m, s, k: m(s, k)[:, -1])
    seq, seq_mask, out, logps = ids, mask, [], []
    for _ in range(n):
        logits = last_logits(model, seq, seq_mask)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        logps.append(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0])
        out.append(tok)
        seq = jnp.concatenate([seq, tok[:, None]], 1)
        seq_mask = jnp.concatenate([seq_mask, jnp.ones_like(tok)[:, None]], 1)
    return jnp.stack(out, 1), jnp.stack(logps, 1)


@pytest.mark.parametrize("family,tie", [("qwen3", False), ("llama", True)])
def test_cached_greedy_equals_recomputation(family, tie):
    model, cfg = _model(family, tie)
    ids, mask = _prompts(cfg.vocab_size)
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=6, greedy=True)
    ref_tokens, ref_logp = _greedy_by_recompute(model, ids, mask, 6)
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_allclose(out.logprobs, ref_logp, atol=1e-4)
    assert out.mask.sum() == 18 and list(out.lengths) == [6, 6, 6]


def test_sampled_logprobs_match_a_rescoring_of_the_sequence():
    model, cfg = _model()
    ids, mask = _prompts(cfg.vocab_size)
    out = generate(model, ids, mask, jax.random.key(1), max_new_tokens=5, temperature=0.7)
    seq = jnp.concatenate([ids, out.tokens], 1)
    seq_mask = jnp.concatenate([mask, out.mask], 1)
    logits = model(seq, seq_mask)[:, ids.shape[1] - 1:-1] / 0.7
    rescored = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, rescored * out.mask, atol=1e-4)


def test_eos_stops_a_row_and_pads_after_it():
    model, cfg = _model()
    ids, mask = _prompts(cfg.vocab_size)
    free = generate(model, ids, mask, jax.random.key(0), max_new_tokens=6, greedy=True)
    eos = int(free.tokens[0, 2])  # make row 0's third greedy token the EOS
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=6, greedy=True,
                   eos_ids=(eos,), pad_id=0)
    first = [int(np.argmax(np.asarray(r) == eos)) if eos in np.asarray(r) else 6 for r in free.tokens]
    for row, stop in enumerate(first):
        n = min(stop + 1, 6)
        assert int(out.lengths[row]) == n
        np.testing.assert_array_equal(out.tokens[row, :n], free.tokens[row, :n])
        assert np.all(np.asarray(out.tokens[row, n:]) == 0) and np.all(np.asarray(out.logprobs[row, n:]) == 0)


def test_sampling_distribution_with_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    # top-k = 2: renormalised first two.
    np.testing.assert_allclose(jnp.exp(process_logits(logits, 1.0, 2, None)), [[2 / 3, 1 / 3, 0, 0, 0]], atol=1e-6)
    # top-p = 0.8: the smallest prefix reaching 0.8 is {0.5, 0.25, 0.15}.
    np.testing.assert_allclose(jnp.exp(process_logits(logits, 1.0, None, 0.8)),
                               [[0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0]], atol=1e-6)
    # temperature 2: p ** (1/2), renormalised.
    p = np.sqrt([0.5, 0.25, 0.15, 0.07, 0.03])
    np.testing.assert_allclose(jnp.exp(process_logits(logits, 2.0, None, None)), [p / p.sum()], atol=1e-6)
    # top_p keeps at least the argmax even for tiny p.
    np.testing.assert_allclose(jnp.exp(process_logits(logits, 1.0, None, 1e-6)), [[1, 0, 0, 0, 0]])


def test_empirical_first_token_frequencies_match_the_distribution():
    model, cfg = _model()
    # Spread the logits (the initialised model's are near uniform, where a sampler that
    # ignored the temperature would pass): scale the LM head.
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 20.0
    ids = jnp.tile(jnp.asarray([[5, 7, 9]], jnp.int32), (8000, 1))
    mask = jnp.ones_like(ids)
    out = generate(model, ids, mask, jax.random.key(2), max_new_tokens=1, temperature=1.5, top_k=4)
    last = model(ids[:1], mask[:1])[:, -1]
    want = np.exp(np.asarray(process_logits(last, 1.5, 4, None)))[0]
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=cfg.vocab_size) / ids.shape[0]
    tolerance = 4 * np.sqrt(0.25 / ids.shape[0])
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want))
    np.testing.assert_allclose(counts, want, atol=tolerance)
    # the test separates temperatures: T = 1 (or no top-k) would fail it
    at_t1 = np.exp(np.asarray(process_logits(last, 1.0, 4, None)))[0]
    no_top_k = np.exp(np.asarray(process_logits(last, 1.5, None, None)))[0]
    assert np.abs(at_t1 - want).max() > 3 * tolerance
    assert np.abs(no_top_k - want).max() > 3 * tolerance


def test_per_row_streams_give_a_row_the_same_tokens_in_any_batch():
    """With ``row_ids`` each row draws from its own stream: rows sampled in two halves under
    their whole-batch indices (as two processes would) equal the whole batch sampled at once,
    while the streams differ between rows and from the one-draw-per-batch default."""
    model, cfg = _model()
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 5.0  # spread the logits
    ids = jnp.tile(_prompts(cfg.vocab_size)[0], (4, 1))  # 12 rows, every prompt 4 times
    mask = jnp.tile(_prompts(cfg.vocab_size)[1], (4, 1))
    kw = dict(max_new_tokens=6, temperature=1.0)
    rows = np.arange(12)
    whole = generate(model, ids, mask, jax.random.key(4), row_ids=rows, **kw)
    first = generate(model, ids[:6], mask[:6], jax.random.key(4), row_ids=rows[:6], **kw)
    rest = generate(model, ids[6:], mask[6:], jax.random.key(4), row_ids=rows[6:], **kw)
    np.testing.assert_array_equal(np.concatenate([first.tokens, rest.tokens]), whole.tokens)
    np.testing.assert_allclose(np.concatenate([first.logprobs, rest.logprobs]), whole.logprobs,
                               atol=1e-5)
    # the same prompt in rows 0, 3, 6, 9 gets different samples: one stream per row
    assert len({tuple(np.asarray(whole.tokens[i])) for i in (0, 3, 6, 9)}) > 1
    default = generate(model, ids, mask, jax.random.key(4), **kw)
    assert not np.array_equal(default.tokens, whole.tokens)
    with pytest.raises(ValueError, match="one id per prompt row"):
        generate(model, ids, mask, jax.random.key(4), row_ids=rows[:3], **kw)


def test_bad_settings():
    model, cfg = _model()
    ids, mask = _prompts(cfg.vocab_size)
    for kw, msg in (({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"),
                    ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")):
        args = {"max_new_tokens": 2, **kw}
        with pytest.raises(ValueError, match=msg):
            generate(model, ids, mask, jax.random.key(0), **args)
