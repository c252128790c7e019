"""Checking final answers to math problems: equal numbers, fractions and equivalent forms.

``math_equal(prediction, reference)`` decides whether two final answers (as a model writes
them, or as MATH's ``\\boxed{}`` holds them) denote the same value:

1. Normalise both strings: strip ``$``, ``\\boxed{..}``, ``\\text{..}`` units and words, ``\\left``/
   ``\\right``, ``\\!``/``\\,`` spacing, trailing ``.``, thousands separators ``1,234``, and
   ``\\%``; ``\\dfrac``/``\\tfrac`` -> ``\\frac``.
2. Compare exactly as rationals when both parse as numbers (``0.5`` = ``1/2`` = ``\\frac{1}{2}``).
3. Otherwise translate the LaTeX subset that final answers use (``\\frac{a}{b}``,
   ``\\sqrt{x}``, ``\\sqrt[n]{x}``, ``^``, ``\\cdot``, ``\\times``, ``\\pi``, implicit
   multiplication like ``2\\pi`` or ``3x``) to sympy and test ``simplify(a - b) == 0``.
   Tuples / intervals compare element-wise.

Nothing here evaluates arbitrary code: sympy parses with a fixed transformation set and
no ``eval`` of user strings; overly long inputs are rejected.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_LENGTH = 200


def _strip_braced_command(text: str, command: str) -> str:
    """``\\command{x}`` -> ``x`` (balanced braces), for every occurrence."""
    while True:
        start = text.find(command + "{")
        if start < 0:
            return text
        i, depth = start + len(command) + 1, 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                text = text[:start] + text[i:j] + text[j + 1:]
                break
        else:
            return text


def normalize(answer: str) -> str:
    text = answer.strip()
    text = _strip_braced_command(text, "\\boxed")
    text = re.sub(r"\\text\{[^{}]*\}", "", text)  # units and words: "5\text{ cm}" -> "5"
    text = text.replace("$", "").replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\\[!,;: ]", "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "").replace("%", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\degree", "")
    text = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", text)  # thousands separators
    return text.strip().rstrip(".").strip()


def _as_fraction(text: str) -> Fraction | None:
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", text)
    if m and int(m.group(3)):
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def latex_to_sympy_text(text: str) -> str:
    """Translate the LaTeX subset of final answers to sympy syntax."""
    out = text
    for _ in range(10):  # nested \frac / \sqrt
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", out)
        new = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        new = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"sqrt(\1)", new)
        if new == out:
            break
        out = new
    out = out.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi")
    out = out.replace("^", "**").replace("{", "(").replace("}", ")")
    return out


def _sympy_value(text: str):
    from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    if len(text) > MAX_LENGTH or re.search(r"[^0-9a-zA-Z+\-*/().\s]", text) or "__" in text:
        return None
    try:
        return parse_expr(text, transformations=standard_transformations +
                          (implicit_multiplication_application,), evaluate=True)
    except Exception:  # sympy raises many types on malformed input
        return None


def _split_tuple(text: str) -> list[str] | None:
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]" and "," in text:
        return [part.strip() for part in text[1:-1].split(",")]
    return None


def math_equal(prediction: str | None, reference: str | None) -> bool:
    """True if the two final answers denote the same value (see the module docstring)."""
    if prediction is None or reference is None:
        return False
    a, b = normalize(prediction), normalize(reference)
    if not a or not b or len(a) > MAX_LENGTH or len(b) > MAX_LENGTH:
        return False
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    ta, tb = _split_tuple(a), _split_tuple(b)
    if ta is not None or tb is not None:
        return (ta is not None and tb is not None and len(ta) == len(tb)
                and a[0] == b[0] and a[-1] == b[-1] and all(math_equal(x, y) for x, y in zip(ta, tb)))
    va, vb = _sympy_value(latex_to_sympy_text(a)), _sympy_value(latex_to_sympy_text(b))
    if va is None or vb is None:
        return False
    import sympy

    try:
        return bool(sympy.simplify(va - vb) == 0)
    except Exception:  # e.g. comparing incompatible objects
        return False
