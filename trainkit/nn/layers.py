"""Domain-neutral NNX layers every package builds on: ``Dense`` with logical axes, the token
``Embed`` table, ``LayerNorm``, grouped-query ``dot_product_attention``, the bidirectional
pre-LN ``EncoderBlock`` (the audio encoders, the MiniLM text encoder, the generative ViT and
code denoiser stack it; the LM zoo's decoders in :mod:`llm_rl.models` use ``Dense``, ``Embed``
and the attention) and the causal pre-LN ``DecoderBlock`` with a KV cache and optional
cross-attention (the ReaLchords models of :mod:`audio.music.models`).

Every parameter carries logical axis names (``nnx.Param(..., out_sharding=(...))``); the rules
table of :mod:`trainkit.sharding` maps them onto the mesh.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``D`` width, ``N`` query heads,
``K`` key/value heads, ``G = N / K`` queries per key/value head, ``H`` head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # normal(0, 0.02) for kernels and embeddings, as the HF models initialise


# --- the contraction of every dense layer ----------------------------------------------------


def contract(x: jax.Array, kernel: jax.Array, n_in: int, out_dtype: Any = None) -> jax.Array:
    """``y = tensordot(x, kernel, n_in)``: the trailing ``n_in`` dims of ``x`` against the
    leading ``n_in`` dims of ``kernel`` (float accumulation in ``out_dtype`` when given).

    Its gradient is the usual pair ``dx = g . kernel^T`` (over the output dims) and
    ``dkernel = x^T g`` (over every token). On the CPU backend the second is written as a plain
    ``[in, tokens] @ [tokens, out]`` product of an explicitly transposed ``x`` (a custom VJP):
    the autodiff form contracts dim 0 of both operands, which XLA's CPU backend leaves to its
    Eigen fallback instead of the YNNPACK matmul, 1.4-2x slower on the MLP shapes of the LM zoo
    (benchmarks/RESULTS.md, "Where the training step's backward lost"). Other backends use
    plain autodiff. A custom VJP has no forward-mode rule: ``jax.jvp`` through a layer that
    uses this raises on CPU (no module of the library differentiates an NNX layer forward)."""
    if jax.default_backend() == "cpu":
        return _contract_cpu(x, kernel, n_in, out_dtype)
    return jnp.tensordot(x, kernel, axes=n_in, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _contract_cpu(x, kernel, n_in, out_dtype):
    return jnp.tensordot(x, kernel, axes=n_in, preferred_element_type=out_dtype)


def _contract_cpu_fwd(x, kernel, n_in, out_dtype):
    return _contract_cpu(x, kernel, n_in, out_dtype), (x, kernel)


def _contract_cpu_bwd(n_in, out_dtype, residuals, g):
    x, kernel = residuals
    out_axes = tuple(range(n_in, kernel.ndim))
    dx = jnp.tensordot(g, kernel, axes=(tuple(range(g.ndim - len(out_axes), g.ndim)), out_axes))
    fan_in = math.prod(kernel.shape[:n_in])
    tokens = x.size // fan_in
    # The barrier keeps XLA from folding the transpose back into the dot's dimension numbers.
    x_t = jax.lax.optimization_barrier(x.reshape(tokens, fan_in).T)
    dkernel = jnp.dot(x_t, g.reshape(tokens, -1), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_contract_cpu.defvjp(_contract_cpu_fwd, _contract_cpu_bwd)


# --- parameters ----------------------------------------------------------------------------


def param(rngs: nnx.Rngs | None, kind: str, shape: Sequence[int], dtype: Any,
           axes: Sequence[str | None]) -> nnx.Param:
    shape = tuple(int(s) for s in shape)
    if kind == "normal":
        value = nnx.initializers.normal(INIT_STD)(rngs.params(), shape, dtype)
    elif kind == "zeros":
        value = jnp.zeros(shape, dtype)
    elif kind == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(kind)
    return nnx.Param(value, out_sharding=tuple(axes))


class Dense(nnx.Module):
    """``y = x . W + b`` contracting the trailing ``len(in_shape)`` dims of ``x`` with the
    leading dims of ``W`` (shape ``in_shape + out_shape``), so heads stay a separate axis.

    ``kernel_init(key, shape, dtype)`` replaces the default ``normal(0.02)`` (the HF LMs'
    initialiser); it is called on the matrix shape ``(prod(in_shape), prod(out_shape))`` and
    the result reshaped, so fan-in/fan-out initialisers (``lecun_normal``...) see the true
    fan-in of a head-split kernel (and a 2-D sample compiles faster than a 3-D one on CPU).
    Biases start at zero."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 axes: Sequence[str | None], *, use_bias: bool, param_dtype: Any, rngs: nnx.Rngs,
                 kernel_init: Callable[..., jax.Array] | None = None):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        assert len(axes) == len(in_shape) + len(out_shape), (axes, in_shape, out_shape)
        self.n_in = len(in_shape)
        if kernel_init is None:
            self.kernel = param(rngs, "normal", in_shape + out_shape, param_dtype, axes)
        else:
            matrix = (math.prod(in_shape), math.prod(out_shape))
            value = kernel_init(rngs.params(), matrix, param_dtype).reshape(in_shape + out_shape)
            self.kernel = nnx.Param(value, out_sharding=tuple(axes))
        self.bias = (param(rngs, "zeros", out_shape, param_dtype, axes[self.n_in:])
                     if use_bias else None)

    def __call__(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        kernel = self.kernel[...]
        y = contract(x.astype(kernel.dtype), kernel, self.n_in, out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``E`` (V, D), logical axes ("vocab", "embed")."""

    def __init__(self, vocab: int, dim: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.embedding = param(rngs, "normal", (vocab, dim), param_dtype, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output projection: float32 ``logits = h E^T``."""
        return contract(h, self.embedding[...].T, 1, jnp.float32)


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (biased
    variance, as ``torch.nn.LayerNorm``); statistics in float32, output in ``x.dtype``."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32,
                 axes: Sequence[str | None] = ("embed",)):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=tuple(axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _masked_softmax(scores: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
    """Softmax over keys of float32 scores [B, K, G, T, S]; keys where ``mask`` [B, T, S] is
    False get the float32 minimum (a row with no visible key averages instead of NaN)."""
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float | None = None) -> jax.Array:
    """Grouped-query attention ``softmax(q k^T * scale + m) v``.

    q [B, T, N, H]; k, v [B, S, K, H]; mask [B, T, S] boolean (True: may attend); query head
    ``n`` uses key/value head ``n // G`` (``G = N / K``). Scores and softmax are float32;
    masked scores are set to the float32 minimum, so a row with no visible key (a padding
    query) gives a finite, meaningless average instead of NaN. Returns [B, T, N, H] in v.dtype.
    """
    chex.assert_rank([q, k, v, mask], [4, 4, 4, 3])
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of key/value heads {kh}")
    scale = h ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    out = jnp.einsum("bkgts,bskh->btkgh", _masked_softmax(scores, mask, v.dtype), v)
    return out.reshape(b, t, n, h)


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                 scale: float | None = None) -> jax.Array:
    """:func:`dot_product_attention` over a head-major KV cache: q [B, T, N, H]; k, v
    [B, K, S, H] (key/value heads before slots); mask [B, T, S]. The same formula (float32
    scores, masked scores at the float32 minimum); returns [B, T, N, H]. In this layout the
    dots see their batch dims (b, k) leading and the contracted head dim last, so only the
    small q and output are transposed, never the cache (benchmarks/RESULTS.md: ~16% per
    decoding step over a [B, S, K, H] cache). The one attention-over-a-cache of the library:
    :mod:`llm_rl.sampling` and :class:`DecoderBlock` (ReaLchords' streaming) decode with it."""
    b, t, n, h = q.shape
    kh = k.shape[1]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of key/value heads {kh}")
    scale = h ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    scores = jnp.einsum("bkgth,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    out = jnp.einsum("bkgts,bksh->bkgth", _masked_softmax(scores, mask, v.dtype), v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class EncoderBlock(nnx.Module):
    """Bidirectional pre-LN transformer block (ViT, BERT-style encoders without the post-LN):
    ``h = x + W_o Attn(LN_1(x))``, ``y = h + W_2 GELU(W_1 LN_2(h))``, exact (erf) GELU.

    Attention is :func:`dot_product_attention` with separate q/k/v projections
    ``("embed", "heads", "head_dim")`` and ``mask [B, T, T]`` (True: query may attend key; None:
    every key). The one encoder block of the library: the audio and text encoders of
    :mod:`audio.encoders`, the ViT of :mod:`generative.vit_dino` and the code denoiser of
    :mod:`generative.code_denoiser` stack it. ``kernel_init`` as in :class:`Dense`."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, eps: float,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 kernel_init: Callable[..., jax.Array] | None = None):
        if width % num_heads:
            raise ValueError(f"width {width} is not a multiple of num_heads {num_heads}")
        h = width // num_heads

        def dense(i, o, axes):
            return Dense(i, o, axes, use_bias=True, param_dtype=param_dtype, rngs=rngs,
                         kernel_init=kernel_init)

        self.attn_norm = LayerNorm(width, eps=eps, param_dtype=param_dtype)
        self.query = dense((width,), (num_heads, h), ("embed", "heads", "head_dim"))
        self.key = dense((width,), (num_heads, h), ("embed", "heads", "head_dim"))
        self.value = dense((width,), (num_heads, h), ("embed", "heads", "head_dim"))
        self.out = dense((num_heads, h), (width,), ("heads", "head_dim", "embed"))
        self.mlp_norm = LayerNorm(width, eps=eps, param_dtype=param_dtype)
        self.fc1 = dense((width,), (mlp_dim,), ("embed", "mlp"))
        self.fc2 = dense((mlp_dim,), (width,), ("mlp", "embed"))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if mask is None:
            mask = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        y = self.attn_norm(x)
        x = x + self.out(dot_product_attention(self.query(y), self.key(y), self.value(y), mask))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.mlp_norm(x)), approximate=False))


class DecoderBlock(nnx.Module):
    """Causal pre-LN transformer decoder block, optionally with cross-attention (T5/BART-
    style encoder-decoder without the post-LN):

        h = x + W_o SelfAttn(LN_1(x))                    (keys: earlier positions)
        h = h + W_o' CrossAttn(LN_x(h), memory)          (only with ``cross=True``)
        y = h + W_2 GELU(W_1 LN_2(h))

    ``mask [B, T, S]`` selects the self-attention keys (True: may attend). With a KV cache
    ``kv = (k, v)`` of shape [B, N, S, H] (head-major, :meth:`init_cache`) the block writes
    this call's keys/values at slots ``write_index .. write_index + T - 1`` (one in-place
    ``dynamic_update_slice``) and attends over the whole cache with :func:`attend_cache`, so a
    token-by-token decode gives the outputs of one full pass; without a cache it attends over
    this call's own keys (S = T). Returns ``(y, (k, v))``: the updated cache, or this call's
    keys/values [B, T, N, H]. ``memory [B, M, D]`` is the encoder output and
    ``memory_mask [B, T, M]`` its key mask; ``cross_kv`` may pass the memory's keys/values
    precomputed once by :meth:`cross_keys_values` (a decode loop then does not re-project
    the encoder output every step). ``head_dim`` (default ``width / num_heads``) lets the
    attention width ``num_heads * head_dim`` differ from the model width, as in T5 (6 heads
    of 64 on a 512-wide model). With an all-True ``mask`` and ``cross=False`` the block is
    a bidirectional encoder block."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, eps: float,
                 cross: bool = False, head_dim: int | None = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 kernel_init: Callable[..., jax.Array] | None = None):
        if head_dim is None and width % num_heads:
            raise ValueError(f"width {width} is not a multiple of num_heads {num_heads} "
                             "(give head_dim for an attention width other than the model's)")
        h = width // num_heads if head_dim is None else int(head_dim)

        def dense(i, o, axes):
            return Dense(i, o, axes, use_bias=True, param_dtype=param_dtype, rngs=rngs,
                         kernel_init=kernel_init)

        def qkvo():
            return (dense((width,), (num_heads, h), ("embed", "heads", "head_dim")),
                    dense((width,), (num_heads, h), ("embed", "heads", "head_dim")),
                    dense((width,), (num_heads, h), ("embed", "heads", "head_dim")),
                    dense((num_heads, h), (width,), ("heads", "head_dim", "embed")))

        self.attn_norm = LayerNorm(width, eps=eps, param_dtype=param_dtype)
        self.query, self.key, self.value, self.out = qkvo()
        self.cross = cross
        if cross:
            self.cross_norm = LayerNorm(width, eps=eps, param_dtype=param_dtype)
            self.cross_query, self.cross_key, self.cross_value, self.cross_out = qkvo()
        self.mlp_norm = LayerNorm(width, eps=eps, param_dtype=param_dtype)
        self.fc1 = dense((width,), (mlp_dim,), ("embed", "mlp"))
        self.fc2 = dense((mlp_dim,), (width,), ("mlp", "embed"))
        self.num_heads, self.head_dim = num_heads, h

    def init_cache(self, batch: int, slots: int, dtype: Any = jnp.float32
                   ) -> tuple[jax.Array, jax.Array]:
        """A zeroed head-major self-attention cache (k, v), each [B, N, S, H]."""
        shape = (batch, self.num_heads, slots, self.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def cross_keys_values(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cross-attention keys and values [B, M, N, H] of an encoder output."""
        return self.cross_key(memory), self.cross_value(memory)

    def __call__(self, x: jax.Array, mask: jax.Array, *, kv: tuple[jax.Array, jax.Array] | None = None,
                 write_index: jax.Array | int = 0, memory: jax.Array | None = None,
                 memory_mask: jax.Array | None = None,
                 cross_kv: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        y = self.attn_norm(x)
        q, k, v = self.query(y), self.key(y), self.value(y)
        if kv is None:
            x = x + self.out(dot_product_attention(q, k, v, mask))
        else:
            at = (0, 0, jnp.asarray(write_index, jnp.int32), 0)
            head_major = lambda a, cache: a.transpose(0, 2, 1, 3).astype(cache.dtype)  # noqa: E731
            k = jax.lax.dynamic_update_slice(kv[0], head_major(k, kv[0]), at)
            v = jax.lax.dynamic_update_slice(kv[1], head_major(v, kv[1]), at)
            x = x + self.out(attend_cache(q, k, v, mask))
        if self.cross:
            if cross_kv is None:
                if memory is None:
                    raise ValueError("a cross-attention block needs memory or cross_kv")
                cross_kv = self.cross_keys_values(memory)
            if memory_mask is None:
                memory_mask = jnp.ones((x.shape[0], x.shape[1], cross_kv[0].shape[1]), bool)
            y = self.cross_norm(x)
            x = x + self.cross_out(dot_product_attention(self.cross_query(y), cross_kv[0],
                                                         cross_kv[1], memory_mask))
        x = x + self.fc2(jax.nn.gelu(self.fc1(self.mlp_norm(x)), approximate=False))
        return x, (k, v)
