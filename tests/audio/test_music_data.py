"""audio.music.data: tokens, interleaving, transposition, chord reduction, split, MIDI/WAV."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.music import data as D


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # a handful of real chorales, parsed once for the module (music21 parsing is slow)
    return D.load_corpus("chorales", limit=4, cache=tmp_path_factory.mktemp("music-cache"))


@st.composite
def pieces(draw, max_frames=40):
    n = draw(st.integers(1, max_frames))
    mel = draw(st.lists(st.one_of(st.just(-1), st.integers(D.MELODY_LOW, D.MELODY_HIGH)),
                        min_size=n, max_size=n))
    chd = draw(st.lists(st.integers(-1, len(D.CHORDS) - 1), min_size=n, max_size=n))
    mon = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    con = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mel, chd = np.array(mel), np.array(chd)
    # silence carries no onset (it has one token)
    return D.Piece("random", mel, np.array(mon) & (mel >= 0), chd, np.array(con) & (chd >= 0))


def test_corpus_pieces_are_sane(corpus):
    assert len(corpus) >= 3
    for p in corpus:
        assert p.name.startswith("bach/") and len(p) > 32
        sounding = p.melody[p.melody >= 0]
        assert sounding.min() >= 55 and sounding.max() <= 84  # soprano range
        assert (p.chord >= 0).mean() > 0.9 and p.melody_onset[0] and p.chord_onset[0]


def test_midi_token_round_trip_on_corpus(corpus, tmp_path):
    vocab = D.Vocab()
    for p in corpus:
        path = tmp_path / "piece.mid"
        D.piece_to_midi(p, path)
        back = D.piece_from_midi(path)
        again = D.deinterleave(D.interleave(back, vocab), vocab)
        D.piece_to_midi(again, tmp_path / "again.mid")
        final = D.piece_from_midi(tmp_path / "again.mid")
        assert back.same_frames(p) and again.same_frames(p) and final.same_frames(p), p.name


def test_musicxml_reader_matches_corpus(corpus):
    from music21 import corpus as m21corpus

    p = corpus[0]
    again = D.piece_from_musicxml(m21corpus.getWork(p.name.split("/")[1]))
    assert again.same_frames(p)


@settings(max_examples=60, deadline=None)
@given(pieces())
def test_interleave_deinterleave_inverse(piece):
    vocab = D.Vocab()
    tokens = D.interleave(piece, vocab)
    assert tokens[0] == vocab.BOS and tokens[-1] == vocab.EOS and tokens.size == 2 * len(piece) + 2
    assert vocab.is_chord(tokens[1:-1:2]).all() and vocab.is_melody(tokens[2:-1:2]).all()
    assert D.deinterleave(tokens, vocab).same_frames(piece)
    padded = np.concatenate([tokens, np.full(5, vocab.PAD)])
    assert D.deinterleave(padded, vocab).same_frames(piece)
    # a cut mid-frame (chord without its melody) drops the incomplete frame
    assert D.deinterleave(tokens[:-2], vocab).same_frames(D.crop(piece, 0, len(piece) - 1)) \
        if len(piece) > 1 else True


def test_vocab_layout_is_a_partition():
    vocab = D.Vocab()
    ids = np.arange(vocab.size)
    special = np.isin(ids, [vocab.PAD, vocab.BOS, vocab.EOS])
    assert not (vocab.is_melody(ids) & vocab.is_chord(ids)).any()
    assert (special | vocab.is_melody(ids) | vocab.is_chord(ids)).all()
    assert np.array_equal(np.flatnonzero(vocab.is_melody(ids)), vocab.melody_tokens)
    assert np.array_equal(np.flatnonzero(vocab.is_chord(ids)), vocab.chord_tokens)
    assert vocab.decode_melody(vocab.melody_token(60, True)) == (60, True)
    assert vocab.decode_melody(vocab.melody_token(-1, True)) == (-1, False)
    assert vocab.decode_chord(vocab.chord_token(7, False)) == (7, False)
    with pytest.raises(ValueError, match="outside"):
        vocab.melody_token(D.MELODY_HIGH + 1, True)
    with pytest.raises(ValueError, match="frame 0 expects a chord"):
        D.deinterleave([vocab.BOS, vocab.melody_token(60, True), vocab.chord_silence], vocab)


@settings(max_examples=40, deadline=None)
@given(pieces(), st.integers(-6, 6))
def test_transpose_shifts_pitches_and_roots(piece, s):
    up = D.transpose(piece, s)
    sounding = piece.melody >= 0
    shifted = piece.melody[sounding] + s
    in_range = (shifted >= D.MELODY_LOW) & (shifted <= D.MELODY_HIGH)
    assert np.array_equal(up.melody[sounding][in_range], shifted[in_range])
    assert np.array_equal(up.melody[sounding] % 12, (piece.melody[sounding] + s) % 12)
    has = piece.chord >= 0
    assert np.array_equal([D.chord_root(c) for c in up.chord[has]],
                          [(D.chord_root(c) + s) % 12 for c in piece.chord[has]])
    assert np.array_equal([D.chord_quality(c) for c in up.chord[has]],
                          [D.chord_quality(c) for c in piece.chord[has]])
    assert np.array_equal(up.melody < 0, ~sounding) and np.array_equal(up.chord < 0, ~has)
    if in_range.all():
        assert D.transpose(up, -s).same_frames(piece)


def test_transpose_round_trips_on_corpus(corpus):
    for p in corpus:
        for s in range(-6, 7):
            assert D.transpose(D.transpose(p, s), -s).same_frames(p)


@pytest.mark.parametrize("notes, bass, expected", [
    (["C4", "E4", "G4"], None, "C:maj"),
    (["A3", "C4", "E4", "G4"], None, "A:min7"),
    (["E3", "G3", "C4"], None, "C:maj"),            # first inversion: same chord
    (["G2", "B3", "D4", "F4"], None, "G:7"),
    (["B3", "D4", "F4"], None, "B:dim"),
    (["B3", "D4", "F4", "A4"], None, "B:hdim7"),
    (["F3", "A3", "C4", "E4"], None, "F:maj7"),
    (["C4", "E4", "G4", "F4"], None, "C:maj"),       # passing F: best fit keeps C:maj
    (["C4", "G4"], None, "C:maj"),                   # open fifth: bass root, triads first
    (["D3", "F3", "A-3", "C-4"], None, "D:dim7"),    # symmetric: rooted on the bass
    (["E-3", "G3", "B3"], None, "Eb:aug"),
])
def test_chord_reduction_rule(notes, bass, expected):
    from music21 import chord as m21chord

    c = m21chord.Chord(notes)
    idx, kind = D.reduce_chord([p.pitchClass for p in c.pitches], c.bass().pitchClass)
    assert D.CHORDS[idx] == expected
    assert kind == ("fit" if "F4" in notes and expected == "C:maj" else
                    "subset" if len(notes) == 2 else "exact")


def test_reduction_prefers_previous_chord_on_ties():
    c = D.chord_index("C:maj")
    a = D.chord_index("A:min")
    # {C, E}: a subset of C:maj, A:min (and others); the previous chord breaks the tie
    assert D.reduce_chord([0, 4], bass=0, previous=a)[0] == a
    assert D.reduce_chord([0, 4], bass=0, previous=-1)[0] == c
    assert D.reduce_chord([], bass=None) == (-1, "none")


def test_split_by_piece_is_disjoint(corpus):
    augmented = [D.transpose(p, s) for p in corpus for s in (-2, 0, 3)]
    train, test = D.split_by_piece(augmented, held_out=0.25, seed=0)
    assert train and test and len(train) + len(test) == len(augmented)
    assert not {p.name for p in train} & {p.name for p in test}
    again = D.split_by_piece(augmented, held_out=0.25, seed=0)
    assert [p.name for p in again[1]] == [p.name for p in test]


def test_batch_shapes_and_crop(corpus):
    vocab = D.Vocab()
    tokens, mask = D.batch(corpus, vocab, max_frames=64)
    assert tokens.shape == (len(corpus), 130) and mask.all()
    assert (tokens[:, -1] == vocab.EOS).all()
    short = D.crop(corpus[0], 4, 10)
    tokens, mask = D.batch([short], vocab, max_frames=16)
    assert mask[0].sum() == 22 and (tokens[0, 22:] == vocab.PAD).all()
    crop = D.random_crop(corpus[0], 32, np.random.default_rng(0))
    assert len(crop) == 32


def test_cache_reloads_the_same_pieces(corpus, tmp_path):
    path = tmp_path / "c.npz"
    D.save_pieces(corpus, path, parse_seconds=1.5)
    back, extra = D.load_pieces(path)
    assert [p.name for p in back] == [p.name for p in corpus]
    assert all(a.same_frames(b) for a, b in zip(back, corpus))
    assert float(extra["parse_seconds"]) == 1.5


def test_malformed_files_are_named(tmp_path):
    bad = tmp_path / "broken.mid"
    bad.write_bytes(b"MThd this is not midi")
    with pytest.raises(ValueError, match="broken.mid"):
        D.piece_from_midi(bad)
    xml = tmp_path / "broken.musicxml"
    xml.write_text("<score-partwise><part id='P1'><measure")
    with pytest.raises(ValueError, match="broken.musicxml"):
        D.piece_from_musicxml(xml)


def test_render_wav_and_piano_roll(corpus, tmp_path):
    import soundfile as sf

    piece = D.crop(corpus[0], 0, 32)
    which = D.render_wav(piece, tmp_path / "x.wav", sample_rate=16000)
    assert which in ("fluidsynth", "sine")
    audio, sr = sf.read(tmp_path / "x.wav")
    assert sr == 16000 and audio.shape[0] >= 32 * 0.125 * 16000 * 0.9
    assert 0.5 < np.abs(audio).max() <= 0.91
    png = D.piano_roll_png(piece, tmp_path / "x.png")
    assert os.path.getsize(png) > 1000


def _part(notes):
    """A music21 part of (pitch name or None for a rest, quarter length) pairs."""
    from music21 import note, stream

    part = stream.Part()
    for name, ql in notes:
        part.append(note.Rest(quarterLength=ql) if name is None else note.Note(name, quarterLength=ql))
    return part


def test_chord_label_ignores_the_soprano():
    """A C-major triad in the lower parts under a soprano A (a non-chord tone, then G). The
    label must be C:maj throughout: chordifying the soprano too would name beat 1 A:min7
    (C-E-G-A exactly) and give the data a trivial 100% note-in-chord."""
    from music21 import stream

    from audio.music import metrics

    score = stream.Score()
    for notes in ([("A4", 1), ("G4", 1)], [("E4", 2)], [("G3", 2)], [("C3", 2)]):
        score.insert(0, _part(notes))
    stats = {}
    p = D.piece_from_score(score, "hand", stats)
    assert p.chord_names() == ["C:maj"] * 8 and p.chord_onset.tolist() == [True] + [False] * 7
    assert p.melody.tolist() == [69] * 4 + [67] * 4
    assert stats == {"exact": 8}
    assert metrics.note_in_chord_ratio(p) == 0.5  # A misses C:maj, G hits


def test_one_part_tune_takes_its_chord_symbols():
    from music21 import harmony, stream

    part = _part([("E4", 1), ("C5", 1), ("B4", 1), ("D5", 1)])
    part.insert(0, harmony.ChordSymbol("Am"))
    part.insert(2, harmony.ChordSymbol("G7"))
    score = stream.Score()
    score.insert(0, part)
    p = D.piece_from_score(score, "tune")
    assert p.chord_names() == ["A:min"] * 8 + ["G:7"] * 8
    assert np.flatnonzero(p.chord_onset).tolist() == [0, 8]
    assert p.melody[::4].tolist() == [64, 72, 71, 74]  # chord symbols are not melody notes
    bare = stream.Score()
    bare.insert(0, _part([("E4", 1)]))
    with pytest.raises(ValueError, match="bare.*no chord symbols"):
        D.piece_from_score(bare, "bare")


def test_nottingham_tunes_load_with_their_chord_symbols(tmp_path):
    # music21 10.5 ships one nottingham-dataset file (2 reels, ABC with chord symbols)
    tunes = D.load_corpus("nottingham", cache=tmp_path)
    assert len(tunes) >= 1 and all(t.name.startswith("nottingham-dataset/") for t in tunes)
    first = tunes[0]  # "Cuckoo's Nest": a one-beat pickup, then D (bar 1), Em (bar 2), A (beat 3)
    assert (first.chord[:4] == -1).all()
    assert first.chord_names()[4] == "D:maj" and first.chord_names()[20] == "E:min"
    assert first.chord_names()[28] == "A:maj" and first.chord_onset[[4, 20, 28]].all()
    assert ((first.melody >= 0).mean() > 0.9) and 0.5 < (first.chord >= 0).mean() <= 1
    both = D.load_corpus("chorales+nottingham", limit=1, cache=tmp_path)
    assert [t.name for t in both][-len(tunes):] == [t.name for t in tunes]
    with pytest.raises(ValueError, match="unknown corpus collection 'folk'"):
        D.load_corpus("chorales+folk", cache=tmp_path)
