"""least: SAC and TD3 with and without LEAST (learn to stop unproductive episodes early).

Setting of "The Courage to Stop: Overcoming Sunk Cost Fallacy in Deep Reinforcement Learning"
(Liu et al. 2025, arXiv 2506.13672): off-policy agents on MuJoCo and DeepMind Control tasks,
each run with and without LEAST (:mod:`jaxrl_suite.least`: a stopped episode is a truncation
that bootstraps, and the environment restarts). One sub-run per (task, agent, least on/off) in
``configs/<task>--<agent>--least-<on|off>/``, seeds vmapped inside it; every chunk logs the
deterministic policy's evaluation return (``eval_return``, full episodes, no stopping) per
seed and LEAST's counters. A resumed run skips finished sub-runs and continues the unfinished
one from its checkpoint (the LEAST memories are in the checkpointed agent state).

The report: evaluation return against environment steps (mean and 95% CI over seeds), the
fraction of training episodes stopped and a histogram of the step at which they were
stopped, the replay-buffer composition (share of collected transitions that belong to
stopped episodes), and the environment steps each seed needed to reach a return threshold
with and without LEAST, with a plain verdict on the paper's sample-efficiency claim.

Multi-host (``docs/scaling.md``): as in grama, the seeds are sharded over every device of
every process (:func:`trainkit.sharding.seed_sharding`; ``--seeds`` a multiple of the device
count), each process steps its own seeds' environments, buffers, agents and LEAST memories,
the evaluation returns and LEAST's counters are gathered, and process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.registry import Experiment, RunContext, RunResult, UserError
from trainkit import plots
from trainkit.config import Config, field, load_json
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir, is_main_process, read_json, read_metrics, seed_series, write_json
from trainkit.sharding import seed_sharding, to_host

AGENTS = ("sac", "td3")
VARIANTS = ("off", "on")
LOGGED = ("episode_return", "episode_length", "critic_loss", "q_mean", "env_steps",
          "least/k", "least/episodes", "least/stopped", "least/stop_fraction",
          "least/stopped_share")


@dataclasses.dataclass(frozen=True)
class LeastExperimentConfig(Config):
    seed: int = field(0, ge=0)
    tasks: tuple[str, ...] = field(("brax/hopper",), help="environments (continuous actions)")
    agents: tuple[str, ...] = field(AGENTS, help=f"each of {', '.join(AGENTS)}")
    variants: tuple[str, ...] = field(VARIANTS, help="LEAST off and/or on")
    max_episode_steps: int = field(0, ge=0, help="time limit (0: the task's own)")
    total_steps: int = field(20_000, ge=1, help="env steps per run")
    chunk_steps: int = field(1000, ge=1, help="env steps between evaluations/checkpoints")
    learning_starts: int = field(1000, ge=0)
    batch_size: int = field(256, ge=1)
    lr: float = field(1e-3, gt=0, help="actor, critic (and SAC temperature) learning rate")
    width: int = field(256, ge=1, help="hidden width of the 2-layer actor and critics")
    eval_episodes: int = field(4, ge=1, help="deterministic evaluation episodes per chunk")
    # LEAST (jaxrl_suite.least.LeastConfig)
    k_min: int = field(5, ge=1)
    k_max: int = field(20, ge=1)
    k_init: int = field(0, ge=0, help="K at the start (0: k_max)")
    k_step: int = field(1, ge=1)
    k_every: int = field(1000, ge=1)
    entropy_overflow: float = field(0.05, ge=0)
    warmup_steps: int = field(5_000, ge=0, help="env steps before LEAST may stop episodes")
    omega_scale: float = field(0.5, ge=0, lt=1)
    patience: int = field(10, ge=1)
    threshold_fraction: float = field(0.8, gt=0, le=1, help="sample-efficiency threshold: this "
                                      "fraction of the LEAST-off arm's final eval return")
    final_evals: int = field(3, ge=1, help="evaluations averaged into the 'final' return")

    def validate(self) -> None:
        for name, values, allowed in (("agents", self.agents, AGENTS),
                                      ("variants", self.variants, VARIANTS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise self.invalid(name, f"each must be one of {', '.join(allowed)}")
        if not self.tasks:
            raise self.invalid("tasks", "needs at least one environment")
        if self.total_steps < self.chunk_steps:
            raise self.invalid("total_steps", f"must be >= chunk_steps = {self.chunk_steps}")
        if self.k_min > self.k_max:
            raise self.invalid("k_min", f"must be <= k_max = {self.k_max}")
        if self.k_init and not self.k_min <= self.k_init <= self.k_max:
            raise self.invalid("k_init", f"must be 0 or in [k_min, k_max] = [{self.k_min}, "
                                         f"{self.k_max}]")


def smoke() -> LeastExperimentConfig:
    """Seconds: gymnax Pendulum cut to 50-step episodes, SAC, tiny nets, 768 steps; K in
    [2, 4] re-checked every 128 steps."""
    return LeastExperimentConfig(tasks=("gymnax/Pendulum-v1",), agents=("sac",),
                                 max_episode_steps=50, total_steps=768, chunk_steps=256,
                                 learning_starts=128, batch_size=32, width=16, eval_episodes=2,
                                 k_min=2, k_max=4, k_init=3, k_every=128, warmup_steps=256,
                                 patience=3, final_evals=1)


def cpu() -> LeastExperimentConfig:
    """Minutes on 2 cores (about 10 per sub-run, 4 sub-runs): brax hopper (``spring`` physics,
    1000-step limit), SAC and TD3 with and without LEAST, 20k env steps, width 128; LEAST
    warm-up 3k steps (15% of training, the paper's 10-20%), K in [5, 20] starting at 10,
    moved by 2 every 1000 steps. Add the DeepMind Control cart-pole swing-up with ``--set
    tasks=brax/hopper,dmc/CartpoleSwingup``."""
    return LeastExperimentConfig(tasks=("brax/hopper",), total_steps=20_000, width=128,
                                 warmup_steps=3000, k_min=5, k_max=20, k_init=10, k_step=2,
                                 k_every=1000)


def paper() -> LeastExperimentConfig:
    """The paper's evaluation (SAC and TD3 on MuJoCo and DMC tasks, 1M steps at the SAC/TD3
    papers' settings: lr 3e-4, 2x256 nets, 10k random warm-up; LEAST starting at 15% of
    training with K = 250 episodes, the paper notes' values; K's range, step and check
    interval are this implementation's choice); needs an accelerator."""
    return LeastExperimentConfig(
        tasks=("brax/hopper", "brax/walker2d", "brax/halfcheetah", "brax/ant",
               "dmc/CheetahRun", "dmc/WalkerRun", "dmc/HopperHop"),
        total_steps=1_000_000, chunk_steps=5000, learning_starts=10_000, lr=3e-4, width=256,
        eval_episodes=10, k_min=50, k_max=500, k_init=250, k_step=10, k_every=5000,
        warmup_steps=150_000)


def least_config(cfg: LeastExperimentConfig):
    from jaxrl_suite.least import LeastConfig

    return LeastConfig(k_min=cfg.k_min, k_max=cfg.k_max, k_init=cfg.k_init, k_step=cfg.k_step,
                       k_every=cfg.k_every, entropy_overflow=cfg.entropy_overflow,
                       warmup_steps=cfg.warmup_steps, omega_scale=cfg.omega_scale,
                       patience=cfg.patience)


def agent_config(cfg: LeastExperimentConfig, agent: str):
    from jaxrl_suite.agents.sac import SACConfig
    from jaxrl_suite.agents.td3 import TD3Config
    from jaxrl_suite.networks import NetworkConfig

    net = NetworkConfig(kind="mlp", depth=2, width=cfg.width)
    common = {"num_envs": 1, "total_steps": cfg.total_steps, "chunk_steps": cfg.chunk_steps,
              "learning_starts": cfg.learning_starts, "batch_size": cfg.batch_size,
              "buffer_size": max(cfg.total_steps, cfg.batch_size), "actor_lr": cfg.lr,
              "critic_lr": cfg.lr, "actor": net, "critic": net}
    if agent == "sac":
        return SACConfig(alpha_lr=cfg.lr, **common)
    return TD3Config(**common)


def _name(task: str, agent: str, variant: str) -> str:
    return f"{task.replace('/', '_')}--{agent}--least-{variant}"


def _grid(cfg: LeastExperimentConfig):
    return [(t, a, v) for t in cfg.tasks for a in cfg.agents for v in cfg.variants]


def make_env(cfg: LeastExperimentConfig, task: str):
    from jaxrl_suite.envs import make

    kwargs = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps else {}
    try:
        env = make(task, **kwargs)
    except ValueError as err:
        raise UserError(f"config field 'tasks': {err}") from None
    if env.discrete:
        raise UserError(f"config field 'tasks': {task} has discrete actions; SAC and TD3 need "
                        "continuous ones")
    return env


def build_agent(cfg: LeastExperimentConfig, env, agent: str, variant: str):
    """The SAC/TD3 agent of one sub-run, with the LEAST hook when ``variant == "on"``."""
    from jaxrl_suite.agents import sac, td3
    from jaxrl_suite.least import Least

    hook = (Least(least_config(cfg), 1, env.spec.max_episode_steps) if variant == "on"
            else None)
    maker = sac.make_agent if agent == "sac" else td3.make_agent
    return maker(agent_config(cfg, agent), env, hook)


def run(cfg: LeastExperimentConfig, ctx: RunContext) -> RunResult:
    if cfg.k_max < 1:
        raise UserError("config field 'k_max': must be >= 1")
    envs = {task: make_env(cfg, task) for task in cfg.tasks}
    chunks = cfg.total_steps // cfg.chunk_steps
    try:
        sharding = seed_sharding(ctx.seeds)
    except ValueError as err:  # --seeds not a multiple of the devices of a multi-process run
        raise UserError(str(err)) from None
    on_seeds = {} if sharding is None else {"out_shardings": sharding}
    metrics, params = {}, {}
    for task, agent_name, variant in _grid(cfg):
        name = _name(task, agent_name, variant)
        sub = RunDir(ctx.run_dir.path / "configs" / name)
        agent = build_agent(cfg, envs[task], agent_name, variant)
        if is_main_process():  # process 0 writes the run's files
            write_json(sub.config_path, {"agent": dataclasses.asdict(agent.config),
                                         "least": dataclasses.asdict(least_config(cfg))
                                         if variant == "on" else None})
        # keys made inside the jit (a multi-process jit takes no host-local inputs); with
        # several devices each seed's state lives on the device that steps it
        state = jax.jit(lambda agent=agent: jax.vmap(agent.init)(
            jax.random.split(jax.random.key(cfg.seed), ctx.seeds)), **on_seeds)()
        one_chunk = jax.vmap(agent.train_chunk)

        @jax.jit
        def chunk_fn(state, one_chunk=one_chunk):
            state, m = one_chunk(state)
            if sharding is not None:  # keep every seed on the device that holds it
                state = jax.lax.with_sharding_constraint(state, sharding)
            return state, {k: m[k] for k in LOGGED if k in m}

        def chunk(state, n, chunk_fn=chunk_fn):
            rows = []
            for _ in range(n):
                state, m = chunk_fn(state)
                rows.append(jax.block_until_ready(m))
            return state, jax.tree.map(lambda *r: jnp.stack(r), *rows)

        @jax.jit
        def eval_fn(state, agent=agent):
            keys = jax.random.split(jax.random.key(cfg.seed + 1), ctx.seeds)  # made in the jit
            return jax.vmap(lambda s, key: agent.evaluate(s, key, num_envs=cfg.eval_episodes))(
                state, keys)

        last = {}  # the latest evaluation, on every process

        def evaluate(state, eval_fn=eval_fn, last=last):
            last["eval_return"] = to_host(eval_fn(state)["eval/return"])  # [seeds], gathered
            return dict(last)

        loop = LoopSettings(num_steps=chunks, chunk_size=1, save_every=1,
                            key_metric="episode_return", desc=name, eval_every=1,
                            max_nonfinite=chunks + 1)
        state, logger = fit(sub, state, chunk, loop, resume=ctx.resume, evaluate=evaluate)
        logger.close()
        summary = {"task": task, "agent": agent_name, "variant": variant}
        if state.early_stop is not None:  # LEAST's counters, gathered on every process
            es = {k: to_host(getattr(state.early_stop, k))
                  for k in ("stop_hist", "episodes", "stopped", "stopped_steps", "steps")}
            es["stop_hist"] = es["stop_hist"].sum(axis=0)  # over seeds
            summary.update({k: v.tolist() for k, v in es.items()})
        # the last eval_return row of the log, kept in memory (only process 0 has the log);
        # a finished sub-run that was resumed evaluates its final state again (same keys)
        final = (last or evaluate(state))["eval_return"]
        if is_main_process():
            write_json(sub.summary_path, summary)
        metrics[f"{name}/eval_return"] = float(np.mean(final))
        params[name] = state.critic
    return RunResult(params=params, metrics=metrics, steps=cfg.total_steps)


# --- report -------------------------------------------------------------------------------------


def return_threshold(off_returns: np.ndarray, fraction: float, final_evals: int) -> float:
    """The sample-efficiency threshold, fixed from the LEAST-off arm alone: its final return
    ``R`` (mean over seeds of the last ``final_evals`` evaluations) less ``(1 - fraction) |R|``,
    i.e. ``fraction * R`` for a positive ``R``."""
    final = float(np.mean(np.asarray(off_returns, np.float64)[:, -final_evals:]))
    return final - (1.0 - fraction) * abs(final)


def steps_to_threshold(env_steps: np.ndarray, returns: np.ndarray, threshold: float,
                       after: float = -math.inf) -> np.ndarray:
    """Per seed (rows of ``returns [seeds, N]``), the first ``env_steps > after`` at which the
    evaluation return is ``>= threshold``; NaN for a seed that never reaches it. ``after`` is
    LEAST's warm-up: before it both arms run the same code, and an untrained hopper that
    stands still collects the alive bonus, so an early evaluation says nothing about speed."""
    env_steps = np.asarray(env_steps)
    out = np.full(returns.shape[0], np.nan)
    for s, row in enumerate(returns):
        hit = np.nonzero((row >= threshold) & (env_steps > after))[0]
        if hit.size:
            out[s] = env_steps[hit[0]]
    return out


def _fmt_ci(values) -> str:
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "-"
    mean, ci = plots.mean_and_ci(finite[:, None])
    return f"{mean[0]:.4g} ± {ci[0]:.2g}"


def _verdict(rows: list[dict]) -> str:
    """Plain-language verdict from the steps-to-threshold comparisons."""
    lines, wins, losses = [], 0, 0
    for r in rows:
        off, on = r["off"], r["on"]
        n_off, n_on = int(np.isfinite(off).sum()), int(np.isfinite(on).sum())
        # seeds that never reach the threshold count as the full budget (a lower bound)
        off_b, on_b = np.where(np.isfinite(off), off, r["budget"]), np.where(
            np.isfinite(on), on, r["budget"])
        m_off, ci_off = (x[0] for x in plots.mean_and_ci(off_b[:, None]))
        m_on, ci_on = (x[0] for x in plots.mean_and_ci(on_b[:, None]))
        if m_on + ci_on < m_off - ci_off:
            verdict, wins = "LEAST faster (intervals separate)", wins + 1
        elif m_off + ci_off < m_on - ci_on:
            verdict, losses = "LEAST slower (intervals separate)", losses + 1
        else:
            verdict = "no significant difference (intervals overlap)"
        lines.append(f"- {r['task']} {r['agent'].upper()}: {m_off:.0f} ± {ci_off:.0f} steps "
                     f"without LEAST ({n_off}/{off.size} seeds reached the threshold) vs "
                     f"{m_on:.0f} ± {ci_on:.0f} with LEAST ({n_on}/{on.size}); {verdict}.")
    if not rows:
        return "No pair of runs with and without LEAST to compare."
    if wins and not losses:
        head = ("**The paper's claim (LEAST reaches a given return in fewer environment steps) "
                f"reproduced in {wins} of {len(rows)} comparisons at this scale**, with none "
                "going the other way.")
    elif losses and not wins:
        head = (f"**The paper's claim did not reproduce at this scale: LEAST was slower in "
                f"{losses} of {len(rows)} comparisons** and faster in none.")
    elif wins and losses:
        head = (f"**Mixed: LEAST was faster in {wins} and slower in {losses} of {len(rows)} "
                "comparisons at this scale.**")
    else:
        head = ("**The paper's claim did not reproduce at this scale: no comparison shows a "
                "difference beyond the seed intervals.**")
    return head + " (Unreached seeds count as the full budget.)\n\n" + "\n".join(lines)


def report(run_dir: RunDir) -> str:
    cfg = load_json(LeastExperimentConfig, run_dir.config_path)
    chunk = cfg.chunk_steps
    figures, table, stop_rows, eff_rows, comp_labels, comp_values = [], [], [], [], [], []
    for task in cfg.tasks:
        for agent in cfg.agents:
            title = f"{task} ({agent.upper()})"
            curves, evals = {}, {}
            for variant in cfg.variants:
                sub = run_dir.path / "configs" / _name(task, agent, variant)
                if not (sub / "metrics.jsonl").exists():
                    continue
                steps, values = seed_series(read_metrics(sub / "metrics.jsonl"), "eval_return")
                if not steps:
                    continue
                env_steps = np.asarray(steps, np.float64) * chunk
                curves[f"LEAST {variant}"] = (env_steps, values)
                evals[variant] = (env_steps, values)
                final = values[:, -1]
                summary = read_json(sub / "summary.json") if (sub / "summary.json").exists() \
                    else {}
                if "stopped" in summary:
                    episodes = np.asarray(summary["episodes"], np.float64)
                    stopped = np.asarray(summary["stopped"], np.float64)
                    share = (np.asarray(summary["stopped_steps"], np.float64)
                             / np.maximum(np.asarray(summary["steps"], np.float64), 1))
                    frac = stopped / np.maximum(episodes, 1)
                    hist = np.asarray(summary["stop_hist"], np.float64)
                    stop_steps = np.repeat(np.arange(hist.size), hist.astype(int))
                    median_stop = float(np.median(stop_steps)) if stop_steps.size else math.nan
                    stop_rows.append([task, agent, _fmt_ci(episodes), _fmt_ci(frac),
                                      median_stop, _fmt_ci(share)])
                    comp_labels.append(f"{task.split('/')[-1]} {agent}")
                    comp_values.append(float(np.mean(share)))
                    if hist.sum() > 0:
                        figures.append(_stop_histogram(
                            run_dir.plots_dir / f"{task.replace('/', '_')}-{agent}-stops.png",
                            hist, f"{title}: step at which LEAST stopped episodes"))
                table.append([task, agent, variant, _fmt_ci(final),
                              _fmt_ci(values.max(axis=1))])
            if curves:
                figures.append(plots.learning_curves(
                    run_dir.plots_dir / f"{task.replace('/', '_')}-{agent}-return.png", curves,
                    xlabel="env steps", ylabel="evaluation return (deterministic policy)",
                    title=title))
            if {"off", "on"} <= evals.keys():
                thr = return_threshold(evals["off"][1], cfg.threshold_fraction,
                                       cfg.final_evals)
                eff_rows.append({
                    "task": task, "agent": agent, "threshold": thr,
                    "budget": float(cfg.total_steps),
                    **{v: steps_to_threshold(*evals[v], thr, after=cfg.warmup_steps)
                       for v in ("off", "on")}})
    comp_fig = None
    if comp_labels:
        comp_fig = plots.bar_chart(run_dir.plots_dir / "replay_stopped_share.png", comp_labels,
                                   comp_values, ylabel="share of transitions from stopped "
                                   "episodes", title="replay-buffer composition (LEAST on)")
    eff_table = plots.markdown_table(
        [[r["task"], r["agent"], f"{r['threshold']:.4g}", _fmt_ci(r["off"]),
          f"{int(np.isfinite(r['off']).sum())}/{r['off'].size}", _fmt_ci(r["on"]),
          f"{int(np.isfinite(r['on']).sum())}/{r['on'].size}"] for r in eff_rows],
        ["task", "agent", "return threshold", "env steps, LEAST off", "seeds reached (off)",
         "env steps, LEAST on", "seeds reached (on)"])
    img = lambda p: f"![{p.stem}]({p.relative_to(run_dir.path)})"
    text = "\n\n".join([
        "# least",
        (f"{' and '.join(a.upper() for a in cfg.agents)} with LEAST {' and '.join(cfg.variants)} "
        f"on {', '.join(cfg.tasks)}; {cfg.total_steps} env steps per run, 2x{cfg.width} nets, "
        f"lr {cfg.lr}, {cfg.learning_starts} random warm-up steps; LEAST K in "
        f"[{cfg.k_min}, {cfg.k_max}] (start {cfg.k_init or cfg.k_max}, moved by {cfg.k_step} "
        f"every {cfg.k_every} steps), warm-up {cfg.warmup_steps} steps, omega clip "
        f"{cfg.omega_scale}, patience {cfg.patience}. Values are mean ± 95% CI over seeds."),
        "## Return against environment steps",
        "Deterministic-policy evaluation return (full episodes, never stopped) after every "
        f"chunk of {chunk} env steps.\n\n" + plots.markdown_table(
            table, ["task", "agent", "LEAST", "final eval return", "best eval return"]) + "\n\n"
        + "\n".join(img(p) for p in figures if p.stem.endswith("-return")),
        "## Stopped episodes",
        "Training episodes ended (naturally or stopped) and the fraction LEAST stopped; the "
        "median step index at which it stopped them (all seeds), histograms below.\n\n"
        + plots.markdown_table(stop_rows, ["task", "agent", "episodes", "fraction stopped",
                                           "median stop step", "stopped share of transitions"])
        + "\n\n" + "\n".join(img(p) for p in figures if p.stem.endswith("-stops")),
        "## Replay-buffer composition",
        "Share of the collected transitions (all stored: the buffer holds the whole run) that "
        "belong to episodes LEAST stopped (column `stopped share of transitions` above)."
        + (f"\n\n{img(comp_fig)}" if comp_fig else ""),
        "## Sample efficiency",
        "Environment steps until the evaluation return first reaches the threshold `R - "
        f"{1 - cfg.threshold_fraction:.2g} |R|` ({cfg.threshold_fraction:.0%} of R for R > 0), "
        f"R the LEAST-off arm's final return (mean over seeds of its last {cfg.final_evals} "
        "evaluations); only evaluations after LEAST's warm-up "
        f"({cfg.warmup_steps} env steps) count. Per seed; mean ± 95% CI over the seeds that "
        "reached it.\n\n" + eff_table,
        "## Verdict",
        _verdict(eff_rows),
    ]) + "\n"
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


def _stop_histogram(path, hist: np.ndarray, title: str):
    plt = plots._pyplot()
    stops = np.repeat(np.arange(hist.size), hist.astype(int))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(stops, bins=min(50, max(5, hist.size // 20)), range=(0, hist.size))
    ax.set_xlabel("step index in the episode")
    ax.set_ylabel("episodes stopped (all seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


EXPERIMENT = Experiment(
    name="least",
    description="LEAST: SAC and TD3 with and without learned early stopping of unproductive "
                "episodes on MuJoCo (brax) and DMC tasks (arXiv 2506.13672)",
    config_cls=LeastExperimentConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)
