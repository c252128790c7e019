"""Chain-of-thought trace sources for SFT ("Shape of Thought", arXiv 2512.22255, Sec. 3).

A :class:`Trace` is a completion for one :class:`llm_rl.tasks.Problem`, with where it came
from, its flaw level and the character spans of its flaws. The sources:

- **H, human** (:func:`human_trace`): a reference solver's steps (the tasks' own worked
  solutions, :attr:`Problem.solution`) written out in one fixed, human, prose style:
  ``"First, 45 times 2 is 90. Then 23 plus 90 is 113. So the answer is 113. #### 113"``.
  Deterministic: the same problem always gives the same text.
- **G / W, teacher** (:func:`teacher_traces`): a larger model (trained by the experiment, or
  loaded with ``from_pretrained``) samples ``k`` completions per problem at a temperature;
  the task's grader splits them into G (correct final answer) and W (a final answer, and a
  wrong one). At most one G and one W trace per problem keeps the sets diverse.
- **P, paraphrase** (:func:`paraphrase_traces`): a *model* rewrites each human trace. The
  paraphraser is a student-family model fine-tuned (by :func:`paraphrase_examples` data and
  :func:`llm_rl.sft.train_sft`) to map ``problem + human trace`` to a model-written trace of
  the same problem (the teacher's G trace), i.e. from the human style toward the models'
  style while keeping the human trace's content in context; its outputs are kept only when
  their final answer is correct. Why this choice and not sampling a model with the human
  trace in its context: at the scale the experiment trains (a few hundred thousand
  parameters, no instruction following) an untrained-for-it model ignores or copies the
  context; a model trained on the mapping is the small-scale analogue of the paper's
  "rewrite this solution in your own words" prompt, and it is still a model, so its output
  moves when its parameters do (tests/llm_rl/test_traces.py checks that).
- **Flawed** (:func:`inject_flaws`): human traces with graded, cumulative flaws:

  ===== ========================================================================= ============
  level flaws added                                                                final answer
  ===== ========================================================================= ============
  0     none (the human trace)                                                    correct
  1     arithmetic slip: the last step states a wrong result                      correct
  2     + skipped step: an earlier step's sentence is removed                     correct
  3     + wrong intermediate values: earlier results wrong, carried into later    correct
        steps that use them
  4     + wrong final answer                                                      wrong
  ===== ========================================================================= ============

  A one-step problem has no earlier step: level 2 removes its only step (and with it the
  slip), and level 3 adds nothing to level 2.

  Every flaw is recorded as a :class:`Flaw` ``(kind, start, end, original)``: the span
  ``text[start:end]`` of the flawed text replaced ``original`` of the clean one (a skipped
  step is an empty span whose ``original`` is the removed sentence), so putting the originals
  back gives the clean trace exactly.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence

import jax
import numpy as np

from llm_rl import tasks
from llm_rl.tasks import ANSWER_MARK, Problem

SOURCES = ("H", "G", "W", "P", "F")
FLAW_LEVELS = (0, 1, 2, 3, 4)
FLAW_KINDS = ("arithmetic_slip", "skipped_step", "wrong_intermediate", "wrong_final_answer")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
_CONNECTORS = ("First", "Then", "Next", "After that")
_STEP = re.compile(r"(-?\d+)([+\-*/])(-?\d+)=(-?\d+)")


@dataclasses.dataclass(frozen=True)
class Flaw:
    kind: str  # one of FLAW_KINDS
    start: int  # span [start, end) of the flawed text
    end: int
    original: str  # what the clean trace had there


@dataclasses.dataclass(frozen=True)
class Trace:
    problem: Problem
    text: str  # the completion (ends with "#### answer")
    source: str  # H, G, W, P or F (flawed human)
    level: int = 0
    flaws: tuple[Flaw, ...] = ()

    @property
    def correct(self) -> bool:
        return grade_trace_text(self.text, self.problem) == 1.0


def grade_trace_text(text: str, problem: Problem) -> float:
    """The task's grader: the generated tasks' own, GSM8K numeric equality, MATH equivalence."""
    if problem.task == "gsm8k":
        return tasks.grade_numeric(text, problem.answer)
    if problem.task == "math":
        return tasks.grade_math(text, problem.answer)
    return tasks.grade(text, problem)


# --- human traces --------------------------------------------------------------------------


def reference_steps(problem: Problem) -> list[tuple[str, str, str, str]]:
    """The reference solver's steps ``(a, op, b, result)`` from the task's worked solution."""
    if problem.task not in ("arithmetic", "countdown"):
        raise ValueError(f"no reference solver for task {problem.task!r}")
    work = problem.solution.split(ANSWER_MARK)[0]
    return [m.groups() for m in _STEP.finditer(work)]


def _sentences(problem: Problem) -> tuple[list[list[tuple[str, object]]], list[tuple[str, object]]]:
    """Step sentences and the closing sentence as pieces ``(text, tag)``; tags name the
    pieces a flaw may replace: ``("result", i)`` (step i's result), ``("carry", j, k)``
    (operand k of step j, which carries the result of an earlier step) and ``("final",)``."""
    steps, earlier = [], {}
    for j, (a, op, b, c) in enumerate(reference_steps(problem)):
        conn = _CONNECTORS[min(j, len(_CONNECTORS) - 1)]
        tag = lambda x, k: ("carry", j, k, earlier[x]) if x in earlier else None  # noqa: B023, E731
        steps.append([(f"{conn}, ", None), (a, tag(a, 0)), (f" {_OP_WORDS[op]} ", None), (b, tag(b, 1)),
                      (" is ", None), (c, ("result", j)), (". ", None)])
        earlier[c] = j
    closing = [("So the answer is ", None), (problem.answer, ("final",)), (f". {ANSWER_MARK} ", None),
               (problem.answer, ("final",))]
    return steps, closing


def _render(steps, closing, replace: dict, skip: set[int], kinds: dict) -> tuple[str, tuple[Flaw, ...]]:
    out, flaws, at = [], [], 0
    for i, sentence in enumerate(steps + [closing]):
        if i in skip:
            flaws.append(Flaw("skipped_step", at, at, "".join(t for t, _ in sentence)))
            continue
        for text, tag in sentence:
            new = _replacement(tag, replace, kinds)
            if new is not None and new != text:
                kind = "wrong_intermediate" if tag[0] == "carry" else kinds[tag]
                flaws.append(Flaw(kind, at, at + len(new), text))
                text = new
            out.append(text)
            at += len(text)
    return "".join(out), tuple(flaws)


def _replacement(tag, replace: dict, kinds: dict) -> str | None:
    """What replaces a tagged piece: its own replacement, or for a carried operand the wrong
    intermediate value of the step it carries (only wrong intermediates propagate)."""
    if tag is None:
        return None
    if tag[0] == "carry":
        source = ("result", tag[3])
        return replace[source] if kinds.get(source) == "wrong_intermediate" else None
    return replace.get(tag)


def human_trace(problem: Problem) -> Trace:
    """The human-style trace of ``problem`` (deterministic)."""
    steps, closing = _sentences(problem)
    text, _ = _render(steps, closing, {}, set(), {})
    return Trace(problem, text, "H")


def _off(value: str, rng: np.random.Generator) -> str:
    """A different integer near ``value``."""
    delta = int(rng.choice([-10, -2, -1, 1, 2, 10]))
    return str(int(value) + delta)


def inject_flaws(problem: Problem, level: int, seed: int) -> Trace:
    """The human trace of ``problem`` with the cumulative flaws of ``level`` drawn from
    ``seed`` (one random stream for all levels, so level k adds to level k-1's flaws):

    1. arithmetic slip: the last step states a wrong result (the answer is still right);
    2. + skipped step: a random earlier step is removed (with one step: that step);
    3. + wrong intermediate values: every earlier step's result is replaced by a wrong value,
       carried into the later steps that use it (the shown ones; the final answer is kept);
    4. + wrong final answer (arithmetic: a nearby integer; Countdown: ``expr+1``).

    Level 0 is the human trace itself."""
    if level not in FLAW_LEVELS:
        raise ValueError(f"level={level} is invalid: must be one of {FLAW_LEVELS}")
    if level == 0:
        return dataclasses.replace(human_trace(problem), source="F", level=0)
    steps, closing = _sentences(problem)
    rng = np.random.default_rng([seed, zlib.crc32(problem.prompt.encode())])
    n = len(steps)
    result = lambda i: steps[i][5][0]  # noqa: E731
    slip_value = _off(result(n - 1), rng)
    skipped = int(rng.integers(n - 1)) if n > 1 else 0
    wrong = {i: _off(result(i), rng) for i in range(n - 1)}
    final = f"{problem.answer}+1" if problem.task == "countdown" else _off(problem.answer, rng)
    replace, kinds, skip = {("result", n - 1): slip_value}, {("result", n - 1): "arithmetic_slip"}, set()
    if level >= 2:
        skip.add(skipped)
    if level >= 3:
        for i, value in wrong.items():
            replace[("result", i)] = value
            kinds[("result", i)] = "wrong_intermediate"
    if level >= 4:
        replace[("final",)] = final
        kinds[("final",)] = "wrong_final_answer"
    text, flaws = _render(steps, closing, replace, skip, kinds)
    return Trace(problem, text, "F", level, flaws)


def restore(trace: Trace) -> str:
    """The clean text: every flaw span put back to its original (inverse of the injection)."""
    text = trace.text
    for flaw in sorted(trace.flaws, key=lambda f: f.start, reverse=True):
        text = text[:flaw.start] + flaw.original + text[flaw.end:]
    return text


# --- model-generated traces ----------------------------------------------------------------


def sample_completions(model, tokenizer, prompts: Sequence[str], key: jax.Array, *,
                       max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                       batch_size: int = 256) -> list[str]:
    """Completions of ``prompts`` (rendered by :func:`llm_rl.sft.render_prompt`, as in
    training), decoded without special tokens; batches are padded to one shape."""
    from llm_rl.sampling import generate
    from llm_rl.sft import render_prompt
    from llm_rl.tokenization import encode_prompts

    rendered = [render_prompt(tokenizer, p) for p in prompts]
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids, mask = encode_prompts(tokenizer, rendered, add_bos=not templated, pad_to_multiple=32)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        real = len(b_ids)
        rows = min(batch_size, -(-real // 32) * 32)  # few distinct shapes: few compilations
        if real < rows:
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[-1:], rows - real, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[-1:], rows - real, 0)])
        res = generate(model, b_ids, b_mask, jax.random.fold_in(key, start),
                       max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                       eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id or 0)
        out += tokenizer.batch_decode(np.asarray(res.tokens)[:real], skip_special_tokens=True)
    return out


def split_by_answer(problems: Sequence[Problem], texts: Sequence[str], source_ok: str = "G",
                    source_wrong: str = "W") -> tuple[list[Trace], list[Trace]]:
    """(correct, wrong) traces by the task's grader: wrong means a final answer was given
    (``#### ...``) and the grader rejects it; texts without a final answer are dropped."""
    ok, wrong = [], []
    for p, text in zip(problems, texts, strict=True):
        text = text.strip()
        if tasks.final_answer(text) is None:
            continue
        if grade_trace_text(text, p) == 1.0:
            ok.append(Trace(p, text, source_ok))
        else:
            wrong.append(Trace(p, text, source_wrong))
    return ok, wrong


def teacher_traces(model, tokenizer, problems: Sequence[Problem], key: jax.Array, *,
                   samples_per_problem: int = 4, temperature: float = 1.0,
                   max_new_tokens: int = 64) -> tuple[list[Trace], list[Trace]]:
    """(G, W): the teacher's sampled traces with a correct / wrong final answer, at most one
    of each per problem (the first sample of each kind)."""
    prompts = [p.prompt for p in problems for _ in range(samples_per_problem)]
    repeated = [p for p in problems for _ in range(samples_per_problem)]
    texts = sample_completions(model, tokenizer, prompts, key, max_new_tokens=max_new_tokens,
                               temperature=temperature)
    ok, wrong = split_by_answer(repeated, texts)
    return _first_per_problem(ok), _first_per_problem(wrong)


def _first_per_problem(traces: list[Trace]) -> list[Trace]:
    seen, out = set(), []
    for t in traces:
        if t.problem.prompt not in seen:
            seen.add(t.problem.prompt)
            out.append(t)
    return out


def paraphrase_prompt(problem: Problem, human: str) -> str:
    """What the paraphraser reads: the question, the human trace, then ``"Rewrite: "``."""
    question = problem.prompt.split("\n")[0]
    return f"{question}\nHuman: {human}\nRewrite: "


def paraphrase_examples(pairs: Sequence[tuple[Trace, Trace]]) -> list[tuple[str, str]]:
    """SFT examples for the paraphraser from (human trace, model trace) pairs of one problem."""
    return [(paraphrase_prompt(h.problem, h.text), m.text) for h, m in pairs]


def paraphrase_traces(model, tokenizer, humans: Sequence[Trace], key: jax.Array, *,
                      max_new_tokens: int = 64, temperature: float = 0.0,
                      keep_correct: bool = True) -> list[Trace]:
    """P traces: ``model`` rewrites each human trace (greedy when ``temperature == 0``);
    with ``keep_correct`` only rewrites with the correct final answer are kept."""
    prompts = [paraphrase_prompt(h.problem, h.text) for h in humans]
    texts = sample_completions(model, tokenizer, prompts, key, max_new_tokens=max_new_tokens,
                               temperature=max(temperature, 1e-3), greedy=temperature == 0.0)
    out = [Trace(h.problem, t.strip(), "P") for h, t in zip(humans, texts, strict=True)]
    return [t for t in out if t.correct] if keep_correct else out
