"""SFT trainer: packing is exact (no cross-document attention, loss = sum of the documents'
own losses), prompt tokens carry no loss, token budgets are counted, resume is bitwise exact,
sharded training matches one device, and non-finite steps never reach the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_rl import sft
from llm_rl.models import Qwen3Config, Qwen3ForCausalLM
from trainkit.guards import NonFiniteError
from trainkit.run import RunDir, read_metrics
from trainkit.sharding import make_mesh

pytest.importorskip("transformers")

SEQ = 32
ROWS = 6


@pytest.fixture(scope="module")
def tok():
    from llm_rl.tokenization import char_tokenizer

    return char_tokenizer()


def tiny_model(vocab: int, seed: int = 0):
    cfg = Qwen3Config.tiny(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model(40)


@pytest.fixture(scope="module")
def forward(model):
    graphdef, params = nnx.split(model)

    @jax.jit
    def f(ids, positions, segment_ids):
        return nnx.merge(graphdef, params)(ids, positions=positions, segment_ids=segment_ids)

    return f


def _doc(rng, p_len, c_len):
    ids = rng.integers(4, 40, p_len + c_len).astype(np.int32)
    return sft.Document(ids, np.r_[np.zeros(p_len), np.ones(c_len)].astype(np.int32))


def _packed_loss(forward, docs):
    packed = sft.pack_documents(docs, SEQ)
    b = sft.batches(packed, ROWS)  # fixed [1, ROWS, SEQ]: one compiled shape
    b = {k: jnp.asarray(v[0]) for k, v in b.items()}
    logits = forward(b["input_ids"], b["positions"], b["segment_ids"])
    return sft.packed_nll(logits, b["input_ids"], b["loss_mask"], b["segment_ids"]), packed


def _alone_loss(forward, doc):
    """The document by itself at positions 0.., right-padded (padding follows it, so causal
    attention never sees it)."""
    n = len(doc.ids)
    ids = np.zeros((1, SEQ), np.int32)
    ids[0, :n] = doc.ids
    mask = np.zeros((1, SEQ), np.int32)
    mask[0, :n] = doc.loss_mask
    seg = np.zeros((1, SEQ), np.int32)
    seg[0, :n] = 1
    pos = np.arange(SEQ, dtype=np.int32)[None]
    logits = forward(jnp.asarray(np.repeat(ids, ROWS, 0)), jnp.asarray(np.repeat(pos, ROWS, 0)),
                     jnp.asarray(np.repeat(np.ones_like(seg), ROWS, 0)))[:1]
    return sft.packed_nll(logits, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 10), st.integers(1, 12)), min_size=1, max_size=6),
       st.integers(0, 2**16))
def test_packed_loss_is_the_sum_of_the_documents_own_losses(forward, lengths, seed):
    rng = np.random.default_rng(seed)
    docs = [_doc(rng, p, c) for p, c in lengths]
    (nll, count), packed = _packed_loss(forward, docs)
    assert packed.input_ids.shape[0] <= ROWS
    alone = [_alone_loss(forward, d) for d in docs]
    np.testing.assert_allclose(float(nll), sum(float(a) for a, _ in alone), rtol=2e-5, atol=1e-4)
    # every completion token but none of the prompt tokens is a target
    assert float(count) == sum(c for _, c in lengths) == sum(float(c) for _, c in alone)
    assert sft.completion_tokens(packed) == int(count)


def test_positions_restart_and_segments_number_documents():
    rng = np.random.default_rng(0)
    docs = [_doc(rng, 2, 3), _doc(rng, 1, 2), _doc(rng, 20, 20), _doc(rng, 3, 3)]
    packed = sft.pack_documents(docs, 16)
    assert packed.truncated == 1  # the 40-token document is cut to 16
    np.testing.assert_array_equal(packed.segment_ids[0], [1] * 5 + [2] * 3 + [0] * 8)
    np.testing.assert_array_equal(packed.positions[0, :8], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(packed.segment_ids[1], [1] * 16)
    np.testing.assert_array_equal(packed.segment_ids[2], [1] * 6 + [0] * 10)


def test_no_attention_across_documents(forward):
    rng = np.random.default_rng(1)
    a, b = _doc(rng, 4, 6), _doc(rng, 3, 5)
    a2 = sft.Document(rng.integers(4, 40, len(a.ids)).astype(np.int32), a.loss_mask)
    outs = []
    for first in (a, a2):
        batch = sft.batches(sft.pack_documents([first, b], SEQ), ROWS)
        batch = {k: jnp.asarray(v[0]) for k, v in batch.items()}
        outs.append((forward(batch["input_ids"], batch["positions"], batch["segment_ids"]), batch))
    sl = slice(len(a.ids), len(a.ids) + len(b.ids))
    np.testing.assert_array_equal(np.asarray(outs[0][0][0, sl]), np.asarray(outs[1][0][0, sl]))
    # the same rows with one segment for the whole row: B now sees A, its logits move
    leaky = [forward(o[1]["input_ids"], o[1]["positions"], jnp.ones_like(o[1]["segment_ids"]))
             for o in outs]
    assert not np.allclose(np.asarray(leaky[0][0, sl]), np.asarray(leaky[1][0, sl]))


def test_prompt_tokens_carry_no_loss(tok, forward):
    doc = sft.encode_document(tok, "Q: 1+2=?\nA: ", "#### 3")
    n_prompt = 1 + len("Q: 1+2=?\nA: ")  # <bos> and the prompt characters
    assert doc.loss_mask[:n_prompt].sum() == 0 and doc.loss_mask[n_prompt:].all()
    assert doc.ids[-1] == tok.eos_token_id
    # the loss does not depend on the logits that predict prompt tokens
    ids = jnp.asarray(np.r_[doc.ids, np.zeros(SEQ - len(doc.ids))][None].astype(np.int32))
    mask = jnp.asarray(np.r_[doc.loss_mask, np.zeros(SEQ - len(doc.ids))][None].astype(np.int32))
    seg = (jnp.arange(SEQ) < len(doc.ids)).astype(jnp.int32)[None]
    grad = jax.grad(lambda lg: sft.packed_nll(lg, ids, mask, seg)[0])(jnp.zeros((1, SEQ, len(tok))))
    per_pos = np.abs(np.asarray(grad)).sum(-1)[0]
    assert per_pos[:n_prompt - 1].sum() == 0  # positions whose target is a prompt token
    assert (per_pos[n_prompt - 1:len(doc.ids) - 1] > 0).all()


def test_chat_template_is_used_when_the_tokenizer_has_one(tok):
    from llm_rl.tokenization import char_tokenizer

    chat = char_tokenizer()
    chat.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<a>{% endif %}")
    assert sft.render_prompt(chat, "hi") == "<u>hi<a>"
    assert sft.render_prompt(tok, "hi") == "hi"  # the plain template
    doc = sft.encode_document(chat, "hi", "ok")
    assert chat.decode(doc.ids, skip_special_tokens=False).startswith("<u>hi<a>ok")  # no <bos>
    assert doc.loss_mask.sum() == 3  # "o", "k", <eos>


def test_budget_documents_stops_at_the_budget():
    rng = np.random.default_rng(2)
    docs = [_doc(rng, 2, int(c)) for c in rng.integers(1, 9, 7)]
    for budget in (1, 5, 37, 200):
        chosen = sft.budget_documents(docs, budget, seed=3)
        total = sum(int(d.loss_mask.sum()) for d in chosen)
        assert budget <= total < budget + 9
        assert total - int(chosen[-1].loss_mask.sum()) < budget  # the last one crossed it
    assert [d.ids.tolist() for d in sft.budget_documents(docs, 50, 4)] == \
        [d.ids.tolist() for d in sft.budget_documents(docs, 50, 4)]


EXAMPLES = [(f"Q: {a}+{b}=?\nA: ", f"{a}+{b}={a + b} #### {a + b}") for a in range(7) for b in range(5)]
CFG = sft.SFTConfig(seq_len=48, batch_size=8, token_budget=900, lr=3e-3, warmup_steps=2, chunk_size=3,
                    save_every=1000)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_resume_is_bitwise_exact_and_tokens_are_counted(tok, tmp_path):
    full, info = sft.train_sft(tiny_model(len(tok)), tok, EXAMPLES, CFG, RunDir(tmp_path / "a"), seed=1)
    assert info["steps"] >= 5 and info["nonfinite_total"] == 0
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert sum(r["tokens"] for r in rows) == info["completion_tokens"]
    longest = max(len(c) + 1 for _, c in EXAMPLES)
    assert CFG.token_budget <= info["completion_tokens"] < CFG.token_budget + longest
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    run_b = RunDir(tmp_path / "b")
    _, part = sft.train_sft(tiny_model(len(tok)), tok, EXAMPLES, CFG, run_b, seed=1, max_steps=3)
    assert part["steps_done"] == 3
    resumed, _ = sft.train_sft(tiny_model(len(tok)), tok, EXAMPLES, CFG, run_b, seed=1, resume=True)
    for x, y in zip(_params(full), _params(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # data parallel over the 8 simulated devices vs one device: the same update up to
    # the order of the gradient sum
    assert jax.device_count() == 8
    one, _ = sft.train_sft(tiny_model(len(tok)), tok, EXAMPLES, CFG, RunDir(tmp_path / "c"), seed=1,
                           mesh=make_mesh(data=1, devices=jax.devices()[:1]))
    for x, y in zip(_params(full), _params(one), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(tok, tmp_path):
    model = tiny_model(len(tok))
    emb = model.model.embed_tokens.embedding
    emb[...] = emb[...].at[tok.bos_token_id].set(jnp.nan)  # every document starts with <bos>
    graphdef, params = nnx.split(model, nnx.Param)
    step = jax.jit(sft.make_step(graphdef))
    state = sft.init_state(CFG, params, 10)
    batch = sft.batches(sft.pack_documents([sft.encode_document(tok, p, c) for p, c in EXAMPLES[:4]],
                                           CFG.seq_len), CFG.batch_size)
    new, metrics = step(state, {k: jnp.asarray(v[0]) for k, v in batch.items()})
    assert int(metrics["skipped"]) == 1 and int(new.guard.streak) == 1
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # NaN rows included
    cfg = sft.SFTConfig(seq_len=48, batch_size=8, token_budget=900, chunk_size=2, max_nonfinite=3)
    with pytest.raises(NonFiniteError, match="consecutive steps had non-finite"):
        sft.train_sft(model, tok, EXAMPLES, cfg, RunDir(tmp_path / "nan"))
