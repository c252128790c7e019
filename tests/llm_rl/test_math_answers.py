"""Math answer equivalence and the shipped sample files in the public formats."""

import pytest

from llm_rl import tasks
from llm_rl.math_answers import math_equal

pytest.importorskip("sympy")


@pytest.mark.parametrize("a,b", [
    ("5", "5"), ("5.0", "5"), ("1,234", "1234"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{1}{2}", "1/2"),
    ("-\\frac{3}{4}", "-0.75"), ("\\boxed{7}", "7"), ("$9\\pi$", "9\\pi"), ("5\\sqrt{2}", "\\sqrt{50}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("2^{10}", "1024"), ("50\\%", "50"),
    ("5\\text{ cm}", "5"), ("(1, \\frac{1}{2})", "(1,0.5)"), ("x+1", "1+x"), ("2x", "x \\cdot 2"),
    ("\\sqrt[3]{8}", "2"), ("90^\\circ", "90"),
])
def test_equivalent_answers(a, b):
    assert math_equal(a, b) and math_equal(b, a)


@pytest.mark.parametrize("a,b", [
    ("5", "6"), ("0.5", "\\frac{1}{3}"), ("(1, 2)", "(2, 1)"), ("(1,2)", "[1,2]"), ("9\\pi", "9"),
    ("x+1", "x"), ("", "1"), (None, "1"), ("__import__('os').system('true')", "0"), ("1" * 300, "1"),
])
def test_different_answers(a, b):
    assert not math_equal(a, b)


def test_shipped_samples_load_and_grade():
    gsm = tasks.load_jsonl(tasks.sample_file("gsm8k"), "gsm8k")
    assert [r["answer"] for r in gsm] == ["7", "130", "8", "30"]
    assert tasks.grade_numeric("so #### 130", gsm[1]["answer"]) == 1.0
    math = tasks.load_jsonl(tasks.sample_file("math"), "math")
    assert [r["answer"] for r in math] == ["\\frac{5}{6}", "5\\sqrt{2}", "4", "9\\pi"]
    assert tasks.grade_math("... = \\boxed{\\sqrt{50}}", math[1]["answer"]) == 1.0
    assert tasks.grade_math("#### 0.8333", math[0]["answer"]) == 0.0
    assert tasks.grade_math("#### 10/12", math[0]["answer"]) == 1.0
    mbpp = tasks.load_jsonl(tasks.sample_file("mbpp"), "mbpp")
    assert mbpp[0]["answer"] == ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
