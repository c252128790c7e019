"""lm_pretrain: train a small decoder from scratch on generated task corpora, save it in HF format.

RL on LLMs starts from a model that already answers in the expected format. At ``cpu``
scale there is no such checkpoint to download, so this experiment makes one: a Qwen3 / Qwen2
/ Llama decoder of a few hundred thousand to a few million parameters, trained with
next-token cross-entropy

    L(theta) = - sum_{b,t} m_bt log p_theta(x_{b,t+1} | x_{b,<=t}) / sum_{b,t} m_bt

on ``prompt + worked solution`` texts (arithmetic and Countdown, :mod:`llm_rl.tasks`), with
``m`` on the completion tokens (``loss_on=completion``) or on every token. It reports greedy
accuracy on held-out problems (graded by the tasks' verifiers) and writes ``model/``
(``config.json``, ``model.safetensors``, tokenizer) that :func:`llm_rl.models.from_pretrained`
and transformers both load.

Multi-host (``docs/scaling.md``): parameters are sharded from their logical axes over the
``mesh`` (``--set mesh.fsdp=-1``: fully sharded data parallel over every device of every
process); the batch is split over ``data`` x ``fsdp``. Every process generates the same
problem set (deterministic per seed), draws the same global batch indices per step, and
reads and uploads only its own rows of each batch (:func:`trainkit.sharding.
process_batch_slice`), so N processes train exactly what one process with the same mesh
trains.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.registry import Experiment, RunContext, RunResult, UserError
from trainkit import plots
from trainkit.config import Config, field, load_json, save_json
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.loop import LoopSettings, count_params, fit
from trainkit.run import RunDir, final_metrics, is_main_process, read_json, write_json
from trainkit.sharding import (
    BATCH_AXES,
    MeshConfig,
    from_main,
    make_global_batch,
    make_mesh,
    mirror_from_main,
    param_shardings,
    process_batch_slice,
    to_host,
)

FAMILIES = ("qwen3", "qwen2", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    family: str = field("qwen3", choices=FAMILIES)
    hidden_size: int = field(64, ge=8)
    intermediate_size: int = field(192, ge=8)
    num_hidden_layers: int = field(2, ge=1)
    num_attention_heads: int = field(4, ge=1)
    num_key_value_heads: int = field(2, ge=1)
    head_dim: int = field(16, ge=2)
    tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    tasks: tuple[str, ...] = field(("arithmetic",), help="subset of: arithmetic, countdown")
    num_train: int = field(4096, ge=1, help="training problems (fixed set)")
    num_eval: int = field(64, ge=1, help="held-out problems for greedy accuracy")
    max_ops: int = field(1, ge=1, help="arithmetic: operators per expression")
    max_value: int = field(9, ge=1, help="arithmetic: largest operand")
    countdown_numbers: int = field(3, ge=2)
    seq_len: int = field(48, ge=8, help="tokens per training sequence (longer ones are cut)")
    loss_on: str = field("completion", choices=("completion", "all"))

    def validate(self):
        for task in self.tasks:
            if task not in ("arithmetic", "countdown"):
                raise self.invalid("tasks", "each must be 'arithmetic' or 'countdown'")
        if not self.tasks:
            raise self.invalid("tasks", "must name at least one task")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = field(300, ge=1)
    batch_size: int = field(32, ge=1)
    lr: float = field(3e-3, gt=0, le=1)
    warmup_steps: int = field(30, ge=0)
    weight_decay: float = field(0.01, ge=0)
    clip_norm: float = field(1.0, gt=0)
    chunk_size: int = field(50, ge=1)
    ce_chunk: int = field(0, ge=0, help="0: plain cross-entropy; > 0: over the vocabulary in "
                          "chunks of this many tokens (llm_rl.sft.chunked_token_nll)")
    save_every: int = field(500, ge=1)
    eval_every: int = field(150, ge=1)
    max_new_tokens: int = field(24, ge=1, help="generation budget for evaluation")


@dataclasses.dataclass(frozen=True)
class LMPretrainConfig(Config):
    seed: int = field(0, ge=0)
    model: ModelConfig = field(factory=ModelConfig)
    data: DataConfig = field(factory=DataConfig)
    train: TrainConfig = field(factory=TrainConfig)
    mesh: MeshConfig = field(factory=MeshConfig)


def smoke() -> LMPretrainConfig:
    return LMPretrainConfig(data=DataConfig(num_train=512, num_eval=16),
                            train=TrainConfig(steps=60, chunk_size=30, eval_every=60))


def cpu() -> LMPretrainConfig:
    return LMPretrainConfig(
        model=ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                          head_dim=32),
        data=DataConfig(num_train=20000, num_eval=128, max_ops=2, max_value=20, seq_len=64),
        train=TrainConfig(steps=3000, batch_size=64, lr=2e-3, warmup_steps=100, chunk_size=250,
                          save_every=1000, eval_every=1000, max_new_tokens=40))


def paper() -> LMPretrainConfig:
    return LMPretrainConfig(
        model=ModelConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64),
        data=DataConfig(tasks=("arithmetic", "countdown"), num_train=500_000, num_eval=1024,
                        max_ops=3, max_value=100, countdown_numbers=4, seq_len=96),
        train=TrainConfig(steps=50_000, batch_size=256, lr=1e-3, warmup_steps=1000,
                          chunk_size=500, save_every=5000, eval_every=5000, max_new_tokens=64))


def model_config(cfg: ModelConfig, vocab_size: int, tokenizer) -> Any:
    from llm_rl.models import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[cfg.family]
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "family"}
    try:
        return cls.tiny(**fields, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    except ValueError as err:  # ConfigError from the family's own validation
        raise UserError(f"model: {err}") from None


def pretrain_problems(cfg: LMPretrainConfig):
    """(training problems, held-out problems) of the pretraining data, as :func:`build_data`
    uses them (also what the RL experiments deduplicate their evaluation sets against)."""
    from llm_rl import tasks

    d = cfg.data

    def problems(n, seed):
        out = []
        for i, task in enumerate(d.tasks):
            count = n // len(d.tasks) + (1 if i < n % len(d.tasks) else 0)
            kw = ({"max_ops": d.max_ops, "max_value": d.max_value} if task == "arithmetic"
                  else {"num_numbers": d.countdown_numbers})
            out += tasks.make_problems(task, count, seed * 1000 + i, **kw)
        return out

    return problems(d.num_train, cfg.seed), problems(d.num_eval, cfg.seed + 7919)


def build_data(cfg: LMPretrainConfig, tokenizer):
    from llm_rl.tokenization import encode_sequences

    d = cfg.data
    train, held_out = pretrain_problems(cfg)
    batch = encode_sequences(tokenizer, [p.prompt for p in train], [p.solution for p in train],
                             max_length=d.seq_len)
    if d.loss_on == "all":
        batch["loss_mask"] = batch["attention_mask"].copy()
        batch["loss_mask"][:, 0] = 0
    return batch, held_out


def build_mesh(cfg: MeshConfig):
    """The run's mesh: sizes without -1 take the first devices (one process); a multi-host
    run must span every device of every process."""
    sizes = (cfg.data, cfg.fsdp, cfg.model)
    try:
        if -1 in sizes:
            return make_mesh(*sizes)
        need = int(np.prod(sizes))
        if jax.process_count() > 1 and need != jax.device_count():
            raise ValueError(f"{jax.process_count()} processes need a mesh over all "
                             f"{jax.device_count()} devices, not {need}; e.g. --set mesh.fsdp=-1")
        if need > jax.device_count():
            raise ValueError(f"needs {need} devices, {jax.device_count()} available")
        return make_mesh(*sizes, devices=jax.devices()[:need])
    except ValueError as err:
        raise UserError(f"mesh: {err}") from None


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    guard: GuardState
    key: jax.Array
    step: jax.Array


def next_token_loss(logits: jax.Array, ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of ids[:, t+1] given logits[:, t] over positions where
    loss_mask[:, t+1] == 1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    m = loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(picked * m) / jnp.maximum(jnp.sum(m), 1.0)


def run(cfg: LMPretrainConfig, ctx: RunContext) -> RunResult:
    from llm_rl import tasks
    from llm_rl.models import save_pretrained
    from llm_rl.models.checkpoint import family_of_config
    from llm_rl.sampling import generate
    from llm_rl.tokenization import char_tokenizer, encode_prompts, save_tokenizer

    if ctx.seeds != 1:
        raise UserError("lm_pretrain trains one model; run it once per seed (--set seed=N)")
    t = cfg.train
    tokenizer = char_tokenizer()
    mcfg = model_config(cfg.model, len(tokenizer), tokenizer)
    data, held_out = build_data(cfg, tokenizer)
    data = {k: np.asarray(data[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    n_train, seq_len = data["input_ids"].shape
    mesh = build_mesh(cfg.mesh)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % batch_devices:
        raise UserError(f"train.batch_size={t.batch_size} must be divisible by the "
                        f"{batch_devices} data x fsdp devices of the mesh")

    model_cls = family_of_config(mcfg).model_class
    key = jax.random.key(cfg.seed)
    make_model = lambda: model_cls(mcfg, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    params_sharding = param_shardings(abstract_params, mesh)
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1),
                                                  max(t.steps, t.warmup_steps + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(t.clip_norm),
                            optax.adamw(schedule, weight_decay=t.weight_decay))

    def loss_fn(p, b_ids, b_mask, b_loss_mask):
        model = nnx.merge(graphdef, p)
        if t.ce_chunk:  # same value and gradient without the [tokens, vocab] logits
            from llm_rl.sft import chunked_token_nll, output_projection

            m = b_loss_mask[:, 1:].astype(jnp.float32)
            nll = chunked_token_nll(model.model(b_ids, b_mask)[:, :-1], output_projection(model),
                                    b_ids[:, 1:], m, t.ce_chunk)
            return nll / jnp.maximum(jnp.sum(m), 1.0)
        return next_token_loss(model(b_ids, b_mask), b_ids, b_loss_mask)

    # [steps, batch, seq], batch split over data x fsdp: each process holds its rows.
    batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES))
    data_key = jax.random.fold_in(key, 1)
    draw = jax.jit(jax.vmap(lambda s: jax.random.randint(jax.random.fold_in(data_key, s),
                                                         (t.batch_size,), 0, n_train)))

    def host_batch(first_step: int, n: int) -> dict:
        """The batches of steps first_step .. first_step+n-1: every process draws the same
        global indices (as the single-process run does) and reads only its own rows."""
        idx = np.asarray(draw(jnp.arange(first_step, first_step + n)))
        shape = (n, t.batch_size, seq_len)
        rows = idx[:, process_batch_slice(batch_sharding, shape, axis=1)]
        local = {k: v[rows] for k, v in data.items()}
        return make_global_batch(local, batch_sharding, {k: shape for k in local})

    def step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["input_ids"],
                                                  batch["attention_mask"], batch["loss_mask"])
        params, opt_state, guard, gm = guarded_update(optimizer, grads, state.opt_state,
                                                      state.params, loss, state.guard)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step), **gm}
        return TrainState(params, opt_state, guard, state.key, state.step + 1), metrics

    def init():
        params = jax.lax.with_sharding_constraint(nnx.split(make_model(), nnx.Param)[1],
                                                  params_sharding)
        return TrainState(params, optimizer.init(params), init_guard(), data_key,
                          jnp.zeros((), jnp.int32))

    init_jit = jax.jit(init)
    state_sharding = jax.tree.map(lambda x: x.sharding, jax.eval_shape(init_jit))
    scan = jax.jit(lambda s, b: jax.lax.scan(step, s, b), out_shardings=(state_sharding, None),
                   in_shardings=(state_sharding, batch_sharding), donate_argnums=0)

    def chunk(state: TrainState, n: int):
        return scan(state, host_batch(int(to_host(state.step)), n))

    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in held_out])

    def evaluate(state: TrainState) -> dict:
        out = generate(nnx.merge(graphdef, state.params), prompt_ids, prompt_mask,
                       jax.random.key(0), max_new_tokens=t.max_new_tokens, greedy=True,
                       eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(np.asarray(out.tokens), skip_special_tokens=True)
        rewards = [tasks.grade(text, p) for text, p in zip(texts, held_out)]
        formatted = [tasks.extract_answer(text) is not None for text in texts]
        return {"eval_accuracy": np.mean(rewards), "eval_formatted": np.mean(formatted)}

    state = init_jit()
    settings = LoopSettings(num_steps=t.steps, chunk_size=t.chunk_size, save_every=t.save_every,
                            key_metric="loss", desc="lm_pretrain", eval_every=t.eval_every)
    state, logger = fit(ctx.run_dir, state, chunk, settings, resume=ctx.resume, evaluate=evaluate)
    logger.close()

    final_model = nnx.merge(graphdef, state.params)
    out_dir = ctx.run_dir.path / "model"
    save_pretrained(final_model, mcfg, out_dir)
    save_tokenizer(tokenizer, out_dir)
    samples = generate(final_model, prompt_ids[:8], prompt_mask[:8], jax.random.key(0),
                       max_new_tokens=t.max_new_tokens, greedy=True,
                       eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(np.asarray(samples.tokens), skip_special_tokens=True)
    if is_main_process():
        (ctx.run_dir.path / "samples.md").write_text("\n".join(
            f"- `{p.prompt.strip()!r}` -> `{text.strip()!r}` (reference `{p.answer}`)"
            for p, text in zip(held_out[:8], texts)) + "\n")
    metrics = final_metrics(ctx.run_dir.read_metrics())
    metrics = {k: metrics[k] for k in ("loss", "eval_accuracy", "eval_formatted", "nonfinite_total")
               if k in metrics}
    metrics["num_params"] = count_params(state.params)
    return RunResult(params=state.params, metrics=metrics, steps=t.steps)


def report(run_dir: RunDir) -> str:
    cfg = load_json(LMPretrainConfig, run_dir.config_path)
    rows = run_dir.read_metrics()
    summary = read_json(run_dir.summary_path) if run_dir.summary_path.exists() else {}

    def curve(key):
        logged = [r for r in rows if key in r]
        return [r["step"] for r in logged], np.asarray([r[key] for r in logged], np.float64)

    loss_plot = plots.learning_curves(run_dir.plots_dir / "loss.png", {"loss": curve("loss")},
                                      ylabel="next-token cross-entropy", logy=True,
                                      title="lm_pretrain: training loss")
    acc_plot = plots.learning_curves(run_dir.plots_dir / "accuracy.png",
                                     {"greedy accuracy": curve("eval_accuracy"),
                                      "answer formatted": curve("eval_formatted")},
                                     ylabel="fraction of held-out problems",
                                     title="lm_pretrain: held-out greedy evaluation")
    final = summary.get("final", {})
    samples = run_dir.path / "samples.md"
    text = (f"# lm_pretrain\n\n{cfg.model.family} decoder, {final.get('num_params', '?')} parameters, "
            f"trained {cfg.train.steps} steps on {', '.join(cfg.data.tasks)} "
            f"({cfg.data.num_train} problems); the HF checkpoint is in `model/`.\n\n"
            + plots.markdown_table([[k, v] for k, v in final.items()], ["metric", "final value"])
            + f"\n\n![loss]({loss_plot.relative_to(run_dir.path)})\n"
            f"![accuracy]({acc_plot.relative_to(run_dir.path)})\n\n## Greedy samples\n\n"
            + (samples.read_text() if samples.exists() else "(none)\n"))
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


def _given_model_dir(model_dir: str, key: str) -> Path:
    """A local HF directory as is; a Hugging Face Hub id (``org/name``, no such local path)
    through ``huggingface_hub.snapshot_download`` (its cache; the weights, configs and
    tokenizer files only). Every process resolves it on its own."""
    path = Path(model_dir)
    if (path / "config.json").is_file():
        return path
    if not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model_dir):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model_dir, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
        except Exception as err:  # offline, unknown repo, gated model, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"{key}={model_dir}: not a local directory, and fetching it from the "
                            f"Hugging Face Hub failed ({first}); download it where every process "
                            "can read it and pass that directory") from None
    raise UserError(f"{key}={path}: no config.json (expected an HF model dir, e.g. "
                    "lm_pretrain's model/, or a Hugging Face Hub id)")


def pretrained_model_dir(model_dir: str | None, pretrain: LMPretrainConfig, ctx: RunContext, *,
                         key: str = "base.model_dir", subdir: str = "base") -> Path:
    """The HF directory of the LM an experiment starts from (the first stage of the LLM RL
    experiments: the actor of kl_estimators and asyppo, asyppo's mini-critics).

    ``model_dir`` when given (a directory holding ``config.json``, or a Hugging Face Hub id
    such as ``Qwen/Qwen2.5-7B``, fetched into the hub's cache; errors name ``key``), else
    ``pretrain`` trained here once as the sub-run ``<run dir>/<subdir>`` (resumed with
    ``ctx.resume``, reused once its summary exists), whose ``model/`` is returned.

    Several processes: a given ``model_dir`` must be on every worker. The pretraining runs
    on every device of every process (a ``pretrain.mesh`` over fewer devices becomes
    ``data=-1``: data parallel), process 0 writes ``model/`` and the others get a copy of it
    where their disk lacks it (:func:`trainkit.sharding.mirror_from_main`)."""
    if model_dir:
        return _given_model_dir(model_dir, key)
    sub = RunDir(ctx.run_dir.path / subdir)
    if not from_main(sub.summary_path.exists()):
        m = pretrain.mesh
        if jax.process_count() > 1 and -1 not in (m.data, m.fsdp, m.model) and \
                m.data * m.fsdp * m.model != jax.device_count():
            pretrain = dataclasses.replace(pretrain, mesh=MeshConfig(data=-1))
        if is_main_process():
            save_json(pretrain, sub.config_path)
        result = run(pretrain, RunContext(sub, 1, ctx.resume))
        if is_main_process():
            write_json(sub.summary_path, {"final": result.metrics, "steps": result.steps})
            report(sub)
    return mirror_from_main(sub.path / "model")


EXPERIMENT = Experiment(
    name="lm_pretrain",
    description="small decoder trained from scratch on arithmetic/Countdown, saved in HF format",
    config_cls=LMPretrainConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)
