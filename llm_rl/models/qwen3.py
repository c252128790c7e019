"""Qwen3 dense models (``Qwen3ForCausalLM``) in Flax NNX.

The shared pre-norm decoder of :mod:`llm_rl.models.layers` without projection biases (unless
``attention_bias``) and with QK-norm: an RMSNorm over each head's ``H`` features of q and k,
applied before RoPE::

    q_n = RoPE(RMSNorm_q(x W_q)[n]),   k_j = RoPE(RMSNorm_k(x W_k)[j])

Not supported: sliding-window attention (off in every released Qwen3 checkpoint) and YaRN
rope scaling (opt-in for contexts beyond 32k); Qwen3-MoE is a different architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llm_rl.models.keymap import DECODER_KEYS, QK_NORM_KEYS, KeyRule
from llm_rl.models.layers import CausalLM, DecoderConfig, RopeConfig, reject_sliding_window
from trainkit.config import field


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    """Qwen3 architecture (field names as in HF ``config.json``)."""

    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    model_type: ClassVar[str] = "qwen3"

    attention_bias: bool = field(False, help="biases on q, k, v and o (off in Qwen3)")

    @property
    def use_qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def use_o_bias(self) -> bool:
        return self.attention_bias

    @property
    def use_qk_norm(self) -> bool:
        return True

    @classmethod
    def tiny(cls, **overrides: Any) -> "Qwen3Config":
        """A 2-layer model for tests and CPU experiments."""
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope=RopeConfig(theta=1e6), max_position_embeddings=2048,
                  tie_word_embeddings=True)
        return cls(**{**kw, **overrides})

    @classmethod
    def _preset(cls, hidden: int, inter: int, layers: int, heads: int, tie: bool) -> "Qwen3Config":
        return cls(vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                   head_dim=128, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6),
                   max_position_embeddings=40960, tie_word_embeddings=tie,
                   bos_token_id=151643, eos_token_id=(151645,))

    @classmethod
    def qwen3_0_6b(cls) -> "Qwen3Config":
        """Qwen/Qwen3-0.6B."""
        return cls._preset(1024, 3072, 28, 16, tie=True)

    @classmethod
    def qwen3_4b(cls) -> "Qwen3Config":
        """Qwen/Qwen3-4B."""
        return cls._preset(2560, 9728, 36, 32, tie=True)

    @classmethod
    def qwen3_8b(cls) -> "Qwen3Config":
        """Qwen/Qwen3-8B."""
        return cls._preset(4096, 12288, 36, 32, tie=False)

    @classmethod
    def qwen3_14b(cls) -> "Qwen3Config":
        """Qwen/Qwen3-14B."""
        return cls._preset(5120, 17408, 40, 40, tie=False)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "Qwen3Config":
        reject_sliding_window(hf)
        return cls(**cls._common_from_hf(hf), attention_bias=bool(hf.get("attention_bias", False)))

    def to_hf_config(self) -> dict[str, Any]:
        return {**super().to_hf_config(), "attention_bias": self.attention_bias,
                "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": self.num_hidden_layers}


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 LM; see :class:`llm_rl.models.layers.CausalLM` for the call contract."""

    config_class: ClassVar[type] = Qwen3Config


HF_KEYS: tuple[KeyRule, ...] = DECODER_KEYS + QK_NORM_KEYS
