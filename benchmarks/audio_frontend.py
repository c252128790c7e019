"""Log-mel front end throughput: ``audio.frontend.log_mel`` (jitted JAX, batched) against
librosa on the same machine, same settings, same clips.

Both compute the same features (the equality is checked here before timing, and pinned by
tests/audio/test_frontend.py): centred STFT with a periodic Hann window, power spectrogram,
Slaney mel filterbank, ``10 log10(max(S, amin))``. librosa is given its fastest fair path: the
filterbank is built once and reused (``librosa.feature.melspectrogram`` would rebuild it per
call), and clips go through one call on the ``[batch, T]`` array (librosa >= 0.10 vectorises
over leading axes). Each side is timed on the whole batch; clips/s = batch / median seconds
over ``--repeats`` interleaved repeats (absolute times drift on shared machines, the ratio
is the figure to read). JAX's first call (compilation) is excluded and reported separately.

    python benchmarks/audio_frontend.py [--preset flam|sed_16k|tiny] [--batch 32]
        [--seconds 10] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from audio import frontend


def librosa_log_mel(x: np.ndarray, cfg: frontend.FrontendConfig, fb: np.ndarray) -> np.ndarray:
    """librosa's path for ``[B, T]`` float32 clips -> ``[B, frames, mels]`` dB."""
    spec = np.abs(librosa.stft(x, n_fft=cfg.n_fft, hop_length=cfg.hop,
                               win_length=cfg.window_length, window="hann", center=cfg.center,
                               pad_mode=cfg.pad_mode)) ** cfg.power  # [B, F, frames]
    mel = np.einsum("mf,bft->btm", fb, spec)
    return librosa.power_to_db(mel, ref=1.0, amin=cfg.amin, top_db=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flam", choices=("flam", "sed_16k", "panns_32k", "tiny"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    cfg = getattr(frontend.FrontendConfig, args.preset)()
    n = int(args.seconds * cfg.sample_rate)
    x = np.random.default_rng(0).standard_normal((args.batch, n)).astype(np.float32) * 0.1
    fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                             fmin=cfg.fmin, fmax=cfg.fmax, htk=cfg.mel_scale == "htk",
                             norm="slaney" if cfg.mel_norm == "slaney" else None)

    fn = jax.jit(lambda a: frontend.log_mel(a, cfg))
    xj = jnp.asarray(x)
    t0 = time.perf_counter()
    ours = np.asarray(fn(xj).block_until_ready())
    compile_s = time.perf_counter() - t0
    ref = librosa_log_mel(x, cfg, fb)
    err = float(np.max(np.abs(ours - ref)))

    times = {"jax": [], "librosa": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn(xj).block_until_ready()
        times["jax"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        librosa_log_mel(x, cfg, fb)
        times["librosa"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset={args.preset} sr={cfg.sample_rate} batch={args.batch} x {args.seconds:g} s "
          f"clips, frames={ours.shape[1]} mels={cfg.n_mels}; devices={jax.devices()}")
    print(f"max |ours - librosa| = {err:.2e} dB; jax first call (compile + run) {compile_s:.2f} s")
    for k in ("jax", "librosa"):
        print(f"{k:8s} {args.batch / med[k]:9.1f} clips/s  (median {med[k] * 1e3:.1f} ms / batch)")
    print(f"ratio jax / librosa clips/s = {med['librosa'] / med['jax']:.2f}x")


if __name__ == "__main__":
    main()
