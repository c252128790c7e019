"""Simulated sound-event mixtures with exact frame labels and captions (FLAM's training data).

FLAM (Wu et al., ICML 2025, arXiv 2505.05335, Sec. 4.1) trains its frame-wise contrastive
objective on mixtures made by placing labelled sound events on backgrounds, so that the frame
labels are known exactly. This module is that simulator, with sources we synthesize ourselves
(nothing downloads):

* **Sound classes** (:data:`CLASSES`): each a function ``(rng, duration, sr) -> waveform`` and
  a caption vocabulary: pure tones (low, high), exponential chirps (rising, falling), harmonic
  stacks, noise bursts (white, pink, band-passed), click trains, knocks, amplitude-modulated
  (pulsing) and frequency-modulated (warbling) tones, sirens, two-tone rings and, when the
  ``espeak-ng`` binary is installed, speech (:func:`speech_available`; without it the class is
  left out of every split, and :func:`available_classes` says so once with a warning).
  Classes are split into **seen** (train and ``test_seen``) and **held-out** ones
  (``test_heldout`` only); caption phrasings and templates are split the same way, so the
  held-out test measures open-vocabulary detection.
* **Backgrounds**: low-level white or pink noise, mains hum (50/60 Hz with harmonics), or
  pink noise plus hum; or none.
* **Mixtures** (:func:`simulate`): ``min_events..max_events`` sources, each with a random
  gain (dB), raised-cosine fades, optionally fragmented (one sound cut into pieces separated
  by gaps) or repeated (the same sound several times), placed so that at most
  ``max_overlap`` sources sound in any label frame.
* **Frame labels**: a label frame ``l`` of an event is active when the event's own
  A-weighted level in that frame (:func:`frame_a_levels`) is at least
  ``max(peak + label_rel_db, label_floor_db)``, ``peak`` being the event's loudest frame;
  labels are per event, unaffected by the other events (no masking).
* **Captions**: ``template.format(phrase)``, e.g. "the sound of a rising chirp"; per mixture
  one text for every class present (positive, its label the union of that class's events)
  and ``num_negatives`` texts of absent classes (all-zero labels).

**Frame grid.** Labels live on the encoder's frame grid: the front end
(:mod:`audio.frontend`) gives STFT frames ``t`` centred at ``c_t = t hop`` (``+ n_fft // 2``
when not centred), and the encoder pools ``downsample`` of them, so label frame ``l`` covers
the samples ``[c_{l d} - hop // 2, c_{l d} - hop // 2 + d hop)`` (clipped to the clip) and
``L = n_frames(T) // d`` (:func:`num_label_frames`, :func:`frame_bounds`).

**Data set.** :func:`build` writes splits ``train``, ``valid``, ``test_seen`` and
``test_heldout`` as tfds ``array_record`` files (no TensorFlow needed; waveform as int16 or float32, labels as
zlib-compressed bool tensors, captions and events as sequences); :func:`load` reads a split
with grain (index shuffle deterministic per seed, resumable via ``get_state``/``set_state``)
into fixed-shape batches (texts and events padded, with masks). Example ``i`` of a split is
``simulate(np.random.default_rng([seed, split, i]), cfg, ...)``, so a data set depends only
on ``(cfg, num_train, num_valid, num_test, seed, audio_dtype)``. ``valid`` (seen classes, all
phrasings, its own RNG stream) is for choices made after training, such as detection
thresholds, so that the test splits are only ever scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from audio import frontend as fe
from trainkit.config import Config, field, from_dict, to_dict

# --- A-weighting (IEC 61672-1:2013, Annex E) ------------------------------------------------

#: Pole frequencies of the A-weighting (IEC 61672-1 Eq. E.1-E.6): f1, f2, f3, f4 in Hz.
A_POLES = (20.598997, 107.65265, 737.86223, 12194.217)
#: Normalisation constant A_1000 in dB so that A(1 kHz) = 0 dB.
A_1000_DB = -2.000


def a_weighting_db(freqs) -> np.ndarray:
    """A-weighting in dB per IEC 61672-1:2013 (Annex E, Eq. E.6):

    ``A(f) = 20 log10( f4^2 f^4 / ((f^2 + f1^2) sqrt(f^2 + f2^2) sqrt(f^2 + f3^2) (f^2 + f4^2)) )
    - A_1000``

    with ``f1 = 20.598997``, ``f2 = 107.65265``, ``f3 = 737.86223``, ``f4 = 12194.217`` Hz and
    ``A_1000 = -2.000`` dB (so ``A(1 kHz) = 0``). Table values: -19.1 dB at 100 Hz, 0 at 1 kHz,
    -2.5 at 10 kHz. ``-inf`` at 0 Hz."""
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(a_weighting_gain(np.abs(np.asarray(freqs, np.float64))))


def a_weighting_gain(freqs) -> np.ndarray:
    """Linear amplitude weight ``R_A(f) = 10^(A(f) / 20)`` (:func:`a_weighting_db`), 0 at DC."""
    f1, f2, f3, f4 = A_POLES
    f = np.asarray(freqs, np.float64)
    fsq = f * f
    ra = (f4 ** 2 * fsq ** 2) / ((fsq + f1 ** 2) * np.sqrt((fsq + f2 ** 2) * (fsq + f3 ** 2))
                                 * (fsq + f4 ** 2))
    return ra * 10.0 ** (-A_1000_DB / 20.0)


def _weighted_mean_square(frames: np.ndarray, sr: int, n_fft: int | None = None) -> np.ndarray:
    """A-weighted mean square of each row of ``frames [..., N]`` (frequency-domain weight).

    Parseval with the one-sided spectrum ``X_k`` of the row zero-padded to ``M = n_fft >= N``
    samples: ``ms_A = (1 / (M N)) sum_k c_k R_A(k sr / M)^2 |X_k|^2`` with ``c_k = 1`` for DC
    and (M even) Nyquist, else 2. With ``R_A = 1`` this is exactly ``mean(x^2)``."""
    import scipy.fft

    n = frames.shape[-1]
    m = n if n_fft is None else n_fft
    spec = scipy.fft.rfft(frames, n=m, axis=-1)
    weight = a_weighting_gain(np.arange(spec.shape[-1]) * sr / m) ** 2
    weight[1:] *= 2.0
    if m % 2 == 0:
        weight[-1] /= 2.0
    return np.einsum("...k,k->...", spec.real ** 2 + spec.imag ** 2, weight) / (m * n)


def a_weighted_level(x, sr: int) -> float:
    """A-weighted level of a whole signal, ``10 log10(ms_A)`` in dB relative to digital full
    scale squared (a full-scale 1 kHz sine is -3.01 dB); ``-inf`` for silence. The spectrum
    is taken over the signal zero-padded to a fast FFT length."""
    import scipy.fft

    x = np.asarray(x, np.float64)
    ms = float(_weighted_mean_square(x, sr, scipy.fft.next_fast_len(x.shape[-1], real=True)))
    return 10.0 * math.log10(ms) if ms > 0 else -math.inf


# --- config ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimConfig(Config):
    """Settings of the mixture simulator. Presets: :meth:`default` (10 s at 16 kHz, 100 ms
    label frames), :meth:`flam` (FLAM's 48 kHz front end), :meth:`tiny` (tests)."""

    frontend: fe.FrontendConfig = field(factory=fe.FrontendConfig.sed_16k,
                                        help="front end whose hop defines the frame grid")
    downsample: int = field(10, ge=1, help="STFT frames pooled into one encoder/label frame")
    duration: float = field(10.0, gt=0, help="clip length in seconds")
    min_events: int = field(1, ge=1, help="fewest sound sources per mixture")
    max_events: int = field(10, ge=1, le=64, help="most sound sources per mixture")
    max_overlap: int = field(3, ge=1, help="most sources sounding in one label frame")
    event_level_db: float = field(-26.0, le=0, help="A-weighted RMS level (dB re full scale) "
                                  "of an event at 0 dB gain")
    gain_db_min: float = field(-10.0, help="lowest event gain (dB)")
    gain_db_max: float = field(6.0, help="highest event gain (dB)")
    fade_max: float = field(0.05, ge=0, help="longest raised-cosine fade in/out (s)")
    p_fragment: float = field(0.15, ge=0, le=1, help="probability an event is cut into pieces")
    p_repeat: float = field(0.15, ge=0, le=1, help="probability an event is repeated")
    max_pieces: int = field(3, ge=2, help="most pieces / repetitions of one event")
    min_piece: float = field(0.1, gt=0, help="shortest fragment (s)")
    gap_min: float = field(0.05, ge=0, help="shortest gap between pieces (s)")
    gap_max: float = field(0.8, ge=0, help="longest gap between pieces (s)")
    p_background: float = field(0.9, ge=0, le=1, help="probability of a background")
    background_db_min: float = field(-62.0, le=0, help="lowest background A-level (dB FS)")
    background_db_max: float = field(-42.0, le=0, help="highest background A-level (dB FS)")
    label_rel_db: float = field(-20.0, le=0, help="frame active when its A-level is within "
                                "this many dB of the event's loudest frame ...")
    label_floor_db: float = field(-80.0, le=0, help="... and at least this A-level (dB FS)")
    num_negatives: int = field(3, ge=0, help="captions of absent classes per mixture")
    max_peak: float = field(0.9, gt=0, le=1, help="mixtures peaking above are scaled down")
    speech: bool = field(True, help="include the espeak-ng speech class when installed")

    def validate(self) -> None:
        if self.min_events > self.max_events:
            raise self.invalid("min_events", f"must be <= max_events = {self.max_events}")
        if self.gain_db_min > self.gain_db_max:
            raise self.invalid("gain_db_min", f"must be <= gain_db_max = {self.gain_db_max}")
        if self.gap_min > self.gap_max:
            raise self.invalid("gap_min", f"must be <= gap_max = {self.gap_max}")
        if self.background_db_min > self.background_db_max:
            raise self.invalid("background_db_min",
                               f"must be <= background_db_max = {self.background_db_max}")
        if self.p_fragment + self.p_repeat > 1:
            raise self.invalid("p_repeat", f"p_fragment + p_repeat must be <= 1 "
                                           f"(p_fragment = {self.p_fragment})")
        if num_label_frames(self.num_samples, self) < 1:
            raise self.invalid("duration", f"shorter than one label frame "
                                           f"({self.frame_samples} samples)")

    @property
    def sample_rate(self) -> int:
        return self.frontend.sample_rate

    @property
    def num_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))

    @property
    def frame_samples(self) -> int:
        """Samples per label frame, ``hop * downsample``."""
        return self.frontend.hop * self.downsample

    @property
    def num_frames(self) -> int:
        """Label frames per clip, ``L``."""
        return num_label_frames(self.num_samples, self)

    @property
    def max_segments(self) -> int:
        """Most event rows (pieces) per mixture."""
        return self.max_events * self.max_pieces

    @property
    def max_texts(self) -> int:
        """Most captions per mixture (positives + negatives)."""
        return self.max_events + self.num_negatives

    @classmethod
    def default(cls) -> "SimConfig":
        return cls()

    @classmethod
    def flam(cls) -> "SimConfig":
        """48 kHz, hop 480 (FLAM's HTSAT front end), 10 s clips, labels every 10 frames."""
        return cls(frontend=fe.FrontendConfig.flam(), downsample=10)

    @classmethod
    def tiny(cls) -> "SimConfig":
        """8 kHz, 2 s clips, 100 ms label frames, up to 4 events: for tests and notebooks."""
        return cls(frontend=fe.FrontendConfig.tiny(), downsample=10, duration=2.0,
                   max_events=4, gap_max=0.3, num_negatives=2)


# --- frame grid -------------------------------------------------------------------------------


def num_label_frames(n_samples: int, cfg: SimConfig) -> int:
    """``L = n_frames(T) // downsample`` with :func:`audio.frontend.n_frames`."""
    return fe.n_frames(n_samples, cfg.frontend) // cfg.downsample


def frame_bounds(n_samples: int, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sample ranges ``[start_l, end_l)`` of the label frames (clipped to ``[0, T)``).

    Label frame ``l`` pools STFT frames ``l d .. l d + d - 1``, whose centres are
    ``c_t = t hop + (0 if center else n_fft // 2)``; it covers
    ``[c_{l d} - hop // 2, c_{l d} - hop // 2 + d hop)``. Consecutive frames are contiguous."""
    hop = cfg.frontend.hop
    first = (0 if cfg.frontend.center else cfg.frontend.n_fft // 2) - hop // 2
    l_ = np.arange(num_label_frames(n_samples, cfg))
    start = first + l_ * cfg.frame_samples
    end = start + cfg.frame_samples
    return np.clip(start, 0, n_samples), np.clip(end, 0, n_samples)


def frame_timestamps(n_samples: int, cfg: SimConfig) -> np.ndarray:
    """Frame edges in seconds, ``[L + 1]``: ``start_0, start_1, ..., start_{L-1}, end_{L-1}``
    (the format :mod:`audio.metrics` and ``sed_scores_eval`` take)."""
    start, end = frame_bounds(n_samples, cfg)
    return np.concatenate([start, end[-1:]]).astype(np.float64) / cfg.sample_rate


def frame_a_levels(x, cfg: SimConfig) -> np.ndarray:
    """A-weighted level of each label frame of ``x [T]``: ``[L]`` in dB re full scale squared.

    ``level_l = 10 log10( ms_A(x[start_l : start_l + D]) )``, ``D = hop * downsample``, the
    frame zero-padded where it runs off the clip, ``ms_A`` the A-weighted mean square over
    the frame's ``D`` samples computed in the frequency domain (:func:`a_weighting_gain`,
    rectangular window). ``-inf`` where the frame is silent."""
    x = np.asarray(x, np.float64)
    if x.ndim != 1:
        raise ValueError(f"x must be a 1-D waveform, got shape {x.shape}")
    n_frames_ = num_label_frames(x.shape[0], cfg)
    d = cfg.frame_samples
    first = (0 if cfg.frontend.center else cfg.frontend.n_fft // 2) - cfg.frontend.hop // 2
    padded = np.zeros(n_frames_ * d, np.float64)
    lo, hi = max(first, 0), min(first + n_frames_ * d, x.shape[0])
    padded[lo - first:hi - first] = x[lo:hi]
    ms = _weighted_mean_square(padded.reshape(n_frames_, d), cfg.sample_rate)
    with np.errstate(divide="ignore"):
        return np.where(ms > 0, 10.0 * np.log10(np.maximum(ms, 1e-300)), -np.inf)


def _active(levels: np.ndarray, cfg: SimConfig) -> np.ndarray:
    peak = levels.max() if levels.size else -np.inf
    if not np.isfinite(peak):
        return np.zeros(levels.shape, bool)
    return levels >= max(peak + cfg.label_rel_db, cfg.label_floor_db)


def frame_labels(x, cfg: SimConfig) -> np.ndarray:
    """Bool ``[L]``: frame ``l`` active iff ``level_l >= max(max_l level_l + label_rel_db,
    label_floor_db)`` (:func:`frame_a_levels`); all False for a silent signal."""
    return _active(frame_a_levels(x, cfg), cfg)


def piece_labels(piece, start: int, n_samples: int, cfg: SimConfig) -> np.ndarray:
    """:func:`frame_labels` of a clip of ``n_samples`` that is silent except for ``piece`` at
    sample ``start`` (computed on the frames the piece touches only; same result)."""
    piece = np.asarray(piece, np.float64)
    if start < 0 or start + piece.shape[0] > n_samples:
        raise ValueError(f"piece [{start}, {start + piece.shape[0]}) is outside the clip "
                         f"[0, {n_samples})")
    n_frames_ = num_label_frames(n_samples, cfg)
    d = cfg.frame_samples
    first = (0 if cfg.frontend.center else cfg.frontend.n_fft // 2) - cfg.frontend.hop // 2
    levels = np.full(n_frames_, -np.inf)
    lo = max(0, (start - first) // d)
    hi = min(n_frames_, -(-(start + piece.shape[0] - first) // d))
    if hi <= lo:
        return np.zeros(n_frames_, bool)
    region = np.zeros((hi - lo) * d)
    # keep only the samples that fall in frames lo..hi-1 (frames past L are not labelled)
    a = max(start, first + lo * d)
    b = min(start + piece.shape[0], first + hi * d)
    region[a - first - lo * d:b - first - lo * d] = piece[a - start:b - start]
    ms = _weighted_mean_square(region.reshape(hi - lo, d), cfg.sample_rate)
    with np.errstate(divide="ignore"):
        levels[lo:hi] = np.where(ms > 0, 10.0 * np.log10(np.maximum(ms, 1e-300)), -np.inf)
    return _active(levels, cfg)


# --- source synthesis ------------------------------------------------------------------------


def _n(duration: float, sr: int) -> int:
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    return max(1, int(round(duration * sr)))


def _t(duration: float, sr: int) -> np.ndarray:
    return np.arange(_n(duration, sr)) / sr


def _nyq(sr: int, fraction: float = 0.45) -> float:
    return fraction * sr


def _shaped_noise(rng: np.random.Generator, n: int, sr: int,
                  amplitude: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Gaussian noise whose spectrum is multiplied by ``amplitude(f)`` (frequency domain)."""
    import scipy.fft

    m = scipy.fft.next_fast_len(n, real=True)  # shape noise of a fast length, keep n samples
    spec = scipy.fft.rfft(rng.standard_normal(m))
    out = scipy.fft.irfft(spec * amplitude(np.fft.rfftfreq(m, 1.0 / sr)), m)[:n]
    peak = np.max(np.abs(out))
    return out / peak if peak > 0 else out


def pink(rng: np.random.Generator, n: int, sr: int, f_lo: float = 20.0) -> np.ndarray:
    """Pink (1/f power) noise of ``n`` samples: white spectrum times ``f^(-1/2)`` above ``f_lo``."""
    return _shaped_noise(rng, n, sr, lambda f: np.where(f >= f_lo, 1.0 / np.sqrt(
        np.maximum(f, f_lo)), 0.0))


def low_tone(rng, duration, sr):
    """Pure tone, 150-400 Hz (log-uniform), random phase."""
    f = math.exp(rng.uniform(math.log(150.0), math.log(400.0)))
    return np.sin(2 * np.pi * f * _t(duration, sr) + rng.uniform(0, 2 * np.pi))


def high_tone(rng, duration, sr):
    """Pure tone, 1.5-4 kHz (log-uniform, below 0.45 sr)."""
    f = math.exp(rng.uniform(math.log(1500.0), math.log(min(4000.0, _nyq(sr)))))
    return np.sin(2 * np.pi * f * _t(duration, sr) + rng.uniform(0, 2 * np.pi))


def _exp_chirp(t: np.ndarray, f0: float, f1: float, span: float) -> np.ndarray:
    """``sin(phi(t))``, ``phi = 2 pi f0 S / ln(k) (k^(t / S) - 1)``, ``k = f1 / f0``: the
    instantaneous frequency ``f0 k^(t / S)`` moves exponentially from f0 to f1 over S."""
    k = f1 / f0
    return np.sin(2 * np.pi * f0 * span / math.log(k) * (k ** (t / span) - 1.0))


def rising_chirp(rng, duration, sr):
    """Exponential sweep up from 200-800 Hz by a factor 2.5-6 (capped at 0.45 sr)."""
    t = _t(duration, sr)
    f0 = math.exp(rng.uniform(math.log(200.0), math.log(800.0)))
    f1 = min(f0 * rng.uniform(2.5, 6.0), _nyq(sr))
    return _exp_chirp(t, f0, f1, max(t[-1], 1.0 / sr))


def falling_chirp(rng, duration, sr):
    """Exponential sweep down to 200-800 Hz from 2.5-6 times higher (capped at 0.45 sr)."""
    t = _t(duration, sr)
    f1 = math.exp(rng.uniform(math.log(200.0), math.log(800.0)))
    f0 = min(f1 * rng.uniform(2.5, 6.0), _nyq(sr))
    return _exp_chirp(t, f0, f1, max(t[-1], 1.0 / sr))


def harmonic(rng, duration, sr):
    """Harmonic stack: f0 90-300 Hz, harmonics up to 0.45 sr (at most 20) with amplitudes
    ``h^-rho`` (rho 0.5-1.5) and random phases."""
    t = _t(duration, sr)
    f0 = rng.uniform(90.0, 300.0)
    rho = rng.uniform(0.5, 1.5)
    out = np.zeros_like(t)
    for h in range(1, min(20, int(_nyq(sr) // f0)) + 1):
        out += h ** -rho * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
    return out


def white_noise(rng, duration, sr):
    """Gaussian white noise burst."""
    return rng.standard_normal(_n(duration, sr))


def pink_noise(rng, duration, sr):
    """Pink noise burst (1/f power above 20 Hz)."""
    return pink(rng, _n(duration, sr), sr)


def bandpass_noise(rng, duration, sr):
    """Noise in a band around 500-3000 Hz (log-uniform centre), 1/3 to 1 octave wide, with
    raised-cosine band edges (frequency-domain filter)."""
    fc = math.exp(rng.uniform(math.log(500.0), math.log(min(3000.0, _nyq(sr) / 1.5))))
    width = rng.uniform(1 / 3, 1.0)  # octaves
    lo, hi = fc * 2 ** (-width / 2), fc * 2 ** (width / 2)

    def band(f):
        octave = np.log2(np.maximum(f, 1e-9))
        x = np.clip((octave - math.log2(lo)) / (math.log2(hi) - math.log2(lo)), 0.0, 1.0)
        return np.sin(np.pi * x) ** 2

    return _shaped_noise(rng, _n(duration, sr), sr, band)


def _click(rng, sr: int) -> np.ndarray:
    """A 1-3 ms click: white noise under a fast exponential decay."""
    m = max(2, int(rng.uniform(0.001, 0.003) * sr))
    return rng.standard_normal(m) * np.exp(-np.arange(m) / (0.25 * m))


def click_train(rng, duration, sr):
    """Clicks at a steady rate of 8-30 per second (first click at the start)."""
    n = _n(duration, sr)
    out = np.zeros(n)
    period = sr / rng.uniform(8.0, 30.0)
    for start in np.arange(0.0, n, period).astype(int):
        c = _click(rng, sr)[: n - start]
        out[start:start + c.shape[0]] += c
    return out


def knock(rng, duration, sr):
    """2-6 knocks 0.12-0.3 s apart: a damped resonance (150-600 Hz, 15-50 ms decay) struck by
    a click. Returns at most ``duration`` (the last knock's tail may be cut)."""
    n = _n(duration, sr)
    out = np.zeros(n)
    f = rng.uniform(150.0, 600.0)
    tau = rng.uniform(0.015, 0.05)
    m = min(n, int(5 * tau * sr))
    t = np.arange(m) / sr
    body = np.sin(2 * np.pi * f * t) * np.exp(-t / tau)
    pos = 0
    for _ in range(int(rng.integers(2, 7))):
        if pos >= n:
            break
        hit = body.copy()
        c = _click(rng, sr)[:m]
        hit[: c.shape[0]] += 0.5 * c
        hit = hit[: n - pos]
        out[pos:pos + hit.shape[0]] += hit * rng.uniform(0.7, 1.0)
        pos += int(rng.uniform(0.12, 0.3) * sr)
    return out


def am_tone(rng, duration, sr):
    """Pulsing tone: carrier 400-2000 Hz times ``1 - m (1 + cos(2 pi f_m t)) / 2`` with
    modulation rate 4-12 Hz and depth m 0.8-1."""
    t = _t(duration, sr)
    fc = rng.uniform(400.0, min(2000.0, _nyq(sr)))
    fm, depth = rng.uniform(4.0, 12.0), rng.uniform(0.8, 1.0)
    env = 1.0 - depth * (1.0 + np.cos(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))) / 2
    return env * np.sin(2 * np.pi * fc * t)


def _fm(t: np.ndarray, fc: float, fm: float, dev: float, phase: float) -> np.ndarray:
    """``sin(2 pi fc t + (dev / fm) sin(2 pi fm t + phase))``: instantaneous frequency
    ``fc + dev cos(2 pi fm t + phase)``."""
    return np.sin(2 * np.pi * fc * t + dev / fm * np.sin(2 * np.pi * fm * t + phase))


def fm_tone(rng, duration, sr):
    """Warbling tone: carrier 500-2000 Hz, vibrato 4-10 Hz with 3-10% deviation."""
    t = _t(duration, sr)
    fc = rng.uniform(500.0, min(2000.0, _nyq(sr) / 1.1))
    return _fm(t, fc, rng.uniform(4.0, 10.0), fc * rng.uniform(0.03, 0.10),
               rng.uniform(0, 2 * np.pi))


def siren(rng, duration, sr):
    """Siren: 600-1200 Hz carrier swept slowly (0.3-1 Hz) by 25-40%, three harmonics."""
    t = _t(duration, sr)
    fc = rng.uniform(600.0, 1200.0)
    fm, dev, phase = rng.uniform(0.3, 1.0), fc * rng.uniform(0.25, 0.4), rng.uniform(0, 2 * np.pi)
    out = np.zeros_like(t)
    for h in (1, 2, 3):
        if h * (fc + dev) < _nyq(sr):
            out += _fm(t, h * fc, fm, h * dev, phase) / h
    return out


def ring(rng, duration, sr):
    """Telephone-style ring: two tones 350-500 Hz apart by 20-80 Hz (beating), switched on
    and off in a cadence of 0.2-0.4 s on, 0.1-0.3 s off (5 ms ramps)."""
    t = _t(duration, sr)
    f1 = rng.uniform(350.0, 500.0)
    f2 = f1 + rng.uniform(20.0, 80.0)
    on, off = rng.uniform(0.2, 0.4), rng.uniform(0.1, 0.3)
    phase = np.mod(t, on + off)
    ramp = 0.005
    gate = np.clip(np.minimum(phase / ramp, (on - phase) / ramp), 0.0, 1.0)
    return gate * (np.sin(2 * np.pi * f1 * t) + np.sin(2 * np.pi * f2 * t))


# --- speech (espeak-ng) --------------------------------------------------------------------

SPEECH_WORDS = (
    "the", "a", "red", "green", "morning", "window", "river", "seven", "twelve", "garden",
    "please", "open", "close", "door", "quickly", "slowly", "music", "table", "yellow",
    "station", "train", "arrives", "today", "tomorrow", "weather", "is", "cold", "warm",
    "we", "will", "meet", "at", "noon", "the", "number", "nine", "three", "hello", "world")
SPEECH_VOICES = ("en", "en-us", "en+f3", "en+m3", "en-gb")


def speech_available() -> bool:
    """Whether the ``espeak-ng`` binary is on the PATH (the speech class needs it)."""
    return shutil.which("espeak-ng") is not None


def speech(rng, duration, sr):
    """Synthetic speech: random words spoken by ``espeak-ng`` (voice, speed 130-200 words/min
    and pitch 30-70 drawn from ``rng``), resampled to ``sr`` (``scipy.signal.resample_poly``),
    leading/trailing silence trimmed, cut to ``duration`` when longer (so it may be shorter).

    Raises ``RuntimeError`` when ``espeak-ng`` is not installed (``apt-get install espeak-ng``).
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("the 'speech' sound class needs the espeak-ng binary, which is not "
                           "on the PATH (Debian/Ubuntu: apt-get install espeak-ng)")
    from math import gcd

    from scipy.signal import resample_poly

    n = _n(duration, sr)
    speed = int(rng.integers(130, 201))
    n_words = max(1, int(math.ceil(duration * speed / 60.0)) + 1)
    text = " ".join(rng.choice(SPEECH_WORDS, size=n_words))
    voice = SPEECH_VOICES[int(rng.integers(len(SPEECH_VOICES)))]
    pitch = int(rng.integers(30, 71))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speech.wav")
        try:
            subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path,
                            text], check=True, capture_output=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f"espeak-ng failed on {text!r}: {err}") from None
        x, file_sr = fe.read_audio(path)
    if file_sr != sr:
        g = gcd(file_sr, sr)
        x = resample_poly(x.astype(np.float64), sr // g, file_sr // g)
    x = np.asarray(x, np.float64)
    loud = np.flatnonzero(np.abs(x) > 1e-3 * max(np.max(np.abs(x)), 1e-12))
    if loud.size:
        x = x[loud[0]:loud[-1] + 1]
    return x[:n]


# --- class table ------------------------------------------------------------------------------


class SoundClass(NamedTuple):
    """A sound class: its synthesizer, duration range (s), caption phrasings (noun phrases;
    the ``heldout_phrases`` appear only in test splits) and whether the class is held out."""
    name: str
    synth: Callable[[np.random.Generator, float, int], np.ndarray]
    duration: tuple[float, float]
    phrases: tuple[str, ...]
    heldout_phrases: tuple[str, ...]
    heldout: bool = False


CLASSES: dict[str, SoundClass] = {c.name: c for c in (
    SoundClass("low_tone", low_tone, (0.2, 3.0),
               ("a low tone", "a low-pitched beep", "a deep sine tone"), ("a low beep",)),
    SoundClass("high_tone", high_tone, (0.1, 2.0),
               ("a high beep", "a high-pitched tone", "a shrill beep"), ("a high sine tone",)),
    SoundClass("rising_chirp", rising_chirp, (0.15, 1.5),
               ("a rising chirp", "an upward sweep", "a rising whistle"),
               ("a chirp going up",)),
    SoundClass("harmonic", harmonic, (0.3, 3.0),
               ("a buzzing drone", "a buzzy harmonic tone", "a rich harmonic note"),
               ("a droning buzz",)),
    SoundClass("white_noise", white_noise, (0.15, 2.0),
               ("a burst of white noise", "a hiss", "a burst of static"),
               ("a hissing noise",)),
    SoundClass("pink_noise", pink_noise, (0.2, 2.5),
               ("a burst of pink noise", "a soft rushing noise", "a rumbling whoosh"),
               ("a whooshing noise",)),
    SoundClass("click_train", click_train, (0.3, 2.5),
               ("a train of clicks", "rapid clicking", "a ticking sound"),
               ("fast clicks",)),
    SoundClass("am_tone", am_tone, (0.5, 3.0),
               ("a pulsing tone", "a throbbing beep", "a tremolo tone"),
               ("a beeping that pulses",)),
    SoundClass("fm_tone", fm_tone, (0.4, 3.0),
               ("a warbling tone", "a vibrato whistle", "a trilling tone"),
               ("a wavering whistle",)),
    SoundClass("ring", ring, (1.0, 3.5),
               ("a telephone ringing", "a phone ring", "a ringing phone"),
               ("a ringtone",)),
    SoundClass("speech", speech, (1.0, 4.0),
               ("a person speaking", "someone talking", "a robotic voice"),
               ("a man or woman saying words",)),
    # held out: never in the training split, as sounds or as captions
    SoundClass("falling_chirp", falling_chirp, (0.15, 1.5),
               ("a falling chirp", "a downward sweep", "a descending whistle"),
               ("a chirp going down",), heldout=True),
    SoundClass("bandpass_noise", bandpass_noise, (0.2, 2.0),
               ("a band-passed noise", "a narrow band of noise", "a filtered hiss"),
               ("a whistling wind noise",), heldout=True),
    SoundClass("knock", knock, (0.4, 1.5),
               ("a knocking sound", "someone knocking", "a series of knocks"),
               ("knocks on a door",), heldout=True),
    SoundClass("siren", siren, (1.5, 5.0),
               ("a wailing siren", "a siren", "an emergency siren"),
               ("an ambulance siren",), heldout=True),
)}

#: Caption templates: the seen ones in every split, the held-out ones only in test splits.
TEMPLATES = ("{}", "the sound of {}", "{} can be heard")
HELDOUT_TEMPLATES = ("you can hear {}", "a recording of {}")

SEEN_CLASSES = tuple(n for n, c in CLASSES.items() if not c.heldout)
HELDOUT_CLASSES = tuple(n for n, c in CLASSES.items() if c.heldout)

#: The data set splits: (which classes, which caption phrasings).
#: A split's RNG stream is its position here: new splits go at the end (existing data unchanged).
SPLITS = {"train": ("seen", "seen"), "test_seen": ("seen", "all"),
          "test_heldout": ("heldout", "all"), "valid": ("seen", "all")}

_warned_speech = False


def available_classes(which: str = "all", *, speech_enabled: bool = True) -> tuple[str, ...]:
    """Class names of ``which`` ("seen", "heldout" or "all") that can be synthesized here:
    ``speech`` is left out (with a one-time warning) when espeak-ng is absent, or when
    ``speech_enabled`` is False."""
    global _warned_speech
    if which not in ("seen", "heldout", "all"):
        raise ValueError(f"which={which!r}: must be 'seen', 'heldout' or 'all'")
    names = {"seen": SEEN_CLASSES, "heldout": HELDOUT_CLASSES,
             "all": SEEN_CLASSES + HELDOUT_CLASSES}[which]
    if "speech" in names and speech_enabled and not speech_available() and not _warned_speech:
        warnings.warn("espeak-ng is not installed: the 'speech' sound class is left out "
                      "(apt-get install espeak-ng to include it)", stacklevel=2)
        _warned_speech = True
    if not (speech_enabled and speech_available()):
        names = tuple(n for n in names if n != "speech")
    return names


def caption(rng: np.random.Generator, name: str, phrasing: str = "seen") -> tuple[str, bool]:
    """A caption of class ``name``: ``template.format(phrase)``.

    ``phrasing`` "seen" draws from the training phrases and templates; "all" also from the
    held-out ones. Returns ``(text, novel)``, ``novel`` True when the phrase or the template
    is a held-out one."""
    if name not in CLASSES:
        raise ValueError(f"unknown sound class {name!r}; known: {', '.join(CLASSES)}")
    if phrasing not in ("seen", "all"):
        raise ValueError(f"phrasing={phrasing!r}: must be 'seen' or 'all'")
    cls = CLASSES[name]
    phrases = cls.phrases + (cls.heldout_phrases if phrasing == "all" else ())
    templates = TEMPLATES + (HELDOUT_TEMPLATES if phrasing == "all" else ())
    p = int(rng.integers(len(phrases)))
    t = int(rng.integers(len(templates)))
    novel = p >= len(cls.phrases) or t >= len(TEMPLATES)
    return templates[t].format(phrases[p]), novel


def all_captions(name: str, phrasing: str = "all") -> tuple[str, ...]:
    """Every caption of class ``name`` that :func:`caption` can draw."""
    cls = CLASSES[name]
    phrases = cls.phrases + (cls.heldout_phrases if phrasing == "all" else ())
    templates = TEMPLATES + (HELDOUT_TEMPLATES if phrasing == "all" else ())
    return tuple(t.format(p) for t in templates for p in phrases)


# --- backgrounds --------------------------------------------------------------------------

BACKGROUNDS = ("white", "pink", "hum", "pink+hum")


def background(rng: np.random.Generator, kind: str, n: int, sr: int) -> np.ndarray:
    """Background of ``n`` samples with peak 1 (level set by the caller): white noise, pink
    noise, mains hum (50 or 60 Hz and harmonics 2-5 with amplitudes ``1/h``, random phases,
    slow 0.1-0.5 Hz level wobble), or pink noise plus hum at -6 dB."""
    t = np.arange(n) / sr
    if kind == "white":
        out = rng.standard_normal(n)
    elif kind == "pink":
        out = pink(rng, n, sr)
    elif kind in ("hum", "pink+hum"):
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        out = sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) / h
                  for h in range(1, 6) if h * f0 < _nyq(sr))
        out = out * (1.0 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t))
        if kind == "pink+hum":
            out = out / np.max(np.abs(out)) * 0.5 + pink(rng, n, sr)
    else:
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return out / max(np.max(np.abs(out)), 1e-12)


# --- mixtures --------------------------------------------------------------------------------


class Event(NamedTuple):
    """One placed piece of a sound: class name, onset/offset in seconds, gain in dB (the
    event's A-weighted RMS level is ``event_level_db + gain_db``), and the index of its
    source (pieces of one fragmented or repeated sound share it)."""
    label: str
    onset: float
    offset: float
    gain_db: float
    source: int


@dataclasses.dataclass
class Mixture:
    """A simulated clip.

    Attributes:
      waveform: float32 ``[T]``.
      events: one :class:`Event` per placed piece, sorted by onset.
      event_labels: bool ``[E, L]``, row ``i`` the frames where ``events[i]`` is active.
      texts: captions ``[K]``: one per class present (positives), then negatives, shuffled.
      text_classes: the class of each text.
      text_labels: bool ``[K, L]``: union of the event labels of the text's class (all False
        for negatives).
      text_novel: bool ``[K]``: the caption uses a held-out phrase or template.
      background: the background kind ("none" when there is none).
    """
    waveform: np.ndarray
    events: list[Event]
    event_labels: np.ndarray
    texts: list[str]
    text_classes: list[str]
    text_labels: np.ndarray
    text_novel: np.ndarray
    background: str


def _fade(x: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Raised-cosine fade-in over ``n_in`` samples and fade-out over ``n_out``."""
    x = x.copy()
    if n_in > 0:
        x[:n_in] *= 0.5 - 0.5 * np.cos(np.pi * (np.arange(n_in) + 0.5) / n_in)
    if n_out > 0:
        x[x.shape[0] - n_out:] *= 0.5 + 0.5 * np.cos(np.pi * (np.arange(n_out) + 0.5) / n_out)
    return x


def _random_fade(rng, x: np.ndarray, cfg: SimConfig, sr: int) -> np.ndarray:
    cap = x.shape[0] // 4
    n_in = min(cap, int(rng.uniform(0.0, cfg.fade_max) * sr))
    n_out = min(cap, int(rng.uniform(0.0, cfg.fade_max) * sr))
    return _fade(x, n_in, n_out)


def _normalise(x: np.ndarray, level_db: float, sr: int) -> np.ndarray:
    """Scale ``x`` to A-weighted level ``level_db`` (:func:`a_weighted_level`)."""
    current = a_weighted_level(x, sr)
    if not np.isfinite(current):
        return x
    return x * 10.0 ** ((level_db - current) / 20.0)


def _pieces(rng, wave: np.ndarray, cfg: SimConfig, sr: int, n_total: int):
    """Split a source into pieces and gaps: single, fragmented or repeated."""
    u = rng.random()
    min_piece = int(cfg.min_piece * sr)
    gaps = lambda k: [int(rng.uniform(cfg.gap_min, cfg.gap_max) * sr) for _ in range(k)]  # noqa
    if u < cfg.p_fragment and wave.shape[0] >= 2 * min_piece:
        k = int(rng.integers(2, cfg.max_pieces + 1))
        k = min(k, wave.shape[0] // min_piece)
        free = wave.shape[0] - k * min_piece
        cuts = np.sort(rng.integers(0, free + 1, size=k - 1)) + min_piece * np.arange(1, k)
        pieces = [_random_fade(rng, p, cfg, sr) for p in np.split(wave, cuts)]
        g = gaps(k - 1)
    elif u < cfg.p_fragment + cfg.p_repeat:
        k = int(rng.integers(2, cfg.max_pieces + 1))
        one = _random_fade(rng, wave, cfg, sr)
        pieces, g = [one] * k, gaps(k - 1)
    else:
        return [_random_fade(rng, wave, cfg, sr)], []
    if sum(p.shape[0] for p in pieces) + sum(g) > n_total:
        return [_random_fade(rng, wave, cfg, sr)], []
    return pieces, g


def _frames_touched(a: int, b: int, starts: np.ndarray, ends: np.ndarray) -> slice:
    """Label frames intersecting samples ``[a, b)``."""
    lo = int(np.searchsorted(ends, a, side="right"))
    hi = int(np.searchsorted(starts, b, side="left"))
    return slice(lo, max(lo, hi))


class Piece(NamedTuple):
    """A sound placed in a clip: class name, first sample, samples (already at their gain),
    gain in dB (recorded in the :class:`Event`), source index."""
    label: str
    start: int
    waveform: np.ndarray
    gain_db: float
    source: int


def compose(cfg: SimConfig, pieces: Sequence[Piece], background_wave=None,
            ) -> tuple[np.ndarray, list[Event], np.ndarray]:
    """Mix placed pieces (plus an optional background ``[T]``) into a clip of
    ``cfg.num_samples`` samples and label them.

    The mixture is ``s (sum_i piece_i + background)`` with ``s = min(1, max_peak / peak)``;
    every piece is labelled alone at its final level (:func:`piece_labels`), so overlapping
    pieces do not affect each other's labels. Returns ``(waveform float32 [T], events sorted
    by onset, event_labels bool [E, L])`` with ``event_labels[i]`` the frames of
    ``events[i]`` and gains including ``20 log10 s``."""
    sr, n_total = cfg.sample_rate, cfg.num_samples
    mix = np.zeros(n_total, np.float64)
    for p in pieces:
        w = np.asarray(p.waveform, np.float64)
        if w.ndim != 1 or p.start < 0 or p.start + w.shape[0] > n_total:
            raise ValueError(f"piece {p.label!r} at sample {p.start} with shape {w.shape} "
                             f"does not fit in a clip of {n_total} samples")
        mix[p.start:p.start + w.shape[0]] += w
    if background_wave is not None:
        bg = np.asarray(background_wave, np.float64)
        if bg.shape != (n_total,):
            raise ValueError(f"background must have shape ({n_total},), got {bg.shape}")
        mix += bg
    peak = float(np.max(np.abs(mix))) if n_total else 0.0
    scale = min(1.0, cfg.max_peak / peak) if peak > 0 else 1.0
    scale_db = 20.0 * math.log10(scale)
    mix *= scale
    events, rows = [], []
    for p in sorted(pieces, key=lambda p: (p.start, p.source)):
        w = np.asarray(p.waveform, np.float64)
        rows.append(piece_labels(w * scale, p.start, n_total, cfg))
        events.append(Event(p.label, p.start / sr, (p.start + w.shape[0]) / sr,
                            float(p.gain_db) + scale_db, int(p.source)))
    labels = np.stack(rows) if rows else np.zeros((0, num_label_frames(n_total, cfg)), bool)
    return mix.astype(np.float32), events, labels


def class_labels(events: Sequence[Event], event_labels: np.ndarray,
                 classes: Sequence[str]) -> np.ndarray:
    """Bool ``[K, L]``: row ``k`` is the union of the labels of the events of ``classes[k]``
    (all False when the class has no event)."""
    event_labels = np.asarray(event_labels, bool)
    out = np.zeros((len(classes), event_labels.shape[-1]), bool)
    for k, name in enumerate(classes):
        for e, row in zip(events, event_labels):
            if e.label == name:
                out[k] |= row
    return out


def simulate(rng: np.random.Generator, cfg: SimConfig, *, classes: Sequence[str] | None = None,
             negative_classes: Sequence[str] | None = None, phrasing: str = "all") -> Mixture:
    """Simulate one mixture (FLAM Sec. 4.1's event mixing).

    1. Draw ``n ~ U{min_events..max_events}`` sources; for each a class from ``classes``, a
       duration from the class's range (at most the clip), a gain ``g ~ U[gain_db_min,
       gain_db_max]`` (the source is scaled to A-weighted level ``event_level_db + g``), and
       a form: fragmented (probability ``p_fragment``; cut into 2..max_pieces pieces of at
       least ``min_piece`` s), repeated (``p_repeat``; 2..max_pieces copies) or single; each
       piece gets raised-cosine fades of up to ``fade_max`` s and pieces are separated by
       gaps ``U[gap_min, gap_max]``.
    2. Place each source at a uniform onset such that at most ``max_overlap`` sources touch
       any label frame (so also any sample); up to 50 tries, then the duration is halved and
       tried again; a source that never fits is dropped.
    3. Add a background (probability ``p_background``) at A-level ``U[background_db_min,
       background_db_max]``; scale the mixture down if it peaks above ``max_peak`` (the
       recorded gains include that scale).
    4. Label each piece on the frame grid (:func:`compose`, :func:`piece_labels`: the piece
       alone, so overlaps do not mask each other).
    5. Texts: one caption per class present (labels: the union of its pieces,
       :func:`class_labels`) and ``num_negatives`` captions of classes from
       ``negative_classes`` that are absent (all-zero labels), in random order.

    Args:
      rng: the only source of randomness (same state -> same mixture).
      cfg: simulator settings.
      classes: classes to draw sounds from (default: every available class).
      negative_classes: classes negatives are drawn from (default: ``classes``).
      phrasing: "seen" (training captions only) or "all" (see :func:`caption`).
    """
    sr, n_total = cfg.sample_rate, cfg.num_samples
    pool = tuple(classes) if classes is not None else available_classes(
        "all", speech_enabled=cfg.speech)
    if not pool:
        raise ValueError("classes must name at least one sound class")
    for name in pool:
        if name not in CLASSES:
            raise ValueError(f"unknown sound class {name!r}; known: {', '.join(CLASSES)}")
    neg_pool = tuple(negative_classes) if negative_classes is not None else pool
    starts, ends = frame_bounds(n_total, cfg)
    n_frames_ = starts.shape[0]
    occupancy = np.zeros(n_frames_, np.int64)

    placed: list[tuple[str, int, np.ndarray, float, int]] = []  # label, start, piece, gain, src
    n_sources = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    source = 0
    for _ in range(n_sources):
        name = pool[int(rng.integers(len(pool)))]
        lo, hi = CLASSES[name].duration
        duration = min(rng.uniform(lo, hi), cfg.duration)
        gain = float(rng.uniform(cfg.gain_db_min, cfg.gain_db_max))
        wave = np.asarray(CLASSES[name].synth(rng, duration, sr), np.float64)[:n_total]
        if not np.isfinite(a_weighted_level(wave, sr)):
            continue  # a silent synthesis (e.g. speech that trimmed to nothing): no event
        wave = _normalise(wave, cfg.event_level_db + gain, sr)
        pieces, gaps = _pieces(rng, wave, cfg, sr, n_total)
        placement = None
        for _attempt in range(4):
            offsets = np.cumsum([0] + [p.shape[0] + g for p, g in zip(pieces[:-1], gaps)])
            span = int(offsets[-1] + pieces[-1].shape[0])
            for _try in range(50):
                onset = int(rng.integers(0, n_total - span + 1))
                mask = np.zeros(n_frames_, bool)
                for off, p in zip(offsets, pieces):
                    a = onset + int(off)
                    mask[_frames_touched(a, a + p.shape[0], starts, ends)] = True
                if np.all(occupancy[mask] < cfg.max_overlap):
                    placement = (onset, offsets, mask)
                    break
            if placement is not None:
                break
            # shorten: keep the first half of every piece (fade again) and halve the gaps
            pieces = [_fade(p[: max(1, p.shape[0] // 2)], 0, min(p.shape[0] // 8,
                                                                 int(0.005 * sr)))
                      for p in pieces]
            gaps = [g // 2 for g in gaps]
        if placement is None:
            continue
        onset, offsets, mask = placement
        occupancy[mask] += 1
        for off, p in zip(offsets, pieces):
            placed.append((name, onset + int(off), p, gain, source))
        source += 1

    bg_kind, bg = "none", None
    if rng.random() < cfg.p_background:
        bg_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        level = rng.uniform(cfg.background_db_min, cfg.background_db_max)
        bg = _normalise(background(rng, bg_kind, n_total, sr), level, sr)
    mix, events, event_labels = compose(cfg, [Piece(*p) for p in placed], bg)

    present = sorted({e.label for e in events}, key=pool.index)
    absent = [c for c in neg_pool if c not in present]
    negatives = [absent[i] for i in rng.permutation(len(absent))[:cfg.num_negatives]]
    text_classes = present + negatives
    order = rng.permutation(len(text_classes))
    text_classes = [text_classes[i] for i in order]
    texts, novel = [], []
    for name in text_classes:
        text, is_novel = caption(rng, name, phrasing)
        texts.append(text)
        novel.append(is_novel)
    return Mixture(
        waveform=mix, events=events, event_labels=event_labels, texts=texts,
        text_classes=text_classes, text_labels=class_labels(events, event_labels, text_classes),
        text_novel=np.asarray(novel, bool), background=bg_kind)


def cross_labels(event_classes, event_labels, event_mask, text_classes) -> np.ndarray:
    """Frame labels of every clip of a batch against any texts: ``[B, K, L]`` float32.

    ``out[b, k, l] = 1`` iff some valid event ``e`` of clip ``b`` has class
    ``text_classes[k]`` and is active in frame ``l``. Because the simulator knows every
    event's class, a text taken from one clip has exact labels in all the others (FLAM
    scores each clip against all texts of the batch): flatten the batch's ``text_classes``
    ``[B, K0] -> [B K0]`` and pass them here. Padded texts (class "") match nothing.

    Args:
      event_classes: str ``[B, E]``; event_labels: ``[B, E, L]``; event_mask: bool ``[B, E]``;
      text_classes: str ``[K]``.
    """
    ec = np.asarray(event_classes)
    el = np.asarray(event_labels)
    em = np.asarray(event_mask, bool)
    tc = np.asarray(text_classes)
    if ec.ndim != 2 or el.shape[:2] != ec.shape or em.shape != ec.shape or tc.ndim != 1:
        raise ValueError(f"expected event_classes [B, E], event_labels [B, E, L], event_mask "
                         f"[B, E], text_classes [K]; got {ec.shape}, {el.shape}, {em.shape}, "
                         f"{tc.shape}")
    match = (ec[:, :, None] == tc[None, None, :]) & em[:, :, None] & (tc != "")[None, None, :]
    counts = np.einsum("bek,bel->bkl", match.astype(np.float32), (el > 0).astype(np.float32))
    return (counts > 0).astype(np.float32)


def split_classes(split: str, cfg: SimConfig) -> tuple[tuple[str, ...], str]:
    """``(classes, phrasing)`` of a data set split (:data:`SPLITS`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    which, phrasing = SPLITS[split]
    return available_classes(which, speech_enabled=cfg.speech), phrasing


def example(cfg: SimConfig, seed: int, split: str, index: int) -> Mixture:
    """Example ``index`` of ``split``: :func:`simulate` with ``default_rng([seed, s, index])``
    (``s`` the split's position in :data:`SPLITS`), the split's classes and phrasing."""
    classes, phrasing = split_classes(split, cfg)
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index])
    return simulate(rng, cfg, classes=classes, phrasing=phrasing)


# --- tfds data set ------------------------------------------------------------------------------

NAME = "flam_sed_sim"
VERSION = "1.1.0"  # 1.1.0: the valid split
AUDIO_DTYPES = ("int16", "float32")


def _config_name(cfg: SimConfig, num_train: int, num_valid: int, num_test: int, seed: int,
                 audio_dtype: str) -> str:
    key = json.dumps({"cfg": to_dict(cfg), "dtype": audio_dtype, "version": VERSION,
                      "classes": [available_classes(w, speech_enabled=cfg.speech)
                                  for w in ("seen", "heldout")]}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"n{num_train}_{num_valid}_{num_test}_s{seed}_{digest}"


def _encode_audio(x: np.ndarray, audio_dtype: str) -> np.ndarray:
    if audio_dtype == "int16":
        return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    return x.astype(np.float32)


def _builder_class():
    import tensorflow_datasets as tfds

    if "cls" in _BUILDER:
        return _BUILDER["cls"]

    @dataclasses.dataclass
    class SimBuilderConfig(tfds.core.BuilderConfig):
        num_train: int = 100
        num_test: int = 20
        num_valid: int = 20
        seed: int = 0
        audio_dtype: str = "int16"
        sim: Any = None

    def _info(self):
        bc = self.builder_config
        seq_text = tfds.features.Sequence(tfds.features.Text())
        vec = lambda dt: tfds.features.Tensor(shape=(None,), dtype=dt)  # noqa: E731
        mat = tfds.features.Tensor(shape=(None, None), dtype=np.bool_, encoding="zlib")
        features = {
            "waveform": vec(np.int16 if bc.audio_dtype == "int16" else np.float32),
            "texts": seq_text, "text_classes": seq_text, "text_novel": vec(np.bool_),
            "text_labels": mat, "event_labels": mat, "event_classes": seq_text,
            "event_onset": vec(np.float32), "event_offset": vec(np.float32),
            "event_gain_db": vec(np.float32), "event_source": vec(np.int32),
            "background": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64),
        }
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(
                sim_config=to_dict(bc.sim), num_train=bc.num_train, num_test=bc.num_test,
                num_valid=bc.num_valid,
                seed=bc.seed, audio_dtype=bc.audio_dtype,
                seen_classes=list(available_classes("seen", speech_enabled=bc.sim.speech)),
                heldout_classes=list(available_classes("heldout",
                                                       speech_enabled=bc.sim.speech))))

    def _split_generators(self, dl_manager):
        del dl_manager
        bc = self.builder_config
        counts = {"train": bc.num_train, "valid": bc.num_valid}
        return {split: self._generate_examples(split, counts.get(split, bc.num_test))
                for split in SPLITS}

    def _generate_examples(self, split, count):
        bc = self.builder_config
        for i in range(count):
            m = example(bc.sim, bc.seed, split, i)
            yield i, {
                "waveform": _encode_audio(m.waveform, bc.audio_dtype),
                "texts": m.texts, "text_classes": m.text_classes, "text_novel": m.text_novel,
                "text_labels": m.text_labels, "event_labels": m.event_labels,
                "event_classes": [e.label for e in m.events],
                "event_onset": np.array([e.onset for e in m.events], np.float32),
                "event_offset": np.array([e.offset for e in m.events], np.float32),
                "event_gain_db": np.array([e.gain_db for e in m.events], np.float32),
                "event_source": np.array([e.source for e in m.events], np.int32),
                "background": m.background, "index": i,
            }

    cls = type("FlamSedSim", (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version(VERSION), "RELEASE_NOTES": {VERSION: "adds the valid split"},
        "BUILDER_CONFIGS": [], "_info": _info, "_split_generators": _split_generators,
        "_generate_examples": _generate_examples, "__module__": __name__})
    cls.name = NAME
    cls.SimBuilderConfig = SimBuilderConfig
    _BUILDER["cls"] = cls
    return cls


_BUILDER: dict[str, Any] = {}


def build(data_dir: str | os.PathLike, num_train: int, num_test: int, seed: int = 0,
          cfg: SimConfig | None = None, *, audio_dtype: str = "int16",
          num_valid: int | None = None) -> Path:
    """Write the simulated data set under ``data_dir`` unless it is already there; returns the
    prepared directory ``data_dir/flam_sed_sim/n{train}_{valid}_{test}_s{seed}_{hash}/1.1.0``
    (the hash covers ``cfg``, ``audio_dtype`` and the available classes).

    Splits: ``train`` (``num_train`` mixtures of seen classes, seen captions), ``valid``
    (``num_valid``, default ``num_test``: seen classes, all captions, for calibration),
    ``test_seen`` and ``test_heldout`` (``num_test`` each; all captions; held-out classes in
    the latter). ``audio_dtype`` "int16" (PCM, quantised to 1/32767) or "float32" (exact)."""
    cfg = cfg or SimConfig()
    num_valid = num_test if num_valid is None else num_valid
    if num_train < 1 or num_test < 1 or num_valid < 1:
        raise ValueError(f"num_train, num_valid and num_test must be >= 1, got {num_train}, "
                         f"{num_valid}, {num_test}")
    if audio_dtype not in AUDIO_DTYPES:
        raise ValueError(f"audio_dtype={audio_dtype!r}: must be one of {AUDIO_DTYPES}")
    cls = _builder_class()
    bc = cls.SimBuilderConfig(name=_config_name(cfg, num_train, num_valid, num_test, seed,
                                                audio_dtype),
                              version=VERSION, num_train=num_train, num_test=num_test,
                              num_valid=num_valid, seed=seed, audio_dtype=audio_dtype, sim=cfg)
    builder = cls(config=bc, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def prepared_dir(data_dir: str | os.PathLike, config: str | None = None) -> Path:
    """The prepared directory under ``data_dir``; ``config`` (the build's name) may be left
    out when only one has been built."""
    root = Path(data_dir) / NAME
    built = sorted(p.parent.parent.name for p in root.glob(f"*/{VERSION}/dataset_info.json"))
    if config is None:
        if len(built) != 1:
            why = ("no prepared data set; run build() first" if not built
                   else f"several data sets: {', '.join(built)}; pass config=")
            raise FileNotFoundError(f"{root}: {why}")
        config = built[0]
    path = root / config / VERSION
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(f"{path}: not prepared (built here: {', '.join(built) or 'none'})")
    return path


def _open(split: str, data_dir, config):
    import tensorflow_datasets as tfds

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    builder = tfds.builder_from_directory(os.fspath(prepared_dir(data_dir, config)))

    meta = builder.info.metadata
    cfg = from_dict(SimConfig, dict(meta["sim_config"]))
    return builder.as_data_source(split=split), cfg, meta


def data_source(split: str, data_dir: str | os.PathLike, config: str | None = None):
    """``(source, cfg)``: the random-access tfds data source of one split (records as stored)
    and the :class:`SimConfig` it was built with."""
    source, cfg, _ = _open(split, data_dir, config)
    return source, cfg


def _strs(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def decode_record(record: Mapping[str, Any], cfg: SimConfig) -> dict[str, Any]:
    """A stored record as fixed-shape arrays (texts padded to ``cfg.max_texts``, events to
    ``cfg.max_segments``):

    ``waveform`` float32 ``[T]`` (int16 / 32767); ``text_labels`` float32 ``[K, L]`` in {0, 1};
    ``text_mask`` bool ``[K]``; ``texts``, ``text_classes`` str ``[K]`` ("" where padded);
    ``text_novel`` bool ``[K]``; ``event_labels`` float32 ``[E, L]``; ``event_mask`` bool
    ``[E]``; ``event_classes`` str ``[E]``; ``event_onset``/``event_offset``/``event_gain_db``
    float32 ``[E]``; ``event_source`` int32 ``[E]`` (-1 where padded); ``background`` str;
    ``index``: the example's index ``i`` in its split (``example(cfg, seed, split, i)``; tfds
    stores examples in a hashed order)."""
    wave = np.asarray(record["waveform"])
    wave = (wave.astype(np.float32) / np.float32(32767.0) if wave.dtype == np.int16
            else wave.astype(np.float32))
    n_frames_ = cfg.num_frames

    def pad_rows(x, rows, dtype):
        x = np.asarray(x, dtype).reshape(-1, n_frames_)
        return np.concatenate([x, np.zeros((rows - x.shape[0], n_frames_), dtype)])

    def pad_vec(x, rows, dtype, fill):
        x = np.asarray(x, dtype).reshape(-1)
        return np.concatenate([x, np.full(rows - x.shape[0], fill, dtype)])

    k, e = cfg.max_texts, cfg.max_segments
    texts = _strs(record["texts"])
    n_ev = len(record["event_classes"])
    return {
        "waveform": wave,
        "text_labels": pad_rows(record["text_labels"], k, np.float32),
        "text_mask": np.arange(k) < len(texts),
        "texts": np.array(texts + [""] * (k - len(texts)), dtype=object).astype(str),
        "text_classes": np.array(_strs(record["text_classes"]) + [""] * (k - len(texts)),
                                 dtype=object).astype(str),
        "text_novel": pad_vec(record["text_novel"], k, bool, False),
        "event_labels": pad_rows(record["event_labels"], e, np.float32),
        "event_mask": np.arange(e) < n_ev,
        "event_classes": np.array(_strs(record["event_classes"]) + [""] * (e - n_ev),
                                  dtype=object).astype(str),
        "event_onset": pad_vec(record["event_onset"], e, np.float32, 0.0),
        "event_offset": pad_vec(record["event_offset"], e, np.float32, 0.0),
        "event_gain_db": pad_vec(record["event_gain_db"], e, np.float32, 0.0),
        "event_source": pad_vec(record["event_source"], e, np.int32, -1),
        "background": _strs([record["background"]])[0],
        "index": np.int64(record["index"]),
    }


def load(split: str, data_dir: str | os.PathLike, num_examples: int | None = None,
         seed: int = 0, *, batch_size: int = 16, num_epochs: int | None = None,
         drop_remainder: bool = True, config: str | None = None, read_threads: int = 2):
    """A resumable grain iterator of batches of a prepared split.

    ``MapDataset.source -> [:num_examples] -> shuffle(seed) -> repeat(num_epochs) ->
    map(decode_record) -> batch``. Shuffling is grain's index shuffle: deterministic per
    ``seed``, a new permutation each epoch; ``it.get_state()``/``it.set_state()`` resume
    exactly. Batches are dicts of numpy arrays with a leading ``[B]`` axis
    (:func:`decode_record`'s fields).
    """
    import grain

    source, cfg, _ = _open(split, data_dir, config)
    ds = grain.MapDataset.source(source)
    if num_examples is not None:
        if not 1 <= num_examples <= len(ds):
            raise ValueError(f"num_examples={num_examples} but split {split!r} has "
                             f"{len(ds)} examples")
        ds = ds[:num_examples]
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(lambda record: decode_record(record, cfg))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    return iter(ds.to_iter_dataset(options))


def iterate_examples(split: str, data_dir: str | os.PathLike,
                     config: str | None = None) -> Iterator[dict[str, Any]]:
    """Every stored example of a split in storage order (tfds's hashed order; each record
    carries its ``index``), decoded (for inspection and tests)."""
    source, cfg, _ = _open(split, data_dir, config)
    for i in range(len(source)):
        yield decode_record(source[i], cfg)
