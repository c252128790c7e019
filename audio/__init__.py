"""audio: see ../shared/DESIGN.md (methods land here).

- :mod:`audio.frontend`: WAV/FLAC I/O, polyphase resampling, STFT, mel filterbanks, log-mel.
- :mod:`audio.flam`: FLAM's frame-wise sigmoid loss (direct and chunked), prior loss,
  calibrated score, clip InfoNCE and the total objective.
"""
