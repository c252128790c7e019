"""ReaLchords evaluation metrics (paper Table 1 and the adaptation figure).

Wu et al., "Adaptive Accompaniment with ReaLchords" (ICML 2024), Sec. 5: harmony is the
note-in-chord ratio, rhythm the onset-interval EMD between a system's and the test data's
distributions (reported x1e3), and the chord-length entropy.

- note-in-chord follows ``evaluate_note_in_chord_ratio`` in lukewys/realchords-pytorch
  ``realchords/utils/eval_utils.py``: frames where the melody *or* the chord is silent are
  ignored; a frame counts when the melody's pitch class is one of the chord's pitch classes.
- the entropy uses the natural log, as ``compute_entropy`` in the reference's
  ``realchords/utils/chord_diversity_analysis.py``.
- the reference code has no onset-interval EMD; the definition here (documented in
  :func:`onset_intervals`) is our reading of the paper's text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from audio.music.data import CHORD_PC_TABLE, Piece

MAX_INTERVAL = 16  # frames (one 4/4 bar of 16ths); longer intervals fall in the last bin


def _pieces(pieces: Piece | Sequence[Piece]) -> list[Piece]:
    return [pieces] if isinstance(pieces, Piece) else list(pieces)


def note_in_chord_frames(piece: Piece) -> tuple[np.ndarray, np.ndarray]:
    """(hit [T] bool, valid [T] bool): valid = melody and chord both sounding,
    hit = valid and ``melody mod 12`` is a chord tone."""
    valid = (piece.melody >= 0) & (piece.chord >= 0)
    hit = np.zeros(len(piece), bool)
    hit[valid] = CHORD_PC_TABLE[piece.chord[valid], piece.melody[valid] % 12] == 1
    return hit, valid


def note_in_chord_ratio(pieces: Piece | Sequence[Piece]) -> float:
    """NiC = sum_t 1[pc(x_t) in pcs(y_t)] / sum_t 1[x_t, y_t not silent], pooled over the
    frames of all given pieces; NaN when no frame is valid."""
    hits = valid = 0
    for p in _pieces(pieces):
        h, v = note_in_chord_frames(p)
        hits += int(h.sum())
        valid += int(v.sum())
    return hits / valid if valid else float("nan")


def per_frame_note_in_chord(pieces: Sequence[Piece]) -> np.ndarray:
    """[T_max] mean over pieces of the per-frame note-in-chord indicator at frame t, over the
    pieces whose frame t is valid (NaN where none is): the adaptation curve around a
    mid-song transposition (paper Fig. 4)."""
    pieces = _pieces(pieces)
    n = max((len(p) for p in pieces), default=0)
    hits, counts = np.zeros(n), np.zeros(n)
    for p in pieces:
        h, v = note_in_chord_frames(p)
        hits[:len(p)] += h
        counts[:len(p)] += v
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def onset_intervals(piece: Piece) -> np.ndarray:
    """For every chord onset at frame t: min_s |t - s| over melody onsets s, clipped to
    ``MAX_INTERVAL`` (chord onsets in a piece without melody onsets give MAX_INTERVAL).
    0 = the chord changes together with a melody note."""
    c = np.flatnonzero(piece.chord_onset & (piece.chord >= 0))
    m = np.flatnonzero(piece.melody_onset & (piece.melody >= 0))
    if c.size == 0:
        return np.zeros(0, np.int64)
    if m.size == 0:
        return np.full(c.size, MAX_INTERVAL, np.int64)
    d = np.abs(c[:, None] - m[None, :]).min(1)
    return np.minimum(d, MAX_INTERVAL)


def onset_interval_histogram(pieces: Sequence[Piece]) -> np.ndarray:
    """Normalised histogram [MAX_INTERVAL + 1] of :func:`onset_intervals` over all pieces."""
    counts = np.zeros(MAX_INTERVAL + 1)
    for p in _pieces(pieces):
        counts += np.bincount(onset_intervals(p), minlength=MAX_INTERVAL + 1)
    if counts.sum() == 0:
        raise ValueError("onset_interval_histogram: no chord onsets in the pieces")
    return counts / counts.sum()


def emd_1d(p: np.ndarray, q: np.ndarray) -> float:
    """Earth mover's distance between two histograms on the same unit-spaced bins:
    EMD = sum_k |P(k) - Q(k)|, P and Q the cumulative distributions (1-D Wasserstein-1)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    if p.shape != q.shape:
        raise ValueError(f"emd_1d: histograms differ in shape {p.shape} vs {q.shape}")
    return float(np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum())).sum())


def onset_interval_emd(pieces_a: Sequence[Piece], pieces_b: Sequence[Piece]) -> float:
    """1e3 * EMD(h_a, h_b), h the onset-interval histograms (:func:`onset_interval_histogram`)
    of two sets of pieces, e.g. a system's outputs and the test data (Table 1, x1e3)."""
    return 1e3 * emd_1d(onset_interval_histogram(pieces_a), onset_interval_histogram(pieces_b))


def chord_lengths(piece: Piece) -> np.ndarray:
    """Lengths (frames) of the chord runs: a run starts at a chord onset, at a change of chord
    index, or after silence, and ends before the next such start or silence."""
    c = piece.chord
    if c.size == 0:
        return np.zeros(0, np.int64)
    prev = np.concatenate([[-1], c[:-1]])
    start = (c >= 0) & (piece.chord_onset | (c != prev))
    run_id = np.cumsum(start)
    ids = run_id[c >= 0]
    return np.bincount(ids)[1:][np.bincount(ids)[1:] > 0].astype(np.int64)


def chord_length_entropy(pieces: Piece | Sequence[Piece]) -> float:
    """H = -sum_l p(l) ln p(l), p the empirical distribution of chord run lengths (frames)
    pooled over the pieces. 0 when every chord has the same length."""
    lengths = np.concatenate([chord_lengths(p) for p in _pieces(pieces)] or [np.zeros(0)])
    if lengths.size == 0:
        return float("nan")
    _, counts = np.unique(lengths, return_counts=True)
    prob = counts / counts.sum()
    return float(-(prob * np.log(prob)).sum())
