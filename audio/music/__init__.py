"""audio.music: ReaLchords, online chord accompaniment (Wu et al., ICML 2024).

Reference re-implementation by the first author: lukewys/realchords-pytorch (MIT).

- :mod:`audio.music.data`: the music21 Bach chorales as 16th-note frames (melody = soprano,
  chords from chordify reduced to ``CHORDS``), the token vocabulary, interleaving
  ``[BOS, c_0, m_0, ..., EOS]``, transposition, the split by piece, the ``.npz`` cache,
  MIDI/MusicXML in, MIDI/WAV/piano-roll out.
- :mod:`audio.music.metrics`: note-in-chord ratio, onset-interval EMD (x1e3), chord-length
  entropy, per-frame note-in-chord (Table 1 and the adaptation plot of the paper).
- :mod:`audio.music.models`: online decoder, offline encoder-decoder teacher, reward models.
- :mod:`audio.music.rewards`, :mod:`audio.music.rl`: rewards and RL fine-tuning with the
  teacher-KL term.
- :mod:`audio.music.stream`: frame-by-frame accompaniment with a KV cache.
"""
