"""SAC environment steps per second (with updates): jaxrl_suite.agents.sac against sbx and a
host loop, and where each one's time goes.

Variants, all SAC with UTD 1 (one gradient update per env step), one environment, 2x256 ReLU
actor and twin critics, batch 256, Adam 3e-4 (defaults are the paper's sizes;
``--width``/``--batch`` change them for every variant):

* ``ours``: :class:`jaxrl_suite.agents.sac.SAC` ``train_chunk`` under one ``jax.jit``
  (replay buffer on the device, env steps and updates in one ``lax.scan``);
* ``numpy-replay`` (Pendulum only): the standard pattern of JAX SAC scripts (CleanRL's
  ``sac_continuous_action_jax``): a numpy replay buffer on the host, jitted ``act``, ``env.step``
  (the same gymnax Pendulum, one step per call) and ``update`` functions (the same losses as
  ours, taken from the agent), and a host round trip every env step;
* ``sbx``: stable-baselines3-jax (``sbx-rl``, the JAX SAC most users pick; ``pip install
  .[bench]``) ``SAC`` with the same hyperparameters: on gymnasium's own ``Pendulum-v1`` (numpy
  physics), and on the brax task through :class:`GymnasiumAdapter` (our brax ``Env``, one
  jitted ``step`` per call, behind the gymnasium API that SB3 drives).

Tasks: ``Pendulum-v1`` (gymnax for ours, gymnasium for sbx: the same dynamics) and, unless
``--no-brax``, ``brax/<--brax>`` (default ``inverted_pendulum``, spring physics) for ours and
sbx on the very same environment.

Each variant is warmed up first (compilation, ``learning_starts`` filled so every timed step
does an update); then the repeats are interleaved (A B C A B C ...), each timing ``--steps``
env steps; the table gives the median env steps/s and the ratio to sbx.

Where the time goes (ms per env step, medians over the same interleaved repeats):

* ours: the fused loop cannot be timed from inside, so each part runs alone as its own jitted
  ``lax.scan`` of ``--steps`` iterations from the warmed-up state: ``env`` (env.step with
  random actions), ``act`` (the exploration policy), ``replay`` (buffer add + a batch sample)
  and ``update`` (one SAC update, which samples its own batch; the sample's time is also in
  ``replay``); parts may not add up to the fused loop (XLA overlaps and fuses them).
* sbx: its own loop, instrumented: time inside ``env.step`` (the VecEnv), ``replay`` (buffer
  ``add`` + ``sample``), ``update`` (``train`` minus its ``sample``), and the rest (policy
  action on the host round trip, SB3's Python bookkeeping).

    python benchmarks/jaxrl_sac.py [--steps 1000] [--repeats 3] [--width 256] [--batch 256]
        [--no-sbx] [--no-brax] [--brax inverted_pendulum]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_suite.agents import replay, sac
from jaxrl_suite.envs import make

WARMUP = 1000
BATCH, WIDTH = 256, 256  # set from the command line


def _config(**kw) -> sac.SACConfig:
    net = sac.NetworkConfig(kind="mlp", depth=2, width=WIDTH, activation="relu")
    return dataclasses.replace(sac.SACConfig.mujoco(), learning_starts=WARMUP, batch_size=BATCH,
                               buffer_size=100_000, actor=net, critic=net, **kw)


def make_ours(steps: int, env_name: str = "gymnax/Pendulum-v1"):
    """(run, parts): ``run`` times the fused loop; ``parts`` {name: fn} time its pieces alone."""
    env = make(env_name)
    cfg = _config(chunk_steps=steps)
    agent = sac.make_agent(cfg, env)
    state = jax.jit(agent.init)(jax.random.key(0))
    warm = jax.jit(dataclasses.replace(agent, config=dataclasses.replace(
        cfg, chunk_steps=WARMUP)).train_chunk)
    state, _ = warm(state)  # fills learning_starts with random actions
    chunk = jax.jit(agent.train_chunk)
    box = {"state": jax.block_until_ready(chunk(state)[0])}  # compile

    def run():
        box["state"], metrics = chunk(box["state"])
        jax.block_until_ready(metrics)

    def scan(body, init):  # ``steps`` iterations of ``body(carry, key)`` under one jit
        keys = jax.random.split(jax.random.key(9), steps)
        fn = jax.jit(lambda c: jax.lax.scan(lambda c, k: (body(c, k), None), c, keys)[0])
        jax.block_until_ready(fn(init))  # compile
        return lambda: jax.block_until_ready(fn(init))

    s0 = box["state"]
    act_dim = agent.action_dim

    def env_body(e, k):
        return jax.vmap(env.step)(e, jax.random.uniform(k, (1, act_dim), jnp.float32, -1, 1))

    def act_body(a, k):  # the exploration action feeds the next call: nothing is dead code
        return a + agent.explore(s0.actor, s0.env.obs + a.sum(), k)

    def replay_body(buf, k):
        batch = replay.sample(buf, k, cfg.batch_size)
        return replay.add_batch(buf, jax.tree.map(lambda x: x[:1], batch))

    parts = {"env": scan(env_body, s0.env),
             "act": scan(act_body, jnp.zeros((1, act_dim), jnp.float32)),
             "replay": scan(replay_body, s0.buffer),
             "update": scan(lambda st, k: agent.update(st, k)[0], s0)}
    return run, parts


def make_numpy_replay(steps: int):
    env = make("gymnax/Pendulum-v1")
    cfg = _config()
    agent = sac.make_agent(cfg, env)
    init = agent.init(jax.random.key(0))
    tx_actor, tx_critic, tx_alpha = (optax.adam(3e-4), sac.per_member(optax.adam(3e-4)),
                                     optax.adam(3e-4))
    params = {"actor": init.actor, "critic": init.critic, "target": init.critic,
              "log_alpha": init.log_alpha}
    opts = {"actor": tx_actor.init(init.actor), "critic": tx_critic.init(init.critic),
            "alpha": tx_alpha.init(init.log_alpha)}

    @jax.jit
    def act(actor, obs, key):
        return agent.explore(actor, obs[None], key)[0]

    @jax.jit
    def env_step(env_state, action):
        nxt = env.step(env_state, action)
        return nxt, (nxt.reward, nxt.final_obs, nxt.terminated, nxt.obs)

    @jax.jit
    def update(params, opts, batch, key):
        k1, k2 = jax.random.split(key)
        q_loss, q_grads = jax.value_and_grad(lambda c: agent.critic_loss(
            c, params["target"], params["actor"], params["log_alpha"], batch, k1)[0])(
            params["critic"])
        upd, critic_opt = tx_critic.update(q_grads, opts["critic"], params["critic"])
        critic = optax.apply_updates(params["critic"], upd)
        (pi_loss, logp), pi_grads = jax.value_and_grad(agent.actor_loss, has_aux=True)(
            params["actor"], critic, params["log_alpha"], batch["obs"], k2)
        upd, actor_opt = tx_actor.update(pi_grads, opts["actor"], params["actor"])
        actor = optax.apply_updates(params["actor"], upd)
        a_grad = jax.grad(agent.alpha_loss)(params["log_alpha"], logp)
        upd, alpha_opt = tx_alpha.update(a_grad, opts["alpha"], params["log_alpha"])
        log_alpha = optax.apply_updates(params["log_alpha"], upd)
        new = {"actor": actor, "critic": critic, "target": sac.polyak(params["target"], critic,
                                                                        cfg.tau),
               "log_alpha": log_alpha}
        return new, {"actor": actor_opt, "critic": critic_opt, "alpha": alpha_opt}, q_loss

    cap = 100_000
    buf = {"obs": np.zeros((cap, 3), np.float32), "action": np.zeros((cap, 1), np.float32),
           "reward": np.zeros(cap, np.float32), "next_obs": np.zeros((cap, 3), np.float32),
           "terminated": np.zeros(cap, np.float32)}
    rng = np.random.default_rng(0)
    box = {"env": env.reset(jax.random.key(1)), "key": jax.random.key(2), "t": 0,
           "params": params, "opts": opts}
    box["obs"] = np.asarray(box["env"].obs)

    def one_step(learn: bool):
        box["key"], k_act, k_upd = jax.random.split(box["key"], 3)
        if learn:
            action = np.asarray(act(box["params"]["actor"], box["obs"], k_act))
        else:
            action = rng.uniform(-1, 1, size=1).astype(np.float32)
        box["env"], out = env_step(box["env"], action)
        reward, final_obs, terminated, obs = jax.device_get(out)
        i = box["t"] % cap
        buf["obs"][i], buf["action"][i], buf["reward"][i] = box["obs"], action, reward
        buf["next_obs"][i], buf["terminated"][i] = final_obs, terminated
        box["obs"] = obs
        box["t"] += 1
        if learn:
            idx = rng.integers(0, min(box["t"], cap), size=BATCH)
            batch = {k: v[idx] for k, v in buf.items()}
            box["params"], box["opts"], _ = update(box["params"], box["opts"], batch, k_upd)

    for _ in range(WARMUP):
        one_step(False)
    one_step(True)  # compile
    jax.block_until_ready(box["params"])

    def run():
        for _ in range(steps):
            one_step(True)
        jax.block_until_ready(box["params"])
    return run


class GymnasiumAdapter:
    """One of our :class:`jaxrl_suite.envs.Env` (e.g. a brax task) behind the gymnasium API:
    ``reset``/``step`` are jitted calls on one environment with numpy in and out. On an
    episode's end ``step`` returns the final observation and the flags; SB3 then calls
    ``reset``. Built lazily as a ``gymnasium.Env`` subclass (gymnasium is only a bench dep)."""

    def __new__(cls, env_name: str):
        import gymnasium as gym

        class Adapter(gym.Env):
            metadata: ClassVar[dict] = {"render_modes": []}

            def __init__(self):
                self.env = make(env_name)
                n_obs, n_act = self.env.observation_size, self.env.action_size
                self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n_obs,), np.float32)
                self.action_space = gym.spaces.Box(-1.0, 1.0, (n_act,), np.float32)
                self._reset = jax.jit(self.env.reset)
                self._step = jax.jit(self._pure_step)
                self._key = jax.random.key(0)

            def _pure_step(self, state, action):
                nxt = self.env.step(state, action)
                return nxt, (nxt.final_obs, nxt.reward, nxt.terminated, nxt.truncated)

            def reset(self, *, seed=None, options=None):
                if seed is not None:
                    self._key = jax.random.key(seed)
                self._key, k = jax.random.split(self._key)
                self.state = self._reset(k)
                return np.asarray(self.state.obs, np.float32), {}

            def step(self, action):
                self.state, out = self._step(self.state, jnp.asarray(action, jnp.float32))
                obs, reward, term, trunc = jax.device_get(out)
                return (np.asarray(obs, np.float32), float(reward), bool(term > 0), bool(trunc > 0), {})

        return Adapter()


def make_sbx(steps: int, env_name: str = "gymnasium/Pendulum-v1"):
    """(run, totals): ``totals`` accumulates seconds spent in the env, the replay buffer and
    the updates during ``run`` calls (the instance's methods are wrapped with timers)."""
    import gymnasium as gym
    from sbx import SAC as SbxSAC

    env = (gym.make(env_name.split("/", 1)[1]) if env_name.startswith("gymnasium/")
           else GymnasiumAdapter(env_name))
    model = SbxSAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=100_000,
                   learning_starts=WARMUP, batch_size=BATCH, tau=0.005, gamma=0.99, train_freq=1,
                   gradient_steps=1, policy_kwargs={"net_arch": [WIDTH, WIDTH]}, seed=0, verbose=0)
    model.learn(WARMUP + 10)  # warm-up and compile
    totals = {"env": 0.0, "replay": 0.0, "update": 0.0, "sample_in_update": 0.0}
    inside_train = [False]

    def timed(obj, name, bucket):
        inner = getattr(obj, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                totals[bucket] += dt
                if name == "sample" and inside_train[0]:
                    totals["sample_in_update"] += dt
        setattr(obj, name, wrapper)

    timed(model.env, "step", "env")
    timed(model.replay_buffer, "add", "replay")
    timed(model.replay_buffer, "sample", "replay")
    train = model.train

    def train_timed(*a, **kw):
        inside_train[0] = True
        t = time.perf_counter()
        try:
            return train(*a, **kw)
        finally:
            totals["update"] += time.perf_counter() - t
            inside_train[0] = False
    model.train = train_timed

    def run():
        model.learn(steps, reset_num_timesteps=False)
    return run, totals


def bench_task(task: str, variants: dict, args) -> list[str]:
    """Build, warm up and time ``variants`` {name: build()} on one task; the table lines."""
    runs, parts, totals = {}, {}, {}
    for name, build in variants.items():
        t = time.perf_counter()
        out = build()
        if name == "ours":
            runs[name], ours_parts = out
            parts.update({f"ours {k}": v for k, v in ours_parts.items()})
        elif name == "sbx":
            runs[name], totals = out
        else:
            runs[name] = out
        print(f"{task} {name}: ready in {time.perf_counter() - t:.1f} s", flush=True)
    for k in totals:
        totals[k] = 0.0  # count the timed repeats only
    timed = {**runs, **parts}
    secs = {name: [] for name in timed}
    for r in range(args.repeats):
        for name, run in timed.items():
            t = time.perf_counter()
            run()
            secs[name].append(time.perf_counter() - t)
        print(f"{task} repeat {r}: " + ", ".join(f"{n} {args.steps / secs[n][-1]:.0f}" for n in runs),
              flush=True)
    rate = {n: args.steps / statistics.median(secs[n]) for n in runs}
    ref_name = "sbx" if "sbx" in rate else "numpy-replay" if "numpy-replay" in rate else "ours"
    lines = [f"**{task}** ({args.steps} steps x {args.repeats} interleaved repeats)", "",
             f"| variant | env steps/s (median) | ratio to {ref_name} |", "|---|---|---|"]
    lines += [f"| {n} | {v:.0f} | {v / rate[ref_name]:.2f} |" for n, v in rate.items()]
    lines += ["", "| where the time goes (ms per env step) | env | act | replay | update | rest | total |",
              "|---|---|---|---|---|---|---|"]
    if "ours" in runs:
        ms = {k: 1e3 * statistics.median(secs[f"ours {k}"]) / args.steps
              for k in ("env", "act", "replay", "update")}
        total = 1e3 / rate["ours"]
        lines.append(f"| ours (each part alone, jitted scan) | {ms['env']:.3f} | {ms['act']:.3f} | "
                     f"{ms['replay']:.3f} | {ms['update']:.3f} | - | {total:.3f} (fused loop) |")
    if "sbx" in runs:
        n = args.steps * args.repeats
        total = 1e3 * sum(secs["sbx"]) / n
        env_ms, rep_ms = 1e3 * totals["env"] / n, 1e3 * totals["replay"] / n
        upd_ms = 1e3 * (totals["update"] - totals["sample_in_update"]) / n
        rest = total - env_ms - rep_ms - upd_ms
        lines.append(f"| sbx (instrumented, mean over the timed repeats) | {env_ms:.3f} | in rest | "
                     f"{rep_ms:.3f} | {upd_ms:.3f} | {rest:.3f} | {total:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000, help="env steps (= updates) per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sbx", action="store_true")
    ap.add_argument("--no-brax", action="store_true")
    ap.add_argument("--brax", default="inverted_pendulum", help="brax task for the second table")
    ap.add_argument("--width", type=int, default=256, help="hidden width of all nets (2 layers)")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    global BATCH, WIDTH
    BATCH, WIDTH = args.batch, args.width
    have_sbx = not args.no_sbx
    if have_sbx:
        try:
            import sbx  # noqa: F401
        except ImportError as err:
            print(f"sbx not importable ({err}; pip install .[bench]); skipping it")
            have_sbx = False
    n = args.steps
    tasks = {"Pendulum-v1": {"ours": lambda: make_ours(n), "numpy-replay": lambda: make_numpy_replay(n),
                             **({"sbx": lambda: make_sbx(n)} if have_sbx else {})}}
    if not args.no_brax:
        name = f"brax/{args.brax}"
        tasks[name] = {"ours": lambda: make_ours(n, name),
                       **({"sbx": lambda: make_sbx(n, name)} if have_sbx else {})}
    out = [f"SAC, UTD 1, 1 env, 2x{WIDTH} nets, batch {BATCH}; device {jax.devices()[0].platform}", ""]
    for task, variants in tasks.items():
        out += bench_task(task, variants, args) + [""]
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
