"""cot_sft: does the distribution of chain-of-thought traces matter more than their correctness?

Reproduces the design of "Shape of Thought: When Distribution Matters More than Correctness
in Reasoning Tasks" (arXiv 2512.22255) at laptop scale. Students of two sizes are fine-tuned
(:mod:`llm_rl.sft`) on one trace set each, every set at the same completion-token budget:

- ``H``: human-style traces (a reference solver written in a fixed prose style);
- ``G`` / ``W``: a larger teacher's sampled traces with a correct / wrong final answer;
- ``P``: the human traces rewritten by a paraphraser model (kept when correct);
- ``F1`` .. ``F4``: the human traces with graded, cumulative flaws (:mod:`llm_rl.traces`).

Pipeline (all models trained here; ``paper`` loads them with ``from_pretrained`` instead):

1. **Base students** (sizes ``students``) pretrained on single-operation equation facts
   (``8*3=24``) as generic text plus questions of up to ``data.base_answer_ops`` operators with
   their *final answers only* (``Q: 7*3=?\\nA: #### 21``). Why: the base knows the prompt/answer
   format and the elementary facts, but has never seen a worked trace; with
   ``base_answer_ops`` below the in-domain operator count (``cpu``: 1 vs 2) it cannot answer the
   in-domain problems directly either (a base that answers them directly at 0.34 made every
   SFT gain negative, docs/cot_sft_results.md), so what it learns about multi-step reasoning
   comes from the SFT traces alone, and the trace styles differ in how close they are to its
   distribution
   (compact equations are close to its facts; prose is not). Pretraining on traces would let
   every set look alike; pretraining on unrelated text would leave the student unable to
   answer at all at this scale.
2. **Teacher**: a model of its own shape trained on the facts and the tasks' compact worked
   solutions (``7*3=21, 8+21=29 #### 29``, the model-native style of this project); it
   samples ``teacher_samples`` traces per training problem at ``temperature``, split by the
   grader into G and W.
3. **Paraphraser**: a copy of the first student's base fine-tuned on (human trace -> teacher's
   G trace) pairs; it rewrites every human trace, the correct rewrites are P.
4. Each trace set's perplexity under each *untrained* (base) student, then SFT of each
   student on each set for ``sft.token_budget`` completion tokens per seed, then greedy
   accuracy in domain (``data.min_ops``..``data.max_ops`` operations) and out of domain
   (``data.ood_ops`` operations: longer problems than any trace showed).

Seeds change the SFT data order and which documents fill the budget; the base students,
teacher and trace sets are built once per run (from ``seed``).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from experiments.registry import Experiment, RunContext, RunResult, UserError
from llm_rl.sft import SFTConfig
from trainkit import plots
from trainkit.config import Config, ConfigError, field, load_json
from trainkit.run import RunDir, is_main_process, read_json, write_json
from trainkit.sharding import from_main

TRACE_SETS = ("H", "G", "W", "P", "F1", "F2", "F3", "F4")
STUDENTS = ("small", "large")
JSONL_TASKS = ("gsm8k", "math")


@dataclasses.dataclass(frozen=True)
class ArchConfig(Config):
    hidden_size: int = field(64, ge=8)
    intermediate_size: int = field(192, ge=8)
    num_hidden_layers: int = field(2, ge=1)
    num_attention_heads: int = field(4, ge=1)
    num_key_value_heads: int = field(2, ge=1)
    head_dim: int = field(16, ge=2)


@dataclasses.dataclass(frozen=True)
class ModelsConfig(Config):
    family: str = field("qwen3", choices=("qwen3", "qwen2", "llama"))
    small: ArchConfig = field(factory=ArchConfig)
    large: ArchConfig = field(factory=lambda: ArchConfig(hidden_size=96, intermediate_size=288,
                                                         num_hidden_layers=3))
    teacher: ArchConfig = field(factory=lambda: ArchConfig(hidden_size=128, intermediate_size=384,
                                                           num_hidden_layers=3, head_dim=32))
    # paper: HF checkpoints (local directories) instead of training the models here
    small_dir: str | None = field(None, help="HF dir of the small student (paper preset)")
    large_dir: str | None = field(None, help="HF dir of the large student")
    teacher_dir: str | None = field(None, help="HF dir of the teacher")

    def validate(self):
        given = [self.small_dir, self.large_dir, self.teacher_dir]
        if any(given) and not all(given):
            raise self.invalid("small_dir", "small_dir, large_dir and teacher_dir go together")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    task: str = field("arithmetic", choices=("arithmetic", "countdown") + JSONL_TASKS)
    jsonl: str | None = field(None, help="GSM8K/MATH JSONL file (task gsm8k or math)")
    min_ops: int = field(2, ge=1, help="in-domain arithmetic: fewest operators")
    max_ops: int = field(2, ge=1, help="in-domain arithmetic: most operators")
    ood_ops: int = field(3, ge=1, help="out-of-domain arithmetic: operators (longer problems)")
    max_value: int = field(9, ge=1)
    countdown_numbers: int = field(3, ge=2)
    num_pretrain: int = field(2000, ge=1, help="base corpus: equation facts, and at most this many "
                              "question/answer problems")
    base_answer_ops: int = field(3, ge=0, help="the base corpus answers (directly, no trace) problems "
                                 "with up to this many operators only; 0 = equation facts only")
    num_teacher: int = field(2000, ge=1, help="problems with compact traces for the teacher")
    num_train: int = field(400, ge=1, help="SFT problems (every trace set is made from them)")
    num_eval: int = field(64, ge=1, help="evaluation problems, each of in and out of domain")

    def validate(self):
        if self.min_ops > self.max_ops:
            raise self.invalid("min_ops", f"must be <= max_ops ({self.max_ops})")
        if (self.task in JSONL_TASKS) != (self.jsonl is not None):
            raise self.invalid("jsonl", "is needed for tasks gsm8k/math and only for them")


@dataclasses.dataclass(frozen=True)
class GenerationConfig(Config):
    teacher_samples: int = field(4, ge=1, help="samples per training problem")
    temperature: float = field(1.0, gt=0)
    max_new_tokens: int = field(96, ge=8, help="trace generation budget")
    eval_max_new_tokens: int = field(128, ge=8, help="evaluation budget (OOD traces are longer)")


@dataclasses.dataclass(frozen=True)
class CotSFTConfig(Config):
    seed: int = field(0, ge=0)
    trace_sets: tuple[str, ...] = field(TRACE_SETS, help="subset of H G W P F1 F2 F3 F4")
    students: tuple[str, ...] = field(STUDENTS, help="student sizes trained (subset of small large); "
                                      "the first one's base is also the paraphraser's start")
    models: ModelsConfig = field(factory=ModelsConfig)
    data: DataConfig = field(factory=DataConfig)
    generation: GenerationConfig = field(factory=GenerationConfig)
    base: SFTConfig = field(factory=lambda: SFTConfig(seq_len=64, batch_size=32, token_budget=60_000,
                                                      lr=3e-3), help="base-student pretraining")
    teacher: SFTConfig = field(factory=lambda: SFTConfig(seq_len=64, batch_size=32, token_budget=150_000,
                                                         lr=3e-3), help="teacher training")
    paraphraser: SFTConfig = field(factory=lambda: SFTConfig(seq_len=192, batch_size=16, token_budget=30_000,
                                                             lr=2e-3), help="paraphraser fine-tuning")
    sft: SFTConfig = field(factory=lambda: SFTConfig(seq_len=128, batch_size=16, token_budget=15_000,
                                                     lr=1e-3), help="student SFT on each trace set")

    def validate(self):
        bad = [s for s in self.trace_sets if s not in TRACE_SETS]
        if bad or not self.trace_sets:
            raise ConfigError("trace_sets", self.trace_sets, f"each must be one of {', '.join(TRACE_SETS)}")
        if not self.students or any(s not in STUDENTS for s in self.students):
            raise ConfigError("students", self.students, f"each must be one of {', '.join(STUDENTS)}")
        if self.data.task in JSONL_TASKS and any(s.startswith("F") for s in self.trace_sets):
            raise ConfigError("trace_sets", self.trace_sets, "flaw levels need a reference solver "
                              "(tasks arithmetic, countdown); drop F1..F4 for JSONL tasks")


def smoke() -> CotSFTConfig:
    """Seconds: tiny models, one-operator problems, the small student only; every stage shares
    one row shape so each model shape compiles its step once."""
    tiny = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16)
    larger = dataclasses.replace(tiny, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    stage = lambda budget, lr: SFTConfig(seq_len=128, batch_size=8, token_budget=budget, lr=lr,  # noqa: E731
                                         chunk_size=50)
    return CotSFTConfig(
        trace_sets=("H", "G", "W", "P", "F2", "F4"), students=("small",),
        models=ModelsConfig(small=tiny, large=larger, teacher=larger),
        data=DataConfig(min_ops=1, max_ops=1, ood_ops=2, max_value=12, num_pretrain=200, base_answer_ops=2,
                        num_teacher=250, num_train=48, num_eval=8),
        generation=GenerationConfig(teacher_samples=2, max_new_tokens=64, eval_max_new_tokens=64),
        base=stage(3000, 3e-3), teacher=stage(60000, 1e-2), paraphraser=stage(20000, 1e-2),
        sft=stage(1000, 1e-3))


def cpu() -> CotSFTConfig:
    """Half an hour on 2 shared cores with ``--seeds 3``: two-operator arithmetic in domain, three
    out, the small student only (``--set students=small,large`` adds the large one).

    Chosen from the probes in docs/cot_sft_results.md: the base answers only one-operator
    questions directly (plus equation facts), so it cannot answer the in-domain problems without
    a trace (base accuracy ~0) and every gain comes from what SFT teaches; SFT runs ~500
    steps (300k completion tokens, batch 8 x 128) where 100k tokens / 84 steps left the student
    unable even to copy the operands; the teacher is smaller and shorter-trained than a
    near-perfect one, so that several samples at temperature 1 give a real W set."""
    return CotSFTConfig(
        students=("small",),
        models=ModelsConfig(
            small=ArchConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2),
            large=ArchConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3, head_dim=32),
            teacher=ArchConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3, head_dim=32)),
        data=DataConfig(min_ops=2, max_ops=2, ood_ops=3, max_value=9, num_pretrain=6000, base_answer_ops=1,
                        num_teacher=4000, num_train=1000, num_eval=128),
        generation=GenerationConfig(teacher_samples=6, temperature=1.0, max_new_tokens=96,
                                    eval_max_new_tokens=128),
        base=SFTConfig(seq_len=64, batch_size=32, token_budget=800_000, lr=3e-3, warmup_steps=50,
                       chunk_size=100),
        teacher=SFTConfig(seq_len=128, batch_size=32, token_budget=800_000, lr=3e-3, warmup_steps=50,
                          chunk_size=100),
        paraphraser=SFTConfig(seq_len=192, batch_size=16, token_budget=150_000, lr=2e-3, chunk_size=100),
        sft=SFTConfig(seq_len=128, batch_size=8, token_budget=300_000, lr=2e-3, warmup_steps=20,
                      chunk_size=100))


def paper() -> CotSFTConfig:
    """The paper's setting: students and teacher from HF checkpoints (e.g. Qwen2.5-1.5B /
    Qwen3-4B students, a Qwen3-8B teacher), GSM8K through the JSONL loader. Flaw levels need a
    reference solver, so this preset uses H G W P (run the arithmetic task for the flaws)."""
    return CotSFTConfig(
        trace_sets=("H", "G", "W", "P"),
        models=ModelsConfig(small_dir="checkpoints/Qwen2.5-1.5B", large_dir="checkpoints/Qwen3-4B",
                            teacher_dir="checkpoints/Qwen3-8B"),
        data=DataConfig(task="gsm8k", jsonl="data/gsm8k/train.jsonl", num_train=7473, num_eval=1319),
        generation=GenerationConfig(teacher_samples=4, temperature=0.7, max_new_tokens=512,
                                    eval_max_new_tokens=512),
        sft=SFTConfig(seq_len=2048, batch_size=64, token_budget=5_000_000, lr=1e-5, warmup_steps=50,
                 chunk_size=20, save_every=200))


# --- data ----------------------------------------------------------------------------------


def _problems(cfg: CotSFTConfig):
    """(pretrain Q/A problems, teacher problems, SFT problems, eval in-domain, eval OOD),
    prompts disjoint between the SFT/teacher pools and the evaluation sets."""
    from llm_rl import tasks

    d = cfg.data
    if d.task in JSONL_TASKS:
        records = tasks.load_jsonl(d.jsonl, d.task)
        probs = [tasks.Problem(prompt=f"Q: {r['prompt']}\nA: ", solution=r["reference"],
                               answer=str(r["answer"]), task=d.task) for r in records]
        n_eval = min(d.num_eval, len(probs) // 2)
        return [], probs[n_eval:], probs[n_eval:][:d.num_train], probs[:n_eval], []
    rng = np.random.default_rng([cfg.seed, 17])

    def draw(n, ops_lo, ops_hi, exclude, exact=True):
        out = []
        for _ in range(50 * n):
            if d.task == "arithmetic":
                p = tasks.arithmetic_problem(rng, min_ops=ops_lo, max_ops=ops_hi, max_value=d.max_value)
            else:
                p = tasks.countdown_problem(rng, num_numbers=d.countdown_numbers + ops_lo - d.min_ops)
            if p.prompt not in exclude:
                exclude.add(p.prompt)
                out.append(p)
                if len(out) == n:
                    return out
        if not exact:
            return out
        raise UserError(f"data: found only {len(out)} distinct problems with {ops_lo}-{ops_hi} "
                        "operators; lower the problem counts or raise data.max_value")

    seen: set[str] = set()
    eval_in = draw(d.num_eval, d.min_ops, d.max_ops, seen)
    eval_ood = draw(d.num_eval, d.ood_ops, d.ood_ops, seen)
    train = draw(d.num_train, d.min_ops, d.max_ops, seen)
    teacher = draw(d.num_teacher, d.min_ops, d.max_ops, set(seen))
    # Q/A pretraining: direct answers (never a trace) to problems of 1..base_answer_ops
    # operators; eval prompts excluded.
    pre_rng_problems = []
    for ops in range(1, d.base_answer_ops + 1):
        pre_rng_problems += draw(d.num_pretrain // d.base_answer_ops, ops, ops, set(seen), exact=False)
    return pre_rng_problems, teacher, train, eval_in, eval_ood


def equation_facts(max_value: int, seed: int, n: int) -> list[tuple[str, str]]:
    """Generic arithmetic text: single-operation facts ``a op b=c`` over the operand range
    the tasks' intermediate results reach (one operand up to max_value**2, the other up to
    max_value, either sign of the first)."""
    rng = np.random.default_rng([seed, 23])
    big = max_value * max_value + max_value
    out = []
    for _ in range(n):
        a = int(rng.integers(-big, big + 1))
        b = int(rng.integers(0, max_value + 1))
        if rng.random() < 0.5:
            a, b = b, a
        op = str(rng.choice(["+", "-", "*"]))
        c = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(("", f"{a}{op}{b}={c}"))
    return out


def base_examples(cfg: CotSFTConfig, pretrain) -> list[tuple[str, str]]:
    """The base corpus: ``data.num_pretrain`` equation facts and the questions of ``pretrain``
    with their final answers only."""
    from llm_rl.tasks import ANSWER_MARK

    qa = [(p.prompt, f"{ANSWER_MARK} {p.answer}") for p in pretrain]
    return qa + equation_facts(cfg.data.max_value, cfg.seed, cfg.data.num_pretrain)


# --- models --------------------------------------------------------------------------------


def _new_model(cfg: CotSFTConfig, arch: ArchConfig, tokenizer, seed: int):
    from experiments.lm_pretrain import ModelConfig, model_config
    from llm_rl.models.checkpoint import family_of_config

    mc = ModelConfig(family=cfg.models.family, tie_word_embeddings=True,
                     **{f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)})
    mcfg = model_config(mc, len(tokenizer), tokenizer)
    return family_of_config(mcfg).model_class(mcfg, rngs=nnx.Rngs(params=seed)), mcfg


def _stage(ctx: RunContext, tok, name: str, build, train_cfg, examples, seed: int):
    """Train (or reload) one model stage into ``run_dir/name/model``.

    With several processes a finished stage is not reloaded from ``model/``, which only process
    0's disk holds: every process resumes :func:`train_sft` from the stage's final checkpoint
    (checkpoints are on storage every process reaches, docs/scaling.md) and runs no step."""
    from llm_rl.models import from_pretrained, save_pretrained
    from llm_rl.sft import train_sft

    sub = RunDir(ctx.run_dir.path / name)
    model_dir = sub.path / "model"
    if jax.process_count() == 1 and (model_dir / "config.json").is_file() and sub.summary_path.exists():
        return from_pretrained(model_dir)[0]
    model, mcfg = build()
    model, info = train_sft(model, tok, examples, train_cfg, sub, seed=seed,
                            resume=ctx.resume, desc=name)
    if is_main_process() and not sub.summary_path.exists():
        save_pretrained(model, mcfg, model_dir)
        write_json(sub.summary_path, {"final": info})
    return model


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


def evaluate(model, tokenizer, problems, max_new_tokens: int) -> float:
    from llm_rl.traces import grade_trace_text, sample_completions

    if not problems:
        return float("nan")
    texts = sample_completions(model, tokenizer, [p.prompt for p in problems], jax.random.key(0),
                               max_new_tokens=max_new_tokens, greedy=True)
    return float(np.mean([grade_trace_text(t, p) for t, p in zip(texts, problems, strict=True)]))


# --- run -----------------------------------------------------------------------------------


def build_trace_sets(cfg: CotSFTConfig, ctx: RunContext, tok, small_base, teacher, train) -> dict:
    """{name: [Trace]} for every configured trace set (cached in trace_sets.json)."""
    from llm_rl import traces
    from llm_rl.sft import train_sft

    g = cfg.generation
    human = [traces.human_trace(p) if p.task in ("arithmetic", "countdown")
             else traces.Trace(p, p.solution, "H") for p in train]
    sets = {"H": human}
    G, W = traces.teacher_traces(teacher, tok, train, jax.random.key(cfg.seed + 1),
                                 samples_per_problem=g.teacher_samples, temperature=g.temperature,
                                 max_new_tokens=g.max_new_tokens)
    sets["G"], sets["W"] = G, W
    if "P" in cfg.trace_sets:
        by_prompt = {h.problem.prompt: h for h in human}
        pairs = [(by_prompt[t.problem.prompt], t) for t in G]
        if not pairs:
            raise UserError("the teacher produced no correct trace: no pairs to train the paraphraser "
                            "(raise teacher.token_budget)")
        para = _copy(small_base)
        sub = RunDir(ctx.run_dir.path / "paraphraser")
        para, info = train_sft(para, tok, traces.paraphrase_examples(pairs), cfg.paraphraser, sub,
                               seed=cfg.seed, resume=ctx.resume, desc="paraphraser")
        if is_main_process():
            write_json(sub.summary_path, {"final": info})
        sets["P"] = traces.paraphrase_traces(para, tok, human, jax.random.key(cfg.seed + 2),
                                             max_new_tokens=g.max_new_tokens)
    for level in (1, 2, 3, 4):
        if f"F{level}" in cfg.trace_sets:
            sets[f"F{level}"] = [traces.inject_flaws(p, level, cfg.seed) for p in train]
    empty = [k for k in cfg.trace_sets if not sets.get(k)]
    if empty:
        raise UserError(f"trace set(s) {', '.join(empty)} came out empty (no teacher sample of that "
                        "kind, or no correct paraphrase); train the teacher/paraphraser longer")
    return {k: sets[k] for k in cfg.trace_sets}


def run(cfg: CotSFTConfig, ctx: RunContext) -> RunResult:
    from llm_rl.models import from_pretrained
    from llm_rl.sft import completion_nll, train_sft
    from llm_rl.tokenization import char_tokenizer, load_tokenizer

    if ctx.seeds < 1:
        raise UserError("--seeds must be >= 1")
    stages = {"base": cfg.base, "teacher": cfg.teacher, "paraphraser": cfg.paraphraser, "sft": cfg.sft}
    uneven = [f"{k}.batch_size={c.batch_size}" for k, c in stages.items() if c.batch_size % jax.device_count()]
    if jax.process_count() > 1 and uneven:
        raise UserError(f"{', '.join(uneven)}: with {jax.process_count()} processes every SFT batch "
                        f"is split over all {jax.device_count()} devices; use a multiple of that")
    m = cfg.models
    tok = load_tokenizer(m.small_dir) if m.small_dir else char_tokenizer()
    pretrain, teacher_pool, train, eval_in, eval_ood = _problems(cfg)
    if m.small_dir:
        dirs = {"small": m.small_dir, "large": m.large_dir}
        bases = {size: from_pretrained(dirs[size])[0] for size in cfg.students}
        teacher = from_pretrained(m.teacher_dir)[0]
    else:
        base_ex = base_examples(cfg, pretrain)
        archs = {"small": m.small, "large": m.large}
        bases = {}
        for size in cfg.students:
            seed = cfg.seed + STUDENTS.index(size)
            bases[size] = _stage(ctx, tok, f"base_{size}", lambda a=archs[size], s=seed: _new_model(cfg, a, tok, s),
                                 cfg.base, base_ex, cfg.seed)
        # facts + compact traces; not the answer-only Q/A pairs, which would teach the teacher
        # to answer without a trace
        facts = [ex for ex in base_ex if not ex[0]]
        teacher_ex = facts + [(p.prompt, p.solution) for p in teacher_pool]
        teacher = _stage(ctx, tok, "teacher", lambda: _new_model(cfg, m.teacher, tok, cfg.seed + 7),
                         cfg.teacher, teacher_ex, cfg.seed)
    sets = build_trace_sets(cfg, ctx, tok, bases[cfg.students[0]], teacher, train)
    g = cfg.generation
    results = {"sets": {k: {"n": len(v), "correct_frac": float(np.mean([t.correct for t in v])),
                            "mean_chars": float(np.mean([len(t.text) for t in v])),
                            "example": v[0].text} for k, v in sets.items()},
               "teacher": {"in": evaluate(teacher, tok, eval_in, g.eval_max_new_tokens)},
               "base": {}, "nll": {}, "runs": {}}
    for size, base in bases.items():
        results["base"][size] = {"in": evaluate(base, tok, eval_in, g.eval_max_new_tokens),
                                 "ood": evaluate(base, tok, eval_ood, g.eval_max_new_tokens)}
        results["nll"][size] = {k: completion_nll(base, tok, [(t.problem.prompt, t.text) for t in v],
                                                  seq_len=cfg.sft.seq_len)[0]
                                for k, v in sets.items()}
    runs_dir = ctx.run_dir.path / "runs"
    for seed_index in range(ctx.seeds):
        seed = cfg.seed + seed_index
        for size, base in bases.items():
            for name, traces_ in sets.items():
                tag = f"{size}-{name}-s{seed}"
                done = runs_dir / tag / "result.json"
                finished = from_main(read_json(done) if is_main_process() and done.exists() else None)
                if finished is not None:
                    results["runs"][tag] = finished
                    continue
                student = _copy(base)
                student, info = train_sft(student, tok, [(t.problem.prompt, t.text) for t in traces_],
                                          cfg.sft, RunDir(runs_dir / tag), seed=seed, resume=ctx.resume,
                                          desc=tag)
                row = {"size": size, "set": name, "seed": seed, **info,
                       "in": evaluate(student, tok, eval_in, g.eval_max_new_tokens),
                       "ood": evaluate(student, tok, eval_ood, g.eval_max_new_tokens)}
                if is_main_process():
                    write_json(done, row)
                results["runs"][tag] = row
    if is_main_process():
        write_json(ctx.run_dir.path / "results.json", results)
    metrics = {}
    for size in bases:
        for name in sets:
            accs = [r["in"] for r in results["runs"].values() if r["size"] == size and r["set"] == name]
            metrics[f"{size}/{name}/acc_in"] = float(np.mean(accs))
    return RunResult(params=nnx.state(bases[cfg.students[0]], nnx.Param), metrics=metrics,
                     steps=len(results["runs"]))


# --- report --------------------------------------------------------------------------------


def _pearson(x, y) -> float:
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(stats.pearsonr(x, y)[0])


def _spearman(x, y) -> float:
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y)[0])


def _mean_ci(values) -> tuple[float, float]:
    """Mean over seeds and the half-width of its 95% Student-t interval."""
    mean, ci = plots.mean_and_ci(np.asarray(values, float).reshape(-1, 1))
    return float(mean[0]), float(ci[0])


def _per_seed(values) -> tuple[float, float, int]:
    """Mean ± 95% CI over seeds of a per-seed statistic (seeds where it is undefined dropped)."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return (*_mean_ci(v), len(v)) if len(v) > 1 else (float(v[0]), float("nan"), 1)


def summarize(results: dict) -> dict:
    """Per (size, set, split): accuracies ordered by seed, their mean and 95% CI. Per (size,
    split): the gains over the base student and their correlation over trace sets with the set's
    perplexity, both from the seed means and per seed (mean ± CI of the per-seed correlations);
    and the least-squares slope of accuracy against flaw level (H = 0, F1..F4) per seed."""
    out: dict = {"acc": {}, "corr": {}, "flaw_slope": {}}
    sizes = sorted({r["size"] for r in results["runs"].values()}, key=list(STUDENTS).index)
    sets = [n for n in TRACE_SETS if n in results["sets"]]
    flaw_sets = [n for n in ("H", "F1", "F2", "F3", "F4") if n in sets]
    for size in sizes:
        for name in sets:
            rows = sorted((r for r in results["runs"].values() if r["size"] == size and r["set"] == name),
                          key=lambda r: r["seed"])
            for split in ("in", "ood"):
                vals = np.asarray([r[split] for r in rows], float)
                out["acc"][(size, name, split)] = (*_mean_ci(vals), vals.tolist())
        ppl = [float(np.exp(results["nll"][size][n])) for n in sets]
        for split in ("in", "ood"):
            base = results["base"][size][split]
            gains = [out["acc"][(size, n, split)][0] - base for n in sets]
            per_seed = np.asarray([out["acc"][(size, n, split)][2] for n in sets], float) - base  # [set, seed]
            seeds = range(min(len(out["acc"][(size, n, split)][2]) for n in sets))
            out["corr"][(size, split)] = {
                "ppl": ppl, "gain": gains, "pearson": _pearson(np.log(ppl), gains),
                "spearman": _spearman(ppl, gains),
                "pearson_seeds": _per_seed([_pearson(np.log(ppl), per_seed[:, k]) for k in seeds]),
                "spearman_seeds": _per_seed([_spearman(ppl, per_seed[:, k]) for k in seeds])}
            if len(flaw_sets) >= 2:
                levels = np.asarray([0 if n == "H" else int(n[1]) for n in flaw_sets], float)
                acc = np.asarray([out["acc"][(size, n, split)][2] for n in flaw_sets], float)
                out["flaw_slope"][(size, split)] = _per_seed(
                    [np.polyfit(levels, acc[:, k], 1)[0] for k in range(acc.shape[1])])
    out["sizes"], out["sets"] = sizes, sets
    return out


def _fmt_acc(entry) -> str:
    mean, ci, vals = entry
    return f"{mean:.3f} ± {ci:.3f}" if len(vals) > 1 else f"{mean:.3f}"


def _diff(s, size, a, b, split) -> str:
    """Mean over seeds of acc(a) - acc(b) (same seeds paired) with its 95% CI."""
    va, vb = np.asarray(s["acc"][(size, a, split)][2]), np.asarray(s["acc"][(size, b, split)][2])
    if not len(va) or len(va) != len(vb):
        return "n/a"
    mean, ci = _mean_ci(va - vb)
    return f"{mean:+.3f} ± {ci:.3f}"


def report(run_dir: RunDir) -> str:
    cfg = load_json(CotSFTConfig, run_dir.config_path)
    path = run_dir.path / "results.json"
    if not path.exists():
        raise UserError(f"{path}: no results (the run has not finished)")
    results = read_json(path)
    s = summarize(results)
    sizes, sets = s["sizes"], s["sets"]
    seeds = len({r["seed"] for r in results["runs"].values()})
    pdir = run_dir.plots_dir
    figs = []
    for split, what in (("in", "in domain"), ("ood", "out of domain")):
        for size in sizes:
            vals = [s["acc"][(size, n, split)] for n in sets]
            figs.append(plots.bar_chart(pdir / f"accuracy_{size}_{split}.png", sets, [v[0] for v in vals],
                                        errors=[v[1] for v in vals], ylabel="greedy accuracy",
                                        title=f"{size} student, {what} (mean ± 95% CI, {seeds} seeds)"))
    plt = plots._pyplot()
    flaw_sets = [n for n in ("H", "F1", "F2", "F3", "F4") if n in sets]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for size in sizes:
        for split in ("in", "ood"):
            levels = [0 if n == "H" else int(n[1]) for n in flaw_sets]
            v = [s["acc"][(size, n, split)] for n in flaw_sets]
            ax.errorbar(levels, [x[0] for x in v], yerr=[x[1] for x in v], marker="o", capsize=3,
                        label=f"{size}, {split}")
    ax.set_xlabel("flaw level (0 = human traces)")
    ax.set_ylabel("greedy accuracy")
    ax.set_title("accuracy vs flaw level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    pdir.mkdir(parents=True, exist_ok=True)
    fig.savefig(pdir / "accuracy_vs_flaw_level.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for size in sizes:
        c = s["corr"][(size, "in")]
        ax.scatter(c["ppl"], c["gain"], label=f"{size} (Spearman {c['spearman']:.2f})")
        for x, y, n in zip(c["ppl"], c["gain"], sets, strict=True):
            ax.annotate(n, (x, y), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trace-set perplexity under the untrained student")
    ax.set_ylabel("in-domain accuracy gain over the base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(pdir / "gain_vs_perplexity.png")
    plt.close(fig)

    rows = []
    for n in sets:
        info = results["sets"][n]
        rows.append([n, info["n"], f"{info['correct_frac']:.2f}", f"{info['mean_chars']:.0f}"]
                    + [f"{np.exp(results['nll'][size][n]):.2f}" for size in sizes]
                    + [_fmt_acc(s["acc"][(size, n, split)]) for size in sizes for split in ("in", "ood")])
    headers = (["set", "traces", "correct", "chars"] + [f"ppl ({size})" for size in sizes]
               + [f"{size} {split}" for size in sizes for split in ("in", "ood")])
    base_rows = [[size, f"{results['base'][size]['in']:.3f}", f"{results['base'][size]['ood']:.3f}"]
                 for size in sizes]
    comparisons = []
    for a, b, label in (("W", "H", "W vs H"), ("W", "G", "W vs G"), ("P", "H", "P vs H"), ("G", "H", "G vs H"),
                        ("F4", "H", "F4 vs H")):
        if a in sets and b in sets:
            comparisons.append([label] + [_diff(s, size, a, b, split) for size in sizes
                                          for split in ("in", "ood")])
    flaw_rows = [[n] + [_fmt_acc(s["acc"][(size, n, split)]) for size in sizes for split in ("in", "ood")]
                 for n in flaw_sets]

    def fmt_ci(m):
        return f"{m[0]:+.2f} ± {m[1]:.2f} ({m[2]} seeds)" if m[2] > 1 else f"{m[0]:+.2f}"

    corr_rows = [[size, split, f"{c['pearson']:.2f}", f"{c['spearman']:.2f}", fmt_ci(c["pearson_seeds"]),
                  fmt_ci(c["spearman_seeds"])]
                 for size in sizes for split in ("in", "ood") for c in [s["corr"][(size, split)]]]
    slope_rows = [[size, split, fmt_ci((100 * mean, 100 * ci, n))]  # in accuracy points
                  for (size, split), (mean, ci, n) in s["flaw_slope"].items()]
    example_rows = [[n, f"`{results['sets'][n]['example'][:110]}`"] for n in sets]
    rel = lambda p: p.relative_to(run_dir.path)  # noqa: E731
    acc_headers = [f"{size} {split}" for size in sizes for split in ("in", "ood")]
    text = (
        "# cot_sft: trace distribution vs correctness\n\n"
        f"Task {cfg.data.task}; in domain {cfg.data.min_ops}-{cfg.data.max_ops} operators, out of domain "
        f"{cfg.data.ood_ops}; every set trained for {cfg.sft.token_budget} completion tokens; {seeds} "
        f"seed(s), mean ± 95% CI (Student t) over seeds. Teacher greedy accuracy in domain: "
        f"{results['teacher']['in']:.3f}.\n\n"
        "## Trace sets\n\n" + plots.markdown_table(rows, headers) + "\n\n"
        "Base students (before SFT):\n\n" + plots.markdown_table(base_rows, ["student", "in", "ood"])
        + "\n\nOne example per set:\n\n" + plots.markdown_table(example_rows, ["set", "first trace"]) + "\n\n"
        + "".join(f"![accuracy]({rel(f)})\n" for f in figs)
        + "\n## W vs H\n\nAccuracy difference, paired by seed (mean ± 95% CI):\n\n"
        + plots.markdown_table([r for r in comparisons if r[0] in ("W vs H", "W vs G")],
                               ["comparison"] + acc_headers)
        + "\n\nW vs G compares a wrong and a correct final answer in the same (teacher's) style."
        + "\n\n## P vs H\n\n"
        + plots.markdown_table([r for r in comparisons if r[0] in ("P vs H", "G vs H")],
                               ["comparison"] + acc_headers)
        + "\n\n## Accuracy vs flaw level\n\n" + plots.markdown_table(flaw_rows, ["set"] + acc_headers)
        + "\n\n" + plots.markdown_table([r for r in comparisons if r[0] == "F4 vs H"], ["comparison"] + acc_headers)
        + "\n\nLeast-squares slope of accuracy against flaw level, per seed (accuracy points per "
        "level; mean ± 95% CI over seeds):\n\n"
        + plots.markdown_table(slope_rows, ["student", "split", "slope (points / level)"])
        + "\n\n![flaw levels](plots/accuracy_vs_flaw_level.png)\n\n"
        "## Perplexity vs gain\n\nCorrelation over trace sets between the set's perplexity under the "
        "untrained student (Pearson on log perplexity) and the accuracy gain SFT on it gives, from the "
        "seed means and per seed (mean ± 95% CI over seeds):\n\n"
        + plots.markdown_table(corr_rows, ["student", "split", "Pearson", "Spearman", "Pearson per seed",
                                           "Spearman per seed"])
        + "\n\n![gain vs perplexity](plots/gain_vs_perplexity.png)\n")
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


EXPERIMENT = Experiment(
    name="cot_sft",
    description="CoT-trace SFT: human, teacher-correct, teacher-wrong, paraphrased and flawed traces "
                "at equal token budgets (Shape of Thought, arXiv 2512.22255)",
    config_cls=CotSFTConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)

