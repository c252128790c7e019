"""Domain-neutral neural-network building blocks shared by every domain package.

- :mod:`trainkit.nn.layers`: ``Dense`` (logical axes), ``Embed``, ``LayerNorm``,
  ``dot_product_attention`` and the pre-LN ``EncoderBlock`` in Flax NNX.
- :mod:`trainkit.nn.keymap`: declarative HF safetensors key <-> NNX path rules and the
  errors and readers of HF-checkpoint loaders.

Domain models (the LM zoo's decoders in :mod:`llm_rl.models`, the audio and generative
encoders) are built from these; domain packages never import each other's general machinery.
"""
