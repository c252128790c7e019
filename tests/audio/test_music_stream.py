"""Streaming accompaniment: frame-by-frame chords with a KV cache equal the batch model's
greedy chords for the same melody, and the MIDI demo writes MIDI + WAV + piano roll."""

import jax
import numpy as np
import pytest

pytest.importorskip("music21")

from flax import nnx

from audio.music import (
    data,
    stream,
)
from audio.music import models as M
from tests.audio.test_music_models import synthetic_pieces

F = 12
VOCAB = data.Vocab()
SPACE = M.TokenSpace.from_vocab(VOCAB)
CFG = M.ModelConfig(width=32, num_heads=2, head_dim=16, num_layers=1, mlp_dim=64, max_frames=F)


@pytest.fixture(scope="module")
def model():
    return M.OnlineDecoder(CFG, SPACE, rngs=nnx.Rngs(5))


def test_stream_equals_batch_greedy_chords(model):
    piece = synthetic_pieces(1, F, seed=3)[0]
    melody = VOCAB.melody_token_array(piece.melody, piece.melody_onset)[None]
    batch = M.sample_online(model, melody, jax.random.key(0), greedy=True, allow_eos=False)
    acc = stream.Accompanist(model, VOCAB)
    got = [acc.step_token(int(m)) for m in melody[0]]
    assert got == np.asarray(batch.chords)[0].tolist()
    # the chord of frame t is fixed before melody t arrives: replaying with another last note
    acc.reset()
    other = melody[0].copy()
    other[-1] = VOCAB.melody_token(62 if piece.melody[-1] != 62 else 64, True)
    assert [acc.step_token(int(m)) for m in other] == got
    with pytest.raises(ValueError, match="max_frames"):
        acc.step_token(int(melody[0, 0]))
    # the (pitch, onset) interface decodes the same chords
    played = stream.accompany(model, VOCAB, piece)
    want = VOCAB.decode_chord(np.asarray(got))
    np.testing.assert_array_equal(played.chord, want[0])
    np.testing.assert_array_equal(played.melody, piece.melody)


def test_accompany_midi_writes_midi_wav_and_piano_roll(model, tmp_path):
    piece = synthetic_pieces(1, F, seed=4)[0]
    src = tmp_path / "melody.mid"
    data.piece_to_midi(piece, src)
    out = stream.accompany_midi(model, VOCAB, src, tmp_path / "run")
    for key in ("midi", "wav", "png"):
        assert (tmp_path / "run" / out[key].split("/")[-1]).stat().st_size > 0
    back = data.piece_from_midi(out["midi"])
    assert len(back) >= out["frames"] - 1 and out["synthesis"]
