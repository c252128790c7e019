"""Online accompaniment, one frame at a time (the paper's live setting, Sec. 1 and Fig. 1).

    acc = Accompanist(online_model, vocab)           # greedy; temperature=... to sample
    for pitch, onset in melody_frames:
        chord, chord_onset = acc.step(pitch, onset)  # the chord played WITH this frame

The chord returned for frame t was chosen from the melody of frames < t only (the model
cannot hear the note being played now); the call then feeds ``[c_t, m_t]`` into the KV
cache in one jitted step, so each frame costs one decoder step on two tokens, never a re-
encoding of the past. :func:`accompany_midi` runs it over a MIDI file and writes the
accompaniment as MIDI, WAV and a piano roll into a run directory.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audio.music import models as M


@functools.partial(jax.jit, static_argnums=(0,))
def _prime(graphdef, params):
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1)
    logits, cache = model.decode(jnp.full((1, 1), model.space.bos, jnp.int32), cache, 0)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 6))
def _advance(graphdef, params, logits, cache, melody_token, t, greedy_temperature, key):
    """Choose c_t from the pending logits, feed [c_t, m_t] at positions 2t+1, 2t+2."""
    model = nnx.merge(graphdef, params)
    space = model.space
    allowed = space.chord_slot_allowed()
    allowed[space.eos] = False  # a live accompanist plays until the melody stops
    masked = M.chord_slot_logits(logits, jnp.asarray(allowed))
    if greedy_temperature is None:
        chord = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    else:
        chord = jax.random.categorical(key, masked / greedy_temperature, axis=-1).astype(jnp.int32)
    ids = jnp.stack([chord, melody_token[None]], axis=1)
    out, cache = model.decode(ids, cache, 2 * t + 1)
    return chord[0], out[:, -1], cache


class Accompanist:
    """Streaming chord accompaniment with a KV cache (see the module docstring).

    ``temperature=None`` plays the greedy (argmax) chord, equal to
    ``sample_online(..., greedy=True, allow_eos=False)`` on the whole melody; a float samples.
    A stream holds at most ``model.config.max_frames`` frames; :meth:`reset` starts anew."""

    def __init__(self, model: M.OnlineDecoder, vocab, *, temperature: float | None = None, seed: int = 0):
        self.graphdef, self.params = nnx.split(model)
        self.vocab, self.temperature = vocab, temperature
        self.max_frames = model.config.max_frames
        self._key = jax.random.key(seed)
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self._logits, self._cache = _prime(self.graphdef, self.params)

    def step_token(self, melody_token: int) -> int:
        """The chord token for this frame, given this frame's melody token."""
        if self.t >= self.max_frames:
            raise ValueError(f"stream longer than the model's max_frames={self.max_frames}; "
                             "call reset() to start a new piece")
        key = jax.random.fold_in(self._key, self.t)
        chord, self._logits, self._cache = _advance(
            self.graphdef, self.params, self._logits, self._cache, jnp.int32(melody_token),
            jnp.int32(self.t), self.temperature, key)
        self.t += 1
        return int(chord)

    def step(self, pitch: int, onset: bool) -> tuple[int, bool]:
        """(chord index or -1 for silence, chord onset) for the frame whose melody is
        ``pitch`` (MIDI, -1 silence) with ``onset``."""
        from audio.music import data

        token = self.vocab.melody_token(data.fold_pitch(pitch) if pitch >= 0 else -1, onset)
        return self.vocab.decode_chord(self.step_token(token))


def accompany(model: M.OnlineDecoder, vocab, piece, *, temperature: float | None = None, seed: int = 0):
    """A copy of ``piece`` (first ``max_frames`` frames) with the streamed chords."""
    from audio.music import data

    acc = Accompanist(model, vocab, temperature=temperature, seed=seed)
    n = min(len(piece), acc.max_frames)
    chords = [acc.step(int(piece.melody[t]), bool(piece.melody_onset[t])) for t in range(n)]
    return data.Piece(piece.name, piece.melody[:n], piece.melody_onset[:n],
                      np.asarray([c for c, _ in chords], np.int32), np.asarray([o for _, o in chords], bool))


def accompany_midi(model: M.OnlineDecoder, vocab, midi_path: str | Path, out_dir: str | Path, *,
                   stem: str | None = None, temperature: float | None = None) -> dict:
    """Accompany the melody of ``midi_path`` frame by frame and write ``STEM.mid``,
    ``STEM.wav`` and ``STEM.png`` (piano roll) into ``out_dir``. Returns the paths and which
    synthesis rendered the WAV."""
    from audio.music import data

    piece = data.piece_from_midi(midi_path)
    played = accompany(model, vocab, piece, temperature=temperature)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(midi_path).stem + "_accompanied"
    paths = {"midi": out / f"{stem}.mid", "wav": out / f"{stem}.wav", "png": out / f"{stem}.png"}
    data.piece_to_midi(played, paths["midi"])
    synthesis = data.render_wav(played, paths["wav"])
    data.piano_roll_png(played, paths["png"])
    return {**{k: str(v) for k, v in paths.items()}, "synthesis": synthesis, "frames": len(played)}
