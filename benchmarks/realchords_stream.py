"""Streaming latency of ReaLchords accompaniment per frame on this machine: the KV-cache
:class:`audio.music.stream.Accompanist` against re-encoding the whole prefix every frame
(one uncached pass of the online decoder over the tokens so far, what a model without a
cache must do), same process, same model.

Each frame: the accompanist returns the chord for the frame and feeds [c_t, m_t] (one
jitted decoder call on 2 tokens against the cache). The peer, per frame, runs the model on
the full ``2t + 2``-token prefix padded to the model's length (one compiled shape) and
takes the argmax at the last chord slot. Reported: median and p99 wall time per frame over
``--frames`` frames x ``--repeats`` streams (after a warm-up stream), for the cpu-preset
size and the paper's size (T5 v1.1 small: 8 layers, 6 heads of 64, width 512).
A frame at 120 bpm lasts 125 ms (a 16th note): latencies far below that play live.

    python benchmarks/realchords_stream.py [--frames 256] [--repeats 2] [--sizes cpu,paper]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audio.music import data
from audio.music import models as M
from audio.music.stream import Accompanist

SIZES = {
    "cpu": M.ModelConfig(width=64, num_heads=4, head_dim=16, num_layers=2, mlp_dim=128, max_frames=256),
    "paper": M.ModelConfig.paper(),
}


def _stream(acc: Accompanist, melody: np.ndarray) -> list[float]:
    acc.reset()
    times = []
    for m in melody:
        start = time.perf_counter()
        acc.step_token(int(m))
        times.append(time.perf_counter() - start)
    return times


@functools.partial(jax.jit, static_argnums=0)
def _chord_at(graphdef, params, allowed, tokens, slot):
    logits = nnx.merge(graphdef, params)(tokens)[0, slot]
    return jnp.argmax(M.chord_slot_logits(logits, allowed))


def _reencode(model: M.OnlineDecoder, melody: np.ndarray) -> list[float]:
    # One jitted function for every call (the model's graph static): a jit built per call
    # compiled again on the first timed frame of every stream.
    graphdef, params = nnx.split(model)
    length = model.length
    allowed = jnp.asarray(model.space.chord_slot_allowed())

    tokens = np.zeros((1, length), np.int32)
    tokens[0, 0] = model.space.bos
    times = []
    for t, m in enumerate(melody):
        start = time.perf_counter()
        chord = int(_chord_at(graphdef, params, allowed, jnp.asarray(tokens), 2 * t))
        tokens[0, 2 * t + 1], tokens[0, 2 * t + 2] = chord, m
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="cpu,paper")
    args = ap.parse_args()
    vocab = data.Vocab()
    space = M.TokenSpace.from_vocab(vocab)
    rng = np.random.default_rng(0)
    melody = rng.choice(vocab.melody_tokens, size=args.frames)
    print(f"device: {jax.devices()[0].device_kind}; {args.frames} frames x {args.repeats} streams")
    print("| model | params | method | median ms/frame | p99 ms/frame | ratio (median) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        cfg = SIZES[size]
        model = M.OnlineDecoder(cfg, space, rngs=nnx.Rngs(0))
        n = M.param_count(model)
        acc = Accompanist(model, vocab)
        _stream(acc, melody[:4])  # compile
        _reencode(model, melody[:2])
        cached, full = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            cached += _stream(acc, melody)
            full += _reencode(model, melody)
        c_med, f_med = np.median(cached) * 1e3, np.median(full) * 1e3
        print(f"| {size} | {n:,} | KV cache (Accompanist) | {c_med:.2f} | "
              f"{np.percentile(cached, 99) * 1e3:.2f} | 1.00 |")
        print(f"| {size} | {n:,} | re-encode prefix | {f_med:.2f} | "
              f"{np.percentile(full, 99) * 1e3:.2f} | {f_med / c_med:.2f} |")


if __name__ == "__main__":
    main()
