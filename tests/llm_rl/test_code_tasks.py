"""MBPP-style code tasks: generator, MBPP conversion, code extraction and the sandboxed grader."""

import json

import numpy as np
import pytest

from llm_rl import code_tasks as C
from llm_rl import tasks as T


def test_generator_is_deterministic_by_seed_and_diverse():
    a, b = C.make_code_problems(300, seed=3), C.make_code_problems(300, seed=3)
    assert a == b and [p.meta for p in a] == [p.meta for p in b]
    assert a != C.make_code_problems(300, seed=4)
    assert len({p.prompt for p in C.make_code_problems(2000, seed=0)}) > 1500
    assert {p.meta["family"] for p in a} == set(C.FAMILIES)


def test_families_argument_is_validated():
    with pytest.raises(ValueError, match="families"):
        C.code_problem(np.random.default_rng(0), families=("nope",))


def _one_per_family(seed):
    rng = np.random.default_rng(seed)
    return [C.code_problem(rng, families=(f,)) for f in C.FAMILIES]


def test_every_reference_solution_passes_and_a_perturbed_one_fails():
    problems = _one_per_family(seed=11)
    # One sandbox run per family for the references; the grader's dispatch through tasks.grade.
    assert [T.grade(p.solution, p) for p in problems] == [1.0] * len(problems)
    # Perturbed: the first assert's expected value replaced by a wrong one must fail.
    p = problems[0]
    broken = p.solution.replace("total = 0", "total = 1")
    assert broken != p.solution and C.grade_code(broken, p) == 0.0


def test_reference_solutions_agree_with_oracles_without_the_sandbox():
    # Trusted text (our own generator): exec in-process, many problems, cheap.
    for p in C.make_code_problems(400, seed=5):
        scope: dict = {}
        exec(p.solution + "\n" + p.answer, scope)  # noqa: S102 - raises AssertionError on a mismatch


def test_extraction_rule():
    code = "def f():\n    return 1\n"
    assert C.extract_code(code) == code
    assert C.extract_code(f"Here:\n```python\n{code}```\nDone.") == code
    assert C.extract_code(f"```\nnot this\n```\n```py\n{code}```") == code
    assert C.extract_code(f"```python\nold\n```\n```python\n{code}```") == code  # the last one
    assert C.extract_code(f"```text\n{code}```") == code  # untagged/other tag only: last block


def test_grader_on_model_like_responses():
    p = _one_per_family(seed=2)[0]
    assert C.grade_code(f"Sure!\n```python\n{p.solution}\n```\nHope it helps.", p) == 1.0
    assert C.grade_code("I don't know.", p) == 0.0  # syntax error
    assert C.grade_code("while True:\n    pass", p, timeout_s=0.5) == 0.0


def test_shipped_mbpp_sample_loads_and_its_reference_code_passes(tmp_path):
    problems = C.from_mbpp(T.sample_file("mbpp"))
    assert problems and all(p.task == "code" and p.meta["test_list"] for p in problems)
    program = "\n\n".join(p.solution + "\n" + p.answer for p in problems)
    assert C.grade_code(program, C._problem("all", "", ["pass"])) == 1.0
    assert C.grade_code(problems[0].solution.replace("+", "-"), problems[0]) == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "t", "code": "c", "test_list": []}) + "\n{oops\n")
    with pytest.raises(T.DataFormatError, match="line 2"):
        C.from_mbpp(bad)
