"""Tasks with verifiable answers, their graders, and loaders for the public JSONL formats.

Generated tasks (deterministic per seed, no network):

- ``arithmetic``: an integer expression with +, - and * (standard precedence), e.g.
  prompt ``"Q: 23+45*2=?\\nA: "``, worked solution ``"45*2=90, 23+90=113 #### 113"``.
- ``countdown``: reach a target from given numbers with + - * /, each number at most once,
  e.g. prompt ``"Q: make 24 from 3 4 8 2\\nA: "``, solution ``"8*3=24 #### 8*3"``. Every
  problem is built from a random expression, so it is solvable.

Answers follow GSM8K's convention: the final answer comes after ``####``. Graders never
``eval`` model text: Countdown expressions are parsed with :mod:`ast`, allowing only integer
literals and the four operators, evaluated exactly with fractions.

Loaders: :func:`load_jsonl` reads GSM8K (``question``/``answer``), MATH (``problem``/
``solution`` with ``\\boxed{}``) and MBPP (``text``/``code``/``test_list``) files, naming the
file and line of a bad record.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ANSWER_MARK = "####"


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str  # worked solution ending in "#### answer" (for supervised pretraining)
    answer: str  # the reference final answer
    task: str
    meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


def extract_answer(text: str) -> str | None:
    """The final answer after the last ``####`` (up to the end of that line), or None."""
    if ANSWER_MARK not in text:
        return None
    tail = text.rsplit(ANSWER_MARK, 1)[1]
    return tail.strip().splitlines()[0].strip() if tail.strip() else None


# --- arithmetic --------------------------------------------------------------------------------


def _worked_arithmetic(numbers: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Evaluate left to right with * before +/-, recording each step as 'a*b=c'."""
    nums, ops, steps = list(numbers), list(ops), []
    for precedence in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] in precedence:
                a, b = nums[i], nums[i + 1]
                value = a * b if ops[i] == "*" else a + b if ops[i] == "+" else a - b
                steps.append(f"{a}{ops[i]}{b}={value}")
                nums[i:i + 2] = [value]
                del ops[i]
            else:
                i += 1
    return steps, nums[0]


def arithmetic_problem(rng: np.random.Generator, *, min_ops: int = 1, max_ops: int = 2,
                       max_value: int = 20) -> Problem:
    n_ops = int(rng.integers(min_ops, max_ops + 1))
    numbers = [int(x) for x in rng.integers(0, max_value + 1, n_ops + 1)]
    ops = [str(o) for o in rng.choice(["+", "-", "*"], n_ops)]
    expr = "".join(f"{n}{o}" for n, o in zip(numbers, ops)) + str(numbers[-1])
    steps, value = _worked_arithmetic(numbers, ops)
    return Problem(prompt=f"Q: {expr}=?\nA: ", solution=f"{', '.join(steps)} {ANSWER_MARK} {value}",
                   answer=str(value), task="arithmetic", meta={"expression": expr})


def grade_arithmetic(response: str, problem: Problem) -> float:
    """1.0 if the final answer equals the reference integer, else 0.0."""
    got = extract_answer(response)
    return float(got is not None and got == problem.answer)


# --- countdown ---------------------------------------------------------------------------------


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b if b != 0 else None}


def safe_eval(expression: str) -> tuple[Fraction | None, list[int]]:
    """Exact value of an integer expression with + - * / and parentheses, and the integer
    literals it uses. (None, []) if it is anything else or divides by zero."""
    if len(expression) > 200:
        return None, []
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return None, []
    used: list[int] = []

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            return _OPS[type(node.op)](left, right)
        return None

    value = walk(tree.body)
    return (value, used) if value is not None else (None, [])


def countdown_problem(rng: np.random.Generator, *, num_numbers: int = 3, max_number: int = 10) -> Problem:
    numbers = [int(x) for x in rng.integers(1, max_number + 1, num_numbers)]
    # Build the solution as a random left-deep expression over a random subset (>= 2 numbers).
    k = int(rng.integers(2, num_numbers + 1))
    order = [numbers[i] for i in rng.permutation(num_numbers)[:k]]
    expr, value, steps = str(order[0]), Fraction(order[0]), []
    for n in order[1:]:
        ops = ["+", "*"] + (["-"] if value - n >= 0 else []) + (["/"] if n and (value / n).denominator == 1 else [])
        op = str(rng.choice(ops))
        new = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
        steps.append(f"{value}{op}{n}={new}")
        expr = f"({expr}){op}{n}" if op in "*/" and any(c in expr for c in "+-") else f"{expr}{op}{n}"
        value = new
    target = int(value)
    listed = " ".join(str(n) for n in numbers)
    return Problem(prompt=f"Q: make {target} from {listed}\nA: ",
                   solution=f"{', '.join(steps)} {ANSWER_MARK} {expr}", answer=expr, task="countdown",
                   meta={"numbers": numbers, "target": target})


def grade_countdown(response: str, problem: Problem) -> float:
    """1.0 if the answer expression uses only the given numbers (each at most as often as
    given) and evaluates exactly to the target, else 0.0."""
    got = extract_answer(response)
    if got is None:
        return 0.0
    value, used = safe_eval(got)
    if value is None or value != problem.meta["target"]:
        return 0.0
    available = list(problem.meta["numbers"])
    for n in used:
        if n not in available:
            return 0.0
        available.remove(n)
    return 1.0


def _code_problem(rng: np.random.Generator, **kw: Any) -> Problem:
    from llm_rl import code_tasks  # lazy: the sandbox is only needed for code

    return code_tasks.code_problem(rng, **kw)


def _grade_code(response: str, problem: Problem) -> float:
    from llm_rl import code_tasks

    return code_tasks.grade_code(response, problem)


TASKS: dict[str, tuple[Callable[..., Problem], Callable[[str, Problem], float]]] = {
    "arithmetic": (arithmetic_problem, grade_arithmetic),
    "countdown": (countdown_problem, grade_countdown),
    "code": (_code_problem, _grade_code),  # MBPP-style functions graded in llm_rl.sandbox
}


def make_problems(task: str, n: int, seed: int, **kw: Any) -> list[Problem]:
    """``n`` problems of ``task``, the same for the same seed."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: must be one of {', '.join(TASKS)}")
    rng = np.random.default_rng(seed)
    return [TASKS[task][0](rng, **kw) for _ in range(n)]


def grade(response: str, problem: Problem) -> float:
    return TASKS[problem.task][1](response, problem)


# --- public JSONL formats ----------------------------------------------------------------------


_FORMATS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"),
            "mbpp": ("text", "code")}


class DataFormatError(ValueError):
    """A data file does not have the expected format (names the file and line)."""


def boxed_answer(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), MATH's answer format."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i:j]
    return None


def load_jsonl(path: str | Path, fmt: str) -> list[dict[str, Any]]:
    """Read GSM8K / MATH / MBPP JSONL into dicts with ``prompt``, ``reference`` and ``answer``
    (GSM8K: after ####; MATH: last \\boxed{}; MBPP: the test asserts)."""
    if fmt not in _FORMATS:
        raise ValueError(f"fmt={fmt!r} is invalid: must be one of {', '.join(_FORMATS)}")
    question_key, reference_key = _FORMATS[fmt]
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read ({err.strerror})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
        missing = [k for k in (question_key, reference_key) if k not in row]
        if missing:
            raise DataFormatError(f"{path}: line {lineno}: missing field(s) {', '.join(missing)} "
                                  f"for format {fmt}")
        if fmt == "gsm8k":
            answer = extract_answer(row["answer"])
        elif fmt == "math":
            answer = boxed_answer(row["solution"])
        else:
            answer = row.get("test_list", [])
        if answer is None:
            raise DataFormatError(f"{path}: line {lineno}: no final answer in '{reference_key}'")
        records.append({"prompt": row[question_key], "reference": row[reference_key],
                        "answer": answer})
    return records


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5' (GSM8K answers carry commas)."""
    cleaned = re.sub(r"[,$\s]", "", text)
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return str(int(value)) if value.is_integer() else repr(value)


def grade_numeric(response: str, reference: str) -> float:
    got = extract_answer(response)
    return float(got is not None and normalize_number(got) == normalize_number(reference))


SAMPLE_DIR = Path(__file__).parent / "data"


def sample_file(fmt: str) -> Path:
    """A small shipped file in the public format ``fmt`` (gsm8k, math, mbpp)."""
    return SAMPLE_DIR / f"{fmt}_sample.jsonl"


def final_answer(response: str) -> str | None:
    """A model's final answer: after the last ``####``, else the last ``\\boxed{}``."""
    return extract_answer(response) or boxed_answer(response)


def grade_math(response: str, reference: str) -> float:
    """1.0 if the response's final answer is equivalent to ``reference``
    (:func:`llm_rl.math_answers.math_equal`: numbers, fractions, equivalent forms)."""
    from llm_rl.math_answers import math_equal

    return float(math_equal(final_answer(response), reference))


def corpus(problems: Sequence[Problem]) -> list[str]:
    """Prompt + worked solution texts for supervised pretraining."""
    return [p.prompt + p.solution for p in problems]
