"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``) in Flax NNX.

The shared pre-norm decoder of :mod:`llm_rl.models.layers` with biases on the q, k and v
projections (none on o or the MLP), RoPE with ``theta = 1e6`` and GQA::

    h_0 = E[ids]
    a_l = h_l + o(Attn(RoPE(q(n1(h_l)) + b_q), RoPE(k(n1(h_l)) + b_k), v(n1(h_l)) + b_v))
    h_{l+1} = a_l + down(silu(gate(n2(a_l))) * up(n2(a_l)))
    logits = norm(h_L) W_out      (W_out = E^T when tie_word_embeddings)

Not supported: sliding-window attention (``use_sliding_window: true``; every released
Qwen2.5 checkpoint ships it switched off) and YaRN rope scaling (opt-in for >32k contexts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llm_rl.models.keymap import DECODER_KEYS, KeyRule
from llm_rl.models.layers import CausalLM, DecoderConfig, RopeConfig, reject_sliding_window


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    """Qwen2/Qwen2.5 architecture (field names as in HF ``config.json``)."""

    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    model_type: ClassVar[str] = "qwen2"

    @property
    def use_qkv_bias(self) -> bool:
        return True

    @classmethod
    def tiny(cls, **overrides: Any) -> "Qwen2Config":
        """A 2-layer model for tests and CPU experiments."""
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope=RopeConfig(theta=1e6), max_position_embeddings=2048)
        return cls(**{**kw, **overrides})

    @classmethod
    def qwen2_5_0_5b(cls) -> "Qwen2Config":
        """Qwen/Qwen2.5-0.5B."""
        return cls(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                   num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                   head_dim=64, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6),
                   max_position_embeddings=32768, tie_word_embeddings=True,
                   bos_token_id=151643, eos_token_id=(151643,))

    @classmethod
    def qwen2_5_7b(cls) -> "Qwen2Config":
        """Qwen/Qwen2.5-7B."""
        return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   head_dim=128, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6),
                   max_position_embeddings=131072, tie_word_embeddings=False,
                   bos_token_id=151643, eos_token_id=(151643,))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "Qwen2Config":
        reject_sliding_window(hf)
        return cls(**cls._common_from_hf(hf))

    def to_hf_config(self) -> dict[str, Any]:
        return {**super().to_hf_config(), "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": self.num_hidden_layers}


class Qwen2ForCausalLM(CausalLM):
    """Qwen2/Qwen2.5 LM; see :class:`llm_rl.models.layers.CausalLM` for the call contract."""

    config_class: ClassVar[type] = Qwen2Config


HF_KEYS: tuple[KeyRule, ...] = DECODER_KEYS
