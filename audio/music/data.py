"""ReaLchords data: melody + chord frames, the token vocabulary, and the music21 chorales.

A :class:`Piece` is two aligned frame sequences at 16th-note resolution (4 frames per quarter,
as ``FRAME_PER_BEAT = 4`` in lukewys/realchords-pytorch ``realchords/constants.py``):

- ``melody[t]``: MIDI pitch sounding at frame t (-1 = silence), ``melody_onset[t]`` whether a
  note starts there;
- ``chord[t]``: index into :data:`CHORDS` (-1 = no chord), ``chord_onset[t]`` likewise.

Tokens follow the paper (Wu et al., "Adaptive Accompaniment with ReaLchords", ICML 2024, Sec. 3)
and the reference ``realchords/dataset/hooktheory_tokenizer.py``: PAD=0, BOS=1, EOS=2, then
per part a silence token, one *hold* token per pitch/chord and one *onset* token per
pitch/chord. The reference shares one SILENCE token between both parts; here melody and chord
have their own silence token, so that every token belongs to exactly one part (simpler logit
masks). A piece becomes ``[BOS, c_0, m_0, c_1, m_1, ..., c_{T-1}, m_{T-1}, EOS]``: the chord of
frame t comes *before* the melody of frame t, so an online model predicts y_t from
(x_<t, y_<t) (paper Eq. 1; reference ``hooktheory_dataloader.py`` ``interleave(chord, melody)``).

Chord vocabulary and reduction rule (the paper used Hooktheory's annotated chords; the
chorales have none, so we name the harmony ourselves):

``CHORDS`` = 12 roots x 9 qualities (``QUALITIES``: maj, min, dim, aug, 7, maj7, min7, hdim7,
dim7), named ``"<root>:<quality>"`` (Harte-style, e.g. ``"C:maj"``, ``"A:min7"``), with
``index = root * len(QUALITIES) + quality`` (so transposition moves the root only). The
harmony *without the melody* is named: the lower parts (alto, tenor, bass) are ``chordify``-ed
(the soprano is not: a chord label that includes the melody's own passing tones makes the
data's note-in-chord ~97%, against the paper's 70.94 on its test data); a one-part tune uses
its chord symbols instead (:func:`piece_from_score`). Each slice's pitch-class set S (with its
bass pitch class) reduces by :func:`reduce_chord`:

1. S empty -> no chord (-1).
2. *exact*: a vocabulary chord whose pitch-class set equals S (several only for the symmetric
   aug / dim7 sets: the one rooted on the bass, else the previous chord, else the lowest index).
3. otherwise *best fit*: maximise ``|S & T| - |T - S| - 0.5 |S - T|`` over vocabulary chords T
   (a missing chord tone costs 1, a foreign tone -- a passing or suspended note -- 0.5);
   ties go to the previous chord (harmonic continuity), then to the chord rooted on the bass,
   then to the lower index (triads before sevenths).

Consecutive slices that reduce to the same chord are merged: a chord onset marks a *change* of
chord (or the first chord after a gap), so a chord repeated over a passing note is held.

Melody = the soprano (the first part), ties merged (``stripTies``); a chord in that part gives
its highest pitch. Pitches outside ``[MELODY_LOW, MELODY_HIGH]`` are octave-folded into it.
Repeats are not expanded; grace notes (zero duration) are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FRAMES_PER_QUARTER = 4  # 16th-note frames
MAX_FRAMES = 256        # the paper's maximum length in frames
MELODY_LOW = 48         # C3; the chorale sopranos span 60..81, +-6 semitones stays inside
MELODY_HIGH = 95        # B6 (inclusive)

ROOT_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
QUALITIES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "hdim7": (0, 3, 6, 10),
    "dim7": (0, 3, 6, 9),
}
_QUALITY_NAMES = tuple(QUALITIES)
N_QUALITIES = len(QUALITIES)
CHORDS: tuple[str, ...] = tuple(f"{r}:{q}" for r in ROOT_NAMES for q in QUALITIES)
_CHORD_INDEX = {name: i for i, name in enumerate(CHORDS)}

CACHE_ENV = "JAXRESEARCH_MUSIC_CACHE"
CACHE_VERSION = 2  # 2: chords from the lower parts only (v1 chordified the soprano too)


# ---------------------------------------------------------------------------------------------
# chords


def chord_root(chord: int) -> int:
    """Root pitch class (0 = C) of a chord index."""
    return int(chord) // N_QUALITIES


def chord_quality(chord: int) -> str:
    return _QUALITY_NAMES[int(chord) % N_QUALITIES]


def chord_index(name: str) -> int:
    """Index of ``"<root>:<quality>"`` in :data:`CHORDS` (``KeyError`` naming it if unknown)."""
    try:
        return _CHORD_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown chord {name!r}; names look like 'C:maj', 'A:min7', "
                       f"qualities {list(QUALITIES)}") from None


def chord_pitch_classes(chord: int) -> tuple[int, ...]:
    """Pitch classes of a chord index, root first (root-position order)."""
    root = chord_root(chord)
    return tuple((root + i) % 12 for i in QUALITIES[chord_quality(chord)])


# [n_chords, 12] 0/1 table of chord tones, used by the reduction and by the metrics
CHORD_PC_TABLE = np.zeros((len(CHORDS), 12), np.int32)
for _c in range(len(CHORDS)):
    CHORD_PC_TABLE[_c, list(chord_pitch_classes(_c))] = 1


def reduce_chord(pitch_classes, bass: int | None = None,
                 previous: int = -1) -> tuple[int, str]:
    """Reduce a pitch-class set to a vocabulary chord (the rule in the module docstring).

    Returns ``(index, kind)`` with kind ``"exact"`` (S equals the chord's set), ``"subset"``
    (S is a proper subset: no foreign tone, some chord tone missing), ``"fit"`` (S had a
    foreign tone) or ``"none"`` (S empty, index -1).
    """
    s = np.zeros(12, np.int32)
    s[[int(p) % 12 for p in pitch_classes]] = 1
    if not s.any():
        return -1, "none"
    t = CHORD_PC_TABLE
    common = t @ s
    missing = t.sum(1) - common
    extra = s.sum() - common
    score = common - missing - 0.5 * extra
    best = np.flatnonzero(score == score.max())

    def pick(candidates: np.ndarray) -> int:
        if previous in candidates:
            return int(previous)
        if bass is not None:
            on_bass = [c for c in candidates if chord_root(c) == int(bass) % 12]
            if on_bass:
                return int(on_bass[0])
        return int(candidates[0])

    exact = np.flatnonzero((missing == 0) & (extra == 0))
    if exact.size:  # symmetric sets: bass root first, then the previous chord
        on_bass = [c for c in exact if bass is not None and chord_root(c) == int(bass) % 12]
        return (int(on_bass[0]) if on_bass else pick(exact)), "exact"
    chosen = pick(best)
    return chosen, ("subset" if extra[chosen] == 0 else "fit")


# ---------------------------------------------------------------------------------------------
# pieces


def fold_pitch(pitch: int) -> int:
    """Move a MIDI pitch by octaves into ``[MELODY_LOW, MELODY_HIGH]`` (-1 stays -1)."""
    pitch = int(pitch)
    if pitch < 0:
        return -1
    while pitch < MELODY_LOW:
        pitch += 12
    while pitch > MELODY_HIGH:
        pitch -= 12
    return pitch


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
    """Aligned melody and chord frames (see the module docstring). Arrays are coerced to
    int32/bool; all four must have the same length T."""

    name: str
    melody: np.ndarray        # int32 [T], MIDI pitch, -1 = silence
    melody_onset: np.ndarray  # bool [T]
    chord: np.ndarray         # int32 [T], index into CHORDS, -1 = no chord
    chord_onset: np.ndarray   # bool [T]

    def __post_init__(self):
        for field, dtype in (("melody", np.int32), ("melody_onset", np.bool_),
                             ("chord", np.int32), ("chord_onset", np.bool_)):
            arr = np.asarray(getattr(self, field))
            if arr.ndim != 1:
                raise ValueError(f"Piece {self.name!r}: {field} must be 1-D, got {arr.shape}")
            object.__setattr__(self, field, arr.astype(dtype, copy=False))
        lengths = {len(self.melody), len(self.melody_onset), len(self.chord),
                   len(self.chord_onset)}
        if len(lengths) != 1:
            raise ValueError(f"Piece {self.name!r}: arrays differ in length {sorted(lengths)}")
        if ((self.chord < -1) | (self.chord >= len(CHORDS))).any():
            raise ValueError(f"Piece {self.name!r}: chord index outside [-1, {len(CHORDS)})")

    def __len__(self) -> int:
        return len(self.melody)

    @property
    def n_frames(self) -> int:
        return len(self.melody)

    def chord_names(self) -> list[str | None]:
        return [CHORDS[c] if c >= 0 else None for c in self.chord]

    def same_frames(self, other: Piece) -> bool:
        """True when all four frame arrays are equal (the name is ignored)."""
        return (len(self) == len(other)
                and all(np.array_equal(getattr(self, f), getattr(other, f))
                        for f in ("melody", "melody_onset", "chord", "chord_onset")))


def transpose(piece: Piece, semitones: int) -> Piece:
    """Shift melody pitches by ``semitones`` (octave-folded into the melody range) and chord
    roots by ``semitones`` mod 12 (quality kept). Onsets and silences are unchanged."""
    s = int(semitones)
    melody = np.where(piece.melody >= 0, piece.melody + s, -1)
    if ((melody >= 0) & ((melody < MELODY_LOW) | (melody > MELODY_HIGH))).any():
        melody = np.array([fold_pitch(p) for p in melody], np.int32)
    root = (piece.chord // N_QUALITIES + s) % 12
    chord = np.where(piece.chord >= 0, root * N_QUALITIES + piece.chord % N_QUALITIES, -1)
    return dataclasses.replace(piece, melody=melody, chord=chord)


def crop(piece: Piece, start: int, length: int) -> Piece:
    """Frames ``[start, start + length)`` (shorter at the end of the piece). A note or chord
    cut at ``start`` begins with a hold frame, as in the reference's random crop."""
    if start < 0 or length <= 0:
        raise ValueError(f"crop: need start >= 0 and length > 0, got {start}, {length}")
    sl = slice(start, start + length)
    return Piece(piece.name, piece.melody[sl], piece.melody_onset[sl], piece.chord[sl],
                 piece.chord_onset[sl])


def random_crop(piece: Piece, length: int, rng: np.random.Generator) -> Piece:
    """A ``length``-frame window starting on a beat (multiple of ``FRAMES_PER_QUARTER``), as
    ``random_crop`` in the reference's ``hooktheory_dataloader.py``; the whole piece if shorter."""
    if len(piece) <= length:
        return piece
    starts = np.arange(0, len(piece) - length + 1, FRAMES_PER_QUARTER)
    return crop(piece, int(rng.choice(starts)), length)


# ---------------------------------------------------------------------------------------------
# tokens


class Vocab:
    """The shared token space. Layout (P melody pitches, C chords)::

        0 PAD, 1 BOS, 2 EOS,
        3 melody silence, 4 .. 4+P-1 melody hold(pitch), 4+P .. 4+2P-1 melody onset(pitch),
        4+2P chord silence, then C chord hold(chord), then C chord onset(chord).
    """

    PAD = 0
    BOS = 1
    EOS = 2

    def __init__(self, melody_low: int = MELODY_LOW, melody_high: int = MELODY_HIGH,
                 n_chords: int = len(CHORDS)):
        self.melody_low, self.melody_high = int(melody_low), int(melody_high)
        self.n_pitches = self.melody_high - self.melody_low + 1
        self.n_chords = int(n_chords)
        self.melody_silence = 3
        self._mel_hold = 4
        self._mel_on = 4 + self.n_pitches
        self.chord_silence = 4 + 2 * self.n_pitches
        self._chord_hold = self.chord_silence + 1
        self._chord_on = self._chord_hold + self.n_chords
        self.size = self._chord_on + self.n_chords
        self.melody_tokens = np.arange(self.melody_silence, self.chord_silence, dtype=np.int32)
        self.chord_tokens = np.arange(self.chord_silence, self.size, dtype=np.int32)

    def __repr__(self) -> str:
        return (f"Vocab(size={self.size}, pitches={self.melody_low}..{self.melody_high}, "
                f"chords={self.n_chords})")

    # -- encoding
    def melody_token(self, pitch: int, onset: bool) -> int:
        """Token of a melody frame: pitch -1 -> melody silence (onset ignored)."""
        pitch = int(pitch)
        if pitch < 0:
            return self.melody_silence
        if not self.melody_low <= pitch <= self.melody_high:
            raise ValueError(f"melody pitch {pitch} outside [{self.melody_low}, "
                             f"{self.melody_high}] (fold it with fold_pitch)")
        return (self._mel_on if onset else self._mel_hold) + pitch - self.melody_low

    def chord_token(self, chord: int, onset: bool) -> int:
        """Token of a chord frame: chord -1 -> chord silence (onset ignored)."""
        chord = int(chord)
        if chord < 0:
            return self.chord_silence
        if chord >= self.n_chords:
            raise ValueError(f"chord index {chord} outside [0, {self.n_chords})")
        return (self._chord_on if onset else self._chord_hold) + chord

    def melody_token_array(self, melody: np.ndarray, onset: np.ndarray) -> np.ndarray:
        melody = np.asarray(melody)
        bad = (melody >= 0) & ((melody < self.melody_low) | (melody > self.melody_high))
        if bad.any():
            raise ValueError(f"melody pitches {sorted(set(melody[bad].tolist()))} outside "
                             f"[{self.melody_low}, {self.melody_high}]")
        base = np.where(np.asarray(onset, bool), self._mel_on, self._mel_hold)
        return np.where(melody < 0, self.melody_silence,
                        base + melody - self.melody_low).astype(np.int32)

    def chord_token_array(self, chord: np.ndarray, onset: np.ndarray) -> np.ndarray:
        chord = np.asarray(chord)
        base = np.where(np.asarray(onset, bool), self._chord_on, self._chord_hold)
        return np.where(chord < 0, self.chord_silence, base + chord).astype(np.int32)

    # -- classification
    def is_melody(self, tokens) -> np.ndarray:
        t = np.asarray(tokens)
        return (t >= self.melody_silence) & (t < self.chord_silence)

    def is_chord(self, tokens) -> np.ndarray:
        t = np.asarray(tokens)
        return (t >= self.chord_silence) & (t < self.size)

    def is_onset(self, tokens) -> np.ndarray:
        t = np.asarray(tokens)
        return (((t >= self._mel_on) & (t < self.chord_silence))
                | ((t >= self._chord_on) & (t < self.size)))

    # -- decoding (scalars give (int, bool); arrays give (int32 array, bool array))
    def decode_melody(self, token):
        """Melody token(s) -> (pitch, onset); silence -> (-1, False). ``ValueError`` for a
        non-melody token."""
        t = np.asarray(token)
        if not self.is_melody(t).all():
            raise ValueError(f"not melody tokens: {np.unique(t[~self.is_melody(t)]).tolist()}")
        onset = t >= self._mel_on
        pitch = np.where(t == self.melody_silence, -1,
                         np.where(onset, t - self._mel_on, t - self._mel_hold) + self.melody_low)
        if t.ndim == 0:
            return int(pitch), bool(onset)
        return pitch.astype(np.int32), onset

    def decode_chord(self, token):
        """Chord token(s) -> (chord index, onset); silence -> (-1, False)."""
        t = np.asarray(token)
        if not self.is_chord(t).all():
            raise ValueError(f"not chord tokens: {np.unique(t[~self.is_chord(t)]).tolist()}")
        onset = t >= self._chord_on
        chord = np.where(t == self.chord_silence, -1,
                         np.where(onset, t - self._chord_on, t - self._chord_hold))
        if t.ndim == 0:
            return int(chord), bool(onset)
        return chord.astype(np.int32), onset

    def token_name(self, token: int) -> str:
        token = int(token)
        special = {self.PAD: "PAD", self.BOS: "BOS", self.EOS: "EOS",
                   self.melody_silence: "MELODY_SILENCE", self.chord_silence: "CHORD_SILENCE"}
        if token in special:
            return special[token]
        if self.is_melody(token):
            p, on = self.decode_melody(token)
            return f"NOTE_{'ON_' if on else ''}{p}"
        if self.is_chord(token):
            c, on = self.decode_chord(token)
            return f"CHORD_{'ON_' if on else ''}{CHORDS[c]}"
        return f"<invalid {token}>"


def interleave(piece: Piece, vocab: Vocab) -> np.ndarray:
    """``[BOS, c_0, m_0, c_1, m_1, ..., c_{T-1}, m_{T-1}, EOS]`` (int32, length 2T + 2)."""
    n = len(piece)
    out = np.empty(2 * n + 2, np.int32)
    out[0], out[-1] = vocab.BOS, vocab.EOS
    out[1:-1:2] = vocab.chord_token_array(piece.chord, piece.chord_onset)
    out[2:-1:2] = vocab.melody_token_array(piece.melody, piece.melody_onset)
    return out


def deinterleave(tokens, vocab: Vocab, name: str = "deinterleaved") -> Piece:
    """Inverse of :func:`interleave`. A leading BOS is skipped; reading stops at the first EOS
    or PAD; a trailing chord without its melody token (a sequence cut mid-frame) is dropped.
    ``ValueError`` names the position of a token in the wrong part."""
    t = np.asarray(tokens).reshape(-1)
    if t.size and t[0] == vocab.BOS:
        t = t[1:]
    stop = np.flatnonzero((t == vocab.EOS) | (t == vocab.PAD))
    if stop.size:
        t = t[:stop[0]]
    t = t[: 2 * (t.size // 2)]
    c, m = t[0::2], t[1::2]
    for part, toks, ok in (("chord", c, vocab.is_chord(c)), ("melody", m, vocab.is_melody(m))):
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"deinterleave: frame {i} expects a {part} token, got "
                             f"{int(toks[i])} ({vocab.token_name(toks[i])})")
    chord, chord_on = vocab.decode_chord(c)
    melody, melody_on = vocab.decode_melody(m)
    return Piece(name, melody, melody_on, chord, chord_on)


def batch(pieces: Sequence[Piece], vocab: Vocab,
          max_frames: int = MAX_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """Token batch ``[B, 2 * max_frames + 2]`` (int32, PAD-filled) and its bool mask (True on
    BOS, frames and EOS). A piece longer than ``max_frames`` keeps its first ``max_frames``
    frames (crop first with :func:`random_crop`); every row ends with EOS, as in the
    reference's dataloader (``add_bos_eos`` after the crop)."""
    width = 2 * max_frames + 2
    tokens = np.full((len(pieces), width), vocab.PAD, np.int32)
    mask = np.zeros((len(pieces), width), bool)
    for i, piece in enumerate(pieces):
        seq = interleave(crop(piece, 0, max_frames) if len(piece) > max_frames else piece, vocab)
        tokens[i, :seq.size] = seq
        mask[i, :seq.size] = True
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# splits


def split_by_piece(pieces: Sequence[Piece], *, held_out: float,
                   seed: int) -> tuple[list[Piece], list[Piece]]:
    """(train, held-out): a seeded permutation of the distinct piece names, the last
    ``round(held_out * n)`` (at least 1 when ``held_out > 0``) held out. Pieces sharing a name
    (e.g. transpositions of one piece) always land on the same side."""
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"held_out must be in [0, 1), got {held_out}")
    names = sorted({p.name for p in pieces})
    order = np.random.default_rng(seed).permutation(len(names))
    n_out = 0 if held_out == 0 else max(1, round(held_out * len(names)))
    if n_out >= len(names):
        raise ValueError(f"held_out={held_out} leaves no training piece out of {len(names)}")
    out_names = {names[i] for i in order[len(names) - n_out:]}
    train = [p for p in pieces if p.name not in out_names]
    test = [p for p in pieces if p.name in out_names]
    return train, test


# ---------------------------------------------------------------------------------------------
# music21 scores -> pieces


def _frame(quarters: float) -> int:
    return round(float(quarters) * FRAMES_PER_QUARTER)


def piece_from_score(score, name: str, stats: dict | None = None) -> Piece:
    """A music21 score -> :class:`Piece`: melody = first part (soprano / tune), chords from the
    harmony *without* the melody, reduced by :func:`reduce_chord`:

    - two or more parts: ``chordify`` of the lower parts only (alto, tenor, bass), so a
      soprano passing tone is not folded into the chord label (the chord must be a property
      of the accompaniment, or note-in-chord of the data is trivially ~100%);
    - one part with chord symbols (``harmony.ChordSymbol``, e.g. ABC ``"Am"`` annotations):
      each symbol's pitch classes (bass = the symbol's bass) from its offset to the next
      symbol; frames before the first symbol have no chord.

    ``ValueError`` naming ``name`` for a one-part score without chord symbols. ``stats``
    (optional) accumulates frame counts per reduction kind ("exact", "subset", "fit")."""
    from music21 import chord as m21chord
    from music21 import harmony
    from music21 import stream as m21stream

    n = max(1, _frame(score.highestTime))
    melody = np.full(n, -1, np.int32)
    melody_on = np.zeros(n, bool)
    part = score.parts[0].stripTies()
    for el in part.flatten().notes:
        if el.quarterLength <= 0 or isinstance(el, harmony.ChordSymbol):
            continue  # grace note / chord symbol (not a sounding melody note)
        pitch = max(p.midi for p in el.pitches) if isinstance(el, m21chord.Chord) else el.pitch.midi
        s = _frame(el.offset)
        e = max(_frame(el.offset + el.quarterLength), s + 1)
        melody[s:e] = fold_pitch(pitch)
        melody_on[s:e] = False
        melody_on[s] = True
    # (start frame, end frame, pitch classes, bass pitch class) of each harmony slice
    slices = []
    if len(score.parts) >= 2:
        lower = m21stream.Score()
        for p in score.parts[1:]:
            lower.insert(0, p)
        for el in lower.chordify().flatten().notes:
            if el.quarterLength <= 0 or not el.pitches:
                continue
            s = _frame(el.offset)
            slices.append((s, max(_frame(el.offset + el.quarterLength), s + 1),
                           [p.pitchClass for p in el.pitches], el.bass().pitchClass))
    else:
        symbols = [cs for cs in score.parts[0].flatten().getElementsByClass(harmony.ChordSymbol)
                   if cs.pitches and not isinstance(cs, harmony.NoChord)]
        if not symbols:
            raise ValueError(f"{name}: one part and no chord symbols: no harmony to learn")
        starts = [_frame(cs.offset) for cs in symbols] + [n]
        for cs, s, e in zip(symbols, starts[:-1], starts[1:]):
            if e > s:
                slices.append((s, e, [p.pitchClass for p in cs.pitches], cs.bass().pitchClass))
    chord = np.full(n, -1, np.int32)
    for s, e, pcs, bass in slices:
        prev = int(chord[s - 1]) if s > 0 else -1
        idx, kind = reduce_chord(pcs, bass, prev)
        chord[s:e] = idx
        if stats is not None:
            stats[kind] = stats.get(kind, 0) + (min(e, n) - min(s, n))
    # onset = change of chord, or first chord after a gap (consecutive equal slices merged)
    chord_on = (chord >= 0) & (np.concatenate([[-2], chord[:-1]]) != chord)
    return Piece(name, melody, melody_on, chord, chord_on)


def piece_from_musicxml(path: str | os.PathLike) -> Piece:
    """Parse a MusicXML (.xml/.musicxml/.mxl) file with music21 (``ValueError`` naming the file
    when it cannot be parsed or has no parts)."""
    from music21 import converter

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such MusicXML file")
    try:
        score = converter.parse(path)
        if not len(score.parts):
            raise ValueError("no parts")
        return piece_from_score(score, Path(path).name)
    except Exception as err:  # music21 raises many types for malformed input
        raise ValueError(f"{path}: not a readable MusicXML score ({type(err).__name__}: "
                         f"{err})") from err


# music21 corpus collections with harmony to learn from. music21 10.5 ships folk tunes in ABC
# (essenFolksong, ryansMammoth, oneills1850, airdsAirs, miscFolk, nottingham-dataset); only the
# nottingham-dataset file carries chord symbols on (nearly) every tune -- the others are
# melodies alone (docs/realchords_results.md lists what was checked).
COLLECTIONS = {"chorales": "bach", "nottingham": "nottingham-dataset"}


def corpus_paths(which: str = "chorales") -> list[Path]:
    """The music21 corpus files of one collection (:data:`COLLECTIONS`): ``"chorales"`` = the
    Bach files under ``corpus/bach`` (4-part pieces are kept at load time); ``"nottingham"`` =
    the ABC files under ``corpus/nottingham-dataset`` (tunes with chord symbols are kept)."""
    from music21 import corpus

    if which not in COLLECTIONS:
        raise ValueError(f"unknown corpus collection {which!r}: one of {sorted(COLLECTIONS)} "
                         "(join several with '+', e.g. 'chorales+nottingham')")
    if which == "chorales":
        return sorted(Path(p) for p in corpus.getComposer("bach"))
    return sorted(Path(p) for p in corpus.getPaths()
                  if Path(p).parent.name == COLLECTIONS[which])


def _scores(path: Path):
    """(name, score) for each score in a corpus file: an ABC opus gives one per tune,
    named ``<dir>/<file>#<tune number>``."""
    from music21 import corpus
    from music21 import stream as m21stream

    parsed = corpus.parse(str(path))
    rel = str(path.relative_to(path.parents[1]))
    if isinstance(parsed, m21stream.Opus):
        return [(f"{rel}#{sc.metadata.number if sc.metadata and sc.metadata.number else i}", sc)
                for i, sc in enumerate(parsed.scores)]
    return [(rel, parsed)]


def cache_dir() -> Path:
    """``$JAXRESEARCH_MUSIC_CACHE`` or ``~/.cache/jaxresearch/music``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxresearch" / "music")


def _cache_key() -> str:
    spec = f"{CACHE_VERSION}|{FRAMES_PER_QUARTER}|{MELODY_LOW}|{MELODY_HIGH}|{CHORDS}"
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def save_pieces(pieces: Sequence[Piece], path: str | os.PathLike, **extra) -> None:
    """Concatenate the pieces into one ``.npz`` (atomic: written to a temp name, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(p) for p in pieces], np.int64)
    cat = (lambda f: np.concatenate([getattr(p, f) for p in pieces])) if pieces else (
        lambda f: np.zeros(0))
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, names=np.array([p.name for p in pieces]), lengths=lengths,
                        melody=cat("melody"), melody_onset=cat("melody_onset"),
                        chord=cat("chord"), chord_onset=cat("chord_onset"),
                        **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)


def load_pieces(path: str | os.PathLike) -> tuple[list[Piece], dict]:
    """Inverse of :func:`save_pieces`: (pieces, the extra arrays)."""
    path = os.fspath(path)
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:
        raise ValueError(f"{path}: not a readable piece cache ({err})") from err
    bounds = np.concatenate([[0], np.cumsum(data["lengths"])])
    pieces = [Piece(str(n), *(data[f][a:b] for f in ("melody", "melody_onset", "chord",
                                                     "chord_onset")))
              for n, a, b in zip(data["names"], bounds[:-1], bounds[1:])]
    extra = {k: v for k, v in data.items() if k not in {"names", "lengths", "melody",
                                                         "melody_onset", "chord", "chord_onset"}}
    return pieces, extra


def load_corpus(which: str = "chorales", *, limit: int | None = None,
                cache: str | os.PathLike | None = None) -> list[Piece]:
    """Pieces of one music21 collection (:data:`COLLECTIONS`; several joined by ``"+"``, e.g.
    ``"chorales+nottingham"``): the 4-part chorales, or the tunes with chord symbols. Parsed
    once and cached to ``<cache dir>/<which>-<n>-<key>.npz`` (key = hash of the
    frame/vocabulary/reduction settings). ``limit`` takes the first ``limit`` corpus files of
    each collection (sorted by path). A cache of the full collection serves any limit. The
    cache also stores the reduction statistics (:func:`corpus_stats` reads them)."""
    return [p for w in _collections(which) for p in _load_corpus(w, limit, cache)[0]]


def corpus_stats(which: str = "chorales", *, limit: int | None = None,
                 cache: str | os.PathLike | None = None) -> dict:
    """Frame counts per chord-reduction kind, skipped scores and the parse time, from the
    corpus cache (summed over the collections of ``which``)."""
    out: dict = {}
    for w in _collections(which):
        for k, v in _load_corpus(w, limit, cache)[1].items():
            out[k] = out.get(k, 0) + v
    return out


def _collections(which: str) -> list[str]:
    names = [w.strip() for w in str(which).split("+")]
    for w in names:
        if w not in COLLECTIONS:
            raise ValueError(f"unknown corpus collection {w!r} in {which!r}: one of "
                             f"{sorted(COLLECTIONS)}, joined by '+'")
    return names


def _load_corpus(which, limit, cache):
    root = Path(cache) if cache is not None else cache_dir()
    paths = corpus_paths(which)
    n = len(paths) if limit is None else min(int(limit), len(paths))
    full = root / f"{which}-all-{_cache_key()}.npz"
    mine = root / f"{which}-{n}-{_cache_key()}.npz"
    for f in (full, mine):
        if f.exists():
            pieces, extra = load_pieces(f)
            if f == full and n < len(paths):
                keep = {str(paths[i].relative_to(paths[i].parents[1])) for i in range(n)}
                pieces = [p for p in pieces if p.name.split("#")[0] in keep]
            return pieces, {k: v.item() for k, v in extra.items()}
    stats = {"exact": 0, "subset": 0, "fit": 0, "files": n, "skipped_not_4_parts": 0,
             "skipped_no_chord_symbols": 0}
    pieces = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    for p in tqdm(paths[:n], desc=f"parsing {which}", unit="file", mininterval=1.0,
                  disable=os.environ.get("TRAINKIT_NO_PROGRESS") == "1"):
        for name, score in _scores(p):
            if which == "chorales" and len(score.parts) != 4:
                stats["skipped_not_4_parts"] += 1
                continue
            if which != "chorales" and (len(score.parts) != 1 or not _has_chord_symbols(score)):
                stats["skipped_no_chord_symbols"] += 1
                continue
            pieces.append(piece_from_score(score, name, stats))
    stats["parse_seconds"] = time.perf_counter() - t0
    save_pieces(pieces, full if n == len(paths) else mine, **stats)
    return pieces, stats


def _has_chord_symbols(score) -> bool:
    from music21 import harmony

    return any(not isinstance(cs, harmony.NoChord)
               for cs in score.recurse().getElementsByClass(harmony.ChordSymbol))


# ---------------------------------------------------------------------------------------------
# MIDI in / out, audio and pictures

MELODY_VELOCITY = 76  # the reference's constants.py: MELODY_VELOCITY = 62 + 14
CHORD_VELOCITY = 50   # CHORD_VELOCITY = 50
CHORD_BASE_PITCH = 48  # chords voiced in root position from C3 upwards


def piece_to_midi(piece: Piece, path: str | os.PathLike | None = None, *, bpm: float = 120.0):
    """Write a two-track MIDI file (``"melody"`` and ``"chords"``, piano) and return the
    ``pretty_midi.PrettyMIDI``. Chords are voiced in root position from ``CHORD_BASE_PITCH``;
    a hold frame with a different pitch/chord than the frame before starts a new note."""
    import pretty_midi

    sec = 60.0 / bpm / FRAMES_PER_QUARTER
    midi = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    mel = pretty_midi.Instrument(program=0, name="melody")
    chd = pretty_midi.Instrument(program=0, name="chords")
    for values, onsets, inst in ((piece.melody, piece.melody_onset, mel),
                                 (piece.chord, piece.chord_onset, chd)):
        t, n = 0, len(values)
        while t < n:
            v = int(values[t])
            if v < 0:
                t += 1
                continue
            e = t + 1
            while e < n and values[e] == v and not onsets[e]:
                e += 1
            if inst is mel:
                pitches, vel = [v], MELODY_VELOCITY
            else:
                root = chord_root(v)
                pitches = [CHORD_BASE_PITCH + root + i for i in QUALITIES[chord_quality(v)]]
                vel = CHORD_VELOCITY
            for p in pitches:
                inst.notes.append(pretty_midi.Note(vel, p, t * sec, e * sec))
            t = e
    midi.instruments += [mel, chd]
    # a marker at the last frame keeps trailing silence through a round trip
    midi.text_events.append(pretty_midi.Text(f"end {len(piece)}", len(piece) * sec))
    if path is not None:
        midi.write(os.fspath(path))
    return midi


def piece_from_midi(path: str | os.PathLike) -> Piece:
    """Read a MIDI file. Melody = the instrument named "melody", else the first non-drum one
    (highest sounding pitch per frame); chords = the instrument named "chords", else all other
    non-drum instruments, reduced per frame by :func:`reduce_chord` (bass = lowest sounding
    note). A chord onset is a frame where a harmony note starts and the chord changes or every
    sounding harmony note starts there. Frames come from ticks (tempo changes respected).
    ``ValueError`` names the file when it is not a readable MIDI file or has no notes."""
    import pretty_midi

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such MIDI file")
    try:
        midi = pretty_midi.PrettyMIDI(path)
    except Exception as err:  # mido/pretty_midi raise OSError, EOFError, KeyError, ...
        raise ValueError(f"{path}: not a readable MIDI file ({type(err).__name__}: "
                         f"{err})") from err
    insts = [i for i in midi.instruments if not i.is_drum and i.notes]
    if not insts:
        raise ValueError(f"{path}: MIDI file has no (non-drum) notes")
    by_name = {i.name.strip().lower(): i for i in insts}
    mel_inst = by_name.get("melody", insts[0])
    harmony = ([by_name["chords"]] if "chords" in by_name
               else [i for i in insts if i is not mel_inst])

    def fr(sec: float) -> int:
        return round(midi.time_to_tick(sec) / midi.resolution * FRAMES_PER_QUARTER)

    spans = lambda inst: [(n.pitch, fr(n.start), max(fr(n.end), fr(n.start) + 1))
                          for n in inst.notes]
    mel_spans = sorted(spans(mel_inst), key=lambda x: x[1])
    harm_spans = [s for inst in harmony for s in spans(inst)]
    n = max(e for _, _, e in mel_spans + harm_spans)
    for m in getattr(midi, "text_events", []):
        if m.text.startswith("end "):
            n = max(n, int(m.text.split()[1]))
    melody = np.full(n, -1, np.int32)
    melody_on = np.zeros(n, bool)
    for p, s, e in mel_spans:
        p = fold_pitch(p)
        for t in range(s, e):
            if p > melody[t] or (t == s and p >= melody[t]):  # skyline; a restrike is an onset
                melody[t], melody_on[t] = p, t == s
    sounding = np.zeros((n, 128), bool)
    starts = np.zeros((n, 128), bool)
    for p, s, e in harm_spans:
        sounding[s:e, p] = True
        starts[s, p] = True
    chord = np.full(n, -1, np.int32)
    chord_on = np.zeros(n, bool)
    for t in range(n):
        notes = np.flatnonzero(sounding[t])
        if notes.size == 0:
            continue
        prev = int(chord[t - 1]) if t > 0 else -1
        chord[t], _ = reduce_chord(notes % 12, int(notes[0]) % 12, prev)
        struck = starts[t, notes]
        chord_on[t] = bool(struck.any() and (chord[t] != prev or struck.all()))
        if prev < 0:
            chord_on[t] = True
    return Piece(Path(path).name, melody, melody_on, chord, chord_on)


def render_wav(piece: Piece, path: str | os.PathLike, *, bpm: float = 120.0,
               sample_rate: int = 22050) -> str:
    """Render to a WAV file and return which synthesis ran: ``"fluidsynth"`` (pretty_midi's
    ``fluidsynth`` with the General MIDI soundfont it ships, TimGM6mb.sf2; needs pyfluidsynth)
    or ``"sine"`` (pretty_midi's ``synthesize``, sine waves). Peak-normalised to 0.9."""
    import soundfile as sf

    midi = piece_to_midi(piece, bpm=bpm)
    try:
        import fluidsynth  # noqa: F401  (pyfluidsynth, which pretty_midi.fluidsynth needs)

        audio, which = midi.fluidsynth(fs=sample_rate), "fluidsynth"
    except (ImportError, OSError, RuntimeError, ValueError):  # no (lib)fluidsynth
        audio, which = midi.synthesize(fs=sample_rate), "sine"
    audio = np.asarray(audio, np.float32)
    if audio.size == 0:
        audio = np.zeros(sample_rate // 10, np.float32)
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = 0.9 * audio / peak
    try:
        sf.write(os.fspath(path), audio, sample_rate, subtype="PCM_16", format="WAV")
    except Exception as err:
        raise ValueError(f"{os.fspath(path)}: cannot write WAV ({err})") from err
    return which


def piano_roll_png(piece: Piece, path: str | os.PathLike, *, title: str | None = None,
                   mark_frame: int | None = None) -> str:
    """A piano roll: melody notes (blue) above the chord tones voiced as in MIDI (orange), chord
    names at chord onsets; ``mark_frame`` draws a vertical line (e.g. a transposition point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    midi = piece_to_midi(piece)
    sec = 60.0 / 120.0 / FRAMES_PER_QUARTER
    fig, ax = plt.subplots(figsize=(min(4 + len(piece) / 16, 24), 4))
    for inst, color in zip(midi.instruments, ("tab:blue", "tab:orange")):
        for note in inst.notes:
            ax.broken_barh([(note.start / sec, (note.end - note.start) / sec)],
                           (note.pitch - 0.4, 0.8), color=color)
    for t in np.flatnonzero(piece.chord_onset):
        ax.text(t, CHORD_BASE_PITCH - 3, CHORDS[piece.chord[t]], fontsize=6, rotation=60)
    if mark_frame is not None:
        ax.axvline(mark_frame, color="k", ls="--", lw=1)
    ax.set_xlabel(f"frame (16th note, {FRAMES_PER_QUARTER} per quarter)")
    ax.set_ylabel("MIDI pitch")
    ax.set_xlim(0, max(len(piece), 1))
    ax.set_title(title or piece.name)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
    return os.fspath(path)
