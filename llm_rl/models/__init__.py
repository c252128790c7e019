"""The LM zoo: Qwen2/Qwen2.5, Qwen3 and Llama 3 decoders in Flax NNX, HF checkpoints.

    from llm_rl.models import from_pretrained, token_logprobs
    model, cfg = from_pretrained("/path/to/Qwen3-0.6B", dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids, attention_mask)             # float32 [B, T, V]
    logp = token_logprobs(model, input_ids, attention_mask)  # [B, T-1]

Build from a preset: ``Qwen3ForCausalLM(Qwen3Config.qwen3_0_6b(), param_dtype=jnp.bfloat16,
rngs=nnx.Rngs(0))``; a critic: ``ValueModel(cfg)`` or ``from_pretrained(..., value_head=True)``.
Import :mod:`trainkit` (this package does) before building models, so that parameters carry
logical axes as metadata instead of being sharded eagerly.
"""

import trainkit  # noqa: F401  (sets flax_always_shard_variable=False)
from llm_rl.models.checkpoint import (FAMILIES, CheckpointError, MissingTensorError,
                                      TensorShapeError, UnknownArchitectureError, from_pretrained,
                                      save_pretrained)
from llm_rl.models.layers import CausalLM, DecoderConfig, RopeConfig, ValueModel
from llm_rl.models.llama import LlamaConfig, LlamaForCausalLM
from llm_rl.models.logprobs import token_logprobs
from llm_rl.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from llm_rl.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "CausalLM", "CheckpointError", "DecoderConfig", "FAMILIES", "LlamaConfig", "LlamaForCausalLM",
    "MissingTensorError", "Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config", "Qwen3ForCausalLM",
    "RopeConfig", "TensorShapeError", "UnknownArchitectureError", "ValueModel", "from_pretrained",
    "save_pretrained", "token_logprobs",
]
