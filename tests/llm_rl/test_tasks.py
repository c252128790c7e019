"""Generated tasks, graders, tokenizers and the JSONL loaders."""

import json
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llm_rl import tasks as T

pytest.importorskip("tokenizers")
from llm_rl.tokenization import (TokenizerError, char_tokenizer, encode_prompts, encode_sequences,  # noqa: E402
                                 format_chat, load_tokenizer, save_tokenizer)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_arithmetic_worked_solution_is_correct(seed):
    p = T.make_problems("arithmetic", 1, seed, max_ops=3)[0]
    expr = p.meta["expression"]
    assert int(p.answer) == eval(expr)  # trusted: our own generated expression
    assert T.grade(p.solution, p) == 1.0
    assert T.grade(p.solution.replace(f"#### {p.answer}", f"#### {int(p.answer) + 1}"), p) == 0.0


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(2, 4))
def test_countdown_problems_are_solvable_by_their_solution(seed, k):
    p = T.make_problems("countdown", 1, seed, num_numbers=k)[0]
    value, used = T.safe_eval(p.answer)
    assert value == p.meta["target"] and len(used) >= 2
    assert T.grade(p.solution, p) == 1.0
    assert p.prompt.startswith(f"Q: make {p.meta['target']} from ")


def test_countdown_grader_rejects_cheats():
    p = T.Problem("Q: make 24 from 3 8 2\nA: ", "", "3*8", "countdown", {"numbers": [3, 8, 2], "target": 24})
    assert T.grade("#### 3*8", p) == 1.0
    assert T.grade("#### (2+2)*(3+3)", p) == 0.0  # numbers not given / reused
    assert T.grade("#### 24", p) == 0.0  # a literal that is not one of the numbers
    assert T.grade("#### 3*8*1", p) == 0.0
    assert T.grade("#### __import__('os')", p) == 0.0  # never evaluated
    assert T.grade("#### 8/(2-2)", p) == 0.0
    assert T.grade("no answer", p) == 0.0
    assert T.safe_eval("6/4")[0] == Fraction(3, 2)


def test_problems_are_deterministic_per_seed():
    assert T.make_problems("countdown", 5, 3) == T.make_problems("countdown", 5, 3)
    assert T.make_problems("countdown", 5, 3) != T.make_problems("countdown", 5, 4)
    with pytest.raises(ValueError, match="task="):
        T.make_problems("sudoku", 1, 0)


def test_extract_answer():
    assert T.extract_answer("blah #### 42\nmore") == "42"
    assert T.extract_answer("#### 1 #### 2") == "2"
    assert T.extract_answer("no mark") is None and T.extract_answer("####   ") is None


def test_jsonl_loaders(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n")
    assert T.load_jsonl(gsm, "gsm8k") == [{"prompt": "2+2?", "reference": "2+2=4\n#### 4", "answer": "4"}]
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "x?", "solution": "so \\boxed{\\frac{1}{2}}."}) + "\n")
    assert T.load_jsonl(math, "math")[0]["answer"] == "\\frac{1}{2}"
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"text": "add", "code": "def f(a,b): return a+b",
                                "test_list": ["assert f(1,2)==3"]}) + "\n")
    assert T.load_jsonl(mbpp, "mbpp")[0]["answer"] == ["assert f(1,2)==3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a #### 1"}) + "\n{oops\n")
    with pytest.raises(T.DataFormatError, match=r"bad.jsonl: line 2: invalid JSON"):
        T.load_jsonl(bad, "gsm8k")
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(T.DataFormatError, match=r"line 1: missing field\(s\) answer"):
        T.load_jsonl(bad, "gsm8k")
    assert T.grade_numeric("#### 1,234.0", "1234") == 1.0


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_char_tokenizer_round_trips_printable_text(text):
    tok = char_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_char_tokenizer_saves_in_hf_format_and_encodes(tmp_path):
    tok = char_tokenizer()
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = "Q: 3*8=?\nA: 24 #### 24"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text  # newline too
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    ids, mask = encode_prompts(loaded, ["ab", "abcd"])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert ids[0, 2] == 1 and loaded.decode(ids[1, 1:]) == "abcd"
    batch = encode_sequences(loaded, ["Q"], ["A!"], max_length=6)
    np.testing.assert_array_equal(batch["input_ids"][0], [1, tok.convert_tokens_to_ids("Q"),
                                                          tok.convert_tokens_to_ids("A"),
                                                          tok.convert_tokens_to_ids("!"), 2, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0])
    assert format_chat(loaded, "hi") == "hi"  # no chat template: the message itself
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
