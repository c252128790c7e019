"""Audio front end: file I/O, resampling, STFT, mel filterbanks and log-mel features.

Everything that touches samples is a pure JAX function, jittable and batched over any leading
axes (``[..., T]`` in, ``[..., frames, bins]`` out: time-major, the layout our models take).
What depends only on static settings (the resampling filter, the mel filterbank, frame
indices) is computed once on the host in float64 NumPy and enters the traced function as a
constant, so a jitted front end is one fused XLA program.

Conventions (checked against the references by tests/audio/test_frontend.py):

* **STFT** ``X[t, f] = sum_n w[n] x[t * hop + n - pad] exp(-2 pi i f n / n_fft)`` with a
  periodic Hann window ``w[n] = 0.5 - 0.5 cos(2 pi n / win_length)`` (zero-padded to
  ``n_fft`` in the centre when ``win_length < n_fft``), and with ``center=True`` the signal
  padded by ``n_fft // 2`` on both sides (``pad_mode`` "reflect" like ``torch.stft`` and
  torchlibrosa, or "constant" like librosa >= 0.10). Frames: ``1 + T // hop`` when centred.
  Same numbers as ``torch.stft(..., window=torch.hann_window(n_fft), center=True)``.
* **Mel filterbank** exactly as ``librosa.filters.mel``: mel scale "slaney" (linear below
  1 kHz, logarithmic above; Slaney's Auditory Toolbox) or "htk" (``2595 log10(1 + f/700)``);
  ``n_mels + 2`` points equally spaced in mel between ``fmin`` and ``fmax``; filter ``m`` is
  the triangle rising from point ``m`` to a peak of 1 at point ``m + 1`` and falling to 0 at
  point ``m + 2``, evaluated at the FFT bin frequencies ``f_k = k sr / n_fft``; with
  ``norm="slaney"`` each triangle is scaled by ``2 / (f_{m+2} - f_m)`` (constant area).
* **Log-mel** ``10 log10(max(S_mel, amin)) - 10 log10(max(ref, amin))``, optionally clipped to
  ``top_db`` below the maximum (``librosa.power_to_db``; torchlibrosa's ``LogmelFilterBank``
  with ``ref=1, amin=1e-10, top_db=None`` is the FLAM/HTSAT setting).
* **Resampling** is a polyphase windowed-sinc filter written in JAX (one strided
  convolution), the same filter and alignment as ``scipy.signal.resample_poly`` (Kaiser
  window, beta 5, ``20 max(up, down) + 1`` taps, cutoff ``1 / max(up, down)`` of Nyquist).
  Why JAX rather than calling scipy on the host: it runs inside jitted, batched data
  pipelines and on the accelerator, next to the STFT, with no host round trip; scipy stays
  the test oracle (same outputs to ~1e-6).

File I/O uses ``soundfile`` (libsndfile): WAV and FLAC in and out, errors are ``ValueError``
naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import lru_cache
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from trainkit.config import Config, field

MelScale = Literal["slaney", "htk"]
MelNorm = Literal["slaney", "none"]

#: Sample rates accepted from files; anything else is refused with a ValueError naming the
#: file (odd rates make the polyphase factors, hence the filter, enormous).
SUPPORTED_SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
#: Largest polyphase factor max(up, down) the resampler accepts (filter of 20 x this + 1 taps).
MAX_RESAMPLE_FACTOR = 1000
AUDIO_EXTENSIONS = (".wav", ".flac")


# --- config --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrontendConfig(Config):
    """Settings of the log-mel front end.

    Presets: :meth:`sed_16k`, :meth:`panns_32k`, :meth:`flam`, :meth:`tiny`."""

    sample_rate: int = field(16000, gt=0, help="sample rate in Hz the features are computed at")
    n_fft: int = field(512, ge=2, help="FFT size (samples)")
    hop: int = field(160, ge=1, help="hop between frames (samples)")
    win_length: int = field(0, ge=0, help="Hann window length; 0 means n_fft")
    n_mels: int = field(64, ge=1, help="number of mel bands")
    fmin: float = field(50.0, ge=0, help="lowest mel edge (Hz)")
    fmax: float = field(8000.0, gt=0, help="highest mel edge (Hz), at most sample_rate / 2")
    mel_scale: str = field("slaney", choices=("slaney", "htk"), help="mel formula")
    mel_norm: str = field("slaney", choices=("slaney", "none"), help="filter normalisation")
    power: float = field(2.0, gt=0, help="|X|^power before the filterbank (2: power, 1: magnitude)")
    center: bool = field(True, help="pad n_fft // 2 on both sides so frame t is centred at t * hop")
    pad_mode: str = field("reflect", choices=("reflect", "constant"), help="padding when centred")
    amin: float = field(1e-10, gt=0, help="floor before the log")
    top_db: float = field(0.0, ge=0, help="clip to this many dB below the max; 0 disables")

    def validate(self) -> None:
        if self.fmax > self.sample_rate / 2:
            raise self.invalid("fmax", f"must be <= sample_rate / 2 = {self.sample_rate / 2}")
        if self.fmin >= self.fmax:
            raise self.invalid("fmin", f"must be < fmax = {self.fmax}")
        if self.win_length > self.n_fft:
            raise self.invalid("win_length", f"must be <= n_fft = {self.n_fft}")

    @property
    def window_length(self) -> int:
        return self.win_length or self.n_fft

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @classmethod
    def sed_16k(cls) -> "FrontendConfig":
        """16 kHz, 64 mels, 32 ms window, 10 ms hop, 50 Hz-8 kHz: the PANNs 16 kHz setting
        (Kong et al. 2020) used by many SED models."""
        return cls(sample_rate=16000, n_fft=512, hop=160, n_mels=64, fmin=50.0, fmax=8000.0)

    @classmethod
    def panns_32k(cls) -> "FrontendConfig":
        """PANNs' 32 kHz setting: 1024-point window, 320 hop, 64 mels, 50 Hz-14 kHz."""
        return cls(sample_rate=32000, n_fft=1024, hop=320, n_mels=64, fmin=50.0, fmax=14000.0)

    @classmethod
    def flam(cls) -> "FrontendConfig":
        """FLAM's HTSAT front end (OpenFLAM ``CLAPAudioCfg``): 48 kHz, window 1024, hop 480
        (100 frames/s), 64 mels, 50 Hz-14 kHz; torchlibrosa power spectrogram, reflect-padded,
        Slaney mel with Slaney norm, ``10 log10(max(S, 1e-10))``, no top_db."""
        return cls(sample_rate=48000, n_fft=1024, hop=480, n_mels=64, fmin=50.0, fmax=14000.0)

    @classmethod
    def tiny(cls) -> "FrontendConfig":
        """8 kHz, 16 mels: for tests and notebooks."""
        return cls(sample_rate=8000, n_fft=256, hop=80, n_mels=16, fmin=0.0, fmax=4000.0)


# --- resampling ----------------------------------------------------------------------------


def _rate_ratio(orig_sr: int, new_sr: int) -> tuple[int, int]:
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    g = math.gcd(int(orig_sr), int(new_sr))
    up, down = int(new_sr) // g, int(orig_sr) // g
    if max(up, down) > MAX_RESAMPLE_FACTOR:
        raise ValueError(f"resampling {orig_sr} -> {new_sr} Hz needs polyphase factors "
                         f"up={up}, down={down}; at most {MAX_RESAMPLE_FACTOR} is supported")
    return up, down


@lru_cache(maxsize=64)
def _polyphase_bank(up: int, down: int) -> tuple[np.ndarray, int]:
    """Polyphase filter bank ``G[r, w]`` and offset ``m_lo`` such that output sample
    ``n = q * up + r`` is ``y[n] = sum_w G[r, w] x[q * down + m_lo + w]``.

    From the direct form ``y[n] = sum_m x[m] h[n * down - m * up + half]`` (h: the centred
    low-pass of length ``2 half + 1``, times ``up``), substituting ``m = q * down + m'``:
    ``G[r, m' - m_lo] = h[r * down + half - m' * up]`` where the index is inside the filter."""
    from scipy.signal import firwin  # host-side filter design (scipy ships with jax)

    max_rate = max(up, down)
    half = 10 * max_rate
    h = firwin(2 * half + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    m_lo = -(half // up)  # ceil(-half / up)
    m_hi = ((up - 1) * down + half) // up
    width = m_hi - m_lo + 1
    bank = np.zeros((up, width), np.float64)
    for r in range(up):
        for w in range(width):
            k = r * down + half - (w + m_lo) * up
            if 0 <= k < h.shape[0]:
                bank[r, w] = h[k]
    return bank, m_lo


def resample(x: jax.Array, orig_sr: int, new_sr: int) -> jax.Array:
    """Resample along the last axis by the rational factor ``new_sr / orig_sr``.

    Polyphase windowed-sinc filtering: ``y[n] = up * sum_m x[m] h[n down - m up + half]`` with
    ``up / down = new_sr / orig_sr`` in lowest terms and ``h`` the Kaiser-windowed (beta 5)
    sinc low-pass of ``2 half + 1 = 20 max(up, down) + 1`` taps cut at ``1 / max(up, down)``
    of Nyquist; samples outside the signal are 0. Output length ``ceil(T up / down)``. This is
    ``scipy.signal.resample_poly(x, up, down, axis=-1)`` (default arguments) computed in JAX
    as one strided convolution with ``up`` output channels (one per polyphase branch).

    Args:
      x: ``[..., T]`` real samples. ``orig_sr``/``new_sr``: static integers.
    Returns:
      ``[..., ceil(T * up / down)]`` in ``x``'s floating dtype.
    """
    up, down = _rate_ratio(orig_sr, new_sr)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if up == down:
        return x
    chex.assert_rank(x, {1, 2, 3, 4})
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_out = -(-n_in * up // down)
    bank, m_lo = _polyphase_bank(up, down)
    width = bank.shape[1]
    n_q = -(-n_out // up)
    left = -m_lo
    right = max(0, (n_q - 1) * down + width - (n_in + left))
    flat = x.reshape((-1, 1, n_in))
    flat = jnp.pad(flat, ((0, 0), (0, 0), (left, right)))
    kernel = jnp.asarray(bank[:, None, :], x.dtype)  # [up, 1, width] (O, I, W)
    out = jax.lax.conv_general_dilated(
        flat, kernel, window_strides=(down,), padding="VALID",
        dimension_numbers=("NCH", "OIH", "NCH"), precision=jax.lax.Precision.HIGHEST)
    out = out[:, :, :n_q]  # [N, up, Q]
    out = jnp.swapaxes(out, 1, 2).reshape((flat.shape[0], n_q * up))[:, :n_out]
    return out.reshape(lead + (n_out,))


# --- STFT ----------------------------------------------------------------------------------


def hann_window(win_length: int, n_fft: int | None = None) -> np.ndarray:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi n / win_length)`` (``scipy.signal.get_window
    ("hann", N)``, ``torch.hann_window(N)``), centred and zero-padded to ``n_fft``."""
    n = np.arange(win_length)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    n_fft = n_fft or win_length
    if n_fft > win_length:
        lpad = (n_fft - win_length) // 2
        w = np.pad(w, (lpad, n_fft - win_length - lpad))
    return w


def frame(x: jax.Array, frame_length: int, hop: int) -> jax.Array:
    """Overlapping frames along the last axis: ``[..., T] -> [..., 1 + (T - frame_length) // hop,
    frame_length]`` with ``out[..., t, n] = x[..., t * hop + n]`` (no padding)."""
    n = x.shape[-1]
    if n < frame_length:
        raise ValueError(f"signal of {n} samples is shorter than one frame ({frame_length})")
    n_frames = 1 + (n - frame_length) // hop
    idx = np.arange(n_frames)[:, None] * hop + np.arange(frame_length)[None, :]
    return x[..., idx]


def stft(x: jax.Array, n_fft: int, hop: int, win_length: int | None = None, *,
         center: bool = True, pad_mode: str = "reflect") -> jax.Array:
    """Short-time Fourier transform with a periodic Hann window.

    ``X[..., t, f] = sum_{n<n_fft} w[n] x_p[..., t hop + n] exp(-2 pi i f n / n_fft)``, ``x_p`` the
    signal padded by ``n_fft // 2`` each side when ``center`` (reflect or zeros). Equal to
    ``torch.stft(x, n_fft, hop, win_length, torch.hann_window(win_length), center=center,
    pad_mode=pad_mode, return_complex=True)`` transposed to time-major.

    Returns: complex ``[..., n_frames, n_fft // 2 + 1]``.
    """
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode={pad_mode!r}: must be 'reflect' or 'constant'")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    win_length = win_length or n_fft
    if center:
        pad = n_fft // 2
        if pad_mode == "reflect" and x.shape[-1] <= pad:
            raise ValueError(f"reflect padding of {pad} needs more than {pad} samples, "
                             f"got {x.shape[-1]}")
        widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
        x = jnp.pad(x, widths, mode=pad_mode)
    frames = frame(x, n_fft, hop)
    window = jnp.asarray(hann_window(win_length, n_fft), x.dtype)
    return jnp.fft.rfft(frames * window, n=n_fft, axis=-1)


def spectrogram(x: jax.Array, cfg: FrontendConfig) -> jax.Array:
    """``|STFT|^power``: real ``[..., n_frames, n_fft // 2 + 1]``."""
    spec = jnp.abs(stft(x, cfg.n_fft, cfg.hop, cfg.window_length, center=cfg.center,
                        pad_mode=cfg.pad_mode))
    return spec ** cfg.power if cfg.power != 1.0 else spec


# --- mel -----------------------------------------------------------------------------------

_F_SP = 200.0 / 3  # Slaney: 66.67 Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mels
_LOGSTEP = math.log(6.4) / 27.0  # 27 mel steps per factor 6.4 above 1 kHz


def hz_to_mel(freqs, scale: MelScale = "slaney"):
    """Hz to mel. HTK: ``2595 log10(1 + f / 700)``. Slaney: ``f / (200/3)`` below 1 kHz, then
    ``15 + log(f / 1000) / (log(6.4) / 27)`` (``librosa.hz_to_mel``)."""
    f = np.asarray(freqs, np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    if scale != "slaney":
        raise ValueError(f"mel scale {scale!r}: must be 'slaney' or 'htk'")
    lin = f / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(mels, scale: MelScale = "slaney"):
    """Inverse of :func:`hz_to_mel`."""
    m = np.asarray(mels, np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    if scale != "slaney":
        raise ValueError(f"mel scale {scale!r}: must be 'slaney' or 'htk'")
    lin = _F_SP * m
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, lin)


def mel_frequencies(n_mels: int, fmin: float, fmax: float,
                    scale: MelScale = "slaney") -> np.ndarray:
    """``n_mels`` frequencies (Hz) equally spaced on the mel scale from ``fmin`` to ``fmax``."""
    mels = np.linspace(hz_to_mel(fmin, scale), hz_to_mel(fmax, scale), n_mels)
    return mel_to_hz(mels, scale)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None, scale: MelScale = "slaney",
                   norm: MelNorm = "slaney") -> np.ndarray:
    """Triangular mel filterbank, ``[n_fft // 2 + 1, n_mels]`` (apply as ``spec @ fb``).

    With ``p_0 < ... < p_{M+1}`` = :func:`mel_frequencies` ``(M + 2, fmin, fmax)`` and the FFT
    bin frequencies ``f_k = k sr / n_fft``, filter ``m`` is
    ``max(0, min((f_k - p_m) / (p_{m+1} - p_m), (p_{m+2} - f_k) / (p_{m+2} - p_{m+1})))``,
    times ``2 / (p_{m+2} - p_m)`` when ``norm == "slaney"``. Identical to
    ``librosa.filters.mel(sr=..., n_fft=..., n_mels=..., fmin=..., fmax=..., htk=scale ==
    "htk", norm="slaney" or None).T``. Float64 (cast where used).
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if norm not in ("slaney", "none", None):
        raise ValueError(f"mel norm {norm!r}: must be 'slaney' or 'none'")
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    points = mel_frequencies(n_mels + 2, fmin, fmax, scale)
    fdiff = np.diff(points)
    ramps = points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # [n_mels, n_freqs]
    if norm == "slaney":
        weights *= (2.0 / (points[2:] - points[:-2]))[:, None]
    return weights.T


def cfg_filterbank(cfg: FrontendConfig) -> np.ndarray:
    """:func:`mel_filterbank` for a :class:`FrontendConfig`."""
    return mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax,
                          cfg.mel_scale, cfg.mel_norm)


def mel_spectrogram(x: jax.Array, cfg: FrontendConfig) -> jax.Array:
    """``|STFT|^power @ fb``: ``[..., T] -> [..., n_frames, n_mels]``."""
    spec = spectrogram(x, cfg)
    fb = jnp.asarray(cfg_filterbank(cfg), spec.dtype)
    return jnp.matmul(spec, fb, precision=jax.lax.Precision.HIGHEST)


def power_to_db(s: jax.Array, *, ref: float = 1.0, amin: float = 1e-10,
                top_db: float | None = None) -> jax.Array:
    """``10 log10(max(s, amin)) - 10 log10(max(ref, amin))``; with ``top_db`` the result is
    clipped below at ``max - top_db``, the max taken over the last two axes (per example,
    like ``librosa.power_to_db`` on one spectrogram)."""
    db = 10.0 * jnp.log10(jnp.maximum(s, amin)) - 10.0 * math.log10(max(ref, amin))
    if top_db:
        peak = jnp.max(db, axis=(-2, -1), keepdims=True)
        db = jnp.maximum(db, peak - top_db)
    return db


def log_mel(x: jax.Array, cfg: FrontendConfig) -> jax.Array:
    """The front end: samples at ``cfg.sample_rate`` ``[..., T]`` -> log-mel (dB)
    ``[..., 1 + T // hop, n_mels]`` (centred frames)."""
    return power_to_db(mel_spectrogram(x, cfg), amin=cfg.amin, top_db=cfg.top_db or None)


def n_frames(n_samples: int, cfg: FrontendConfig) -> int:
    """Number of STFT frames for ``n_samples`` samples."""
    if cfg.center:
        return 1 + n_samples // cfg.hop
    return 1 + (n_samples - cfg.n_fft) // cfg.hop


# --- files ---------------------------------------------------------------------------------


def _check_extension(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_EXTENSIONS:
        raise ValueError(f"{path}: unsupported audio format {ext or '(none)'!r}; "
                         f"use one of {', '.join(AUDIO_EXTENSIONS)}")


def read_audio(path: str | os.PathLike, sample_rate: int | None = None, *,
               mono: bool = True) -> tuple[np.ndarray, int]:
    """Read a WAV or FLAC file as float32 in [-1, 1].

    Returns ``(samples, sr)``: ``[T]`` when ``mono`` (channels averaged), else ``[C, T]``.
    When ``sample_rate`` is given the audio is resampled to it (:func:`resample`) and ``sr`` is
    ``sample_rate``. Raises ``ValueError`` naming the file when it is missing or unreadable,
    empty, or recorded at a rate outside :data:`SUPPORTED_SAMPLE_RATES`.
    """
    import soundfile as sf

    path = os.fspath(path)
    _check_extension(path)
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from None
    if sr not in SUPPORTED_SAMPLE_RATES:
        raise ValueError(f"{path}: unsupported sample rate {sr} Hz; supported: "
                         f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}")
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the file holds no samples")
    samples = data.T  # [C, T]
    if mono:
        samples = samples.mean(axis=0)
    if sample_rate is not None and sample_rate != sr:
        if sample_rate not in SUPPORTED_SAMPLE_RATES:
            raise ValueError(f"{path}: cannot resample to unsupported rate {sample_rate} Hz")
        samples = np.asarray(resample(jnp.asarray(samples), sr, sample_rate))
        sr = sample_rate
    return np.ascontiguousarray(samples, np.float32), int(sr)


def write_audio(path: str | os.PathLike, samples, sample_rate: int, *,
                subtype: str | None = None) -> None:
    """Write ``[T]`` or ``[C, T]`` samples in [-1, 1] to a WAV or FLAC file (format from the
    extension). Default subtype: 32-bit float for WAV (lossless round trip), 24-bit PCM for
    FLAC (FLAC has no float). Raises ``ValueError`` naming the file for an unsupported format,
    sample rate or array shape."""
    import soundfile as sf

    path = os.fspath(path)
    _check_extension(path)
    if sample_rate not in SUPPORTED_SAMPLE_RATES:
        raise ValueError(f"{path}: unsupported sample rate {sample_rate} Hz; supported: "
                         f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}")
    data = np.asarray(samples, np.float32)
    if data.ndim not in (1, 2) or data.size == 0:
        raise ValueError(f"{path}: samples must be a non-empty [T] or [C, T] array, "
                         f"got shape {data.shape}")
    if data.ndim == 2:
        data = data.T  # soundfile wants [T, C]
    is_flac = path.lower().endswith(".flac")
    subtype = subtype or ("PCM_24" if is_flac else "FLOAT")
    try:
        sf.write(path, data, sample_rate, subtype=subtype,
                 format="FLAC" if is_flac else "WAV")
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: cannot write audio ({err})") from None
