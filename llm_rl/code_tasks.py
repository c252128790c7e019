"""MBPP-style code tasks: a CPU-scale generator, MBPP JSONL conversion and the sandboxed grader.

A problem is a :class:`llm_rl.tasks.Problem` with ``task="code"``: ``prompt`` holds the MBPP
``text`` (plus the first test, as MBPP prompts usually show it), ``solution`` the reference code
written in one fixed human style (a ``def`` with a short docstring-free body, explicit loops,
4-space indent), ``answer`` the test asserts joined by newlines, and ``meta`` holds
``test_list``, ``entry_point`` and ``family``. ``llm_rl.tasks.TASKS`` lists ``"code"`` (imported
lazily, so the other domains never load the sandbox), so ``tasks.make_problems("code", ...)``
and ``tasks.grade(response, problem)`` dispatch here.

Families (each parameterised, thousands of distinct problems): sum of k-th powers, count of
characters from a set, reverse the word order / each word, generalised Fibonacci, sum of the
numbers below n divisible by a or b, elements above a threshold, join a string k times with a
separator, clamp every element to [lo, hi]. Expected values in the asserts come from a Python
oracle per family (a function in this file), not from running the reference text.

Code extraction rule (:func:`extract_code`): the last fenced block tagged ``python`` (or
``py``) if any, else the last fenced block of any tag, else the whole response.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from llm_rl import tasks as T
from llm_rl.sandbox import run

_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th"}
_NAMES = ("solve", "compute", "func", "answer", "calc", "result_of", "do_task", "get_value")


def _num(v: int) -> str:
    """An integer as part of an identifier: -3 -> 'm3'."""
    return f"m{-v}" if v < 0 else str(v)


def _sum_powers(rng):
    k = int(rng.integers(1, 5))
    name = f"sum_pow{k}_{rng.choice(_NAMES)}"
    code = (f"def {name}(nums):\n    total = 0\n    for x in nums:\n        total += x ** {k}\n"
            f"    return total")
    args = [[int(v) for v in rng.integers(-9, 10, int(rng.integers(0, 6)))] for _ in range(3)]
    return ((f"Write a function {name}(nums) that returns the sum of the {_ORDINAL[k]} powers of the "
            f"numbers in a list."), name, code, args, lambda xs: sum(x ** k for x in xs))


def _count_chars(rng):
    sets = {"vowels": "aeiou", "digits": "0123456789", "letter": str(rng.choice(list("bcdkmst")))}
    kind = str(rng.choice(list(sets)))
    chars = sets[kind]
    what = f"the letter '{chars}'" if kind == "letter" else kind + f" ({chars})"
    name = f"count_{kind}_{rng.choice(_NAMES)}"
    code = (f"def {name}(text):\n    count = 0\n    for ch in text:\n        if ch in {chars!r}:\n"
            f"            count += 1\n    return count")
    alphabet = list("abcdeiouksmt0123 ")
    args = ["".join(rng.choice(alphabet, int(rng.integers(0, 12)))) for _ in range(3)]
    return (f"Write a function {name}(text) that counts the {what} in a lowercase string.", name,
            code, args, lambda s: sum(ch in chars for ch in s))


def _reverse_words(rng):
    each = bool(rng.integers(0, 2))
    name = f"reverse_{'each_word' if each else 'words'}_{rng.choice(_NAMES)}"
    if each:
        text = "reverses the letters of each word, keeping the word order"
        code = f"def {name}(sentence):\n    words = sentence.split()\n    return ' '.join(w[::-1] for w in words)"
        oracle = lambda s: " ".join(w[::-1] for w in s.split())
    else:
        text = "reverses the order of the words"
        code = f"def {name}(sentence):\n    words = sentence.split()\n    return ' '.join(reversed(words))"
        oracle = lambda s: " ".join(reversed(s.split()))
    vocab = ["cat", "dog", "sun", "tree", "blue", "fast", "a", "io"]
    args = [" ".join(rng.choice(vocab, int(rng.integers(1, 5)))) for _ in range(3)]
    return (f"Write a function {name}(sentence) that {text} (words are separated by spaces).",
            name, code, args, oracle)


def _fibonacci(rng):
    a, b = int(rng.integers(0, 4)), int(rng.integers(1, 5))
    name = f"fib_{a}_{b}_{rng.choice(_NAMES)}"

    def oracle(n):
        x, y = a, b
        for _ in range(n):
            x, y = y, x + y
        return x

    code = (f"def {name}(n):\n    x, y = {a}, {b}\n    for _ in range(n):\n        x, y = y, x + y\n"
            f"    return x")
    return ((f"Write a function {name}(n) that returns the n-th term (from 0) of the sequence "
            f"starting {a}, {b} where each term is the sum of the two before it."), name, code,
            [int(n) for n in rng.integers(0, 15, 3)], oracle)


def _multiples(rng):
    p, q = (int(v) for v in rng.choice(np.arange(2, 10), 2, replace=False))
    name = f"sum_mult_{p}_{q}_{rng.choice(_NAMES)}"
    code = (f"def {name}(n):\n    total = 0\n    for i in range(n):\n"
            f"        if i % {p} == 0 or i % {q} == 0:\n            total += i\n    return total")
    return ((f"Write a function {name}(n) that returns the sum of the non-negative integers below "
            f"n divisible by {p} or {q}."), name, code, [int(n) for n in rng.integers(0, 60, 3)],
            lambda n: sum(i for i in range(n) if i % p == 0 or i % q == 0))


def _above(rng):
    t = int(rng.integers(-5, 6))
    name = f"above_{_num(t)}_{rng.choice(_NAMES)}"
    code = (f"def {name}(nums):\n    out = []\n    for x in nums:\n        if x > {t}:\n"
            f"            out.append(x)\n    return out")
    args = [[int(v) for v in rng.integers(-9, 10, int(rng.integers(0, 7)))] for _ in range(3)]
    return ((f"Write a function {name}(nums) that returns, in order, the elements of a list "
            f"greater than {t}."), name, code, args, lambda xs: [x for x in xs if x > t])


def _repeat(rng):
    k, sep = int(rng.integers(1, 5)), str(rng.choice(["-", ", ", "", "|", " "]))
    name = f"repeat{k}_{rng.choice(_NAMES)}"
    code = f"def {name}(word):\n    parts = [word] * {k}\n    return {sep!r}.join(parts)"
    args = [str(w) for w in rng.choice(["ab", "x", "", "hey", "42"], 3)]
    return ((f"Write a function {name}(word) that returns the word repeated {k} times, joined by "
            f"{sep!r}."), name, code, args, lambda w: sep.join([w] * k))


def _clamp(rng):
    lo = int(rng.integers(-5, 3))
    hi = lo + int(rng.integers(1, 8))
    name = f"clamp_{rng.choice(_NAMES)}_{_num(lo)}_{_num(hi)}"
    code = (f"def {name}(nums):\n    out = []\n    for x in nums:\n"
            f"        out.append(min(max(x, {lo}), {hi}))\n    return out")
    args = [[int(v) for v in rng.integers(-9, 10, int(rng.integers(0, 6)))] for _ in range(3)]
    return ((f"Write a function {name}(nums) that clamps every element of a list to the range "
            f"[{lo}, {hi}]."), name, code, args, lambda xs: [min(max(x, lo), hi) for x in xs])


FAMILIES: dict[str, Callable] = {
    "sum_powers": _sum_powers, "count_chars": _count_chars, "reverse_words": _reverse_words,
    "fibonacci": _fibonacci, "multiples": _multiples, "above": _above, "repeat": _repeat,
    "clamp": _clamp}


def _problem(text: str, code: str, test_list: list[str], entry_point: str = "",
             family: str = "mbpp") -> T.Problem:
    prompt = f"{text}\nYour code should pass this test:\n{test_list[0]}\n" if test_list else f"{text}\n"
    return T.Problem(prompt=prompt, solution=code, answer="\n".join(test_list), task="code",
                     meta={"test_list": list(test_list), "entry_point": entry_point, "family": family})


def code_problem(rng: np.random.Generator, *, families: tuple[str, ...] | None = None) -> T.Problem:
    """One generated problem from a random family (``families`` restricts the choice)."""
    names = list(families or FAMILIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families={unknown} are invalid: must be among {', '.join(FAMILIES)}")
    family = str(rng.choice(names))
    text, name, code, args, oracle = FAMILIES[family](rng)
    tests = [f"assert {name}({a!r}) == {oracle(a)!r}" for a in args]
    return _problem(text, code, tests, name, family)


def from_mbpp(path, *, limit: int | None = None) -> list[T.Problem]:
    """Problems from an MBPP JSONL file (``text``/``code``/``test_list``), via
    :func:`llm_rl.tasks.load_jsonl` (which names the file and line of a bad record)."""
    records = T.load_jsonl(path, "mbpp")[:limit]
    return [_problem(r["prompt"], r["reference"], list(r["answer"])) for r in records]


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last ```python (or ```py) block; else the last fenced block; else the whole text."""
    blocks = _FENCE.findall(response)
    tagged = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    if tagged:
        return tagged[-1]
    return blocks[-1][1] if blocks else response


def grade_code(response: str, problem: T.Problem, *, timeout_s: float = 5.0,
               memory_mb: int = 256) -> float:
    """1.0 if the extracted code followed by the task's asserts runs to exit 0 in
    :func:`llm_rl.sandbox.run`, else 0.0 (failed assert, error, timeout, memory, killed)."""
    tests = problem.meta.get("test_list") or problem.answer.splitlines()
    if not tests:
        raise ValueError(f"problem {problem.prompt[:60]!r} has no tests to grade against")
    program = extract_code(response).rstrip() + "\n\n" + "\n".join(tests) + "\n"
    return float(run(program, timeout_s=timeout_s, memory_mb=memory_mb).status == "ok")


def make_code_problems(n: int, seed: int, **kw: Any) -> list[T.Problem]:
    """``n`` generated problems, the same for the same seed."""
    return T.make_problems("code", n, seed, **kw)
