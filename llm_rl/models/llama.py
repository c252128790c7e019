"""Llama 3 / 3.1 / 3.2 (``LlamaForCausalLM``) in Flax NNX.

The shared pre-norm decoder of :mod:`llm_rl.models.layers` (GQA, SwiGLU, RMSNorm with
``eps = 1e-5``, no biases unless ``attention_bias`` / ``mlp_bias``) with RoPE
``theta = 500000`` and Llama 3.1's frequency scaling (``rope_type = "llama3"``): with
``L = original_max_position_embeddings`` and wavelength ``lambda_i = 2 pi / inv_freq_i``,
frequencies with ``lambda_i < L / high_freq_factor`` are kept, those with
``lambda_i > L / low_freq_factor`` are divided by ``factor``, and the band between is a linear
blend in ``L / lambda_i`` (formula in :func:`llm_rl.models.layers.rope_frequencies`).

Not supported: ``pretraining_tp > 1`` slicing (a training-time detail that does not change
the function), rope types other than default/linear/llama3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llm_rl.models.keymap import DECODER_KEYS, KeyRule
from llm_rl.models.layers import CausalLM, DecoderConfig, RopeConfig
from trainkit.config import field


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """Llama 3.x architecture (field names as in HF ``config.json``)."""

    architecture: ClassVar[str] = "LlamaForCausalLM"
    model_type: ClassVar[str] = "llama"

    attention_bias: bool = field(False, help="biases on q, k, v and o")
    mlp_bias: bool = field(False, help="biases on gate, up and down")

    @property
    def use_qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def use_o_bias(self) -> bool:
        return self.attention_bias

    @property
    def use_mlp_bias(self) -> bool:
        return self.mlp_bias

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlamaConfig":
        """A 2-layer model for tests and CPU experiments, with llama3 rope scaling whose
        bands fall inside its 16-dim heads."""
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope=RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=64),
                  max_position_embeddings=512)
        return cls(**{**kw, **overrides})

    @classmethod
    def llama3_1_8b(cls) -> "LlamaConfig":
        """meta-llama/Llama-3.1-8B."""
        return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, rms_norm_eps=1e-5,
                   rope=RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192),
                   max_position_embeddings=131072, tie_word_embeddings=False,
                   bos_token_id=128000, eos_token_id=(128001,))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "LlamaConfig":
        return cls(**cls._common_from_hf(hf), attention_bias=bool(hf.get("attention_bias", False)),
                   mlp_bias=bool(hf.get("mlp_bias", False)))

    def to_hf_config(self) -> dict[str, Any]:
        return {**super().to_hf_config(), "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias, "pretraining_tp": 1}


class LlamaForCausalLM(CausalLM):
    """Llama 3.x LM; see :class:`llm_rl.models.layers.CausalLM` for the call contract."""

    config_class: ClassVar[type] = LlamaConfig


HF_KEYS: tuple[KeyRule, ...] = DECODER_KEYS
