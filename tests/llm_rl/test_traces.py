"""Trace sources: deterministic human style, G/W split by the grader, flaw injection whose
recorded spans are exactly where the text changed, and paraphrases produced by a model."""

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_rl import tasks, traces

pytest.importorskip("transformers")


def _problems(task, n, seed):
    kw = {"min_ops": 1, "max_ops": 3, "max_value": 12} if task == "arithmetic" else {}
    return tasks.make_problems(task, n, seed, **kw)


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_human_traces_are_deterministic_correct_and_in_the_human_style(task):
    probs = _problems(task, 30, 0)
    first = [traces.human_trace(p).text for p in probs]
    again = [traces.human_trace(p).text for p in _problems(task, 30, 0)]
    assert first == again
    for p, text in zip(probs, first, strict=True):
        assert text.startswith("First, ") and "So the answer is" in text
        assert tasks.grade(text, p) == 1.0
        # every step of the reference solver appears, in words
        assert len(traces.reference_steps(p)) == text.count(" is ") - 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["arithmetic", "countdown"]), st.integers(0, 10_000), st.integers(0, 4))
def test_flaw_spans_are_exactly_where_the_text_differs(task, seed, level):
    p = _problems(task, 1, seed)[0]
    clean = traces.human_trace(p).text
    flawed = traces.inject_flaws(p, level, seed)
    assert flawed.level == level
    if level == 0:
        assert flawed.text == clean and flawed.flaws == ()
        return
    assert traces.restore(flawed) == clean  # outside the spans nothing changed
    assert flawed.flaws
    for f in flawed.flaws:
        assert flawed.text[f.start:f.end] != f.original  # each span is a real change
        assert f.kind in traces.FLAW_KINDS
    kinds = {f.kind for f in flawed.flaws}
    # the final answer changes exactly for the wrong-final-answer flaw (level 4)
    assert (tasks.grade(flawed.text, p) == 0.0) == (level == 4) == ("wrong_final_answer" in kinds)
    if level >= 2:
        assert "skipped_step" in kinds
    lower = traces.inject_flaws(p, level - 1, seed)
    assert len(flawed.flaws) >= len(lower.flaws) or level == 2  # level 2 may drop the slipped step


def test_split_by_answer_uses_the_grader():
    probs = _problems("arithmetic", 4, 1)
    texts = [probs[0].solution, f"1+1=2 #### {int(probs[1].answer) + 1}", "no answer here",
             traces.human_trace(probs[3]).text]
    good, bad = traces.split_by_answer(probs, texts)
    assert [t.problem for t in good] == [probs[0], probs[3]]
    assert [t.problem for t in bad] == [probs[1]]
    assert all(t.correct for t in good) and not any(t.correct for t in bad)


@pytest.fixture(scope="module")
def tok():
    from llm_rl.tokenization import char_tokenizer

    return char_tokenizer()


def _model(tok, seed):
    from llm_rl.models import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config.tiny(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           eos_token_id=(tok.eos_token_id,), tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed))
    # an untrained model's argmax is as likely a special token (decoded as nothing) as a
    # character: mute the 4 special tokens and sharpen the rest, so outputs are visible text
    w = model.lm_head.kernel
    w[...] = (w[...] * 10).at[:, :4].set(0.0)
    return model


def test_teacher_traces_split_into_correct_and_wrong(tok):
    probs = _problems("arithmetic", 8, 2)
    good, bad = traces.teacher_traces(_model(tok, 0), tok, probs, jax.random.key(0),
                                      samples_per_problem=2, max_new_tokens=16)
    assert all(t.correct and t.source == "G" for t in good)
    assert all(not t.correct and tasks.extract_answer(t.text) is not None and t.source == "W" for t in bad)
    assert len({t.problem.prompt for t in good}) == len(good)  # at most one per problem


def test_paraphrases_come_from_the_model(tok):
    probs = _problems("arithmetic", 6, 3)
    humans = [traces.human_trace(p) for p in probs]
    key = jax.random.key(0)
    a = traces.paraphrase_traces(_model(tok, 0), tok, humans, key, max_new_tokens=24, keep_correct=False)
    a2 = traces.paraphrase_traces(_model(tok, 0), tok, humans, key, max_new_tokens=24, keep_correct=False)
    b = traces.paraphrase_traces(_model(tok, 1), tok, humans, key, max_new_tokens=24, keep_correct=False)
    assert [t.text for t in a] == [t.text for t in a2]  # greedy: a function of the model
    assert [t.text for t in a] != [t.text for t in b]  # other parameters, other paraphrases
    assert all(t.source == "P" for t in a)
    # conditioned on the human trace: the rewriter reads it
    flawed = [traces.inject_flaws(p, 3, 0) for p in probs]
    c = traces.paraphrase_traces(_model(tok, 0), tok, flawed, key, max_new_tokens=24, keep_correct=False)
    assert [t.text for t in a] != [t.text for t in c]
    assert "Human: " + humans[0].text in traces.paraphrase_prompt(probs[0], humans[0].text)
    kept = traces.paraphrase_traces(_model(tok, 0), tok, humans, key, max_new_tokens=24)
    assert all(t.correct for t in kept)
    np.testing.assert_equal(len(kept) <= len(a), True)
