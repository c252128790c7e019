"""Declarative mapping between HF safetensors keys and NNX parameter paths.

A table is a tuple of :class:`KeyRule` rows ``(hf, nnx, transform)``. ``hf`` and ``nnx`` are
templates whose ``{name}`` fields match a layer index; each template compiles to a regex, so
a row maps both ways: an NNX path to the HF key it is read from (loading) and written to
(saving). ``transform`` says how the tensor changes on the way:

- :data:`SAME`: same shape (norm scales, embeddings).
- :class:`Flatten`: HF stores ``prod(shape)`` values as a vector (q/k/v biases ``[N*H]``,
  ours ``[N, H]``).
- :class:`Linear`: an ``nn.Linear`` weight ``[out, in]`` becomes our kernel ``[in..., out...]``
  (transpose, then split heads): ``n_in`` leading dims of our kernel are input dims.

Parameters that no row matches are a bug (or, for a value head, listed in the model's
``FRESH_PARAMS`` and initialised instead of read).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

import numpy as np


class Transform:
    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def to_nnx(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Same(Transform):
    def hf_shape(self, shape):
        return tuple(shape)

    def to_nnx(self, x, shape):
        return x

    def to_hf(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class Flatten(Transform):
    def hf_shape(self, shape):
        return (math.prod(shape),)

    def to_nnx(self, x, shape):
        return x.reshape(shape)

    def to_hf(self, x):
        return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    """HF ``W [out, in]`` <-> kernel ``[in_dims..., out_dims...]`` with ``n_in`` input dims:
    ``kernel = W^T`` reshaped."""

    n_in: int = 1

    def hf_shape(self, shape):
        return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

    def to_nnx(self, x, shape):
        # A view (transpose, then split/merge axes by strides): the loader copies once, onto
        # the device, instead of holding a transposed host copy as well.
        return x.T.reshape(shape)

    def to_hf(self, x):
        n_in = math.prod(x.shape[:self.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)


SAME = Same()


@functools.lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\d+)")
    return re.compile("".join(out) + r"\Z")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str
    nnx: str
    transform: Transform = SAME

    def nnx_to_hf(self, path: str) -> str | None:
        m = _compile(self.nnx).match(path)
        return self.hf.format(**m.groupdict()) if m else None

    def hf_to_nnx(self, key: str) -> str | None:
        m = _compile(self.hf).match(key)
        return self.nnx.format(**m.groupdict()) if m else None


def find_rule(rules: Sequence[KeyRule], nnx_path: str) -> tuple[KeyRule, str] | None:
    """The first rule whose NNX template matches ``nnx_path``, with the HF key it maps to."""
    for rule in rules:
        key = rule.nnx_to_hf(nnx_path)
        if key is not None:
            return rule, key
    return None


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
