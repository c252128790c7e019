"""Environment steps per second: jaxrl_suite.envs against the back ends' own training loops.

For each case, a batch of ``--batch`` environments (``jax.vmap``) takes uniformly random
actions for ``--steps`` steps inside one ``jax.jit(lax.scan)`` call; steps/s = batch x steps /
wall time (median of ``--repeats`` timed calls after the first; all selected cases are compiled
first and then timed in interleaved rounds), and the first call's wall time (make + trace +
compile + one run) is reported as the compile time. Each of our environments is timed
next to its peer in the same process, and the ratio ours/peer is reported (absolute speeds on
the shared CPU machine drift; ratios do not):

* gymnax: peer = ``env.step`` of gymnax itself (its own auto-reset and time limit);
* brax: peer = ``brax.envs.training.wrap`` (VmapWrapper + EpisodeWrapper + AutoResetWrapper,
  which resets to a cached first state, where ours draws a new random initial state);
* dmc: peer = ``mujoco_playground.wrapper.wrap_for_brax_training`` (same wrappers).

    python benchmarks/envs.py                      # everything in the default table
    python benchmarks/envs.py --only brax/hopper   # cases whose name contains a string
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxrl_suite import envs  # noqa: E402

CASES = [  # (label, env name, make kwargs, peer kind)
    ("gymnax/CartPole-v1", "gymnax/CartPole-v1", {}, "gymnax"),
    *[(f"brax/inverted_pendulum [{b}]", "brax/inverted_pendulum", {"backend": b}, "brax")
      for b in ("mjx", "generalized", "positional", "spring")],
    *[(f"brax/hopper [{b}]", "brax/hopper", {"backend": b}, "brax")
      for b in ("mjx", "generalized", "positional", "spring")],
    *[(f"dmc/CartpoleBalance [{i}]", "dmc/CartpoleBalance", {"impl": i}, "dmc")
      for i in ("jax", "warp")],
]


def _random_action(key, batch, spec):
    if spec.discrete:
        return jax.random.randint(key, (batch,), 0, spec.num_actions)
    return jax.random.uniform(key, (batch, spec.action_size), minval=-1.0, maxval=1.0)


def ours(name, kwargs, batch, steps):
    env = envs.make(name, **kwargs)
    spec = env.spec
    reset = jax.jit(jax.vmap(env.reset))
    vstep = jax.vmap(env.step)

    def body(carry, _):
        state, key = carry
        key, sub = jax.random.split(key)
        state = vstep(state, _random_action(sub, batch, spec))
        return (state, key), state.reward.sum()

    run = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))
    return (reset(jax.random.split(jax.random.key(0), batch)), jax.random.key(1)), run


def peer(kind, name, kwargs, batch, steps):
    task = name.partition("/")[2]
    if kind == "gymnax":
        import gymnax

        env, params = gymnax.make(task)
        n = env.action_space(params).n
        state = jax.jit(jax.vmap(lambda k: env.reset(k, params)[1]))(
            jax.random.split(jax.random.key(0), batch))

        def body(carry, _):
            s, key = carry
            key, k_a, k_s = jax.random.split(key, 3)
            a = jax.random.randint(k_a, (batch,), 0, n)
            _, s, r, *_ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_s, batch), s, a, params)
            return (s, key), r.sum()
    else:
        if kind == "brax":
            from brax import envs as brax_envs

            raw = brax_envs.get_environment(task, backend=kwargs["backend"])
            env = brax_envs.training.wrap(raw, episode_length=1000)
        else:
            from jaxrl_suite.envs.dmc_backend import _quiet_warp

            _quiet_warp()
            from mujoco_playground import registry, wrapper

            raw = registry.load(task, config_overrides={"impl": kwargs["impl"]})
            env = wrapper.wrap_for_brax_training(raw, episode_length=1000)
        size = raw.action_size
        # brax's EpisodeWrapper reads the batch shape as rng.shape[:-1]: raw uint32 keys
        state = jax.jit(env.reset)(jax.random.split(jax.random.PRNGKey(0), batch))

        def body(carry, _):
            s, key = carry
            key, sub = jax.random.split(key)
            s = env.step(s, jax.random.uniform(sub, (batch, size), minval=-1.0, maxval=1.0))
            return (s, key), s.reward.sum()

    run = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))
    return (state, jax.random.key(1)), run


def _timed(carry, run):
    t0 = time.perf_counter()
    carry, out = run(carry)
    jax.block_until_ready(out)
    return carry, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="steps per timed jit(scan) call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="run cases whose label contains this string")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer loops")
    args = ap.parse_args()

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}, "
          f"{args.steps} steps per call, median of {args.repeats} interleaved repeats",
          flush=True)
    # build and compile every selected case (ours and peer) first, then time them in
    # interleaved rounds, so that load changes on a shared machine hit all of them alike
    runs, first, failed = {}, {}, {}
    for label, name, kwargs, kind in CASES:
        if args.only not in label:
            continue
        for who in ("ours",) + (() if args.no_peer else ("peer",)):
            try:
                t0 = time.perf_counter()
                if who == "ours":
                    carry, run = ours(name, kwargs, args.batch, args.steps)
                else:
                    carry, run = peer(kind, name, kwargs, args.batch, args.steps)
                carry, _ = _timed(carry, run)
                first[label, who] = time.perf_counter() - t0
                # untimed second call: brax's peer loop compiles again when fed its own output
                # carry (its types differ from the reset state's); that belongs to no repeat
                carry, _ = _timed(carry, run)
                runs[label, who] = [carry, run, []]
            except Exception as e:  # one broken back end must not hide the rest
                failed[label, who] = f"{type(e).__name__}: {str(e)[:100]}"
            print(f"compiled {label} ({who}): "
                  f"{first.get((label, who), float('nan')):.1f} s", flush=True)
    for _ in range(args.repeats):
        for r in runs.values():
            r[0], dt = _timed(r[0], r[1])
            r[2].append(dt)
    sps = {k: args.batch * args.steps / statistics.median(r[2]) for k, r in runs.items()}

    print("| env [backend] | ours steps/s | ours first call s | peer steps/s | peer first call s "
          "| ours/peer |")
    print("|---|---|---|---|---|---|")
    for label, *_ in CASES:
        if args.only not in label:
            continue
        cells = []
        for who in ("ours", "peer"):
            if (label, who) in sps:
                cells += [f"{sps[label, who]:,.0f}", f"{first[label, who]:.1f}"]
            else:
                cells += [failed.get((label, who), "-"), ""]
        ratio = (f"{sps[label, 'ours'] / sps[label, 'peer']:.2f}"
                 if (label, "ours") in sps and (label, "peer") in sps else "")
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
