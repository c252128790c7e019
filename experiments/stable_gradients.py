"""stable_gradients: do larger RL networks keep learning with multi-skip residuals, LayerNorm and
Kron? ("Stable Gradients for Stable Learning at Scale in Deep Reinforcement Learning",
Castanyer et al. 2025, arXiv 2506.15544; official code roger-creus/stable-deep-rl-at-scale.)

Two parts, each a set of sub-runs with the seeds vmapped inside one program:

1. **RL**: for each agent in ``agents`` -- PQN (:mod:`jaxrl_suite.agents.pqn`; the paper's
   main agent: lr 2.5e-4, Q(lambda) 0.65, RAdam) and PPO (:mod:`jaxrl_suite.agents.ppo`; the
   paper's second agent, their ``PPOArgs``: 8 envs x 128 steps, 4 minibatches x 4 epochs,
   clip 0.1, lr 2.5e-4, RAdam) -- on a MinAtar task (gymnax), for every network size
   ``(width, blocks)`` and every variant:

   * ``mlp``: plain ReLU MLP with ``2 * blocks + 1`` hidden layers (the multi-skip net's
     number of hidden Dense layers), no LayerNorm, RAdam;
   * ``multiskip``: the paper's multi-skip residual MLP (``kind="multiskip_paper"``:
     ``h0 = LN(W_in x)``, ``z <- z + LN(W1 act(LN(W0 act(z)))) + h0``) with LayerNorm, RAdam;
   * ``multiskip_kron``: the same with PSGD Kron (:mod:`jaxrl_suite.optim`) at ``lr / 3``
     (the paper's rule).

   ``encoder="conv"`` puts a 16-channel 3x3 conv torso (:mod:`jaxrl_suite.networks`) before
   every variant's MLP. Sub-runs ``configs/rl--<agent>--<variant>--w<width>-b<blocks>/`` log
   the training return, per-layer gradient norms and consecutive-gradient cosines, the churn
   of the update on a fixed reference batch (representation; PQN: Q-values and greedy action,
   PPO: policy KL/TV and value) every update, in-jit, and the health report (dormant fraction,
   srank, Hutchinson trace and top eigenvalue of the TD / PPO loss). PPO's gradient-norm and
   health columns are the actor's (*decision*: our PPO has separate actor and critic networks
   where the paper's shares a trunk; both get the variant's network and optimizer).

2. **Supervised non-stationary control** (the paper's Sec. 3 motivation): a deep network
   (``control_width``, ``control_blocks``) memorises random labels of ``control_samples``
   digits (the 8x8 images scikit-learn ships); every ``control_steps`` steps the labels are
   redrawn. Loss of plasticity shows as a rising end-of-phase training loss (falling accuracy)
   from phase to phase; sub-runs ``configs/control--<variant>/``.

The report's main plot, per agent, is the final training return against network size per
variant (mean and 95% CI over seeds); the second is the per-layer gradient norm of the largest
size.

Multi-host (``docs/scaling.md``): the seeds of every sub-run and of the control are sharded
over every device of every process (:func:`trainkit.sharding.seed_sharding`; ``--seeds`` a
multiple of the device count); the per-update metrics are gathered and process 0 writes the
files.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.registry import Experiment, RunContext, RunResult, UserError
from trainkit import plots
from trainkit.config import Config, field, load_json
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir, is_main_process, read_json, read_metrics, seed_series, write_json
from trainkit.sharding import from_main, seed_sharding, to_host

VARIANTS = ("mlp", "multiskip", "multiskip_kron")
AGENTS = ("pqn", "ppo")
# where each agent's metrics live: health report of the (actor) network, the loss Hessian,
# and the per-layer gradient norms (PPO: of the actor)
_HEALTH = {"pqn": "health/q/", "ppo": "health/actor/"}
_HESSIAN = {"pqn": "health/q/", "ppo": "health/"}
_GRAD_PREFIX = {"pqn": "", "ppo": "actor/"}
_CHURN_OUT = {"pqn": ("churn/q", "Q churn"), "ppo": ("churn/policy_kl", "policy KL churn")}


@dataclasses.dataclass(frozen=True)
class StableGradientsConfig(Config):
    seed: int = field(0, ge=0)
    env: str = field("gymnax/Breakout-MinAtar", help="a discrete-action jaxrl_suite env name")
    variants: tuple[str, ...] = field(VARIANTS, help=f"each of {', '.join(VARIANTS)}")
    agents: tuple[str, ...] = field(AGENTS, help=f"each of {', '.join(AGENTS)}")
    encoder: str = field("none", choices=("none", "conv"),
                         help="none | conv (3x3 conv torso on the 10x10xC MinAtar image before "
                              "each variant's MLP)")
    widths: tuple[int, ...] = field((512, 1536, 2560), help="network widths, one per size")
    blocks: tuple[int, ...] = field((1, 3, 5), help="residual blocks per size (mlp: 2*b+1 "
                                                    "hidden layers)")
    rl: bool = field(True, help="run the RL part (every agent in agents)")
    total_timesteps: int = field(10_000_000, ge=1, help="env steps per RL run")
    num_envs: int = field(128, ge=1)
    num_steps: int = field(32, ge=1)
    num_minibatches: int = field(32, ge=1)
    num_epochs: int = field(2, ge=1)
    lr: float = field(2.5e-4, gt=0, help="RAdam learning rate (Kron: lr / kron_lr_divisor)")
    kron_lr_divisor: float = field(3.0, gt=0)
    kron_max_size_triangular: int = field(8192, ge=1, help="Kron: axes larger than this get "
                                                           "diagonal factors")
    q_lambda: float = field(0.65, ge=0, le=1)
    eps_finish: float = field(0.05, ge=0, le=1)
    eps_decay: float = field(0.1, ge=0, le=1)
    ppo_num_envs: int = field(8, ge=1)
    ppo_num_steps: int = field(128, ge=1)
    ppo_num_minibatches: int = field(4, ge=1)
    ppo_update_epochs: int = field(4, ge=1)
    ppo_lr: float = field(2.5e-4, gt=0, help="PPO RAdam learning rate (Kron: / kron_lr_divisor)")
    ppo_clip_eps: float = field(0.1, gt=0)
    chunk_updates: int = field(50, ge=1, help="updates per logged chunk / checkpoint")
    health_every: int = field(50, ge=1, help="health report (incl. Hessian) every N updates")
    hessian_samples: int = field(8, ge=0)
    churn_samples: int = field(256, ge=0, help="fixed reference observations of the per-update "
                                               "churn metrics (0 = off)")
    control: bool = field(True, help="run the supervised non-stationary control")
    control_variants: tuple[str, ...] = field(VARIANTS, help="variants of the control (each "
                                                             "one of VARIANTS)")
    control_width: int = field(256, ge=1)
    control_blocks: int = field(4, ge=1)
    control_samples: int = field(512, ge=8, le=1797)
    control_classes: int = field(10, ge=2)
    control_phases: int = field(10, ge=1, help="label redraws + 1")
    control_steps: int = field(500, ge=1, help="optimizer steps per phase")
    control_batch: int = field(128, ge=1)
    control_lr: float = field(1e-3, gt=0, help="Adam learning rate (Kron: / kron_lr_divisor)")

    def validate(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise self.invalid("variants", f"each must be one of {', '.join(VARIANTS)}")
        if any(v not in VARIANTS for v in self.control_variants):
            raise self.invalid("control_variants", f"each must be one of {', '.join(VARIANTS)}")
        if not self.agents or any(a not in AGENTS for a in self.agents):
            raise self.invalid("agents", f"each must be one of {', '.join(AGENTS)}")
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise self.invalid("blocks", f"needs one entry per width ({len(self.widths)})")
        if any(w < 1 for w in self.widths) or any(b < 1 for b in self.blocks):
            raise self.invalid("widths", "widths and blocks must be >= 1")
        for agent in self.agents:
            pre = "ppo_" if agent == "ppo" else ""
            batch = self.batch_size(agent)
            mbs = getattr(self, f"{pre}num_minibatches")
            if batch % mbs:
                raise self.invalid(f"{pre}num_minibatches",
                                   f"must divide {pre}num_envs * {pre}num_steps = {batch}")
            if self.total_timesteps < batch * self.chunk_updates:
                raise self.invalid("total_timesteps", f"must be >= one {agent} chunk: "
                                                      f"{pre}num_envs * {pre}num_steps * "
                                                      f"chunk_updates = "
                                                      f"{batch * self.chunk_updates}")
        if self.control_batch > self.control_samples:
            raise self.invalid("control_batch", f"must be <= control_samples = "
                                                f"{self.control_samples}")

    def batch_size(self, agent: str) -> int:
        """Env steps per update of ``agent``."""
        if agent == "ppo":
            return self.ppo_num_envs * self.ppo_num_steps
        return self.num_envs * self.num_steps

    def num_chunks(self, agent: str) -> int:
        return self.total_timesteps // (self.batch_size(agent) * self.chunk_updates)


def smoke() -> StableGradientsConfig:
    """Compile-light (every compiled program costs CI seconds): one tiny size, the plain MLP and
    multi-skip + Kron (the two ends), PQN only, 2 updates with the health/Hessian report once
    and churn every update, and a 2-phase control of the MLP only. (PPO's smoke-sized settings
    are here too, for ``--set agents=pqn,ppo``.)"""
    return StableGradientsConfig(variants=("mlp", "multiskip_kron"), agents=("pqn",),
                                 control_variants=("mlp",), kron_max_size_triangular=32,
                                 widths=(8,), blocks=(1,), total_timesteps=4 * 8 * 2,
                                 num_envs=4, num_steps=8, num_minibatches=2, num_epochs=1,
                                 ppo_num_envs=4, ppo_num_steps=8, ppo_num_minibatches=2,
                                 ppo_update_epochs=1, chunk_updates=2, health_every=2,
                                 hessian_samples=1, churn_samples=8, control_width=8,
                                 control_blocks=1, control_samples=32, control_phases=2,
                                 control_steps=3, control_batch=16)


def cpu() -> StableGradientsConfig:
    """Breakout-MinAtar at the scale a shared 2-core CPU allows: widths 16/32/64 with 1/2/3
    blocks (mlp: 3/5/7 hidden layers), 3 variants, PQN and PPO for 51k env steps each. PQN: 50
    updates of 32 envs x 32 steps, 4 minibatches, 2 epochs, lr 1e-3 RAdam; PPO: 50 updates of
    8 envs x 128 steps (the paper's), 4 minibatches x 4 epochs, lr 1e-3 RAdam; Kron at lr / 3
    with diagonal factors above 256 (the 400-wide input axis); health every 25 updates with 2
    Hessian probes; churn on 256 fixed observations; control: 32 wide, 3 blocks, 6 phases of
    200 steps on 256 digits. The PQN part took about 17 min with ``--seeds 3`` on the loaded
    2-core machine of docs/stable_gradients_results.md; orders of magnitude below the paper's
    1e7 steps and 512-2560 widths, so it shows the mechanics more than the effect."""
    return StableGradientsConfig(widths=(16, 32, 64), blocks=(1, 2, 3),
                                 total_timesteps=50 * 1024, num_envs=32, num_steps=32,
                                 num_minibatches=4, num_epochs=2, lr=1e-3, ppo_lr=1e-3,
                                 chunk_updates=25, health_every=25, hessian_samples=2,
                                 kron_max_size_triangular=256, control_width=32,
                                 control_blocks=3, control_samples=256, control_phases=6,
                                 control_steps=200, control_batch=64)


def paper() -> StableGradientsConfig:
    """The paper's PQN/MinAtar settings and sizes (small 512/1, medium 1536/3, large 2560/5)."""
    return StableGradientsConfig()


# --- networks and agents --------------------------------------------------------------------


def network(variant: str, width: int, blocks: int, *, encoder: str = "none",
            kernel_init: str = "lecun_normal"):
    from jaxrl_suite.networks import NetworkConfig

    if variant == "mlp":
        return NetworkConfig(kind="mlp", depth=2 * blocks + 1, width=width, layer_norm=False,
                             activation="relu", encoder=encoder, kernel_init=kernel_init)
    return NetworkConfig(kind="multiskip_paper", depth=blocks, width=width, layer_norm=True,
                         activation="relu", encoder=encoder, kernel_init=kernel_init)


def optimizer_name(variant: str) -> str:
    return "kron" if variant.endswith("kron") else "radam"


def pqn_config(cfg: StableGradientsConfig, variant: str, width: int, blocks: int):
    from jaxrl_suite.agents.pqn import PQNConfig
    from jaxrl_suite.optim import KronConfig

    kron = optimizer_name(variant) == "kron"
    return PQNConfig(num_envs=cfg.num_envs, num_steps=cfg.num_steps,
                     total_timesteps=cfg.total_timesteps, eps_finish=cfg.eps_finish,
                     eps_decay=cfg.eps_decay, num_minibatches=cfg.num_minibatches,
                     num_epochs=cfg.num_epochs,
                     lr=cfg.lr / cfg.kron_lr_divisor if kron else cfg.lr, reward_scale=1.0,
                     q_lambda=cfg.q_lambda,
                     network=network(variant, width, blocks, encoder=cfg.encoder),
                     optimizer=optimizer_name(variant), grad_diagnostics=True,
                     kron=KronConfig(max_size_triangular=cfg.kron_max_size_triangular),
                     health_every=cfg.health_every, hessian_samples=cfg.hessian_samples,
                     churn_samples=cfg.churn_samples, chunk_updates=cfg.chunk_updates)


def ppo_config(cfg: StableGradientsConfig, variant: str, width: int, blocks: int):
    """The paper's PPO (their ``PPOArgs``; orthogonal init, RAdam or Kron at ``lr / 3``)."""
    from jaxrl_suite.agents.ppo import PPOConfig
    from jaxrl_suite.optim import KronConfig

    kron = optimizer_name(variant) == "kron"
    return PPOConfig(num_envs=cfg.ppo_num_envs, num_steps=cfg.ppo_num_steps,
                     total_timesteps=cfg.total_timesteps, update_epochs=cfg.ppo_update_epochs,
                     num_minibatches=cfg.ppo_num_minibatches,
                     lr=cfg.ppo_lr / cfg.kron_lr_divisor if kron else cfg.ppo_lr,
                     clip_eps=cfg.ppo_clip_eps,
                     network=network(variant, width, blocks, encoder=cfg.encoder,
                                     kernel_init="orthogonal"),
                     optimizer=optimizer_name(variant), grad_diagnostics=True,
                     kron=KronConfig(max_size_triangular=cfg.kron_max_size_triangular),
                     health_every=cfg.health_every, hessian_samples=cfg.hessian_samples,
                     churn_samples=cfg.churn_samples, chunk_updates=cfg.chunk_updates)


def agent_config(cfg: StableGradientsConfig, agent: str, variant: str, width: int, blocks: int):
    return (ppo_config if agent == "ppo" else pqn_config)(cfg, variant, width, blocks)


def layer_order(variant: str, blocks: int, agent: str = "pqn", conv_layers: int = 0
                ) -> list[str]:
    """Weight layers from input to output (the keys of grad/norm/<module>; PPO: the actor's)."""
    torso = [f"torso/{i}/conv" for i in range(conv_layers)]
    if variant == "mlp":
        body = [f"hidden/{i}/dense" for i in range(2 * blocks + 1)]
    else:
        body = ["encoder/dense"] + [f"blocks/{i}/{k}/dense" for i in range(blocks)
                                    for k in ("inner", "out")]
    return [_GRAD_PREFIX[agent] + k for k in torso + body + ["head"]]


def _conv_layers(cfg: StableGradientsConfig) -> int:
    from jaxrl_suite.networks import NetworkConfig

    return len(NetworkConfig().conv_channels) if cfg.encoder == "conv" else 0


def _rl_name(agent: str, variant: str, width: int, blocks: int) -> str:
    return f"rl--{agent}--{variant}--w{width}-b{blocks}"


def _control_name(variant: str) -> str:
    return f"control--{variant}"


# --- the supervised non-stationary control ----------------------------------------------------


def control_phase_results(cfg: StableGradientsConfig, variant: str, seeds: int,
                          sharding=None):
    """Train one variant on the redrawn-labels task; returns ``{metric: [seeds, phases]}`` at
    the end of every phase (training loss and accuracy on all samples, gradient norms),
    numpy, on every process. ``sharding`` (:func:`trainkit.sharding.seed_sharding`) places
    the seeds over the devices of every process."""
    import optax
    from flax import nnx
    from sklearn.datasets import load_digits

    from jaxrl_suite import health
    from jaxrl_suite.networks import make_network
    from jaxrl_suite.optim import KronConfig, make_optimizer

    x_all = load_digits().data.astype(np.float32) / 16.0
    x = jnp.asarray(x_all[:cfg.control_samples])
    net = network(variant, cfg.control_width, cfg.control_blocks)
    graphdef, _ = nnx.split(make_network(net, x.shape[1], cfg.control_classes, nnx.Rngs(0)),
                            nnx.Param)
    lr = cfg.control_lr / (cfg.kron_lr_divisor if variant.endswith("kron") else 1.0)
    tx = make_optimizer("kron" if variant.endswith("kron") else "adam", lr,
                        kron_config=KronConfig(max_size_triangular=cfg.kron_max_size_triangular))
    n, C = cfg.control_samples, cfg.control_classes

    def loss_fn(params, xb, yb):
        logits = nnx.merge(graphdef, params)(xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb)), logits

    def one_seed(key):
        k_init, k_run = jax.random.split(key)
        params = nnx.split(make_network(net, x.shape[1], C, nnx.Rngs(k_init)), nnx.Param)[1]

        def step(carry, k):
            params, opt_state, labels = carry
            idx = jax.random.choice(k, n, (cfg.control_batch,), replace=False)
            _, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x[idx], labels[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, labels), None

        def phase(carry, k):
            params, opt_state = carry
            k_lab, k_steps = jax.random.split(k)
            labels = jax.random.randint(k_lab, (n,), 0, C)
            (params, opt_state, _), _ = jax.lax.scan(
                step, (params, opt_state, labels), jax.random.split(k_steps, cfg.control_steps))
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, labels)
            acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
            norms = health.layer_norms(grads)
            return (params, opt_state), {"loss": loss, "accuracy": acc,
                                         **{f"grad/norm/{k}": v for k, v in norms.items()}}

        _, out = jax.lax.scan(phase, (params, tx.init(params)),
                              jax.random.split(k_run, cfg.control_phases))
        return out

    # keys made inside the jit: a multi-process jit takes no host-local inputs
    out = jax.jit(lambda: jax.vmap(one_seed)(jax.random.split(
        jax.random.fold_in(jax.random.key(cfg.seed), 1), seeds)),
        **({} if sharding is None else {"out_shardings": sharding}))()
    return {k: to_host(v).astype(np.float64) for k, v in out.items()}


# --- run ------------------------------------------------------------------------------------


def _logged(key: str) -> bool:
    return (key in ("episode_return", "loss", "q", "epsilon", "env_steps", "skipped",
                    "approx_kl", "entropy")
            or key.startswith(("grad/norm/", "grad/cos/", "churn/"))
            or (key.startswith("health/") and key.endswith(
                ("/dormant/all", "/srank", "hessian_trace", "hessian_top_eig",
                 "/grad_norm/global"))))


def _finite_mean(x, axis):
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        return np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=axis)


def run(cfg: StableGradientsConfig, ctx: RunContext) -> RunResult:
    from jaxrl_suite.agents import ppo, pqn
    from jaxrl_suite.envs import make

    try:
        sharding = seed_sharding(ctx.seeds)
    except ValueError as err:  # --seeds not a multiple of the devices of a multi-process run
        raise UserError(str(err)) from None
    final, params_out = {}, {}
    if cfg.control:
        for variant in cfg.control_variants:
            sub = RunDir(ctx.run_dir.path / "configs" / _control_name(variant))
            path = sub.path / "phases.json"
            # process 0's files decide (the others may not see them), the same on every process
            if from_main(bool(ctx.resume and path.exists())):
                if not is_main_process():
                    continue  # the metrics are process 0's to write
                res = {k: np.asarray(v) for k, v in read_json(path).items()}
            else:
                res = control_phase_results(cfg, variant, ctx.seeds, sharding)
                if not is_main_process():
                    continue
                sub.path.mkdir(parents=True, exist_ok=True)
                write_json(path, {k: v.tolist() for k, v in res.items()})
            final[f"control--{variant}/last_phase_accuracy"] = float(
                np.mean(res["accuracy"][:, -1]))
            final[f"control--{variant}/first_phase_accuracy"] = float(
                np.mean(res["accuracy"][:, 0]))
    if cfg.rl:
        try:
            env = make(cfg.env)
        except ValueError as err:
            raise UserError(f"config field 'env': {err}") from None
        if "pqn" in cfg.agents and not env.discrete:
            raise UserError(f"config field 'env': {cfg.env} has continuous actions; PQN needs "
                            "discrete ones (or set agents=ppo)")
        if cfg.encoder == "conv" and env.observation_size % 100:
            raise UserError(f"config field 'encoder': conv needs 10 x 10 x C image "
                            f"observations (MinAtar); {cfg.env} has {env.observation_size}")
        modules = {"pqn": pqn, "ppo": ppo}
        # size-major: a run stopped early still compares every variant at the smaller sizes
        for width, blocks in zip(cfg.widths, cfg.blocks):
            for agent_name in cfg.agents:
                for variant in cfg.variants:
                    name = _rl_name(agent_name, variant, width, blocks)
                    settings = agent_config(cfg, agent_name, variant, width, blocks)
                    agent = modules[agent_name].make_agent(settings, env)
                    state = _train_sub_run(cfg, ctx, agent_name, name, settings, agent,
                                           sharding)
                    params_out[name] = state.params
                    if is_main_process():  # from the log, which process 0 writes
                        summary = _rl_summary(RunDir(ctx.run_dir.path / "configs" / name))
                        write_json(RunDir(ctx.run_dir.path / "configs" / name).summary_path,
                                   {"agent": agent_name, "variant": variant, "width": width,
                                    "blocks": blocks, **summary})
                        final[f"{name}/episode_return"] = float(
                            np.nanmean(summary["return_per_seed"]))
    steps = cfg.total_timesteps if cfg.rl else cfg.control_phases * cfg.control_steps
    return RunResult(params=params_out, metrics=final, steps=steps)


def _train_sub_run(cfg: StableGradientsConfig, ctx: RunContext, agent_name: str, name: str,
                   settings, agent, sharding=None):
    """One (agent, variant, size) sub-run, seeds vmapped, through trainkit's loop; with a
    ``sharding`` (:func:`trainkit.sharding.seed_sharding`) each device of each process holds
    and trains its share of the seeds."""
    sub = RunDir(ctx.run_dir.path / "configs" / name)
    if is_main_process():  # process 0 writes the run's files
        write_json(sub.config_path, dataclasses.asdict(settings))
    # keys made inside the jit: a multi-process jit takes no host-local inputs
    state = jax.jit(lambda: jax.vmap(agent.init)(
        jax.random.split(jax.random.key(cfg.seed), ctx.seeds)),
        **({} if sharding is None else {"out_shardings": sharding}))()
    n = cfg.chunk_updates

    @jax.jit
    def chunk_fn(state):
        state, m = jax.vmap(lambda s: agent.train_chunk(s, n))(state)
        if sharding is not None:  # keep every seed on the device that holds it
            state = jax.lax.with_sharding_constraint(state, sharding)
        # per update: [seeds, n] -> [n, seeds]
        return state, {k: jnp.swapaxes(v, 0, 1) for k, v in m.items() if _logged(k)}

    def chunk(state, num):
        # fit aligns chunks to multiples of chunk_size = n: always n updates
        assert num == n, (num, n)
        state, m = chunk_fn(state)
        return state, jax.tree.map(to_host, m)  # gathered from every process

    total = cfg.num_chunks(agent_name) * n
    loop = LoopSettings(num_steps=total, chunk_size=n, save_every=n,
                        key_metric="episode_return", desc=name, max_nonfinite=total + 1)
    state, logger = fit(sub, state, chunk, loop, resume=ctx.resume)
    logger.close()
    return state


def _rl_summary(sub: RunDir) -> dict:
    """Per-seed means over the last 20% of updates: return, and per-layer grad norm/cosine."""
    rows = read_metrics(sub.path / "metrics.jsonl")
    window = max(1, len(rows) // 5)
    tail = rows[-window:]
    out = {}
    keys = [k for k in tail[-1] if k != "step"]
    for k in keys:
        vals = np.asarray([np.atleast_1d(np.asarray(r[k], np.float64)) for r in tail if k in r])
        out[k] = _finite_mean(vals, 0).tolist()  # [seeds]
    out["return_per_seed"] = out.get("episode_return", [float("nan")])
    return {"final": out, "return_per_seed": out["return_per_seed"]}


# --- report ---------------------------------------------------------------------------------


def _rl_report(run_dir: RunDir, cfg: StableGradientsConfig, agent: str):
    """One agent's table and plots: return vs size, return curves, gradient norm by layer."""
    configs = run_dir.path / "configs"
    figures, rows = [], []
    sizes = list(zip(cfg.widths, cfg.blocks))
    size_labels = [f"{w}x{b}" for w, b in sizes]
    conv = _conv_layers(cfg)
    health, hess = _HEALTH[agent], _HESSIAN[agent]
    churn_key, churn_label = _CHURN_OUT[agent]
    main, curves_by_size, layer_curves = {}, {}, {}
    for variant in cfg.variants:
        per_size = []
        for i, (w, b) in enumerate(sizes):
            sub = configs / _rl_name(agent, variant, w, b)
            if not (sub / "summary.json").exists():
                per_size.append(None)
                continue
            summ = read_json(sub / "summary.json")
            fin = summ["final"]
            ret = np.asarray(summ["return_per_seed"], np.float64)
            per_size.append(ret)
            mean, ci = plots.mean_and_ci(ret[:, None])
            order = layer_order(variant, b, agent, conv)

            def avg(key, fin=fin):
                return float(np.nanmean(fin.get(key, [np.nan])))

            rows.append([variant, f"{w} x {b}", float(mean[0]), float(ci[0]),
                         avg(f"grad/norm/{order[0]}"), avg(f"grad/norm/{order[-2]}"),
                         avg(f"grad/cos/{order[0]}"), avg(f"{health}dormant/all"),
                         avg(f"{health}srank"), avg(f"{hess}hessian_top_eig"),
                         avg("churn/repr_relative"), avg(churn_key)])
            steps, values = seed_series(read_metrics(sub / "metrics.jsonl"), "episode_return")
            env_steps = [st * cfg.batch_size(agent) for st in steps]
            curves_by_size.setdefault(size_labels[i], {})[variant] = (env_steps, values)
            if i == len(sizes) - 1:
                vals = np.stack([np.asarray(fin.get(f"grad/norm/{k}", [np.nan]), np.float64)
                                 for k in order], axis=1)  # [seeds, layers]
                layer_curves[variant] = (list(range(len(order))), vals)
        if all(p is not None for p in per_size):
            main[variant] = (list(range(len(sizes))), np.stack(per_size, axis=1))
    title = f"{cfg.env}: {agent.upper()}"
    if main:
        figures.append(plots.learning_curves(
            run_dir.plots_dir / f"return_vs_size_{agent}.png", main,
            xlabel="network size index (" + ", ".join(
                f"{i}: {l}" for i, l in enumerate(size_labels)) + ")",
            ylabel="training return, last 20% of updates", title=f"{title} return vs size"))
    for label, curves in curves_by_size.items():
        figures.append(plots.learning_curves(
            run_dir.plots_dir / f"return_curves_{agent}_{label}.png", curves,
            xlabel="env steps", ylabel="training episode return", title=f"{title}, size {label}"))
    if layer_curves:
        w, b = sizes[-1]
        figures.append(plots.learning_curves(
            run_dir.plots_dir / f"grad_norm_by_layer_{agent}.png", layer_curves,
            xlabel="weight layer (0 = input, last = output head)", ylabel="gradient norm",
            title=f"{title}: per-layer gradient norm, size {w}x{b}, last 20%", logy=True))
    table = plots.markdown_table(rows, [
        "variant", "width x blocks", "return (last 20%)", "95% CI", "grad norm layer 0",
        "grad norm last hidden", "grad cos layer 0", "dormant", "srank", "Hessian top eig",
        "repr churn (relative)", churn_label])
    if agent == "ppo":
        setup = (f"{cfg.ppo_num_envs} envs x {cfg.ppo_num_steps} steps, "
                 f"{cfg.ppo_num_minibatches} minibatches x {cfg.ppo_update_epochs} epochs, "
                 f"clip {cfg.ppo_clip_eps}, lr {cfg.ppo_lr}; gradient norms and health of the "
                 f"actor")
    else:
        setup = (f"{cfg.num_envs} envs x {cfg.num_steps} steps, {cfg.num_minibatches} "
                 f"minibatches x {cfg.num_epochs} epochs, lr {cfg.lr}")
    encoder = ", conv torso" if cfg.encoder == "conv" else ""
    section = (f"## {agent.upper()} on {cfg.env}\n\n{cfg.total_timesteps} env steps per run, "
               f"{setup} (Kron: lr / {cfg.kron_lr_divisor}){encoder}. Means over seeds of the "
               f"last 20% of updates (churn: per update, on {cfg.churn_samples} fixed "
               f"observations); curves: mean and 95% CI over seeds.\n\n{table}\n")
    return figures, section


def report(run_dir: RunDir) -> str:
    cfg = load_json(StableGradientsConfig, run_dir.config_path)
    figures, text = [], []
    if cfg.rl:
        for agent in cfg.agents:
            figs, section = _rl_report(run_dir, cfg, agent)
            figures += figs
            text.append(section)
    if cfg.control:
        crow, ccurves, cacc = [], {}, {}
        for variant in cfg.control_variants:
            path = run_dir.path / "configs" / _control_name(variant) / "phases.json"
            if not path.exists():
                continue
            res = {k: np.asarray(v, np.float64) for k, v in read_json(path).items()}
            ccurves[variant] = (list(range(1, cfg.control_phases + 1)), res["loss"])
            cacc[variant] = (list(range(1, cfg.control_phases + 1)), res["accuracy"])
            crow.append([variant, float(res["accuracy"][:, 0].mean()),
                         float(res["accuracy"][:, -1].mean()), float(res["loss"][:, 0].mean()),
                         float(res["loss"][:, -1].mean())])
        if cacc:
            figures.append(plots.learning_curves(
                run_dir.plots_dir / "control_accuracy.png", cacc, xlabel="phase (labels redrawn)",
                ylabel="end-of-phase training accuracy", title="non-stationary supervised control"))
            figures.append(plots.learning_curves(
                run_dir.plots_dir / "control_loss.png", ccurves, xlabel="phase (labels redrawn)",
                ylabel="end-of-phase training loss", title="non-stationary supervised control",
                logy=True))
        table = plots.markdown_table(crow, ["variant", "accuracy phase 1", "accuracy last phase",
                                            "loss phase 1", "loss last phase"])
        text.append(f"## Supervised non-stationary control\n\n{cfg.control_samples} digits, "
                    f"random labels over {cfg.control_classes} classes redrawn every "
                    f"{cfg.control_steps} steps, {cfg.control_phases} phases; network "
                    f"{cfg.control_width} wide, {cfg.control_blocks} blocks (mlp: "
                    f"{2 * cfg.control_blocks + 1} layers); Adam {cfg.control_lr} (Kron / "
                    f"{cfg.kron_lr_divisor}).\n\n{table}\n")
    body = "\n".join(text)
    images = "\n".join(f"![{p.stem}]({p.relative_to(run_dir.path)})" for p in figures)
    run_dir.report_path.write_text(f"# stable_gradients\n\n{body}\n{images}\n")
    return str(run_dir.report_path)


EXPERIMENT = Experiment(
    name="stable_gradients",
    description="multi-skip residual MLP + LayerNorm + Kron vs plain MLP: PQN/PPO return vs "
                "network size on MinAtar, gradient flow, churn, and a non-stationary supervised "
                "control",
    config_cls=StableGradientsConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)
