"""SAC environment steps per second (with updates): jaxrl_suite.agents.sac against host loops.

Variants, all SAC with UTD 1 (one gradient update per env step), one environment, 2x256 ReLU
actor and twin critics, batch 256, Adam 3e-4, on Pendulum-v1:

Defaults are the paper's sizes; ``--width``/``--batch`` change them for every variant.

* ``ours``: :class:`jaxrl_suite.agents.sac.SAC` ``train_chunk`` under one ``jax.jit``
  (replay buffer on the device, env steps and updates in one ``lax.scan``);
* ``numpy-replay``: the standard pattern of JAX SAC scripts (CleanRL's
  ``sac_continuous_action_jax``): a numpy replay buffer on the host, jitted ``act``, ``env.step``
  (the same gymnax Pendulum, one step per call) and ``update`` functions (the same losses as
  ours, taken from the agent), and a host round trip every env step (action to host, transition
  to host, sampled batch to device);
* ``sbx``: stable-baselines3-jax (``sbx-rl``) ``SAC`` on gymnasium's ``Pendulum-v1`` with the
  same hyperparameters, if it is importable (it is not a dependency of this project; install
  it outside the venv, e.g. ``pip install --no-deps --target /tmp/sbx_site sbx-rl
  stable_baselines3 tfp-nightly gast`` and run with ``PYTHONPATH=/tmp/sbx_site``).

Each variant is warmed up first (compilation, ``learning_starts`` filled so every timed step
does an update); then the repeats are interleaved (A B C A B C ...), each timing ``--steps``
env steps, and the table gives the median env steps/s and the ratio to ``numpy-replay``.

    python benchmarks/jaxrl_sac.py [--steps 1000] [--repeats 3] [--width 256] [--batch 256]
        [--no-sbx]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_suite.agents import sac
from jaxrl_suite.envs import make

WARMUP = 1000
BATCH, WIDTH = 256, 256  # set from the command line


def _config(**kw) -> sac.SACConfig:
    net = sac.NetworkConfig(kind="mlp", depth=2, width=WIDTH, activation="relu")
    return dataclasses.replace(sac.SACConfig.mujoco(), learning_starts=WARMUP, batch_size=BATCH,
                               buffer_size=100_000, actor=net, critic=net, **kw)


def make_ours(steps: int):
    env = make("gymnax/Pendulum-v1")
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
    return run


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


def make_sbx(steps: int):
    import gymnasium as gym
    from sbx import SAC as SbxSAC

    model = SbxSAC("MlpPolicy", gym.make("Pendulum-v1"), learning_rate=3e-4, buffer_size=100_000,
                   learning_starts=WARMUP, batch_size=BATCH, tau=0.005, gamma=0.99, train_freq=1,
                   gradient_steps=1, policy_kwargs={"net_arch": [WIDTH, WIDTH]}, seed=0, verbose=0)
    model.learn(WARMUP + 10)  # warm-up and compile

    def run():
        model.learn(steps, reset_num_timesteps=False)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000, help="env steps (= updates) per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sbx", action="store_true")
    ap.add_argument("--width", type=int, default=256, help="hidden width of all nets (2 layers)")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    global BATCH, WIDTH
    BATCH, WIDTH = args.batch, args.width
    variants = {"ours": make_ours, "numpy-replay": make_numpy_replay}
    if not args.no_sbx:
        try:
            import sbx  # noqa: F401
            variants["sbx"] = make_sbx
        except ImportError as err:
            print(f"sbx not importable ({err}); skipping it")
    runs = {}
    for name, build in variants.items():
        t = time.perf_counter()
        runs[name] = build(args.steps)
        print(f"{name}: ready in {time.perf_counter() - t:.1f} s", flush=True)
    rates = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            rates[name].append(args.steps / (time.perf_counter() - t))
        print(f"repeat {r}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()),
              flush=True)
    ref = statistics.median(rates["numpy-replay"])
    print(f"\nSAC, UTD 1, 1 env, 2x{WIDTH} nets, batch {BATCH}, Pendulum-v1; {args.steps} steps x "
          f"{args.repeats} interleaved repeats; {jax.devices()[0].platform}\n")
    print("| variant | env steps/s (median) | ratio to numpy-replay |")
    print("|---|---|---|")
    for name, v in rates.items():
        med = statistics.median(v)
        print(f"| {name} | {med:.0f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
