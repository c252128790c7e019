"""Quickstart: teacher-student MLP regression that exercises the whole stack.

A fixed random "teacher" MLP defines the task ``y = f_teacher(x) + eps``, ``x ~ N(0, I)``,
``eps ~ N(0, noise_std^2)``; a "student" MLP (Flax NNX) is trained with AdamW on the MSE

    L(theta) = 1/B sum_b (f_theta(x_b) - y_b)^2

from fresh batches drawn inside the jitted step (key = fold_in(seed_key, step), so a resumed
run sees the same data). Seeds run in parallel under ``vmap``; the batch and the parameters
are sharded over the mesh (data / fsdp / model) from logical axis names; non-finite batches
are skipped by the guard; checkpoints, metrics, TensorBoard and plots go to the run dir.

The expected effect: the training loss falls towards the noise floor ``noise_std^2`` and the
held-out loss follows it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.registry import Experiment, RunContext, RunResult, UserError
from trainkit import plots
from trainkit.config import Config, field, load_json
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir, final_metrics, read_json
from trainkit.sharding import MeshConfig, batch_sharding, make_mesh, param_shardings

ACTIVATIONS = {"relu": nnx.relu, "gelu": nnx.gelu, "tanh": jnp.tanh, "silu": nnx.silu}


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    in_dim: int = field(16, ge=1, help="input dimension")
    width: int = field(64, ge=1, help="hidden width of the student")
    depth: int = field(2, ge=1, help="hidden layers of the student")
    activation: str = field("gelu", choices=tuple(ACTIVATIONS))
    teacher_width: int = field(32, ge=1, help="hidden width of the teacher")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Config):
    lr: float = field(3e-3, gt=0, le=1, help="peak learning rate")
    warmup_steps: int = field(20, ge=0)
    weight_decay: float = field(1e-4, ge=0)
    clip_norm: float | None = field(1.0, gt=0, help="global-norm gradient clipping (none: off)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = field(200, ge=1)
    batch_size: int = field(64, ge=1, help="global batch size (split over data x fsdp)")
    noise_std: float = field(0.1, ge=0, help="label noise; the loss floor is noise_std^2")
    eval_size: int = field(512, ge=1)
    eval_every: int = field(50, ge=1)
    chunk_size: int = field(50, ge=1, help="steps per jitted lax.scan chunk")
    save_every: int = field(100, ge=1, help="checkpoint every N steps")
    max_nonfinite: int = field(10, ge=1, help="stop after this many non-finite steps in a row")
    inject_nan_at: tuple[int, ...] = field((), help="steps whose batch is set to NaN (guard demo)")


@dataclasses.dataclass(frozen=True)
class QuickstartConfig(Config):
    seed: int = field(0, ge=0)
    model: ModelConfig = field(factory=ModelConfig)
    optim: OptimConfig = field(factory=OptimConfig)
    train: TrainConfig = field(factory=TrainConfig)
    mesh: MeshConfig = field(factory=lambda: MeshConfig(data=-1))  # all devices


def smoke() -> QuickstartConfig:
    return QuickstartConfig()


def cpu() -> QuickstartConfig:
    return QuickstartConfig(model=ModelConfig(width=256, depth=3),
                            train=TrainConfig(steps=3000, batch_size=256, eval_every=250,
                                              chunk_size=250, save_every=1000))


def paper() -> QuickstartConfig:
    return QuickstartConfig(model=ModelConfig(in_dim=64, width=2048, depth=4, teacher_width=256),
                            optim=OptimConfig(lr=1e-3, warmup_steps=1000),
                            train=TrainConfig(steps=100_000, batch_size=4096, eval_every=5000,
                                              chunk_size=1000, save_every=10_000))


# --- model ------------------------------------------------------------------------------------


class MLP(nnx.Module):
    """MLP with logical axis names on every parameter (embed -> fsdp, mlp -> model).

    Hidden layers alternate column- and row-parallel kernels, ("embed", "mlp") then
    ("mlp", "embed"), as in Megatron: each layer contracts over the axis its input is
    sharded on. (Labelling every kernel ("embed", "mlp") also hits an XLA CPU partitioner
    bug in jax 0.10.2 on a data x fsdp x model mesh: see tests/trainkit/test_sharding.py.)"""

    def __init__(self, in_dim: int, width: int, depth: int, activation: str, *, rngs: nnx.Rngs):
        dense = lambda a, b, axes: nnx.Linear(
            a, b, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))
        dims = [in_dim] + [width] * depth
        axes = [("embed", "mlp") if i % 2 == 0 else ("mlp", "embed") for i in range(depth)]
        self.hidden = nnx.List([dense(a, b, ax) for a, b, ax in zip(dims[:-1], dims[1:], axes)])
        self.out = dense(width, 1, (axes[-1][1], None))
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for layer in self.hidden:
            x = act(layer(x))
        return self.out(x)[..., 0]


def teacher_fn(key: jax.Array, cfg: ModelConfig):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (cfg.in_dim, cfg.teacher_width)) / np.sqrt(cfg.in_dim)
    w2 = jax.random.normal(k2, (cfg.teacher_width,)) / np.sqrt(cfg.teacher_width)
    return lambda x: jnp.tanh(x @ w1) @ w2


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    guard: GuardState
    key: jax.Array
    step: jax.Array


def make_optimizer(cfg: QuickstartConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1),
                                                  max(cfg.train.steps, o.warmup_steps + 1))
    chain = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    chain.append(optax.adamw(schedule, weight_decay=o.weight_decay))
    return optax.chain(*chain), schedule


class Setup(NamedTuple):
    graphdef: Any
    optimizer: optax.GradientTransformation
    init: Any  # jitted: () -> TrainState (seeds stacked on axis 0, sharded)
    chunk: Any  # jitted: (state, n) -> (state, metrics[n, seeds])
    evaluate: Any  # jitted: state -> {"eval_loss": [seeds]}
    mesh: Any


def build(cfg: QuickstartConfig, seeds: int, mesh) -> Setup:
    """Everything pure for this run: init, the chunked train step and evaluation, jitted with
    their shardings on ``mesh``."""
    m, t = cfg.model, cfg.train
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % batch_devices:
        raise UserError(f"train.batch_size={t.batch_size} must be divisible by the "
                        f"{batch_devices} data x fsdp devices of the mesh")
    base = jax.random.key(cfg.seed)
    teacher = teacher_fn(jax.random.fold_in(base, 0), m)
    seed_keys = jax.random.split(jax.random.fold_in(base, 1), seeds)
    eval_x = jax.random.normal(jax.random.fold_in(base, 2), (t.eval_size, m.in_dim))
    eval_y = teacher(eval_x)
    optimizer, schedule = make_optimizer(cfg)
    nan_steps = jnp.asarray(t.inject_nan_at or (-1,), jnp.int32)

    abstract = nnx.eval_shape(lambda: MLP(m.in_dim, m.width, m.depth, m.activation, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    # Seeds are stacked on a new leading axis, which stays unsharded.
    params_sharding = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)),
                                   param_shardings(abstract_params, mesh))
    x_sharding = NamedSharding(mesh, P(None, *batch_sharding(mesh).spec))

    def init_one(key):
        model = MLP(m.in_dim, m.width, m.depth, m.activation, rngs=nnx.Rngs(params=key))
        params = nnx.state(model, nnx.Param)
        return TrainState(params, optimizer.init(params), init_guard(),
                          jax.random.fold_in(key, 1), jnp.zeros((), jnp.int32))

    def init():
        state = jax.vmap(init_one)(seed_keys)
        return state._replace(params=jax.lax.with_sharding_constraint(state.params, params_sharding))

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    def step_one(state: TrainState, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
        params, opt_state, guard, gm = guarded_update(optimizer, grads, state.opt_state,
                                                      state.params, loss, state.guard)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **gm}
        return TrainState(params, opt_state, guard, state.key, state.step + 1), metrics

    def step(state: TrainState, _):
        keys = jax.vmap(jax.random.fold_in)(state.key, state.step)
        x = jax.vmap(lambda k: jax.random.normal(k, (t.batch_size, m.in_dim)))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (t.batch_size,)))(keys)
        y = teacher(x) + t.noise_std * noise
        x = jnp.where(jnp.isin(state.step[:, None, None], nan_steps), jnp.nan, x)
        x = jax.lax.with_sharding_constraint(x, x_sharding)
        state, metrics = jax.vmap(step_one)(state, x, y)
        metrics["lr"] = schedule(state.step[0] - 1)
        return state, metrics

    def chunk(state, n):
        return jax.lax.scan(step, state, None, length=n)

    def evaluate(state):
        loss = jax.vmap(lambda p: loss_fn(p, eval_x, eval_y))(state.params)
        return {"eval_loss": loss}

    init_jit = jax.jit(init)
    state_sharding = jax.tree.map(lambda x: x.sharding, jax.eval_shape(init_jit))
    # Shardings are explicit on the state, so resumed and fresh runs compile the same program.
    chunk_jit = jax.jit(chunk, static_argnums=1, in_shardings=(state_sharding,),
                        out_shardings=(state_sharding, None), donate_argnums=0)
    return Setup(graphdef, optimizer, init_jit, chunk_jit, jax.jit(evaluate), mesh)


def mesh_from_config(cfg: MeshConfig):
    try:
        return make_mesh(cfg.data, cfg.fsdp, cfg.model)
    except ValueError as err:
        raise UserError(f"mesh: {err}") from None


def run(cfg: QuickstartConfig, ctx: RunContext, mesh=None) -> RunResult:
    mesh = mesh if mesh is not None else mesh_from_config(cfg.mesh)
    setup = build(cfg, ctx.seeds, mesh)
    t = cfg.train
    settings = LoopSettings(num_steps=t.steps, chunk_size=t.chunk_size, save_every=t.save_every,
                            key_metric="loss", max_nonfinite=t.max_nonfinite, desc="quickstart",
                            eval_every=t.eval_every)
    state, logger = fit(ctx.run_dir, setup.init(), setup.chunk, settings, resume=ctx.resume,
                        evaluate=setup.evaluate)
    logger.close()
    metrics = final_metrics(ctx.run_dir.read_metrics())
    metrics = {k: metrics[k] for k in ("loss", "eval_loss", "nonfinite_total") if k in metrics}
    return RunResult(params=state.params, metrics=metrics, steps=t.steps)


def report(run_dir: RunDir) -> str:
    cfg = load_json(QuickstartConfig, run_dir.config_path)
    rows = run_dir.read_metrics()
    summary = read_json(run_dir.summary_path) if run_dir.summary_path.exists() else {}
    curves = {}
    for key in ("loss", "eval_loss"):
        logged = [r for r in rows if key in r]
        if logged:
            values = np.asarray([r[key] for r in logged], dtype=np.float64)
            curves[key] = ([r["step"] for r in logged], values.reshape(len(logged), -1).T)
    floor = cfg.train.noise_std ** 2
    plot = plots.learning_curves(run_dir.plots_dir / "loss.png", curves, ylabel="MSE", logy=True,
                                 title="quickstart: student MSE (mean and 95% CI over seeds)",
                                 references={"train-loss floor (noise_std^2)": floor} if floor else None)
    final = summary.get("final", {})
    table = plots.markdown_table([[k, v] for k, v in final.items()], ["metric", "final value"])
    text = (f"# quickstart\n\nTeacher-student MLP regression: {summary.get('seeds', 1)} seed(s), "
            f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, student width "
            f"{cfg.model.width} x depth {cfg.model.depth}.\n\n{table}\n\n"
            f"`loss` is on noisy training batches, so its floor is the label-noise variance "
            f"noise_std^2 = {floor:.4g}; `eval_loss` is on noise-free held-out inputs (pure "
            f"approximation error, floor 0). `nonfinite_total` counts skipped non-finite steps.\n\n"
            f"Wall time {summary.get('wall_seconds', '?')} s; `params_sha256` "
            f"{summary.get('params_sha256', '')[:16]}...\n\n"
            f"![loss]({plot.relative_to(run_dir.path)})\n")
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


EXPERIMENT = Experiment(
    name="quickstart",
    description="teacher-student MLP regression exercising the whole stack",
    config_cls=QuickstartConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)
