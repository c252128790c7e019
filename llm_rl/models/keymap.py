"""The HF key tables of the decoder-only LMs (Llama, Qwen2, Qwen3), written with the
declarative rules of :mod:`trainkit.nn.keymap`."""

from __future__ import annotations

import re

from trainkit.nn.keymap import Flatten, KeyRule, Linear


# The decoder shared by Llama, Qwen2 and Qwen3. Rows for optional parameters (biases, the
# untied lm_head) only act when the model has them.
_L = "model.layers.{i}"
DECODER_KEYS: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    KeyRule(f"{_L}.input_layernorm.weight", f"{_L}.input_layernorm.scale"),
    KeyRule(f"{_L}.post_attention_layernorm.weight", f"{_L}.post_attention_layernorm.scale"),
    *(KeyRule(f"{_L}.self_attn.{p}_proj.weight", f"{_L}.self_attn.{p}_proj.kernel", Linear(1))
      for p in "qkv"),
    *(KeyRule(f"{_L}.self_attn.{p}_proj.bias", f"{_L}.self_attn.{p}_proj.bias", Flatten())
      for p in "qkv"),
    KeyRule(f"{_L}.self_attn.o_proj.weight", f"{_L}.self_attn.o_proj.kernel", Linear(2)),
    KeyRule(f"{_L}.self_attn.o_proj.bias", f"{_L}.self_attn.o_proj.bias"),
    *(KeyRule(f"{_L}.mlp.{p}_proj.weight", f"{_L}.mlp.{p}_proj.kernel", Linear(1))
      for p in ("gate", "up", "down")),
    *(KeyRule(f"{_L}.mlp.{p}_proj.bias", f"{_L}.mlp.{p}_proj.bias")
      for p in ("gate", "up", "down")),
    KeyRule("model.norm.weight", "model.norm.scale"),
    KeyRule("lm_head.weight", "lm_head.kernel", Linear(1)),
)

# Qwen3: RMSNorm over each head's features of q and k.
QK_NORM_KEYS: tuple[KeyRule, ...] = (
    KeyRule(f"{_L}.self_attn.q_norm.weight", f"{_L}.self_attn.q_norm.scale"),
    KeyRule(f"{_L}.self_attn.k_norm.weight", f"{_L}.self_attn.k_norm.scale"),
)

# Keys HF checkpoints may carry that are derived, not learned (old Llama exports).
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq\Z")
