"""asyppo: PPO with an ensemble of mini-critics (AsyPPO, arXiv 2510.01656) against GRPO and
symmetric PPO on generated reasoning tasks.

A decoder pretrained from scratch on arithmetic (:mod:`experiments.lm_pretrain`, unless
``base.model_dir`` points at one, e.g. Qwen3-4B-Base in the ``paper`` preset) is fine-tuned
with RL, once per method in ``grid.methods`` and per seed, each in its own resumable sub-run
(``configs/NAME-sSEED/``):

- ``grpo``: :mod:`llm_rl.rl` (group advantages, no critic);
- ``ppo-actor``: PPO with one critic of the actor's size (its trunk loaded from the actor);
- ``ppo-mini``: PPO with one mini-critic;
- ``asyppo-m2`` / ``asyppo-m4``: AsyPPO with 2 / 4 mini-critics, masks k = ``rl.k``,
  h = ``rl.h``; ablations ``asyppo-m2-nomask`` (k = 0), ``asyppo-m2-nofilter`` (h = 0) and
  ``asyppo-m2-plain`` (k = h = 0: the ensemble mean only);
- the k/h sweep: ``asyppo-mM-kK-hH`` (M critics, k = K%, h = H%), named in ``grid.methods`` or
  generated for every pair of ``grid.sweep_k`` x ``grid.sweep_h`` (preset ``kh_sweep``: k, h
  in {0, 20%, 50%} at reduced cpu scale), reported as k x h tables of mean +- 95% CI.

All PPO variants run through one trainer (:func:`llm_rl.asyppo.make_iteration`; with one
critic and k = h = 0 it is :mod:`llm_rl.ppo`'s update, tested), with the same KL
configuration, entropy bonus, epochs (UTD) and minibatches (off-policy ratio). Mini-critics
are ``ValueModel`` s of a smaller decoder (``critic.pretrain.model``), their trunks pretrained
like the actor's (``critic.init=pretrained``, as the paper's Qwen3-0.6B critics) or random.

The report gives in-domain and out-of-domain (more operators) greedy accuracy over seeds,
the seed spread and collapse count, the value-prediction error of the critics against the
Monte-Carlo return (ensemble mean vs a single critic), the wall time per update and per
iteration, and the critics' parameter and optimizer-state memory.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from experiments import kl_estimators, lm_pretrain
from experiments.registry import Experiment, RunContext, RunResult
from trainkit import plots, stats
from trainkit.config import Config, ConfigError, field, load_json
from trainkit.loop import LoopSettings, count_params, fit
from trainkit.run import RunDir, final_metrics, is_main_process, read_json, read_metrics, write_json
from trainkit.sharding import from_main, local_replica, mirror_from_main, replicated

# name -> (trainer, number of critics, critic size, uses k, uses h)
METHODS = {
    "grpo": ("grpo", 0, None, False, False),
    "ppo-actor": ("ppo", 1, "actor", False, False),
    "ppo-mini": ("ppo", 1, "mini", False, False),
    "asyppo-m2": ("ppo", 2, "mini", True, True),
    "asyppo-m4": ("ppo", 4, "mini", True, True),
    "asyppo-m2-nomask": ("ppo", 2, "mini", False, True),
    "asyppo-m2-nofilter": ("ppo", 2, "mini", True, False),
    "asyppo-m2-plain": ("ppo", 2, "mini", False, False),
}
# k/h sweep cells: AsyPPO with M mini-critics, k = K% and h = H% (grid.sweep_k x grid.sweep_h,
# or named directly in grid.methods).
SWEEP_NAME = re.compile(r"asyppo-m(\d+)-k(\d+)-h(\d+)")


def sweep_name(k: float, h: float, num_critics: int = 2) -> str:
    return f"asyppo-m{num_critics}-k{round(100 * k)}-h{round(100 * h)}"


def method_spec(name: str, k: float = 0.2, h: float = 0.2
                ) -> tuple[str, int, str | None, float, float]:
    """(trainer, number of critics, critic size, k, h) of a method name: a row of METHODS
    (k, h = the given rl.k / rl.h where the method uses them, else 0) or a sweep cell
    ``asyppo-mM-kK-hH`` (K, H in percent). Raises KeyError for anything else."""
    if name in METHODS:
        kind, m, size, uses_k, uses_h = METHODS[name]
        return kind, m, size, k if uses_k else 0.0, h if uses_h else 0.0
    match = SWEEP_NAME.fullmatch(name)
    if match is None or int(match[1]) < 2 or int(match[2]) >= 100 or int(match[3]) >= 100:
        raise KeyError(name)
    return "ppo", int(match[1]), "mini", int(match[2]) / 100, int(match[3]) / 100


def _mini_pretrain_smoke() -> lm_pretrain.LMPretrainConfig:
    return lm_pretrain.LMPretrainConfig(
        model=lm_pretrain.ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        data=lm_pretrain.DataConfig(num_train=512, num_eval=8),
        train=lm_pretrain.TrainConfig(steps=30, chunk_size=30, eval_every=30))


@dataclasses.dataclass(frozen=True)
class CriticConfig(Config):
    model_dir: str | None = field(None, help="HF dir of the mini-critics' LM (e.g. Qwen3-0.6B-Base); "
                                             "none: pretrain critic.pretrain (init=pretrained) or "
                                             "initialise critic.pretrain.model randomly (init=random)")
    init: str = field("pretrained", choices=("pretrained", "random"))
    pretrain: lm_pretrain.LMPretrainConfig = field(factory=_mini_pretrain_smoke,
                                                   help="the mini-critic LM (its model is the critic size)")
    lr: float = field(1e-3, gt=0, le=1, help="critic learning rate (per critic)")


@dataclasses.dataclass(frozen=True)
class RLConfig(Config):
    iterations: int = field(4, ge=1, help="rollout batches per run")
    num_prompts: int = field(4, ge=1)
    group_size: int = field(4, ge=2)
    max_new_tokens: int = field(24, ge=1)
    temperature: float = field(1.0, gt=0)
    lr: float = field(1e-4, gt=0, le=1)
    kl: str = field("none", help="KL configuration estimator-placement (e.g. k3-loss) or none")
    beta: float = field(0.05, ge=0, help="KL coefficient")
    clip_eps: float = field(0.2, gt=0)
    gamma: float = field(1.0, ge=0, le=1)
    lam: float = field(0.95, ge=0, le=1)
    entropy_coef: float = field(0.001, ge=0, help="beta of the (filtered) entropy bonus")
    k: float = field(0.2, ge=0, lt=1, help="advantage mask: bottom-k fraction of sigma")
    h: float = field(0.2, ge=0, lt=1, help="entropy filter: top-h fraction of sigma")
    epochs: int = field(1, ge=1, help="PPO epochs per rollout batch (UTD)")
    num_minibatches: int = field(1, ge=1, help="minibatches per epoch (off-policy ratio)")
    max_ops: int = field(1, ge=1, help="in-domain arithmetic: operators per expression")
    max_value: int = field(9, ge=1)
    ood_max_ops: int = field(2, ge=1, help="out-of-domain evaluation: longer expressions")
    eval_problems: int = field(8, ge=1)
    eval_every: int = field(4, ge=1)
    chunk_size: int = field(2, ge=1)

    def validate(self):
        if self.kl != "none" and self.kl not in kl_estimators.ESTIMATOR_PLACEMENTS:
            raise self.invalid("kl", "must be 'none' or one of " + ", ".join(kl_estimators.ESTIMATOR_PLACEMENTS))
        if self.num_prompts % self.num_minibatches:
            raise self.invalid("num_minibatches", f"must divide num_prompts ({self.num_prompts})")


@dataclasses.dataclass(frozen=True)
class GridConfig(Config):
    methods: tuple[str, ...] = field(("grpo", "ppo-mini", "asyppo-m2"),
                                     help="any of: " + ", ".join(METHODS) + ", or a sweep cell "
                                          "asyppo-mM-kK-hH (M >= 2 critics, k = K%, h = H%)")
    sweep_k: tuple[float, ...] = field((), help="k/h sweep: AsyPPO M=2 at every (k, h) of "
                                                "sweep_k x sweep_h, added to methods")
    sweep_h: tuple[float, ...] = field((), help="see sweep_k")

    def validate(self):
        if bool(self.sweep_k) != bool(self.sweep_h):
            raise self.invalid("sweep_k", "sweep_k and sweep_h must both be set or both empty")
        for key in ("sweep_k", "sweep_h"):
            for v in getattr(self, key):
                if not 0 <= v < 1 or abs(100 * v - round(100 * v)) > 1e-9:
                    raise self.invalid(key, "each must be a whole percent in [0, 0.99]")
        if not self.all_methods():
            raise self.invalid("methods", "must name at least one method (or set a sweep)")
        for name in self.methods:
            try:
                method_spec(name)
            except KeyError:
                raise self.invalid("methods", "each must be one of " + ", ".join(METHODS)
                                   + " or asyppo-mM-kK-hH (M >= 2, K and H < 100)") from None

    def all_methods(self) -> tuple[str, ...]:
        """methods, then the sweep cells (k-major), without repeats."""
        cells = tuple(sweep_name(k, h) for k in self.sweep_k for h in self.sweep_h)
        return tuple(dict.fromkeys(self.methods + cells))


@dataclasses.dataclass(frozen=True)
class BaseConfig(kl_estimators.BaseConfig):
    init: str = field("pretrained", choices=("pretrained", "random"),
                      help="without model_dir: pretrain base.pretrain, or initialise its model "
                           "randomly (smoke runs: no pretraining compile)")


@dataclasses.dataclass(frozen=True)
class AsyPPOConfig(Config):
    seed: int = field(0, ge=0)
    base: BaseConfig = field(factory=BaseConfig)
    critic: CriticConfig = field(factory=CriticConfig)
    rl: RLConfig = field(factory=RLConfig)
    grid: GridConfig = field(factory=GridConfig)

    def validate(self):
        largest = max(method_spec(m)[1] for m in self.grid.all_methods())
        if self.rl.group_size < largest:
            raise ConfigError("rl.group_size", self.rl.group_size,
                              f"must be >= the largest ensemble in grid.methods ({largest})")


def smoke() -> AsyPPOConfig:
    return AsyPPOConfig(
        base=BaseConfig(init="random"),
        critic=CriticConfig(init="random"),
        grid=GridConfig(methods=("asyppo-m2",)),
        # OOD = in-domain shapes here: one greedy-generation compile instead of two.
        rl=RLConfig(iterations=2, num_prompts=2, group_size=4, max_new_tokens=12, ood_max_ops=1,
                    eval_problems=4, eval_every=2, chunk_size=2))


def cpu() -> AsyPPOConfig:
    """Laptop scale; run with ``--seeds 3``. The actor is the lm_pretrain default decoder
    (64 wide, 2 layers) trained on 1-operator arithmetic up to 20; the mini-critics are a
    32-wide 1-layer decoder pretrained the same way (about 1/8 of the actor's parameters)."""
    actor = lm_pretrain.LMPretrainConfig(
        data=lm_pretrain.DataConfig(num_train=4096, num_eval=64, max_value=20, seq_len=40),
        train=lm_pretrain.TrainConfig(steps=400, batch_size=32, lr=3e-3, warmup_steps=30,
                                      chunk_size=100, save_every=400, eval_every=400))
    mini = dataclasses.replace(
        actor, model=_mini_pretrain_smoke().model,
        train=dataclasses.replace(actor.train, steps=200, chunk_size=100, eval_every=200))
    return AsyPPOConfig(
        base=BaseConfig(pretrain=actor),
        critic=CriticConfig(init="pretrained", pretrain=mini, lr=1e-3),
        grid=GridConfig(methods=("grpo", "ppo-actor", "ppo-mini", "asyppo-m2", "asyppo-m4",
                                 "asyppo-m2-nomask", "asyppo-m2-nofilter")),
        # One gradient step per rollout batch for every method (GRPO's trainer takes one), so
        # the comparison is not confounded by update counts; k1 in the reward holds the policy
        # near the reference (unbiased, docs/kl_estimators.md): without it lr 5e-4 collapsed.
        rl=RLConfig(iterations=100, num_prompts=16, group_size=4, max_new_tokens=16, lr=1e-4,
                    kl="k1-reward", beta=0.1, entropy_coef=0.001, k=0.2, h=0.2, epochs=1,
                    num_minibatches=1, max_ops=1, max_value=20, ood_max_ops=2, eval_problems=64,
                    eval_every=50, chunk_size=25))


def kh_sweep() -> AsyPPOConfig:
    """The k/h sweep at reduced cpu scale: AsyPPO M=2 at k, h in {0, 20%, 50%} (9 cells),
    the cpu preset's models and RL settings, 60 iterations; run with ``--seeds 3``."""
    base = cpu()
    return dataclasses.replace(
        base, grid=GridConfig(methods=(), sweep_k=(0.0, 0.2, 0.5), sweep_h=(0.0, 0.2, 0.5)),
        rl=dataclasses.replace(base.rl, iterations=60, eval_every=30, chunk_size=30))


def paper() -> AsyPPOConfig:
    """The paper's setting: Qwen3-4B-Base actor, two Qwen3-0.6B-Base critics (local HF
    directories, set with --set base.model_dir=... --set critic.model_dir=...), group 32,
    off-policy ratio 8 (minibatches), UTD 4 (epochs), k = h = 20%."""
    return AsyPPOConfig(
        base=BaseConfig(model_dir="checkpoints/Qwen3-4B-Base"),
        critic=CriticConfig(model_dir="checkpoints/Qwen3-0.6B-Base", init="pretrained", lr=1e-5),
        grid=GridConfig(methods=tuple(METHODS)),
        rl=RLConfig(iterations=200, num_prompts=32, group_size=32, max_new_tokens=1024, lr=1e-6,
                    kl="none", entropy_coef=0.001, k=0.2, h=0.2, epochs=4, num_minibatches=8,
                    max_ops=3, max_value=100, ood_max_ops=5, eval_problems=512, eval_every=20,
                    chunk_size=10))


# --- run -------------------------------------------------------------------------------------


def _base_model_dir(cfg: AsyPPOConfig, ctx: RunContext) -> Path:
    """The actor's HF dir: base.model_dir, or pretrained here (kl_estimators' first stage), or
    a randomly initialised base.pretrain.model saved in HF format (base.init=random)."""
    if cfg.base.model_dir or cfg.base.init == "pretrained":
        return lm_pretrain.pretrained_model_dir(cfg.base.model_dir, cfg.base.pretrain, ctx)
    from llm_rl.models import save_pretrained
    from llm_rl.models.checkpoint import family_of_config
    from llm_rl.tokenization import char_tokenizer, save_tokenizer

    out = ctx.run_dir.path / "base" / "model"
    if not from_main((out / "config.json").is_file()):
        tokenizer = char_tokenizer()
        mcfg = lm_pretrain.model_config(cfg.base.pretrain.model, len(tokenizer), tokenizer)
        model = family_of_config(mcfg).model_class(mcfg, rngs=nnx.Rngs(cfg.seed))
        save_pretrained(model, mcfg, out)  # process 0 writes
        save_tokenizer(tokenizer, out)
    return mirror_from_main(out)


def _critic_model_dir(cfg: AsyPPOConfig, ctx: RunContext) -> Path | None:
    """The mini-critics' HF dir: critic.model_dir, or critic.pretrain trained here
    (init=pretrained); None with init=random (fresh critics of critic.pretrain.model)."""
    c = cfg.critic
    if not c.model_dir and c.init == "random":
        return None
    return lm_pretrain.pretrained_model_dir(c.model_dir, c.pretrain, ctx, key="critic.model_dir",
                                            subdir="critic_base")


def _settings(cfg: AsyPPOConfig, name: str, seed: int):
    from llm_rl.asyppo import AsyPPOSettings
    from llm_rl.rl import RLSettings

    r = cfg.rl
    estimator, placement = ("k1", "none") if r.kl == "none" else r.kl.split("-")
    common = dict(estimator=estimator, placement=placement, beta=r.beta, clip_eps=r.clip_eps,
                  num_prompts=r.num_prompts, group_size=r.group_size,
                  max_new_tokens=r.max_new_tokens, temperature=r.temperature, task="arithmetic",
                  task_kwargs=(("max_ops", r.max_ops), ("max_value", r.max_value)), seed=seed)
    kind, m, _, k, h = method_spec(name, r.k, r.h)
    if kind == "grpo":
        return RLSettings(advantage="grpo", **common)
    return AsyPPOSettings(num_critics=m, adv_mask_frac=k, ent_filter_frac=h,
                          entropy_coef=r.entropy_coef,
                          epochs=r.epochs, num_minibatches=r.num_minibatches, gamma=r.gamma,
                          lam=r.lam, **common)


def _state_bytes(tree) -> int:
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _timed(iterate):
    """Wrap an iterate so each row also holds its wall time (rollout + update)."""
    def timed(state, n):
        start = time.perf_counter()
        state, metrics = iterate(state, n)
        metrics["iteration_seconds"] = np.full(n, (time.perf_counter() - start) / n, np.float32)
        return state, metrics
    return timed


def _final(rows: list[dict], chunk_size: int) -> dict:
    """A sub-run's final metrics: training metrics over its last 5 iterations, the last
    evaluation, and the steady-state timing (the median over iterations after the first chunk,
    which compiles)."""
    final = final_metrics(rows, window=5)
    final.update(_last_evaluation(rows))
    for key in ("iteration_seconds", "update_seconds"):
        vals = [row[key] for row in rows[chunk_size:] if key in row] or \
               [row[key] for row in rows if key in row]
        if vals:
            final[f"{key}_median"] = float(np.median(vals))
    return final


def run(cfg: AsyPPOConfig, ctx: RunContext) -> RunResult:
    from llm_rl import asyppo, rl, tasks
    from llm_rl.models import from_pretrained
    from llm_rl.tokenization import load_tokenizer

    model_dir = _base_model_dir(cfg, ctx)
    critic_dir = _critic_model_dir(cfg, ctx)
    ref_model, actor_cfg = from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    graphdef, ref_params = nnx.split(ref_model, nnx.Param)
    r = cfg.rl
    eval_rng = np.random.default_rng([cfg.seed, 99])
    in_domain = [tasks.arithmetic_problem(eval_rng, max_ops=r.max_ops, max_value=r.max_value)
                 for _ in range(r.eval_problems)]
    ood = [tasks.arithmetic_problem(eval_rng, min_ops=r.ood_max_ops, max_ops=r.ood_max_ops,
                                    max_value=r.max_value) for _ in range(r.eval_problems)]
    ood_tokens = r.max_new_tokens + 16 * max(r.ood_max_ops - r.max_ops, 0)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(r.lr))
    critic_optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.critic.lr))

    mesh = kl_estimators.update_mesh(r)  # several processes: updates split over every device

    def evaluate(state):
        params = local_replica(state.params)  # every process evaluates alone, as one would
        acc, fmt = rl.greedy_accuracy(graphdef, params, tokenizer, in_domain, r.max_new_tokens)
        ood_acc, _ = rl.greedy_accuracy(graphdef, params, tokenizer, ood, ood_tokens)
        return {"eval_accuracy": acc, "eval_formatted": fmt, "ood_accuracy": ood_acc}

    base_eval = evaluate(rl.init_state(ref_params, optimizer, 0))
    if is_main_process():
        write_json(ctx.run_dir.path / "base_eval.json", base_eval)

    def critics(size: str, m: int, seed: int):
        if size == "actor":
            return asyppo.ensemble_from_pretrained(model_dir, m, seed=seed)[:2]
        if critic_dir is not None:
            return asyppo.ensemble_from_pretrained(critic_dir, m, seed=seed)[:2]
        mini_cfg = lm_pretrain.model_config(cfg.critic.pretrain.model, actor_cfg.vocab_size, tokenizer)
        return asyppo.init_ensemble(mini_cfg, m, seed=seed)

    all_params, finals, sizes = {}, {}, {}
    for name in cfg.grid.all_methods():
        kind, m, size, _, _ = method_spec(name)
        shared = None  # one compiled update per method, shared by its seeds
        for seed_index in range(ctx.seeds):
            seed = cfg.seed + seed_index
            sub = RunDir(ctx.run_dir.path / "configs" / f"{name}-s{seed_index}")
            settings = _settings(cfg, name, seed)
            if is_main_process():
                write_json(sub.config_path, {"method": name, **dataclasses.asdict(settings)})
            if kind == "grpo":
                iterate = rl.make_iteration(graphdef, ref_params, optimizer, tokenizer, settings,
                                            mesh=mesh)
                state = rl.init_state(ref_params, optimizer, 0)
                if mesh is not None:
                    state = jax.device_put(state, replicated(mesh))
                critic_info = {"critic_params": 0, "critic_state_bytes": 0}
            else:
                critic_graphdef, stacked = critics(size, m, seed * 100)
                state = asyppo.init_state(ref_params, stacked, optimizer, critic_optimizer)
                shardings = None if mesh is None else asyppo.state_shardings(
                    state, mesh, optimizer, critic_optimizer)
                if shardings is not None:
                    state = jax.device_put(state, shardings)
                if shared is None:
                    shared = asyppo.make_iteration(graphdef, ref_params, critic_graphdef, optimizer,
                                                   critic_optimizer, tokenizer, settings,
                                                   shardings=shardings)
                iterate = shared.with_seed(seed)
                critic_info = {"critic_params": count_params(stacked),
                               "critic_state_bytes": _state_bytes((state.critic_params,
                                                                   state.critic_opt_state))}
            critic_info["train_state_bytes"] = _state_bytes(state)
            sizes[name] = critic_info
            loop = LoopSettings(num_steps=r.iterations, chunk_size=r.chunk_size,
                                save_every=r.chunk_size, key_metric="reward",
                                desc=f"{name} seed {seed_index}", eval_every=r.eval_every)
            state, logger = fit(sub, state, _timed(iterate), loop, resume=ctx.resume,
                                evaluate=evaluate)
            logger.close()
            # the log is process 0's (its disk alone has it on a pod)
            final = from_main(_final(sub.read_metrics(), r.chunk_size) if is_main_process() else None)
            final.update(critic_info)
            if is_main_process():
                write_json(sub.summary_path, {"method": name, "seed": seed_index, "final": final})
            finals[(name, seed_index)] = final
            all_params[f"{name}-s{seed_index}"] = state.params
    if is_main_process():
        write_json(ctx.run_dir.path / "sizes.json", sizes)
    metrics = {}
    for name in cfg.grid.all_methods():
        for key in ("reward", "eval_accuracy", "ood_accuracy", "value_mse_ensemble"):
            values = [finals[(name, s)][key] for s in range(ctx.seeds) if key in finals[(name, s)]]
            if values:
                metrics[f"{name}/{key}"] = float(np.mean(values))
    return RunResult(params=all_params, metrics=metrics, steps=r.iterations)


# --- report ----------------------------------------------------------------------------------


EVAL_KEYS = ("eval_accuracy", "eval_formatted", "ood_accuracy")


def _last_evaluation(rows: list[dict]) -> dict:
    """The evaluation metrics of the last row that holds them (final_metrics would average
    the last few evaluations)."""
    for row in reversed(rows):
        if "eval_accuracy" in row:
            return {k: float(row[k]) for k in EVAL_KEYS if k in row}
    return {}


def _finals(run_dir: RunDir, name: str) -> list[dict]:
    out = []
    for p in sorted((run_dir.path / "configs").glob(f"{name}-s*")):
        if (p / "summary.json").exists():
            final = dict(read_json(p / "summary.json")["final"])
            final.update(_last_evaluation(read_metrics(p / "metrics.jsonl")))
            out.append(final)
    return out


def _stat(finals: list[dict], key: str) -> tuple[float, float, int]:
    """``(mean, 95% t half-width, seeds)`` of ``key`` over the seeds (trainkit.stats.mean_ci;
    half-width 0 from one seed)."""
    v = [float(f[key]) for f in finals if key in f]
    if not v:
        return float("nan"), 0.0, 0
    mean, half, n = stats.mean_ci(v)
    return float(mean), float(half), int(n)


def _fmt(stat, digits=3) -> str:
    mean, half, n = stat
    return "-" if n == 0 else f"{mean:.{digits}f} +- {half:.{digits}f}"


def _curves(run_dir: RunDir, names, key):
    curves = {}
    for name in names:
        series = []
        for sub in sorted((run_dir.path / "configs").glob(f"{name}-s*")):
            rows = [row for row in read_metrics(sub / "metrics.jsonl") if key in row]
            series.append(([row["step"] for row in rows], [row[key] for row in rows]))
        if series and all(s[0] == series[0][0] for s in series) and series[0][0]:
            curves[name] = (series[0][0], np.asarray([s[1] for s in series], np.float64))
    return curves


def _smooth(v: np.ndarray, window: int = 5) -> np.ndarray:
    """Running mean over up to ``window`` iterations, the same length as ``v``."""
    w = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(w), "same") / np.convolve(np.ones_like(v), np.ones(w), "same")


def _compare(run_dir: RunDir, a: str, b: str, key: str, label: str) -> str | None:
    """One comparison line: difference of the seed means with Welch's 95% interval
    (trainkit.stats.difference_ci); only an interval that excludes 0 gives a direction."""
    va = [float(f[key]) for f in _finals(run_dir, a) if key in f]
    vb = [float(f[key]) for f in _finals(run_dir, b) if key in f]
    if not va or not vb:
        return None
    ma, mb = float(np.mean(va)), float(np.mean(vb))
    if len(va) < 2 or len(vb) < 2:
        return (f"- {label}: {a} {ma:.3f} vs {b} {mb:.3f} ({ma - mb:+.3f}): one seed only, "
                "no interval.")
    gap, low, high = stats.difference_ci(va, vb)
    verdict = (f"{a} is better" if low > 0 else f"{a} is worse" if high < 0
               else "the interval contains 0: no clear difference")
    return (f"- {label}: {a} {ma:.3f} vs {b} {mb:.3f} ({gap:+.3f} [{low:+.3f}, {high:+.3f}], "
            f"Welch 95%): {verdict}.")


SWEEP_KEYS = (("eval_accuracy", "in-domain acc."), ("ood_accuracy", "OOD acc."),
              ("reward", "reward (last 5)"))


def sweep_table(run_dir: RunDir, sweep_k, sweep_h) -> dict[str, dict[tuple[float, float], tuple]]:
    """key -> {(k, h): (mean, 95% CI half-width, seeds)} over the finished seeds of each cell
    (:func:`trainkit.plots.mean_and_ci`)."""
    out = {key: {} for key, _ in SWEEP_KEYS}
    for k in sweep_k:
        for h in sweep_h:
            finals = _finals(run_dir, sweep_name(k, h))
            for key, _ in SWEEP_KEYS:
                v = np.asarray([f[key] for f in finals if key in f], np.float64)
                if v.size:
                    mean, ci = plots.mean_and_ci(v[:, None])  # [seeds, 1]
                    out[key][(k, h)] = (float(mean[0]), float(ci[0]), int(v.size))
    return out


def _sweep_section(run_dir: RunDir, cfg: AsyPPOConfig) -> str:
    """The k/h sweep: one k x h table per metric (mean +- 95% CI over seeds), a bar chart of
    the in-domain accuracy, and which cell is best."""
    g = cfg.grid
    if not g.sweep_k:
        return ""
    table = sweep_table(run_dir, g.sweep_k, g.sweep_h)
    if not table["eval_accuracy"]:
        return ""
    parts = ["## k/h sweep (AsyPPO M=2; mean +- 95% CI over seeds)", ""]
    for key, label in SWEEP_KEYS:
        cells = table[key]
        rows = [[f"k = {round(100 * k)}%"] + [
            f"{cells[(k, h)][0]:.3f} +- {cells[(k, h)][1]:.3f}" if (k, h) in cells else "-"
            for h in g.sweep_h] for k in g.sweep_k]
        parts += [f"{label}:", "", plots.markdown_table(rows, [""] + [f"h = {round(100 * h)}%"
                                                                     for h in g.sweep_h]), ""]
    acc = table["eval_accuracy"]
    cells = sorted(acc)
    best = max(cells, key=lambda c: acc[c][0])
    worst = min(cells, key=lambda c: acc[c][0])
    apart = lambda a, b: abs(acc[a][0] - acc[b][0]) > acc[a][1] + acc[b][1]
    name = lambda c: f"k = {round(100 * c[0])}%, h = {round(100 * c[1])}%"
    parts.append(f"Best in-domain cell: {name(best)} ({acc[best][0]:.3f} +- {acc[best][1]:.3f}); "
                 f"worst {name(worst)} ({acc[worst][0]:.3f} +- {acc[worst][1]:.3f}): their 95% "
                 + ("intervals do not overlap." if apart(best, worst) else
                    "intervals overlap, no cell is distinguishable."))
    if (0.0, 0.0) in acc:  # each cell against no masks at all
        beyond = [name(c) for c in cells if c != (0.0, 0.0) and apart(c, (0.0, 0.0))]
        parts.append("Cells whose interval does not overlap no masks (k = h = 0): "
                     + ("; ".join(beyond) if beyond else "none") + ".")
    plots.bar_chart(run_dir.plots_dir / "sweep_eval_accuracy.png",
                    [f"k{round(100 * k)}/h{round(100 * h)}" for k, h in cells],
                    [acc[c][0] for c in cells], errors=[acc[c][1] for c in cells],
                    ylabel="in-domain greedy accuracy (95% CI)", title="asyppo: k/h sweep")
    parts += ["", "![sweep_eval_accuracy](plots/sweep_eval_accuracy.png)"]
    return "\n".join(parts)


def report(run_dir: RunDir) -> str:
    cfg = load_json(AsyPPOConfig, run_dir.config_path)
    names = cfg.grid.all_methods()
    base = read_json(run_dir.path / "base_eval.json") if (run_dir.path / "base_eval.json").exists() else {}
    base_acc = base.get("eval_accuracy")
    rows = [["base model (before RL)", "-", f"{base_acc:.3f}" if base_acc is not None else "-",
             f"{base.get('ood_accuracy', float('nan')):.3f}" if base else "-",
             "-", "-", "-", "-", "-", "-", "-"]]
    for name in names:
        finals = _finals(run_dir, name)
        if not finals:
            continue
        collapses = sum(1 for f in finals if base_acc is not None
                        and f.get("eval_accuracy", 1.0) < 0.5 * base_acc)
        mb = finals[0].get("critic_state_bytes", 0) / 2 ** 20
        rows.append([name, len(finals), _fmt(_stat(finals, "eval_accuracy")),
                     _fmt(_stat(finals, "ood_accuracy")), _fmt(_stat(finals, "reward")),
                     _fmt(_stat(finals, "value_mse_ensemble"), 4),
                     _fmt(_stat(finals, "value_mse_single"), 4), collapses,
                     _fmt(_stat(finals, "update_seconds_median"), 3),
                     _fmt(_stat(finals, "iteration_seconds_median"), 3),
                     f"{finals[0].get('critic_params', 0):,} / {mb:.2f}"])
    table = plots.markdown_table(rows, [
        "method", "seeds", "in-domain acc.", "OOD acc.", "reward (last 5)",
        "value MSE, ensemble mean", "value MSE, single critic", "collapses",
        "update s (median)", "iteration s (median)", "critic params / state MiB"])
    figures = []
    for key, ylabel in (("reward", "training reward (sampled accuracy)"),
                        ("eval_accuracy", "in-domain greedy accuracy"),
                        ("ood_accuracy", "out-of-domain greedy accuracy"),
                        ("value_mse_ensemble", "value MSE vs Monte-Carlo return"),
                        ("sigma_q50", "median critic disagreement sigma")):
        curves = _curves(run_dir, names, key)
        if key == "reward":
            curves = {n: (s, np.apply_along_axis(_smooth, -1, v)) for n, (s, v) in curves.items()}
        if curves:
            figures.append(plots.learning_curves(run_dir.plots_dir / f"{key}.png", curves,
                                                 xlabel="RL iteration", ylabel=ylabel,
                                                 title=f"asyppo: {key}"))
    lines = ["## AsyPPO against the baselines", ""]
    for other in ("ppo-actor", "ppo-mini", "grpo"):
        for key, label in (("eval_accuracy", "in-domain accuracy"), ("ood_accuracy", "OOD accuracy")):
            line = _compare(run_dir, "asyppo-m2", other, key, label)
            if line:
                lines.append(line)
    lines += ["", "## What each mask contributes (ablations of asyppo-m2)", ""]
    for other, what in (("asyppo-m2-nomask", "advantage mask (k)"),
                        ("asyppo-m2-nofilter", "entropy filter (h)"),
                        ("asyppo-m2-plain", "both masks"), ("asyppo-m4", "2 vs 4 critics")):
        line = _compare(run_dir, "asyppo-m2", other, "eval_accuracy", f"{what}, in-domain accuracy")
        if line:
            lines.append(line)
    lines += ["", "## Value prediction (MSE against the Monte-Carlo return; lower is better)", ""]
    for a, b in (("asyppo-m2", "ppo-mini"), ("asyppo-m4", "ppo-mini"), ("asyppo-m2", "ppo-actor")):
        line = _compare(run_dir, a, b, "value_mse_ensemble", f"ensemble of {a} vs the critic of {b}")
        if line:
            lines.append(line.replace("is better.", "is higher.").replace(
                "is worse.", "is lower."))
    inside = [n for n in names if method_spec(n)[1] > 1 and _finals(run_dir, n)]
    for n in inside:
        f = _finals(run_dir, n)
        ens, single = _stat(f, "value_mse_ensemble"), _stat(f, "value_mse_single")
        lines.append(f"- {n}, same run: ensemble mean {ens[0]:.4f} vs its average single critic "
                     f"{single[0]:.4f} ({ens[0] / max(single[0], 1e-12):.2f}x).")
    sweep = _sweep_section(run_dir, cfg)
    if sweep:
        lines += ["", sweep]
    r = cfg.rl
    text = (f"# asyppo\n\nRL from the base model on arithmetic ({r.max_ops} operator(s), values up to "
            f"{r.max_value}; OOD: {r.ood_max_ops} operators), {r.iterations} iterations of "
            f"{r.num_prompts} prompts x {r.group_size} responses, KL {r.kl}, {r.epochs} epoch(s) x "
            f"{r.num_minibatches} minibatch(es) per batch, k = {r.k}, h = {r.h}, entropy coef "
            f"{r.entropy_coef}. Means +- 95% t interval over seeds; accuracies at the last evaluation, value "
            "MSE against the Monte-Carlo return over the last 5 iterations; a collapse is a final "
            "in-domain accuracy below half the base model's.\n\n"
            f"{table}\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(f"![{p.stem}]({p.relative_to(run_dir.path)})" for p in figures) + "\n")
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


EXPERIMENT = Experiment(
    name="asyppo",
    description="AsyPPO: mini-critic ensembles that mask advantages and filter entropy by their "
                "disagreement, vs PPO and GRPO (arXiv 2510.01656)",
    config_cls=AsyPPOConfig,
    presets={"smoke": smoke, "cpu": cpu, "kh_sweep": kh_sweep, "paper": paper},
    run=run,
    report=report,
)
