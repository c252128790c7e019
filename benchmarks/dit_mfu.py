"""Model FLOP utilisation of the DiT training step (generative.dit) against the measured matmul
peak of the same machine, in the same run.

    MFU = model FLOPs per step / step time / peak FLOP/s

Model FLOPs: :func:`generative.dit.train_step_flops` (matmuls and attention, backward = 2 x
forward; the usual convention). The script also prints XLA's own FLOP count of the compiled step
(``cost_analysis``; it adds element-wise work and the optimizer) as a cross-check of the formula.
The peak is the median FLOP/s of a jitted float32 ``n x n`` matmul, timed in the same
interleaved repeats as the step (the shared machine's speed drifts; MFU is taken per repeat,
then the median).

    PYTHONPATH=. .venv/bin/python benchmarks/dit_mfu.py [--repeats 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from generative import dit


def matmul_peak(n: int):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))

    def timed() -> float:
        t = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        return 2.0 * n ** 3 / (time.perf_counter() - t)

    return timed


def step_timer(cfg: dit.DiTConfig, batch: int, steps: int):
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    train = dit.DiTTrainConfig(batch_size=batch)
    optimizer = dit.make_optimizer(train)
    state = dit.init_train_state(params, optimizer, ema=False)
    step = dit.make_train_step(graphdef, optimizer)
    images = jax.random.uniform(jax.random.key(2), (batch, cfg.image_size, cfg.image_size,
                                                    cfg.channels), minval=-1, maxval=1)
    codes = jax.random.randint(jax.random.key(3), (batch, cfg.code_length), 0, cfg.vocab_size)
    key = jax.random.key(4)
    t0 = time.perf_counter()
    compiled = step.lower(state, key, images, codes).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    holder = {"state": state}
    jax.block_until_ready(compiled(state, key, images, codes))

    def timed() -> float:
        s = holder["state"]
        t = time.perf_counter()
        for _ in range(steps):
            s, m = compiled(s, key, images, codes)
        jax.block_until_ready(m["loss"])
        holder["state"] = s
        return (time.perf_counter() - t) / steps

    return timed, compile_s, xla_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak")
    args = ap.parse_args()
    shapes = [
        ("cpu preset (D=192, depth 6, 64 patches)", dit.DiTConfig.cpu(), 64),
        ("D=384, depth 12, 64 patches", dit.DiTConfig(patch_size=4, dim=384, depth=12, heads=6), 64),
    ]
    peak = matmul_peak(args.peak_n)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print("| DiT | batch | params | model GFLOP/step | XLA GFLOP/step | step ms | "
          "matmul peak GFLOP/s | MFU | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg, batch in shapes:
        timed, compile_s, xla_flops = step_timer(cfg, batch, args.steps)
        flops = dit.train_step_flops(cfg, batch)
        step_s, peaks, mfu = [], [], []
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            s, pk = timed(), peak()
            step_s.append(s)
            peaks.append(pk)
            mfu.append(flops / s / pk)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(dit.DiT(cfg, rngs=nnx.Rngs(0)),
                                                                 nnx.Param)))
        print(f"| {name} | {batch} | {n_params / 1e6:.1f}M | {flops / 1e9:.2f} | "
              f"{xla_flops / 1e9:.2f} | {statistics.median(step_s) * 1e3:.1f} | "
              f"{statistics.median(peaks) / 1e9:.1f} | {statistics.median(mfu):.1%} | "
              f"{compile_s:.1f} |")


if __name__ == "__main__":
    main()
