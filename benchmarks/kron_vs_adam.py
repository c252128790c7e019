"""What does a PSGD Kron step cost against Adam on the same network? (jaxrl_suite.optim)

Same network (the multi-skip residual MLP of Castanyer et al. 2025, ``kind="multiskip_paper"``
with LayerNorm), same batch, same MSE regression loss; one jitted training step (forward,
backward, optimizer update, apply) ``--steps`` times per call in ``lax.scan``, timed for:

- ``adam``: optax.adam;
- ``kron (fit every step)``: Kron with preconditioner-update probability 1 (the first
  ``flat_start`` steps of the default schedule, and every step when seeds are vmapped, since
  the fit's ``lax.cond`` becomes a select under vmap);
- ``kron (p=0.1)``: Kron refitting every 10th step (the steady state of the schedule is 0.03).

Reports the median step time over interleaved repeats and the ratio to Adam measured in the
same process (absolute numbers drift on a shared machine; ratios much less).

    python benchmarks/kron_vs_adam.py [--width 256] [--blocks 3] [--in-dim 400] [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl_suite.networks import NetworkConfig, make_network
from jaxrl_suite.optim import kron


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--in-dim", type=int, default=400, help="400 = MinAtar's 10x10x4 flattened")
    ap.add_argument("--out-dim", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-size-triangular", type=int, default=8192)
    args = ap.parse_args()

    cfg = NetworkConfig(kind="multiskip_paper", depth=args.blocks, width=args.width,
                        layer_norm=True)
    model = make_network(cfg, args.in_dim, args.out_dim, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.in_dim))
    y = jax.random.normal(jax.random.key(2), (args.batch, args.out_dim))

    def loss_fn(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    optimizers = {
        "adam": optax.adam(1e-4),
        "kron (fit every step)": kron(1e-4, preconditioner_update_probability=1.0,
                                      max_size_triangular=args.max_size_triangular),
        "kron (p=0.1)": kron(1e-4, preconditioner_update_probability=0.1,
                             max_size_triangular=args.max_size_triangular),
    }
    runners, states, compile_s = {}, {}, {}
    for name, tx in optimizers.items():
        def run(carry, tx=tx):
            def step(c, _):
                p, s = c
                loss, g = jax.value_and_grad(loss_fn)(p)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss
            return jax.lax.scan(step, carry, None, length=args.steps)

        runners[name] = jax.jit(run)
        t0 = time.perf_counter()
        states[name], _ = jax.block_until_ready(runners[name]((params, tx.init(params))))
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in optimizers}
    for _ in range(args.repeats):  # interleaved: every optimizer sees the same machine load
        for name in optimizers:
            t0 = time.perf_counter()
            states[name], _ = jax.block_until_ready(runners[name](states[name]))
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["adam"])
    print(f"network: multiskip_paper width {args.width}, {args.blocks} blocks, in {args.in_dim}, "
          f"{n_params} params; batch {args.batch}; {args.steps} steps x {args.repeats} repeats; "
          f"devices {jax.devices()}")
    print("| optimizer | step ms (median) | ratio to Adam | first call s (compile + 1 call) |")
    print("|---|---|---|---|")
    for name in optimizers:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x | {compile_s[name]:.1f} |")


if __name__ == "__main__":
    main()
