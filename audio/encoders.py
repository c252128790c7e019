"""FLAM encoders: log-mel audio encoder, small text encoder, projections, per-text heads.

FLAM (Wu et al., ICML 2025, arXiv 2505.05335) embeds each audio frame and each text in one
space and scores them with ``h = alpha(y) <e_l(x), e(y)> + beta(y)`` (losses in
:mod:`audio.flam`). This module holds the networks; what we follow from the official code
(github.com/adobe-research/openflam, ``module/model.py``: ``CLAP``/``FLAM``):

* **Audio branch -> frames, clip.** The official branch is HTSAT; its fine-grained output
  (32 frames per 10 s clip) is the frame sequence, and the *global* (clip) feature is the mean
  of those frame features over time, before the projection
  (``encode_local_and_global_audio``: ``global = local.mean(dim=1)``). We keep that rule, hence
  mean pooling rather than attention pooling: the clip embedding is then a function of the
  frame features only, so the clip-level InfoNCE trains the very features the frame loss
  scores (an attention pool would add a path that can ignore frames), and a padded clip is
  handled exactly by a masked mean. Our audio encoder is a conv stem + pre-LN transformer
  (:class:`AudioEncoder`), not HTSAT: at ``paper()`` scale it has HTSAT's output width (768),
  its frame rate (1024 input frames -> 32) and a comparable size (29.3M; HTS-AT reports
  about 35% of AST's 87M, i.e. ~30M).
* **Projections** (``audio_projection``, ``text_projection``): ``Linear -> ReLU -> Linear``
  to the joint width (512), then L2 normalisation; the *same* audio projection maps frames
  and the clip feature. :class:`Projection` (``kind="mlp"``), or a single linear map.
* **Per-text heads** (``fc_per_text_logit_scale`` / ``_bias``): each ``Linear(E, E) -> GELU
  -> Linear(E, 1)`` on the *text branch output* (before the text projection),
  ``alpha = exp(a(y))``, ``beta = b(y)``, the last bias offset by ``log 10`` and ``-8``.
  Official: PyTorch's default init for the last layer, then the offset added to its bias, so
  alpha and beta start near 10 and -8 with a small input-dependent spread. Ours
  (:class:`AlphaBetaHeads`): the last kernel starts at zero, so ``alpha = 10`` and
  ``beta = -8`` exactly at init for every input; the kernel receives gradient from the first
  step (the hidden layer from the second), as in zero-initialised residual branches.
* **Global logit scale** ``logit_scale`` (init ``log(1 / 0.07)``, learnable, no clamp): the
  clip InfoNCE temperature is ``exp(-logit_scale)``. The frame logits use no global scale
  (the official ``aed_logit_scale`` is frozen at ``exp(0) = 1``).
* **Text branch**: the official model fine-tunes RoBERTa-base (pooler output). Here one of:
  ``"scratch"``, a small transformer trained from scratch on word ids (:class:`TextEncoder`,
  :class:`WordVocab`; for CPU experiments); ``"minilm"``, a trainable
  :class:`audio.minilm.MiniLM` (sentence embedding: mean pool + L2 norm); ``"embeddings"``,
  precomputed text-branch vectors (e.g. frozen MiniLM, :func:`audio.minilm.encode_texts`).

Conv stem arithmetic: stage ``i`` convolves over (time, mel) with stride ``(s_i, m_i)``,
kernel ``max(3, 2 s - 1)`` per axis and padding ``((k - 1) // 2, k - 1 - (k - 1) // 2)``, so
an axis of ``n`` becomes ``ceil(n / s)``; the frame count is
``L = ceil(T / prod(s_i))`` (``= T / downsample`` when it divides). With a frame mask
(valid frames a prefix), every stage zeroes its input at padded positions and the output
frame ``j`` is valid iff input frame ``j s`` is (``ceil(n / s)`` valid of ``n``); padded
keys are masked in attention; so the valid outputs of a padded clip equal those of the
unpadded clip for any valid length, whatever the padding holds.

Parameter counts (computed by :func:`preset_param_counts`; tests/audio/test_encoders.py
checks this table against it):

    preset    AudioEncoder  text encoder     FlamModel  FlamModel less text encoder
    tiny            11,984        11,168        29,555       18,387
    cpu            882,528       528,896     1,510,755      981,859
    paper       29,283,648    22,565,376    53,261,635   30,696,259

(``paper``: the text encoder is the MiniLM-L6 of ``text_source="minilm"``.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from typing import Any, Iterable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import trainkit  # noqa: F401  (parameters keep logical axes as metadata)
from audio import flam
from audio.minilm import MiniLM, MiniLMConfig, l2_normalize
from trainkit.nn.layers import Dense, Embed, EncoderBlock, LayerNorm
from trainkit.config import Config, field

__all__ = [
    "AlphaBetaHeads", "AudioEncoder", "AudioEncoderConfig", "FlamConfig", "FlamModel",
    "FlamOutputs", "Projection", "TextEncoder", "TextEncoderConfig",
    "WordVocab", "count_params", "masked_mean", "output_frames", "preset_param_counts",
    "sinusoidal_positions",
]

# --- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig(Config):
    """Conv stem over (time, mel) + pre-LN transformer on log-mel frames.

    Presets: :meth:`tiny` (tests), :meth:`cpu` (laptop training), :meth:`paper`
    (HTSAT-sized stand-in)."""

    n_mels: int = field(64, ge=1, help="mel bands of the input (FrontendConfig.n_mels)")
    stem_channels: tuple[int, ...] = field((32, 64), help="output channels of each conv stage")
    time_strides: tuple[int, ...] = field((2, 2), help="time stride of each conv stage")
    mel_strides: tuple[int, ...] = field((2, 2), help="mel stride of each conv stage")
    width: int = field(128, ge=2, help="D, transformer width (even: sinusoidal positions)")
    depth: int = field(2, ge=0, help="transformer blocks")
    num_heads: int = field(4, ge=1, help="attention heads; must divide width")
    mlp_dim: int = field(512, ge=1, help="MLP hidden width")
    norm_eps: float = field(1e-6, gt=0, help="LayerNorm epsilon")

    def validate(self) -> None:
        n = len(self.stem_channels)
        if n == 0:
            raise self.invalid("stem_channels", "must name at least one conv stage")
        if any(c < 1 for c in self.stem_channels):
            raise self.invalid("stem_channels", "every stage needs >= 1 channel")
        for name in ("time_strides", "mel_strides"):
            value = getattr(self, name)
            if len(value) != n:
                raise self.invalid(name, f"must have one stride per conv stage ({n})")
            if any(s < 1 for s in value):
                raise self.invalid(name, "strides must be >= 1")
        if self.width % self.num_heads:
            raise self.invalid("num_heads", f"must divide width ({self.width})")
        if self.width % 2:
            raise self.invalid("width", "must be even (sinusoidal positions pair sin/cos)")

    @property
    def downsample(self) -> int:
        """Time downsampling factor ``prod(time_strides)``."""
        return math.prod(self.time_strides)

    @property
    def stem_mels(self) -> int:
        """Mel bins left after the stem: ``n_mels`` through ``ceil(. / m_i)`` per stage."""
        return output_frames(self.n_mels, self.mel_strides)

    @classmethod
    def tiny(cls) -> "AudioEncoderConfig":
        """16 mels (``FrontendConfig.tiny``), 2 stages (x4 in time), width 32, 1 block."""
        return cls(n_mels=16, stem_channels=(8, 16), time_strides=(2, 2), mel_strides=(2, 2),
                   width=32, depth=1, num_heads=2, mlp_dim=64)

    @classmethod
    def cpu(cls) -> "AudioEncoderConfig":
        """64 mels (``FrontendConfig.sed_16k``, 100 frames/s), 3 stages (x8: 12.5 frames/s),
        width 128, 4 blocks of 4 heads: trains on a laptop CPU."""
        return cls(n_mels=64, stem_channels=(16, 32, 64), time_strides=(2, 2, 2),
                   mel_strides=(2, 2, 2), width=128, depth=4, num_heads=4, mlp_dim=512)

    @classmethod
    def paper(cls) -> "AudioEncoderConfig":
        """64 mels at 100 frames/s (``FrontendConfig.flam``), 5 stages (x32: 1024 frames ->
        32, HTSAT's fine-grained rate), width 768 (HTSAT's ``audio_embed_dim``), 4 blocks of
        12 heads, MLP 3072: about HTSAT-tiny's size."""
        return cls(n_mels=64, stem_channels=(32, 64, 128, 128, 256),
                   time_strides=(2, 2, 2, 2, 2), mel_strides=(2, 2, 2, 2, 2), width=768,
                   depth=4, num_heads=12, mlp_dim=3072)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(Config):
    """Small pre-LN transformer over word ids, trained from scratch. Presets :meth:`tiny`,
    :meth:`cpu`."""

    vocab_size: int = field(1000, ge=3, help="vocabulary incl. [PAD]=0 and [UNK]=1 (WordVocab)")
    max_length: int = field(32, ge=1, help="longest token sequence (learned positions)")
    width: int = field(128, ge=1, help="D")
    depth: int = field(2, ge=0, help="transformer blocks")
    num_heads: int = field(4, ge=1, help="attention heads; must divide width")
    mlp_dim: int = field(512, ge=1, help="MLP hidden width")
    norm_eps: float = field(1e-6, gt=0)

    def validate(self) -> None:
        if self.width % self.num_heads:
            raise self.invalid("num_heads", f"must divide width ({self.width})")

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        return cls(vocab_size=64, max_length=16, width=32, depth=1, num_heads=2, mlp_dim=64)

    @classmethod
    def cpu(cls) -> "TextEncoderConfig":
        return cls(vocab_size=1000, max_length=32, width=128, depth=2, num_heads=4, mlp_dim=512)


TEXT_SOURCES = ("scratch", "minilm", "embeddings")


@dataclasses.dataclass(frozen=True)
class FlamConfig(Config):
    """A FLAM model: audio encoder, text branch, projections, per-text heads.

    Presets: :meth:`tiny`, :meth:`cpu` (text from scratch), :meth:`paper` (trainable
    MiniLM text branch, joint width 512)."""

    audio: AudioEncoderConfig = field(factory=AudioEncoderConfig)
    text: TextEncoderConfig = field(factory=TextEncoderConfig, help="used when text_source=scratch")
    text_source: str = field("scratch", choices=TEXT_SOURCES,
                             help="scratch: TextEncoder on word ids; minilm: a trainable MiniLM "
                                  "passed to FlamModel; embeddings: precomputed text vectors")
    text_embed_dim: int = field(384, ge=1, help="text branch width for minilm / embeddings")
    joint_dim: int = field(128, ge=1, help="shared embedding width (official 512)")
    projection: str = field("mlp", choices=("mlp", "linear"),
                            help="mlp: Linear-ReLU-Linear (official); linear: one Linear")
    head_hidden: int = field(0, ge=0, help="alpha/beta MLP hidden width; 0: the text branch width")
    alpha_init: float = field(flam.ALPHA_INIT, gt=0, help="alpha at init (exp of the bias)")
    beta_init: float = field(flam.BETA_INIT, help="beta at init")
    logit_scale_init: float = field(flam.CLIP_LOGIT_SCALE_INIT,
                                    help="clip InfoNCE log inverse temperature at init")

    @property
    def text_dim(self) -> int:
        """Width of the text branch output (input of text projection and heads)."""
        return self.text.width if self.text_source == "scratch" else self.text_embed_dim

    @classmethod
    def tiny(cls) -> "FlamConfig":
        return cls(audio=AudioEncoderConfig.tiny(), text=TextEncoderConfig.tiny(), joint_dim=32)

    @classmethod
    def cpu(cls) -> "FlamConfig":
        return cls(audio=AudioEncoderConfig.cpu(), text=TextEncoderConfig.cpu(), joint_dim=128)

    @classmethod
    def paper(cls) -> "FlamConfig":
        return cls(audio=AudioEncoderConfig.paper(), text_source="minilm",
                   text_embed_dim=MiniLMConfig.all_minilm_l6_v2().hidden_size, joint_dim=512)


# --- pure functions ------------------------------------------------------------------------


def output_frames(n: int, strides: Sequence[int]) -> int:
    """Length of an axis of ``n`` after strided stages: ``n -> ceil(n / s)`` per stage
    (``= ceil(n / prod(strides))``)."""
    for s in strides:
        n = -(-int(n) // int(s))
    return n


def _kernel(stride: int) -> int:
    return max(3, 2 * int(stride) - 1)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """Transformer positions (Vaswani et al. 2017, Sec. 3.5): ``P[p, 2i] = sin(p w_i)``,
    ``P[p, 2i+1] = cos(p w_i)``, ``w_i = 10000^(-2i / dim)``. ``[length, dim]`` float32."""
    if dim % 2:
        raise ValueError(f"dim={dim}: must be even")
    p = np.arange(length, dtype=np.float64)[:, None]
    w = 10000.0 ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    out = np.zeros((length, dim))
    out[:, 0::2] = np.sin(p * w)
    out[:, 1::2] = np.cos(p * w)
    return out.astype(np.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_l m[b,l] x[b,l] / max(sum_l m[b,l], 1)``: ``x [B, L, D]``, ``mask [B, L]`` ->
    ``[B, D]`` in ``x.dtype`` (float32 accumulation); an all-masked row gives 0."""
    chex.assert_rank([x, mask], [3, 2])
    chex.assert_equal_shape_prefix([x, mask], 2)
    m = mask.astype(jnp.float32)
    total = jnp.einsum("bld,bl->bd", x.astype(jnp.float32), m)
    return (total / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)).astype(x.dtype)


def downsample_mask(mask: jax.Array, stride: int, length: int) -> jax.Array:
    """Frame mask after a stage of stride ``s``: output ``j`` is valid iff input ``j s`` is
    (a valid prefix of ``n`` frames becomes one of ``ceil(n / s)``). ``[B, T] -> [B, length]``."""
    return mask[:, ::stride][:, :length]


# --- layers --------------------------------------------------------------------------------


def _conv_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """LeCun normal ``N(0, 1 / fan_in)``, ``fan_in = k_t k_m c_in``, untruncated. Sampled as a
    vector and reshaped: the same distribution as Flax's default up to truncation, but XLA on
    CPU compiles a 4-D ``random.normal`` (and the truncated sampler) in seconds per shape
    against ~0.2 s for a vector."""
    fan_in = math.prod(shape[:-1])
    flat = jax.random.normal(key, (math.prod(shape),), dtype)
    return (flat * (1.0 / math.sqrt(fan_in))).astype(dtype).reshape(shape)


class ConvStage(nnx.Module):
    """``GELU(LN_channels(Conv2d(x)))`` over (time, mel) with stride ``(s_t, s_m)``, kernel
    ``max(3, 2 s - 1)`` per axis and padding that maps a length ``n`` to ``ceil(n / s)``.
    LayerNorm over channels only (per position), so no statistic crosses frames."""

    def __init__(self, c_in: int, c_out: int, time_stride: int, mel_stride: int, *, eps: float,
                 param_dtype: Any, rngs: nnx.Rngs):
        kt, km = _kernel(time_stride), _kernel(mel_stride)
        pad = lambda k: ((k - 1) // 2, k - 1 - (k - 1) // 2)
        self.conv = nnx.Conv(c_in, c_out, kernel_size=(kt, km), strides=(time_stride, mel_stride),
                             padding=(pad(kt), pad(km)), param_dtype=param_dtype, rngs=rngs,
                             kernel_init=_conv_init)
        self.norm = LayerNorm(c_out, eps=eps, param_dtype=param_dtype, axes=(None,))
        self.time_stride = int(time_stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.norm(self.conv(x)), approximate=False)


class AudioEncoder(nnx.Module):
    """Log-mel frames -> frame features and a clip feature.

    ``encoder(mel [B, T, n_mels], frame_mask [B, T] bool = None)`` returns
    ``(frames [B, L, D], clip [B, D], mask [B, L])`` with ``L = ceil(T / downsample)``:
    conv stem (``x[..., None]``, stages of :class:`ConvStage`, padded frames zeroed before
    each stage), flatten (mel x channels) -> Linear to D, plus sinusoidal positions,
    ``depth`` pre-LN :class:`~trainkit.nn.layers.EncoderBlock` s with padded keys masked,
    final LayerNorm; padded output frames are set to 0; ``clip`` is the masked mean over valid
    frames (the official FLAM global feature; see the module docstring). The valid frames must
    be a prefix."""

    def __init__(self, cfg: AudioEncoderConfig, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        chans = (1,) + tuple(cfg.stem_channels)
        self.stem = nnx.List([
            ConvStage(chans[i], chans[i + 1], cfg.time_strides[i], cfg.mel_strides[i],
                      eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
            for i in range(len(cfg.stem_channels))])
        self.stem_out = Dense((cfg.stem_mels * cfg.stem_channels[-1],), (cfg.width,),
                              (None, "embed"), use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            EncoderBlock(cfg.width, cfg.num_heads, cfg.mlp_dim, eps=cfg.norm_eps,
                             param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, eps=cfg.norm_eps, param_dtype=param_dtype)

    def output_frames(self, n_frames: int) -> int:
        """``L`` for an input of ``n_frames`` frames."""
        return output_frames(n_frames, self.config.time_strides)

    def __call__(self, mel: jax.Array, frame_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        chex.assert_rank(mel, 3)
        b, t, m = mel.shape
        if m != cfg.n_mels:
            raise ValueError(f"mel: {m} mel bands, the encoder expects n_mels={cfg.n_mels}")
        if frame_mask is None:
            frame_mask = jnp.ones((b, t), bool)
        chex.assert_shape(frame_mask, (b, t))
        mask = frame_mask.astype(bool)
        dtype = self.stem_out.kernel[...].dtype
        x = mel.astype(dtype)[..., None]  # [B, T, M, 1]
        for stage in self.stem:
            x = jnp.where(mask[:, :, None, None], x, 0)
            x = stage(x)
            mask = downsample_mask(mask, stage.time_stride, x.shape[1])
        l_ = x.shape[1]
        x = self.stem_out(x.reshape(b, l_, -1))
        x = x + jnp.asarray(sinusoidal_positions(l_, cfg.width), x.dtype)[None]
        attn_mask = jnp.broadcast_to(mask[:, None, :], (b, l_, l_))
        for block in self.blocks:
            x = block(x, attn_mask)
        x = jnp.where(mask[:, :, None], self.norm(x), 0)
        return x, masked_mean(x, mask), mask


class TextEncoder(nnx.Module):
    """Word-id transformer trained from scratch: ``encoder(ids [K, S], mask [K, S]) -> [K, D]``.

    Token + learned position embeddings, ``depth`` pre-LN
    :class:`~trainkit.nn.layers.EncoderBlock` s (padded keys masked), final LayerNorm, masked
    mean over the real tokens (float32 pooled output)."""

    def __init__(self, cfg: TextEncoderConfig, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.tokens = Embed(cfg.vocab_size, cfg.width, param_dtype=param_dtype, rngs=rngs)
        self.positions = Embed(cfg.max_length, cfg.width, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            EncoderBlock(cfg.width, cfg.num_heads, cfg.mlp_dim, eps=cfg.norm_eps,
                             param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, eps=cfg.norm_eps, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(ids, 2)
        k, s = ids.shape
        if s > self.config.max_length:
            raise ValueError(f"ids: length {s} exceeds max_length={self.config.max_length}")
        mask = jnp.ones((k, s), bool) if mask is None else mask.astype(bool)
        chex.assert_shape(mask, (k, s))
        ids = jnp.where(mask, ids.astype(jnp.int32), 0)
        x = self.tokens(ids) + self.positions(jnp.arange(s))[None]
        attn_mask = jnp.broadcast_to(mask[:, None, :], (k, s, s))
        for block in self.blocks:
            x = block(x, attn_mask)
        return masked_mean(self.norm(x).astype(jnp.float32), mask)

    embed = __call__


class Projection(nnx.Module):
    """To the joint space, L2-normalised: ``mlp``: ``W_2 ReLU(W_1 x + b_1) + b_2`` (the
    official ``audio_projection`` / ``text_projection``); ``linear``: ``W x + b``. Any leading
    axes; float32 unit vectors out."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", *,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if kind not in ("mlp", "linear"):
            raise ValueError(f"kind={kind!r}: must be 'mlp' or 'linear'")
        self.kind = kind
        self.fc1 = Dense((in_dim,), (out_dim,), (None, "embed"), use_bias=True,
                         param_dtype=param_dtype, rngs=rngs)
        self.fc2 = (Dense((out_dim,), (out_dim,), ("embed", None), use_bias=True,
                          param_dtype=param_dtype, rngs=rngs) if kind == "mlp" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fc1(x)
        if self.fc2 is not None:
            y = self.fc2(jax.nn.relu(y))
        return l2_normalize(y)


class _Head(nnx.Module):
    """``W_2 GELU(W_1 x + b_1) + b_2`` to a scalar, ``W_2`` zero-initialised, ``b_2 = init``."""

    def __init__(self, in_dim: int, hidden: int, init: float, *, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.fc1 = Dense((in_dim,), (hidden,), (None, None), use_bias=True,
                         param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense((hidden,), (1,), (None, None), use_bias=True, param_dtype=param_dtype,
                         rngs=rngs)
        self.fc2.kernel = nnx.Param(jnp.zeros((hidden, 1), param_dtype), out_sharding=(None, None))
        self.fc2.bias = nnx.Param(jnp.full((1,), init, param_dtype), out_sharding=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.fc2(h, out_dtype=jnp.float32)[..., 0].astype(jnp.float32)


class AlphaBetaHeads(nnx.Module):
    """Per-text logit scale and bias (paper Sec. 3; official ``fc_per_text_logit_scale`` /
    ``fc_per_text_logit_bias``): ``alpha(y) = exp(a(y))``, ``beta(y) = b(y)`` with ``a``, ``b``
    two-layer GELU MLPs on the text branch output. At init ``alpha = alpha_init`` and
    ``beta = beta_init`` exactly, for any input (zero last kernel; see the module docstring).

    ``heads(text [K, E]) -> (alpha [K], beta [K])`` float32."""

    def __init__(self, in_dim: int, hidden: int = 0, *, alpha_init: float = flam.ALPHA_INIT,
                 beta_init: float = flam.BETA_INIT, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if alpha_init <= 0:
            raise ValueError(f"alpha_init={alpha_init}: must be > 0 (alpha = exp(.))")
        hidden = hidden or in_dim
        self.scale = _Head(in_dim, hidden, math.log(alpha_init), param_dtype=param_dtype,
                           rngs=rngs)
        self.bias = _Head(in_dim, hidden, beta_init, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(text, 2)
        return jnp.exp(self.scale(text)), self.bias(text)


# --- FLAM model ----------------------------------------------------------------------------


class FlamOutputs(NamedTuple):
    """What :func:`audio.flam.total_loss` takes, apart from labels and the text mask.

    ``frames [B, L, J]``, ``text [K, J]`` (unit norm), ``alpha``, ``beta [K]``,
    ``audio_emb [B, J]``, ``text_emb [B, J]`` (clip/caption pairs, unit norm), ``temperature``
    (scalar, ``exp(-logit_scale)``), ``frame_mask [B, L]`` bool."""

    frames: jax.Array
    text: jax.Array
    alpha: jax.Array
    beta: jax.Array
    audio_emb: jax.Array
    text_emb: jax.Array
    temperature: jax.Array
    frame_mask: jax.Array

    def total_loss(self, labels: jax.Array, text_mask: jax.Array | None = None,
                   **kwargs) -> flam.FlamLosses:
        """:func:`audio.flam.total_loss` on these outputs (``labels [B, K, L]``; keyword
        arguments ``sed_weight``, ``chunk``, ``chunk_axis`` pass through)."""
        return flam.total_loss(self.frames, self.text, self.alpha, self.beta, labels,
                               self.audio_emb, self.text_emb, self.temperature,
                               self.frame_mask, text_mask, **kwargs)


TextInput = Any  # (ids [K, S], mask [K, S]) for scratch / minilm; [K, E] array for embeddings


class FlamModel(nnx.Module):
    """FLAM: audio encoder + text branch + projections + per-text heads + logit scale.

    ``model(mel, texts, captions, frame_mask=None) -> FlamOutputs``: ``mel [B, T, n_mels]``;
    ``texts`` the K frame-level (SED) texts and ``captions`` the B clip captions paired with
    the clips (the clip InfoNCE), each given as the text branch expects: a tuple
    ``(ids [N, S], mask [N, S])`` for ``text_source`` ``"scratch"`` (word ids,
    :class:`WordVocab`) and ``"minilm"`` (WordPiece ids, :func:`audio.minilm.tokenize`), or an
    array ``[N, text_embed_dim]`` for ``"embeddings"``.

    ``text_encoder``: for ``text_source="minilm"`` the (loaded) :class:`audio.minilm.MiniLM`
    to fine-tune, e.g. ``load_minilm()[0]``; ignored otherwise. For a frozen MiniLM,
    precompute :func:`audio.minilm.encode_texts` and use ``"embeddings"``."""

    def __init__(self, cfg: FlamConfig, *, text_encoder: MiniLM | None = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        if cfg.text_source == "minilm":
            if not isinstance(text_encoder, MiniLM):
                raise ValueError("text_encoder: text_source='minilm' needs the MiniLM to train, "
                                 "e.g. FlamModel(cfg, text_encoder=load_minilm()[0])")
            if text_encoder.config.hidden_size != cfg.text_embed_dim:
                raise ValueError(f"text_encoder: hidden size {text_encoder.config.hidden_size} "
                                 f"!= text_embed_dim {cfg.text_embed_dim}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.audio_encoder = AudioEncoder(cfg.audio, param_dtype=param_dtype, rngs=rngs)
        if cfg.text_source == "scratch":
            self.text_encoder = TextEncoder(cfg.text, param_dtype=param_dtype, rngs=rngs)
        elif cfg.text_source == "minilm":
            self.text_encoder = text_encoder
        else:
            self.text_encoder = None
        joint = cfg.joint_dim
        self.audio_projection = Projection(cfg.audio.width, joint, cfg.projection,
                                           param_dtype=param_dtype, rngs=rngs)
        self.text_projection = Projection(cfg.text_dim, joint, cfg.projection,
                                          param_dtype=param_dtype, rngs=rngs)
        self.heads = AlphaBetaHeads(cfg.text_dim, cfg.head_hidden, alpha_init=cfg.alpha_init,
                                    beta_init=cfg.beta_init, param_dtype=param_dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32),
                                     out_sharding=())

    # The three stages, usable alone (e.g. to embed a text query bank once).

    def encode_audio(self, mel: jax.Array, frame_mask: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(frames [B, L, J], clip [B, J], mask [B, L])``: unit-norm frame and clip
        embeddings (the clip from the mean of the encoder's frame features, projected by the
        same projection), and the frame mask at the output rate."""
        frames, clip, mask = self.audio_encoder(mel, frame_mask)
        return self.audio_projection(frames), self.audio_projection(clip), mask

    def text_branch(self, text: TextInput) -> jax.Array:
        """Text branch output ``[N, text_dim]`` (before the projection)."""
        source = self.config.text_source
        if source == "embeddings":
            text = jnp.asarray(text)
            if text.ndim != 2 or text.shape[1] != self.config.text_embed_dim:
                raise ValueError(f"text: text_source='embeddings' takes [N, "
                                 f"{self.config.text_embed_dim}] vectors, got {text.shape}")
            return text
        if not (isinstance(text, (tuple, list)) and len(text) == 2):
            raise ValueError(f"text: text_source={source!r} takes a tuple (ids [N, S], "
                             "mask [N, S])")
        ids, mask = text
        if source == "minilm":
            return self.text_encoder.embed(ids, mask)
        return self.text_encoder(ids, mask)

    def encode_text(self, text: TextInput) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(text_emb [N, J] unit norm, alpha [N], beta [N])``."""
        branch = self.text_branch(text)
        alpha, beta = self.heads(branch)
        return self.text_projection(branch), alpha, beta

    @property
    def temperature(self) -> jax.Array:
        """Clip InfoNCE temperature ``exp(-logit_scale)``."""
        return jnp.exp(-self.logit_scale[...])

    def __call__(self, mel: jax.Array, texts: TextInput, captions: TextInput,
                 frame_mask: jax.Array | None = None) -> FlamOutputs:
        frames, clip, mask = self.encode_audio(mel, frame_mask)
        text, alpha, beta = self.encode_text(texts)
        caption_emb = self.text_projection(self.text_branch(captions))
        if caption_emb.shape[0] != clip.shape[0]:
            raise ValueError(f"captions: {caption_emb.shape[0]} captions for {clip.shape[0]} "
                             "clips; the clip InfoNCE pairs caption i with clip i")
        return FlamOutputs(frames, text, alpha, beta, clip, caption_emb, self.temperature, mask)


# --- vocabulary for the from-scratch text encoder --------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
PAD, UNK = "[PAD]", "[UNK]"


@dataclasses.dataclass(frozen=True)
class WordVocab:
    """Lower-cased word vocabulary: ``[PAD]`` = 0, ``[UNK]`` = 1, then words by frequency.

    Words are runs of ``[a-z0-9]`` (with an optional ``'s``-style suffix); every other
    non-space character is its own token. ``WordVocab.build(captions, max_size=1000)``,
    ``vocab.encode(texts, max_length) -> (ids, mask)`` for :class:`TextEncoder`."""

    tokens: tuple[str, ...]

    def __post_init__(self):
        if self.tokens[:2] != (PAD, UNK):
            raise ValueError(f"tokens: must start with {PAD!r}, {UNK!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("tokens: duplicates")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int | None = None,
              min_count: int = 1) -> "WordVocab":
        """Words of ``texts`` with count >= ``min_count``, most frequent first (ties:
        alphabetical), at most ``max_size`` entries in all (specials included)."""
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size={max_size}: must be >= 2 (the two special tokens)")
        counts = Counter(w for t in texts for w in cls.split(t))
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size - 2]
        return cls((PAD, UNK, *words))

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [K, max_length], mask bool [K, max_length])``; words past
        ``max_length`` are dropped, unknown words map to ``[UNK]``."""
        if isinstance(texts, str):
            raise ValueError("texts: must be a sequence of strings, not one string")
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: must be >= 1")
        ids = np.zeros((len(texts), max_length), np.int32)
        mask = np.zeros((len(texts), max_length), bool)
        for i, t in enumerate(texts):
            words = self.split(t)[:max_length]
            ids[i, :len(words)] = [self._index.get(w, 1) for w in words]
            mask[i, :len(words)] = True
        return ids, mask

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"tokens": list(self.tokens)}, f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordVocab":
        try:
            with open(path) as f:
                return cls(tuple(json.load(f)["tokens"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a WordVocab file ({err})") from None


# --- parameter counts ------------------------------------------------------------------------


def count_params(module: nnx.Module) -> int:
    """Number of scalars in the module's ``nnx.Param`` s."""
    return sum(int(np.prod(v.get_value().shape)) for _, v in
               nnx.to_flat_state(nnx.state(module, nnx.Param)))


def preset_param_counts() -> dict[str, dict[str, int]]:
    """Parameter counts of every preset (abstract evaluation: nothing is allocated):
    ``{preset: {"audio_encoder", "text_encoder", "flam", "flam_without_text_encoder"}}``."""
    out = {}
    for name in ("tiny", "cpu", "paper"):
        cfg = getattr(FlamConfig, name)()

        def build(cfg=cfg):
            text = (MiniLM(MiniLMConfig.all_minilm_l6_v2(), rngs=nnx.Rngs(0))
                    if cfg.text_source == "minilm" else None)
            return FlamModel(cfg, text_encoder=text, rngs=nnx.Rngs(0))

        model = nnx.eval_shape(build)
        total = count_params(model)
        text = count_params(model.text_encoder) if model.text_encoder is not None else 0
        out[name] = {"audio_encoder": count_params(model.audio_encoder), "text_encoder": text,
                     "flam": total, "flam_without_text_encoder": total - text}
    return out
