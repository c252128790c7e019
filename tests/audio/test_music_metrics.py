"""audio.music.metrics against hand-computed cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.music import data as D
from audio.music import metrics as M

C = D.chord_index("C:maj")
A = D.chord_index("A:min")
G = D.chord_index("G:maj")


def piece(melody, chord, melody_onset=None, chord_onset=None):
    melody, chord = np.array(melody), np.array(chord)
    if melody_onset is None:
        melody_onset = (melody >= 0) & (np.concatenate([[-2], melody[:-1]]) != melody)
    if chord_onset is None:
        chord_onset = (chord >= 0) & (np.concatenate([[-2], chord[:-1]]) != chord)
    return D.Piece("hand", melody, melody_onset, chord, chord_onset)


def test_note_in_chord_hand_cases():
    assert M.note_in_chord_ratio(piece([60, 64, 67, 72], [C] * 4)) == 1.0   # C-E-G-C over C
    assert M.note_in_chord_ratio(piece([60, 62, 64, 65], [C] * 4)) == 0.5   # D, F off
    # silent melody frames and silent chord frames are excluded (reference eval_utils)
    assert M.note_in_chord_ratio(piece([60, -1, 62, 64, 62], [C, C, C, -1, G])) == 2 / 3
    # pooled over pieces: 4 hits of 4 and 2 of 4 -> 6/8
    assert M.note_in_chord_ratio([piece([60, 64, 67, 72], [C] * 4),
                                  piece([60, 62, 64, 65], [C] * 4)]) == 0.75
    assert math.isnan(M.note_in_chord_ratio(piece([-1, -1], [C, C])))
    # octave does not matter, pitch class does; A:min contains C, E, A
    assert M.note_in_chord_ratio(piece([48, 76, 93, 67], [A] * 4)) == 0.75


def test_per_frame_note_in_chord():
    a = piece([60, 62, 64, -1], [C] * 4)
    b = piece([60, 64, 65], [C] * 3)
    curve = M.per_frame_note_in_chord([a, b])
    assert curve[:3].tolist() == [1.0, 0.5, 0.5] and math.isnan(curve[3])


def test_onset_intervals_hand_case():
    # melody onsets at 0, 4, 8; chord onsets at 0, 6, 15 -> distances 0, 2, 7
    mel = [60] * 4 + [62] * 4 + [64] * 8
    chd = [C] * 6 + [G] * 9 + [A]
    assert M.onset_intervals(piece(mel, chd)).tolist() == [0, 2, 7]


def test_emd_identical_is_zero_and_shift_has_closed_form():
    a = piece([60, 62, 64, 65] * 4, [C, G] * 8)  # every chord onset on a melody onset
    assert M.onset_interval_emd([a], [a]) == 0.0
    # shifted: chords change one frame after each melody onset (every 4 frames)
    mel = np.repeat([60, 62, 64, 65], 4)
    chd = np.repeat([C, G, C, G, C], [1, 4, 4, 4, 3])
    b = piece(mel, chd)
    h_b = M.onset_interval_histogram([b])
    assert h_b[0] == pytest.approx(1 / 5) and h_b[1] == pytest.approx(4 / 5)
    # delta at 0 against (1/5 at 0, 4/5 at 1): EMD = |1 - 1/5| = 0.8 frames -> 800
    assert M.onset_interval_emd([a], [b]) == pytest.approx(800.0)
    # 1-D EMD between deltas at i and j is |i - j|
    p, q = np.eye(M.MAX_INTERVAL + 1)[[2, 7]]
    assert M.emd_1d(p, q) == pytest.approx(5.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=5, max_size=5),
       st.lists(st.floats(0, 1), min_size=5, max_size=5))
def test_emd_matches_sorted_sample_oracle(p, q):
    # oracle: W1 between the distributions as the mean |quantile difference| on a fine grid
    p, q = np.array(p) + 1e-3, np.array(q) + 1e-3
    grid = (np.arange(20000) + 0.5) / 20000
    qp = np.searchsorted(np.cumsum(p / p.sum()), grid)
    qq = np.searchsorted(np.cumsum(q / q.sum()), grid)
    assert M.emd_1d(p, q) == pytest.approx(np.abs(qp - qq).mean(), abs=2e-3)
    assert M.emd_1d(p, q) == pytest.approx(M.emd_1d(q, p))


def test_chord_length_entropy():
    assert M.chord_length_entropy(piece([60] * 12, [C] * 4 + [G] * 4 + [A] * 4)) == 0.0
    # lengths 2, 2, 4, 4 -> p = (1/2, 1/2) -> ln 2
    p = piece([60] * 12, [C, C, G, G] + [C] * 4 + [A] * 4)
    assert M.chord_lengths(p).tolist() == [2, 2, 4, 4]
    assert M.chord_length_entropy(p) == pytest.approx(math.log(2))
    # a re-struck chord (onset without a change) starts a new run; silence ends one
    q = piece([60] * 7, [C, C, C, C, -1, G, G],
              chord_onset=[True, False, True, False, False, True, False])
    assert M.chord_lengths(q).tolist() == [2, 2, 2]
