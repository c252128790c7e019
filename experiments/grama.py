"""grama: neuron inactivity by activations (tau-dormant, ReDo) and by gradients (GraMa), and
the resets built on each, in SAC (and TD3) critics.

Setting of "Measure gradients, not activations! Enhancing neuronal activity in deep RL"
(GraMa / ReGraMa; Liu et al. 2025): SAC on continuous-control tasks, critics of three kinds
(plain MLP, MLP with LayerNorm, BRO-style residual), and three reset rules applied to the
critics every ``reset_every`` updates:

* ``none``;
* ``redo``: ReDo (Sokar et al. 2023), reinitialise neurons whose tau-dormant score
  ``s_i = mean_x |h_i(x)| / mean_k mean_x |h_k(x)|`` is ``<= tau``, zero their outgoing weights;
* ``regrama``: reinitialise the incoming weights of neurons whose GraMa score
  ``g_j / mean_k g_k`` (``g_j = mean_i |dL/dW_ij|``) is ``<= tau``.

Every run logs, per chunk, the critic's fraction of inactive neurons by each metric
(``critic/dormant/all`` and ``critic/grama/all``), so the report can say whether gradient
scores find inactivity that activation scores miss in residual and normalised critics, and
whether ReGraMa improves returns. ``agents`` adds TD3 (same critics, same resets) as the
second off-policy agent. One sub-run per (task, agent, critic, reset) in
``configs/<task>--<critic>--<reset>/`` (SAC) or ``configs/<task>--td3--<critic>--<reset>/``
with the seeds vmapped inside it; a resumed run skips
finished sub-runs and continues the unfinished one from its checkpoint.

Multi-host (``docs/scaling.md``): with several devices and a seed count they divide, the
seeds are sharded over every device of every process
(:func:`trainkit.sharding.seed_sharding`); each process then steps the environments, replay
buffers and agents of its own seeds (seed ``i`` always from key ``split(key(seed), seeds)[i]``,
whichever process holds it), so N processes train what one process does. A multi-process run needs ``--seeds`` divisible by the device count.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from experiments.registry import Experiment, RunContext, RunResult, UserError
from jaxrl_suite.envs.brax_backend import BRAX_PHYSICS
from trainkit import plots
from trainkit.config import Config, field, load_json
from trainkit.loop import LoopSettings, fit
from trainkit.run import (
    RunDir,
    final_metrics,
    is_main_process,
    read_metrics,
    seed_series,
    write_json,
)
from trainkit.sharding import seed_sharding
from trainkit.stats import mean_ci

CRITICS = ("mlp", "mlp-ln", "residual", "residual-ln", "multiskip-ln")
RESETS = ("none", "redo", "regrama")
AGENTS = ("sac", "td3")


@dataclasses.dataclass(frozen=True)
class GramaConfig(Config):
    seed: int = field(0, ge=0)
    tasks: tuple[str, ...] = field(("gymnax/Pendulum-v1",),
                                   help="environments (jaxrl_suite.envs names, continuous actions)")
    brax_physics: str = field("spring", choices=BRAX_PHYSICS,
                              help="physics back end of brax/ tasks: mjx is MuJoCo's own physics; "
                                   "spring is brax's fast approximation (not MuJoCo)")
    critics: tuple[str, ...] = field(("mlp", "mlp-ln", "residual"),
                                     help=f"critic kinds, each of {', '.join(CRITICS)}")
    resets: tuple[str, ...] = field(RESETS, help=f"reset rules, each of {', '.join(RESETS)}")
    agents: tuple[str, ...] = field(("sac",), help=f"off-policy agents, each of {', '.join(AGENTS)}")
    activation: str = field("relu", choices=("relu", "gelu", "tanh", "silu", "elu"),
                            help="critic activation")
    depth: int = field(2, ge=1, help="critic hidden layers (mlp) or residual blocks")
    width: int = field(256, ge=1, help="critic width (the actor is a 2x256 ReLU MLP)")
    total_steps: int = field(10_000, ge=1, help="env steps per run")
    chunk_steps: int = field(1000, ge=1, help="env steps between log rows/checkpoints")
    learning_starts: int = field(1000, ge=0)
    utd: int = field(1, ge=1, help="gradient updates per env step")
    batch_size: int = field(256, ge=1)
    lr: float = field(1e-3, gt=0, help="actor, critic and temperature learning rate")
    health_every: int = field(250, ge=1, help="critic health report every this many updates")
    tau: float = field(0.1, ge=0, help="threshold of both inactivity metrics and of the resets")
    reset_every: int = field(1000, ge=1, help="reset period in gradient updates")

    def validate(self) -> None:
        for name, values, allowed in (("critics", self.critics, CRITICS), ("resets", self.resets, RESETS),
                                      ("agents", self.agents, AGENTS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise self.invalid(name, f"each must be one of {', '.join(allowed)}")
        if not self.tasks:
            raise self.invalid("tasks", "needs at least one environment")
        if self.total_steps < self.chunk_steps:
            raise self.invalid("total_steps", f"must be >= chunk_steps = {self.chunk_steps}")


def smoke() -> GramaConfig:
    return GramaConfig(critics=("mlp", "residual"), width=32, total_steps=256, chunk_steps=64,
                       learning_starts=64, batch_size=32, health_every=16, reset_every=32)


def cpu() -> GramaConfig:
    """gymnax Pendulum, 3 critics x 3 resets, 10k steps each (SAC solves Pendulum in ~5-7k),
    critics of width 128 (the paper's 256 made the 9 sub-runs ~90 min on 2 cores). Measured
    with ``--seeds 2`` (2026-12-01, same process, interleaved): a 1000-step chunk of the
    LayerNorm critic with ReGraMa takes 39 s at width 128 vs 98 s at 256; compilation ~10 s
    per sub-run. Select a part with ``--set critics=... --set resets=...``; ``--set width=256``
    gives the paper's width. Add the brax inverted pendulum with
    ``--set tasks=gymnax/Pendulum-v1,brax/inverted_pendulum`` (~2x longer)."""
    return GramaConfig(tasks=("gymnax/Pendulum-v1",), total_steps=10_000, width=128)


def mujoco() -> GramaConfig:
    """The cpu preset's budget on MuJoCo physics: brax hopper on MuJoCo's own physics (MJX) and
    the DeepMind Control Suite's cartpole swing-up (MJX), plain and LayerNorm critics, no reset
    vs ReGraMa, 10k env steps each at width 128. SAC is far from solving hopper at 10k steps;
    what this preset shows is how the two inactivity metrics behave on these tasks. (Until
    2026-12-06 hopper ran on brax's ``spring`` approximation, which is not MuJoCo; the results
    doc's hopper rows are those. DMC cheetah-run took ~2 min per 1000 single-env steps here,
    4x hopper: ``paper`` has it.)"""
    return GramaConfig(tasks=("brax/hopper", "dmc/CartpoleSwingup"), brax_physics="mjx",
                       critics=("mlp", "mlp-ln"), resets=("none", "regrama"),
                       total_steps=10_000, width=128)


def paper() -> GramaConfig:
    """MuJoCo tasks on MuJoCo physics (brax's MJX pipeline and the DeepMind Control Suite in
    MJX) at the SAC paper's settings (1M steps, lr 3e-4, 10k warm-up). Differences from the
    GraMa paper that remain: one environment per agent step (no vectorised collection), the
    same depth-2 critics for every arm, and brax's MuJoCo task files, not Gymnasium's."""
    return GramaConfig(tasks=("brax/hopper", "brax/walker2d", "brax/halfcheetah", "brax/ant",
                              "dmc/CheetahRun", "dmc/WalkerRun"), brax_physics="mjx",
                       critics=("mlp", "mlp-ln", "residual-ln"), total_steps=1_000_000,
                       learning_starts=10_000, lr=3e-4, health_every=1000)


def _critic_network(cfg: GramaConfig, critic: str):
    from jaxrl_suite.networks import NetworkConfig

    kind, _, ln = critic.partition("-")
    return NetworkConfig(kind=kind, depth=cfg.depth, width=cfg.width, layer_norm=ln == "ln",
                         activation=cfg.activation)


def sac_config(cfg: GramaConfig, critic: str, reset: str):
    from jaxrl_suite.agents.sac import SACConfig
    from jaxrl_suite.networks import NetworkConfig

    actor = NetworkConfig.sac_mlp() if cfg.width >= 64 else NetworkConfig.tiny()
    return SACConfig(num_envs=1, total_steps=cfg.total_steps, chunk_steps=cfg.chunk_steps,
                     learning_starts=cfg.learning_starts, utd=cfg.utd, batch_size=cfg.batch_size,
                     buffer_size=max(cfg.total_steps, cfg.batch_size), actor_lr=cfg.lr,
                     critic_lr=cfg.lr, alpha_lr=cfg.lr, actor=actor,
                     critic=_critic_network(cfg, critic), health_every=cfg.health_every,
                     tau_dormant=cfg.tau, tau_grama=cfg.tau, reset=reset,
                     reset_every=cfg.reset_every, reset_tau=cfg.tau)


def td3_config(cfg: GramaConfig, critic: str, reset: str):
    """TD3 with the same budget, critic, health reports and resets as :func:`sac_config`."""
    from jaxrl_suite.agents.td3 import TD3Config
    from jaxrl_suite.networks import NetworkConfig

    actor = NetworkConfig.sac_mlp() if cfg.width >= 64 else NetworkConfig.tiny()
    return TD3Config(num_envs=1, total_steps=cfg.total_steps, chunk_steps=cfg.chunk_steps,
                     learning_starts=cfg.learning_starts, utd=cfg.utd, batch_size=cfg.batch_size,
                     buffer_size=max(cfg.total_steps, cfg.batch_size), actor_lr=cfg.lr,
                     critic_lr=cfg.lr, actor=actor, critic=_critic_network(cfg, critic),
                     health_every=cfg.health_every, tau_dormant=cfg.tau, tau_grama=cfg.tau,
                     reset=reset, reset_every=cfg.reset_every, reset_tau=cfg.tau)


def _name(task: str, critic: str, reset: str, agent: str = "sac") -> str:
    middle = "" if agent == "sac" else f"{agent}--"  # SAC runs keep their original names
    return f"{task.replace('/', '_')}--{middle}{critic}--{reset}"


LOGGED = ("episode_return", "critic_loss", "q_mean", "reset_neurons", "critic/dormant/all",
          "critic/grama/all", "critic/grama_kernel/all", "critic/srank", "alpha")


def run(cfg: GramaConfig, ctx: RunContext) -> RunResult:
    from jaxrl_suite.agents import sac, td3
    from jaxrl_suite.envs import make

    envs = {}
    for task in cfg.tasks:
        try:
            physics = {"backend": cfg.brax_physics} if task.startswith("brax/") else {}
            envs[task] = make(task, **physics)
        except ValueError as err:
            raise UserError(f"config field 'tasks': {err}") from None
        if envs[task].discrete:
            raise UserError(f"config field 'tasks': {task} has discrete actions; SAC and TD3 "
                            "need continuous ones")
    chunks = cfg.total_steps // cfg.chunk_steps
    finals, params = {}, {}
    builders = {"sac": (sac_config, sac.make_agent), "td3": (td3_config, td3.make_agent)}
    try:
        sharding = seed_sharding(ctx.seeds)
    except ValueError as err:  # --seeds not a multiple of the devices of a multi-process run
        raise UserError(str(err)) from None
    on_seeds = {} if sharding is None else {"out_shardings": sharding}
    for task, agent_name, critic, reset in _grid(cfg):
        name = _name(task, critic, reset, agent_name)
        sub = RunDir(ctx.run_dir.path / "configs" / name)
        make_settings, make_agent = builders[agent_name]
        settings = make_settings(cfg, critic, reset)
        if is_main_process():  # process 0 writes the run's files
            write_json(sub.config_path, dataclasses.asdict(settings))
        agent = make_agent(settings, envs[task])
        # keys made inside the jit: a multi-process jit takes no host-local inputs
        state = jax.jit(lambda agent=agent: jax.vmap(agent.init)(
            jax.random.split(jax.random.key(cfg.seed), ctx.seeds)), **on_seeds)()
        one_chunk = jax.vmap(agent.train_chunk)

        @jax.jit
        def chunk_fn(state, _):
            state, m = one_chunk(state)
            if sharding is not None:  # keep every seed on the device that holds it
                state = jax.lax.with_sharding_constraint(state, sharding)
            return state, {k: m[k] for k in LOGGED if k in m}

        def chunk(state, n, chunk_fn=chunk_fn):
            # n agent chunks; metrics [n, seeds] (one row per chunk, a list over seeds)
            rows = []
            for _ in range(n):
                state, m = chunk_fn(state, None)
                rows.append(jax.block_until_ready(m))
            return state, jax.tree.map(lambda *r: jnp.stack(r), *rows)

        def evaluate(state, agent=agent):
            ev = jax.jit(lambda s: jax.vmap(lambda s, k: agent.evaluate(s, k, num_envs=8))(
                s, jax.random.split(jax.random.key(cfg.seed + 1), ctx.seeds)))(state)
            return {"eval_return": ev["eval/return"]}

        loop = LoopSettings(num_steps=chunks, chunk_size=1, save_every=1,
                            key_metric="episode_return", desc=name, eval_every=chunks,
                            max_nonfinite=chunks + 1)
        state, logger = fit(sub, state, chunk, loop, resume=ctx.resume, evaluate=evaluate)
        logger.close()
        # only process 0 writes (and so can read) the log: on a pod each host has its own disk
        final = {}
        if is_main_process():
            final = final_metrics(sub.read_metrics(), window=max(1, chunks // 5))
            write_json(sub.summary_path, {"task": task, "agent": agent_name, "critic": critic,
                                          "reset": reset, "final": final})
        finals[name] = final
        params[name] = state.critic
    metrics = {}
    for name, final in finals.items():
        for key in ("eval_return", "episode_return", "critic/dormant/all", "critic/grama/all",
                    "critic/grama_kernel/all"):
            if key in final:
                metrics[f"{name}/{key}"] = float(np.nanmean(np.asarray(final[key], np.float64)))
    return RunResult(params=params, metrics=metrics, steps=cfg.total_steps)


def _grid(cfg: GramaConfig):
    """(task, agent, critic, reset) of every sub-run, in run order."""
    return [(t, a, c, r) for t in cfg.tasks for a in cfg.agents for c in cfg.critics
            for r in cfg.resets]


def per_seed_final(rows, key: str, window: int) -> np.ndarray | None:
    """``[seeds]``: each seed's mean of ``key`` over the last ``window`` rows that log it
    (NaN rows, chunks without a health report, left out), or None if it was never logged."""
    steps, values = seed_series(rows, key)
    if not steps:
        return None
    with warnings.catch_warnings():  # a seed whose window holds only NaN gives NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values[:, -window:], axis=1)


def _ci(values, digits: int = 3) -> str:
    if values is None:
        return "-"
    mean, half, n = mean_ci(values)
    return f"{float(mean):.{digits}f} ± {float(half):.{digits}f}" if n >= 2 else f"{float(mean):.{digits}f}"


# The two GraMa scores, as the report names them. For a neuron j with incoming kernel column
# W[:, j]: kernel score g_j = mean_i |dL/dW_ij| (what public ReGraMa re-implementations compute
# for every layer); gamma score g_j = |dL/dgamma_j| where a LayerNorm follows the Dense (our
# choice for such layers, jaxrl_suite.health.grama_layer_scores "auto"; the two are the same
# score in a layer without LayerNorm).
SCORES = (("critic/dormant/all", "tau-dormant"), ("critic/grama/all", "GraMa (gamma in LN layers)"),
          ("critic/grama_kernel/all", "GraMa (kernel, every layer)"))


def reset_layers(cfg: GramaConfig, critic: str, reset: str) -> str:
    """``"k of n"``: how many of the critic's n hidden (neuron) layers the reset rule can reset.
    ReDo zeroes a reset neuron's outgoing weights, which a layer writing into a residual stream
    does not have as its own (jaxrl_suite.health.redo_scores skips those layers); ReGraMa keeps
    outgoing weights and resets every layer. So in residual critics the two arms do not reset
    the same layers, and the report says so."""
    if reset == "none":
        return "-"
    from flax import nnx

    from jaxrl_suite.networks import make_network

    layers = make_network(_critic_network(cfg, critic), 4, 1, nnx.Rngs(0)).neuron_layers()
    n = sum(layer.isolable for layer in layers) if reset == "redo" else len(layers)
    return f"{n} of {len(layers)}"


def report(run_dir: RunDir) -> str:
    cfg = load_json(GramaConfig, run_dir.config_path)
    chunk = cfg.chunk_steps
    window = max(1, (cfg.total_steps // cfg.chunk_steps) // 5)
    figures, rows, diffs = [], [], []
    logs = {}  # sub-run dir -> its metrics rows, read once

    def log_rows(sub):
        if sub not in logs:
            logs[sub] = read_metrics(sub / "metrics.jsonl")
        return logs[sub]
    for task in cfg.tasks:
        for agent in cfg.agents:
            title = f"{task} ({agent.upper()})"
            for key, ylabel in (("episode_return", "training episode return"),
                                ("critic/dormant/all", f"critic neurons tau-dormant (tau={cfg.tau})"),
                                ("critic/grama/all", f"critic neurons GraMa-inactive (tau={cfg.tau})"),
                                ("critic/grama_kernel/all",
                                 f"GraMa-inactive, kernel score (tau={cfg.tau})")):
                curves = {}
                for critic in cfg.critics:
                    for reset in cfg.resets:
                        sub = run_dir.path / "configs" / _name(task, critic, reset, agent)
                        if (sub / "metrics.jsonl").exists():
                            steps, values = seed_series(log_rows(sub), key)
                            if steps:
                                curves[f"{critic}/{reset}"] = ([s * chunk for s in steps], values)
                if curves:
                    slug = f"{task.replace('/', '_')}-{agent}-{key.replace('/', '_')}"
                    figures.append(plots.learning_curves(run_dir.plots_dir / f"{slug}.png", curves,
                                                         xlabel="env steps", ylabel=ylabel,
                                                         title=title))
    finals = {}  # (task, agent, critic, reset) -> {key: [seeds]}
    for task, agent, critic, reset in _grid(cfg):
        sub = run_dir.path / "configs" / _name(task, critic, reset, agent)
        if not (sub / "summary.json").exists():
            continue
        final = {key: per_seed_final(log_rows(sub), key, window) for key in
                 ("episode_return", "critic/srank", *(k for k, _ in SCORES))}
        final["eval_return"] = per_seed_final(log_rows(sub), "eval_return", 1)  # logged once
        finals[task, agent, critic, reset] = final
        rows.append([task, agent, critic, reset, reset_layers(cfg, critic, reset),
                     _ci(final["eval_return"], 0),
                     _ci(final["episode_return"], 0), *(_ci(final[k]) for k, _ in SCORES),
                     _ci(final["critic/srank"], 1)])
        dormant = final["critic/dormant/all"]
        if dormant is not None:
            diffs.append([task, agent, critic, reset, *(
                _ci(final[k] - dormant) if final[k] is not None else "-" for k, _ in SCORES[1:])])
    # each reset arm against the no-reset arm of the same critic, paired within seeds (same
    # initialisation and environment keys up to the first reset)
    gains = []
    for (task, agent, critic, reset), final in finals.items():
        base = finals.get((task, agent, critic, "none"))
        if reset != "none" and base is not None:
            gains.append([task, agent, critic, reset, *(
                _ci(final[k] - base[k], 0) if final[k] is not None and base[k] is not None else "-"
                for k in ("eval_return", "episode_return"))])
    table = plots.markdown_table(rows, ["task", "agent", "critic", "reset", "layers it resets",
                                        "eval return (deterministic)", "training return (last 20%)",
                                        *(f"{name} fraction" for _, name in SCORES), "srank"])
    diff_table = plots.markdown_table(diffs, ["task", "agent", "critic", "reset",
                                              *(f"{name} minus tau-dormant" for _, name in SCORES[1:])])
    agents = " and ".join(a.upper() for a in cfg.agents)
    text = (f"# grama\n\n{agents}, {cfg.total_steps} env steps per run, critic depth {cfg.depth} "
            f"width {cfg.width} {cfg.activation}, resets every {cfg.reset_every} updates at tau "
            f"{cfg.tau}. Cells: mean ± 95% t-interval over seeds (`trainkit.stats.mean_ci`; a "
            f"bare number when one seed). Fractions are of the critic's hidden neurons at the last "
            f"health report of each chunk, each seed averaged over the last {window} chunks.\n\n"
            f"Two GraMa scores (they differ only in layers followed by a LayerNorm): *kernel*, "
            f"g_j = mean_i |dL/dW_ij| over neuron j's incoming weights, the score public ReGraMa "
            f"re-implementations compute for every layer; *gamma*, g_j = |dL/dgamma_j| of the "
            f"LayerNorm scale, our choice for such layers (exactly 0 for a dead neuron, where the "
            f"kernel gradient is not: see `jaxrl_suite.health.grama_layer_scores`).\n\n{table}\n\n"
            f"## Does the gradient score flag neurons the activation score misses?\n\n"
            f"Per seed, GraMa-inactive fraction minus tau-dormant fraction in the same critic "
            f"(paired over seeds; an interval that excludes 0 is a difference).\n\n{diff_table}\n\n"
            + ("## Do the resets improve returns?\n\nPer seed, the reset arm's return minus the "
               "no-reset arm's in the same critic (paired over seeds).\n\n"
               + plots.markdown_table(gains, ["task", "agent", "critic", "reset",
                                              "eval return minus no reset",
                                              "training return minus no reset"]) + "\n\n"
               if gains else "")
            + "\n".join(f"![{p.stem}]({p.relative_to(run_dir.path)})" for p in figures) + "\n")
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


EXPERIMENT = Experiment(
    name="grama",
    description="GraMa vs ReDo: gradient- vs activation-based neuron inactivity and resets in "
                "SAC critics (plain, LayerNorm, residual)",
    config_cls=GramaConfig,
    presets={"smoke": smoke, "cpu": cpu, "mujoco": mujoco, "paper": paper},
    run=run,
    report=report,
)
