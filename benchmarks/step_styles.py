"""How fast is one training step in each NNX style? (the pattern DESIGN.md prescribes)

Same model (the quickstart MLP), same optimizer (AdamW), same batch, three ways:

- ``functional-scan``: params pytree + optax under ``jax.jit``, K steps per call in
  ``lax.scan`` (what trainkit.loop runs);
- ``functional-step``: the same pure step, one ``jax.jit`` call per step;
- ``nnx-jit``: the module and ``nnx.Optimizer`` mutated in place under ``nnx.jit`` per step
  (Flax's own tutorial style: the peer).

Reports steps/s as the median over repeats and the ratio of each style to ``nnx-jit``
measured in the same process (absolute numbers drift on shared machines; ratios do not).

    python benchmarks/step_styles.py [--width 64] [--depth 2] [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.quickstart import MLP


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, 16))
    y = jnp.sin(x[:, 0])
    tx = optax.adamw(1e-3)

    model = MLP(16, args.width, args.depth, "gelu", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def pure_step(carry, _=None):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    step_jit = jax.jit(pure_step)
    scan_jit = jax.jit(lambda c: jax.lax.scan(pure_step, c, None, length=args.steps))

    nnx_model = MLP(16, args.width, args.depth, "gelu", rngs=nnx.Rngs(0))
    nnx_opt = nnx.Optimizer(nnx_model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(m, o):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)
        o.update(m, g)
        return loss

    def run_scan():
        carry = (params, tx.init(params))
        carry, losses = scan_jit(carry)
        jax.block_until_ready(losses)

    def run_step():
        carry = (params, tx.init(params))
        for _ in range(args.steps):
            carry, loss = step_jit(carry)
        jax.block_until_ready(loss)

    def run_nnx():
        for _ in range(args.steps):
            loss = nnx_step(nnx_model, nnx_opt)
        jax.block_until_ready(loss)

    styles = {"functional-scan": run_scan, "functional-step": run_step, "nnx-jit": run_nnx}
    for fn in styles.values():
        fn()  # compile and warm up
    rates = {name: [] for name in styles}
    for _ in range(args.repeats):  # interleave styles so machine noise hits all alike
        for name, fn in styles.items():
            start = time.perf_counter()
            fn()
            rates[name].append(args.steps / (time.perf_counter() - start))
    peer = statistics.median(rates["nnx-jit"])
    print(f"MLP width {args.width} depth {args.depth} batch {args.batch}, {args.steps} steps x "
          f"{args.repeats} repeats, {jax.devices()[0].platform}")
    print("| style | steps/s (median) | ratio to nnx-jit |")
    print("|---|---|---|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / peer:.2f} |")


if __name__ == "__main__":
    main()
