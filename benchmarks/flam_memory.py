"""Peak memory and step time of FLAM's frame loss: direct (naive) vs chunked.

Both compute the value and the gradients (frames, text, alpha) of ``L_SED`` (audio.flam):

- ``naive``: :func:`audio.flam.frame_loss`, builds the ``[B, K, L]`` logits and their
  gradient;
- ``text-C``: :func:`audio.flam.sed_loss_chunked` with ``C`` texts per chunk (``lax.scan``
  forward, ``custom_vjp`` backward that recomputes each chunk's logits);
- ``batch-C``: the same with ``C`` clips per chunk (``axis="batch"``).

Memory is XLA's own accounting of the compiled program (``jit(...).lower(...).compile()
.memory_analysis()``): ``temp`` is the scratch memory the program allocates beyond its
arguments and outputs (the peak that differs between the two); arguments and outputs are the
same for both. Labels are passed as bool (1 byte per triple). Step time: median over
interleaved repeats of the jitted value-and-grad, reported as a ratio to ``naive`` in the same
process (absolute times drift on shared machines).

    python benchmarks/flam_memory.py [--batch 64] [--texts 512 2048 8192] [--frames 250]
        [--dim 512] [--chunks 16 64 128] [--batch-chunks 1 4] [--time-texts 512]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from audio import flam

MIB = 2.0 ** 20


def _loss_fns(text_chunks, batch_chunks):
    fns = {"naive": lambda f, t, a, b, y: flam.frame_loss(f, t, a, b, y)}
    for axis, chunks in (("text", text_chunks), ("batch", batch_chunks)):
        for c in chunks:
            fns[f"{axis}-{c}"] = (lambda c, axis: lambda f, t, a, b, y:
                                  flam.sed_loss_chunked(f, t, a, b, y, c, axis=axis))(c, axis)
    return fns


def _step(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _shapes(b, k, l, d):
    sd = jax.ShapeDtypeStruct
    return (sd((b, l, d), jnp.float32), sd((k, d), jnp.float32), sd((k,), jnp.float32),
            sd((k,), jnp.float32), sd((b, k, l), jnp.bool_))


def _inputs(b, k, l, d, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((b, l, d), np.float32)
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    t = rng.standard_normal((k, d), np.float32)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    return (jnp.asarray(f), jnp.asarray(t), jnp.full((k,), 10.0, jnp.float32),
            jnp.full((k,), -8.0, jnp.float32), jnp.asarray(rng.random((b, k, l)) < 0.05))


def memory_table(b, texts, l, d, text_chunks, batch_chunks):
    rows = []
    for k in texts:
        for name, loss in _loss_fns(text_chunks, batch_chunks).items():
            if name.startswith("text-") and int(name.split("-")[1]) > k:
                continue
            m = _step(loss).lower(*_shapes(b, k, l, d)).compile().memory_analysis()
            rows.append((k, name, m.temp_size_in_bytes / MIB, m.argument_size_in_bytes / MIB,
                         m.output_size_in_bytes / MIB))
    return rows


def time_table(b, k, l, d, text_chunks, batch_chunks, repeats):
    args = _inputs(b, k, l, d)
    steps = {name: _step(loss) for name, loss in _loss_fns(text_chunks, batch_chunks).items()}
    values = {}
    for name, fn in steps.items():  # compile + warm up, and check the values agree
        values[name] = float(jax.block_until_ready(fn(*args))[0])
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return [(name, med[name], med[name] / med["naive"], values[name]) for name in steps]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--texts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunks", type=int, nargs="*", default=[16, 64, 128],
                    help="texts per chunk (axis='text')")
    ap.add_argument("--batch-chunks", type=int, nargs="*", default=[1, 4],
                    help="clips per chunk (axis='batch')")
    ap.add_argument("--time-texts", type=int, default=512, help="K for the timing table")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    b, l, d = args.batch, args.frames, args.dim

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"B={b}, L={l}, D={d}, float32, bool labels")
    print("\n### Compiled memory of value_and_grad (MiB; XLA memory_analysis)\n")
    print("| K (texts) | variant | temp | ratio to naive | arguments | outputs | [B,K,L] f32 |")
    print("|---|---|---|---|---|---|---|")
    rows = memory_table(b, args.texts, l, d, args.chunks, args.batch_chunks)
    naive = {k: temp for k, name, temp, *_ in rows if name == "naive"}
    for k, name, temp, arg, out in rows:
        full = b * k * l * 4 / MIB
        print(f"| {k} | {name} | {temp:.1f} | {temp / naive[k]:.3f} | {arg:.1f} | {out:.1f} "
              f"| {full:.1f} |")

    if args.repeats > 0:
        k = args.time_texts
        print(f"\n### Step time, value_and_grad, K={k} (median of {args.repeats} interleaved "
              f"repeats)\n")
        print("| variant | seconds | ratio to naive | loss |")
        print("|---|---|---|---|")
        for name, sec, ratio, value in time_table(b, k, l, d, args.chunks, args.batch_chunks,
                                                    args.repeats):
            print(f"| {name} | {sec:.3f} | {ratio:.2f} | {value:.6f} |")


if __name__ == "__main__":
    main()
