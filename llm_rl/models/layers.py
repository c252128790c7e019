"""Building blocks shared by the decoder-only LMs (Qwen2/2.5, Qwen3, Llama 3): config base,
RMSNorm, rotary embeddings (with Llama-3 frequency scaling), SwiGLU MLP, grouped-query
attention with a causal + padding mask, the decoder trunk, the LM and the value model. The
domain-neutral layers they are made of (``Dense``, ``Embed``, ``dot_product_attention``) live
in :mod:`trainkit.nn.layers`.

Every parameter carries logical axis names (``nnx.Param(..., out_sharding=(...))``); the
rules table of :mod:`trainkit.sharding` maps them onto the mesh. The labelling is
Megatron-style: q/k/v/gate/up are column-parallel (``("embed", X)``: output features split
over ``model``), o/down row-parallel (``(X, "embed")``: they contract the model-split
features), so no kernel contracts a model-split input over fsdp-split rows, the pattern that
meets the XLA CPU partitioner bug noted in tests/trainkit/test_sharding.py.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``D`` hidden size, ``N`` query heads,
``K`` key/value heads, ``G = N / K`` queries per key/value head, ``H`` head dim, ``F`` MLP width,
``V`` vocabulary.

Dtypes: parameters are stored in ``param_dtype`` (float32 or bfloat16) and the forward pass
computes in that dtype, except: RMSNorm statistics, the attention softmax and the final
logits / values are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainkit.config import Config, ConfigError, field
from trainkit.nn.layers import INIT_STD, Dense, Embed, dot_product_attention, param


# --- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeConfig(Config):
    """Rotary embedding settings (HF ``rope_theta`` + ``rope_scaling`` / ``rope_parameters``)."""

    rope_type: Literal["default", "linear", "llama3"] = field(
        "default", help="default: plain RoPE; linear: positions / factor; llama3: Llama 3.1 scaling")
    theta: float = field(10000.0, gt=0, help="base wavelength (rope_theta)")
    factor: float = field(1.0, ge=1, help="linear / llama3 scaling factor")
    low_freq_factor: float = field(1.0, gt=0, help="llama3: low-frequency cut-off factor")
    high_freq_factor: float = field(4.0, gt=0, help="llama3: high-frequency cut-off factor")
    original_max_position_embeddings: int = field(
        8192, ge=1, help="llama3: context length of pre-training before scaling")

    def validate(self):
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise self.invalid("high_freq_factor", f"must be > low_freq_factor ({self.low_freq_factor})")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RopeConfig":
        """From an HF config dict: transformers-5 ``rope_parameters`` or the older top-level
        ``rope_theta`` with ``rope_scaling`` (``null`` or a dict with ``rope_type``/``type``)."""
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConfigError("rope_parameters", params, "per-layer-type RoPE is not supported")
        rope_type = params.get("rope_type", params.get("type", "default"))
        supported = ("default", "linear", "llama3")
        if rope_type not in supported:
            raise ConfigError("rope_scaling.rope_type", rope_type,
                              f"must be one of {supported} (yarn/dynamic/longrope are not supported)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor", params["partial_rotary_factor"],
                              "must be 1.0 (partial rotary embeddings are not supported)")
        kw: dict[str, Any] = {"rope_type": rope_type,
                              "theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}
        if rope_type in ("linear", "llama3"):
            kw["factor"] = params["factor"]
        if rope_type == "llama3":
            kw["low_freq_factor"] = params["low_freq_factor"]
            kw["high_freq_factor"] = params["high_freq_factor"]
            kw["original_max_position_embeddings"] = params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """Both spellings: ``rope_parameters`` (transformers >= 5) and ``rope_theta`` +
        ``rope_scaling`` (older readers); transformers 5 reads either consistently."""
        scaling = None
        if self.rope_type == "linear":
            scaling = {"rope_type": "linear", "factor": self.factor}
        elif self.rope_type == "llama3":
            scaling = {"rope_type": "llama3", "factor": self.factor,
                       "low_freq_factor": self.low_freq_factor,
                       "high_freq_factor": self.high_freq_factor,
                       "original_max_position_embeddings": self.original_max_position_embeddings}
        params = {"rope_type": self.rope_type, "rope_theta": self.theta, **(scaling or {})}
        return {"rope_theta": self.theta, "rope_scaling": scaling, "rope_parameters": params}


@dataclasses.dataclass(frozen=True)
class DecoderConfig(Config):
    """Architecture of a pre-norm decoder-only transformer with RMSNorm, RoPE, GQA and a
    SwiGLU MLP. Field names follow the HF ``config.json``. Families subclass it, set
    ``architecture``/``model_type`` and the bias / norm switches, and add presets."""

    architecture: ClassVar[str] = ""
    model_type: ClassVar[str] = ""

    vocab_size: int = field(256, ge=1)
    hidden_size: int = field(64, ge=1, help="D, the residual width")
    intermediate_size: int = field(128, ge=1, help="F, the SwiGLU width")
    num_hidden_layers: int = field(2, ge=1)
    num_attention_heads: int = field(4, ge=1, help="N, query heads")
    num_key_value_heads: int = field(2, ge=1, help="K, key/value heads (GQA); N % K == 0")
    head_dim: int = field(16, ge=2, help="H, per-head width (even, for RoPE)")
    rms_norm_eps: float = field(1e-6, gt=0)
    rope: RopeConfig = field(factory=RopeConfig)
    max_position_embeddings: int = field(4096, ge=1, help="recorded for HF; not enforced")
    tie_word_embeddings: bool = field(False, help="logits use the input embedding matrix")
    bos_token_id: int | None = field(None)
    eos_token_id: tuple[int, ...] = field((), help="one or more end-of-sequence ids")
    pad_token_id: int | None = field(None)

    def validate(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise self.invalid("num_key_value_heads",
                               f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise self.invalid("head_dim", "must be even (RoPE rotates pairs)")

    # Family switches (properties, so that they are not HF fields unless a family says so).
    @property
    def use_qkv_bias(self) -> bool:
        return False

    @property
    def use_o_bias(self) -> bool:
        return False

    @property
    def use_mlp_bias(self) -> bool:
        return False

    @property
    def use_qk_norm(self) -> bool:
        return False

    # HF config.json conversion: the shared part; families add their own keys.
    @classmethod
    def _common_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError("hidden_act", act, "must be 'silu' (SwiGLU)")
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        heads = hf["num_attention_heads"]
        return dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=RopeConfig.from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]):
        return cls(**cls._common_from_hf(hf))

    def to_hf_config(self) -> dict[str, Any]:
        eos = list(self.eos_token_id)
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id, "attention_dropout": 0.0,
            "initializer_range": INIT_STD, "use_cache": True,
            **self.rope.to_hf(),
        }


def reject_sliding_window(hf: dict[str, Any]) -> None:
    """Raise for HF configs that switch on sliding-window attention (Qwen2/Qwen3 option)."""
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window", True, "sliding-window attention is not supported")
    other = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
    if other:
        raise ConfigError("layer_types", other, "only 'full_attention' layers are supported")


class RMSNorm(nnx.Module):
    """``y = w * (x / sqrt(mean(x^2, axis=-1) + eps))``.

    The statistics are taken in float32; the normalised ``x`` is cast back to the input dtype
    before the (learned, ones-initialised) scale ``w`` multiplies it, as HF Llama/Qwen do."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any,
                 axes: Sequence[str | None] = ("embed",)):
        self.eps = float(eps)
        self.scale = param(None, "ones", (dim,), param_dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


# --- rotary embeddings ---------------------------------------------------------------------


def rope_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies ``inv_freq[i] = theta^(-2i/H)``, ``i = 0 .. H/2 - 1`` (float32).

    ``linear``: ``inv_freq / factor`` (positions interpolated by ``factor``).

    ``llama3`` (Llama 3.1): with ``L = original_max_position_embeddings`` and wavelength
    ``lambda_i = 2 pi / inv_freq[i]``::

        lambda_i < L / high_freq_factor:  inv_freq[i]                    (high freq: kept)
        lambda_i > L / low_freq_factor:   inv_freq[i] / factor           (low freq: scaled)
        otherwise, with s = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
                                          (1 - s) * inv_freq[i] / factor + s * inv_freq[i]
    """
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
    """Rotate ``x`` [B, T, heads, H] by angle ``p * inv_freq[i]`` at position ``p``.

    "Half" layout (HF/NeoX): feature ``i`` is paired with ``i + H/2``::

        y[..., :H/2] = x1 cos - x2 sin,   y[..., H/2:] = x2 cos + x1 sin,
        x1 = x[..., :H/2], x2 = x[..., H/2:].

    Angles are computed in float32 (``positions`` are integers), cos/sin cast to ``x.dtype``.
    A rotation of each pair: norms are preserved and ``<R_p q, R_s k>`` depends on ``p - s`` only.
    """
    chex.assert_rank(x, 4)
    chex.assert_rank(positions, 2)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --- attention -----------------------------------------------------------------------------


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """``positions = max(cumsum(mask) - 1, 0)``: real tokens are numbered 0, 1, ... from the
    first non-pad token, so a left-padded prompt sees the same positions as unpadded."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_padding_mask(attention_mask: jax.Array, q_len: int, q_offset: int | jax.Array = 0,
                        segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean [B, T, S]: query ``t`` (at slot ``q_offset + t`` of the S key slots) may attend
    key slot ``s`` iff ``s <= q_offset + t`` and ``attention_mask[b, s] == 1`` (and, with
    ``segment_ids``, ``segment_ids[b, q_offset + t] == segment_ids[b, s]``).

    ``attention_mask`` [B, S] marks the real key slots. Without a cache ``q_offset = 0`` and
    ``S = T``; with a KV cache the keys are the cache slots and ``q_offset`` the write index.
    ``segment_ids`` [B, S] (optional) numbers the documents packed into one row (sequence
    packing, :mod:`llm_rl.sft`): a query attends only keys of its own document."""
    chex.assert_rank(attention_mask, 2)
    s = attention_mask.shape[1]
    q_slot = q_offset + jnp.arange(q_len)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]
    mask = causal[None] & (attention_mask[:, None, :] != 0)
    if segment_ids is not None:
        chex.assert_equal_shape([attention_mask, segment_ids])
        q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, q_len, axis=1)
        mask = mask & (q_seg[:, :, None] == segment_ids[:, None, :])
    return mask


class Attention(nnx.Module):
    """Self-attention with RoPE and GQA. Kernels: q ("embed", "heads", "head_dim"),
    k/v ("embed", "kv_heads", "head_dim"), o ("heads", "head_dim", "embed").

    Qwen3 adds per-head RMSNorm on q and k (over H, before RoPE). A KV cache plugs in between
    :meth:`project` (rotated q, k, v of the new tokens) and :meth:`attend` (attention over any
    keys with an explicit mask, then the output projection)."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        d, n, kh, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda i, o, axes, bias: Dense(i, o, axes, use_bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg.use_qkv_bias)
        self.k_proj = dense((d,), (kh, h), ("embed", "kv_heads", "head_dim"), cfg.use_qkv_bias)
        self.v_proj = dense((d,), (kh, h), ("embed", "kv_heads", "head_dim"), cfg.use_qkv_bias)
        self.o_proj = dense((n, h), (d,), ("heads", "head_dim", "embed"), cfg.use_o_bias)
        if cfg.use_qk_norm:
            norm = lambda: RMSNorm(h, eps=cfg.rms_norm_eps, param_dtype=param_dtype, axes=("head_dim",))
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm = self.k_norm = None
        self.head_dim = h
        self.rope = cfg.rope

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries [B, T, N, H] and keys [B, T, K, H], and values [B, T, K, H]."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_frequencies(self.head_dim, self.rope)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        return self.o_proj(dot_product_attention(q, k, v, mask))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self.project(x, positions)
        return self.attend(q, k, v, mask)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, ``silu(z) = z * sigmoid(z)``; gate/up
    ("embed", "mlp"), down ("mlp", "embed")."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.use_mlp_bias
        self.gate_proj = Dense((d,), (f,), ("embed", "mlp"), use_bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = Dense((d,), (f,), ("embed", "mlp"), use_bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = Dense((f,), (d,), ("mlp", "embed"), use_bias=bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm1(x))``, ``y = h + mlp(norm2(h))``."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _inputs(input_ids: jax.Array, attention_mask: jax.Array | None,
            positions: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(input_ids, 2)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    chex.assert_equal_shape([input_ids, attention_mask])
    if positions is None:
        positions = default_positions(attention_mask)
    chex.assert_equal_shape([input_ids, positions])
    return attention_mask, positions


class Decoder(nnx.Module):
    """Embedding, ``num_hidden_layers`` decoder layers and the final RMSNorm."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D] in the parameter dtype. ``segment_ids`` [B, T]
        (optional): packed documents, no attention across them (:func:`causal_padding_mask`)."""
        attention_mask, positions = _inputs(input_ids, attention_mask, positions)
        mask = causal_padding_mask(attention_mask, input_ids.shape[1], segment_ids=segment_ids)
        x = self.embed_tokens(input_ids.astype(jnp.int32))
        for layer in self.layers:
            x = layer(x, positions, mask)
        return self.norm(x)


class CausalLM(nnx.Module):
    """Decoder-only language model: ``model(input_ids [B,T], attention_mask=None [B,T] 0/1,
    positions=None [B,T]) -> float32 logits [B,T,V]``; ``logits[:, t]`` predicts token ``t+1``.

    ``attention_mask`` marks real tokens (1) and padding (0); padded keys are never attended,
    nor, with ``segment_ids`` [B, T], keys of another packed document; the logits at padded
    positions are finite but meaningless. ``positions`` default to ``cumsum(attention_mask) - 1``,
    which makes left-padded prompts behave as unpadded ones. Parameters live in
    ``param_dtype`` and the computation runs in it; logits are float32 (the output projection
    accumulates in float32)."""

    config_class: ClassVar[type] = DecoderConfig

    def __init__(self, cfg: DecoderConfig, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(cfg).__name__}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.model = Decoder(cfg, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense((cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"),
                              use_bias=False, param_dtype=param_dtype, rngs=rngs))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        h = self.model(input_ids, attention_mask, positions, segment_ids)
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h, out_dtype=jnp.float32)


class ValueModel(nnx.Module):
    """Critic: the decoder trunk and a scalar head, ``values = h . w + b`` -> float32 [B, T].

    ``values[:, t]`` is the value of the prefix ``input_ids[:, :t+1]``. The head kernel is
    ("embed", None). Works with any family config (``ValueModel(Qwen3Config.tiny())``);
    :func:`llm_rl.models.from_pretrained` with ``value_head=True`` loads the trunk from an LM
    checkpoint and initialises the head fresh."""

    FRESH_PARAMS: ClassVar[tuple[str, ...]] = ("value_head",)  # not in HF checkpoints

    def __init__(self, cfg: DecoderConfig, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.model = Decoder(cfg, param_dtype=param_dtype, rngs=rngs)
        self.value_head = Dense((cfg.hidden_size,), (1,), ("embed", None), use_bias=True,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        h = self.model(input_ids, attention_mask, positions, segment_ids)
        return self.value_head(h, out_dtype=jnp.float32)[..., 0]
