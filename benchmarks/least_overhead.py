"""Cost of the LEAST hook: env-steps/s of SAC with LEAST vs without, same process.

Both agents run the same jitted ``train_chunk`` (learning on, gymnax Pendulum or any task),
timed in interleaved repeats after a warm-up call (compilation excluded); the medians and
their ratios are printed. A third arm, ``sac+signals``, runs a hook that takes the same inputs
as LEAST (the critics' ``Q(s, a)`` and TD loss at every env step, :meth:`SAC.stop_signals`)
and never stops: the share of the cost that is evaluating what the rule needs, not the rule's
memories. Usage::

    python benchmarks/least_overhead.py [--task gymnax/Pendulum-v1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp


def main() -> None:
    from jaxrl_suite.agents import sac
    from jaxrl_suite.envs import make
    from jaxrl_suite.least import Least, LeastConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="gymnax/Pendulum-v1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=500, help="env steps per timed call")
    args = p.parse_args()
    env = make(args.task)
    cfg = dataclasses.replace(sac.SACConfig.smoke(), num_envs=1, chunk_steps=args.chunk,
                              learning_starts=0, buffer_size=100_000)
    hook = Least(LeastConfig(k_min=5, k_max=20, warmup_steps=0), 1, env.spec.max_episode_steps)

    @dataclasses.dataclass(frozen=True)
    class SignalsOnly(Least):
        """LEAST's inputs, consumed (into a counter, so XLA keeps them), and no stop."""

        def step(self, st, q, td_loss, step_index, done, entropy_per_dim, env_steps):
            return st.replace(h_bar=st.h_bar + jnp.sum(q) + jnp.sum(td_loss)), done & False

    signals = SignalsOnly(hook.config, 1, env.spec.max_episode_steps)
    runs = {"sac": sac.make_agent(cfg, env), "sac+least": sac.make_agent(cfg, env, hook),
            "sac+signals": sac.make_agent(cfg, env, signals)}
    states, fns, times = {}, {}, {k: [] for k in runs}
    for name, agent in runs.items():
        fns[name] = jax.jit(agent.train_chunk)
        states[name], _ = fns[name](jax.jit(agent.init)(jax.random.key(0)))  # compile + warm
        jax.block_until_ready(states[name])
    for _ in range(args.repeats):
        for name in runs:  # interleaved
            t = time.perf_counter()
            states[name], m = fns[name](states[name])
            jax.block_until_ready(m)
            times[name].append(args.chunk / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:12s} {v:10.0f} env-steps/s (median of {args.repeats}), "
              f"ratio to sac {v / med['sac']:.3f}")


if __name__ == "__main__":
    main()
