"""A Diffusion Transformer (DiT) image generator conditioned on Discrete Latent Codes (Flax NNX).

Peebles & Xie (2023), "Scalable Diffusion Models with Transformers" (DiT), arXiv 2212.09748;
conditioned on a DLC as in Lavoie, Noukhovitch, Courville (2025), "Compositional Discrete
Latent Code for High Fidelity, Productive Diffusion Models", arXiv 2507.12318.

Architecture (``DiT(x [B, H, W, C], t [B], codes [B, L] | None, drop [B] | None) -> v``):

* **patchify** (:func:`patchify`): non-overlapping ``p x p`` patches in row-major order, each
  flattened as ``(row-in-patch, column-in-patch, channel)``, then one Linear to width ``D``
  (the same map as DiT's stride-``p`` convolution); plus a position embedding, either DiT's
  fixed 2-D sin-cos table (:func:`sincos_2d_position_embedding`) or a learned one.
* **conditioning vector** ``c = MLP(sinusoid(t)) + mean_{i=1..L} E[i, T_i]``: the timestep
  embedding (DiT Sec. 3.2; the sinusoid of :func:`generative.code_denoiser.time_embedding`,
  ``t`` in [0, 1] scaled by 1000) plus the mean over the ``L`` code positions of a
  per-position token embedding ``E`` of shape ``[L, V + 1, D]``; token index ``V`` is the
  *null* token. The null code (all ``L`` tokens ``= V``) is the "no condition" input of
  classifier-free guidance (Ho & Salimans 2022): in training each example's whole code is
  replaced by the null code with probability ``cfg_dropout``; ``unconditional=True`` always
  uses the null code (the unconditional baseline).
* **adaLN-Zero blocks** (DiT Sec. 3.2, Fig. 3): from ``c`` a Linear (initialised to zero) makes
  ``(shift1, scale1, gate1, shift2, scale2, gate2)``; with ``mod(h) = h (1 + scale) + shift``
  and parameter-free LayerNorms::

      x <- x + gate1 * Attn(mod1(LN(x)))
      x <- x + gate2 * MLP(mod2(LN(x)))

  At initialisation every gate is exactly 0, so each block is the identity on its residual
  stream. The final layer (adaLN shift/scale, then a Linear to ``p p C``) is zero-initialised
  too, so the network outputs exactly 0 at initialisation; then **unpatchify**.

Training objective: **rectified flow / flow matching** (Liu et al. 2022, arXiv 2209.03003;
Lipman et al. 2022, arXiv 2210.02747), velocity prediction on the linear path. Convention
(``t = 0`` data, ``t = 1`` noise)::

    x_t = (1 - t) x_0 + t eps,   eps ~ N(0, I),   v = dx_t/dt = eps - x_0
    L(theta) = E_{t, x_0, eps} || v_theta(x_t, t, c) - (eps - x_0) ||^2   (mean over pixels)

(:func:`interpolate`, :func:`target_velocity`, :func:`flow_matching_loss`); ``t ~ U[0, 1]`` or
logit-normal (Esser et al. 2024, SD3, eq. 19). Sampling integrates ``dx/dt = v`` from ``t = 1``
(pure noise) to ``t = 0`` with Euler steps on a uniform grid (:func:`euler_integrate`).

Why flow matching and not Gaussian diffusion. The DLC paper's generator is a DiT trained as a
Gaussian diffusion model (eps-prediction with the DiT codebase's DDPM schedule, sampled with
DDPM/DDIM) on Stable-Diffusion VAE latents. At the CPU scale of this project (32x32 pixels,
minutes of training) flow matching is the simpler faithful choice: the same DiT backbone and
conditioning, one line of loss with no noise schedule to tune, an exact closed form for the
optimal velocity of Gaussian data (used by the tests), and a deterministic Euler sampler that
is DDIM's continuous-time counterpart (DDIM is Euler on the probability-flow ODE). What the
DLC experiments measure -- conditioning on codes, CFG, composition -- does not depend on it.

Classifier-free guidance (:func:`guided_velocity`), written so that ``w = 1`` returns the
conditional prediction bit for bit::

    v_w = v_uncond + w (v_cond - v_uncond) = v_cond + (w - 1) (v_cond - v_uncond)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from generative.code_denoiser import time_embedding
from trainkit import guards
from trainkit.config import Config, field

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


# --- config ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DiTConfig(Config):
    image_size: int = field(32, ge=1, help="image height = width (pixels)")
    channels: int = field(3, ge=1, help="image channels")
    patch_size: int = field(4, ge=1, help="p: patches are p x p (must divide image_size)")
    dim: int = field(256, ge=8, help="D: model width")
    depth: int = field(6, ge=1, help="DiT blocks")
    heads: int = field(4, ge=1, help="attention heads (must divide dim)")
    mlp_ratio: int = field(4, ge=1, help="MLP hidden width / dim")
    time_features: int = field(256, ge=2, help="sinusoidal features of t (even)")
    pos_embed: str = field("sincos", choices=("sincos", "learned"),
                           help="fixed 2-D sin-cos position table (DiT) or a learned one")
    code_length: int = field(32, ge=1, help="L: tokens per discrete latent code")
    vocab_size: int = field(64, ge=2, help="V: code tokens 0..V-1 (V is the null token)")
    cfg_dropout: float = field(0.1, ge=0.0, le=1.0,
                               help="probability of replacing an example's code by the null "
                                    "code in training (classifier-free guidance)")
    unconditional: bool = field(False, help="always use the null code (unconditional baseline)")

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise self.invalid("patch_size", f"must divide image_size={self.image_size}")
        if self.dim % self.heads:
            raise self.invalid("heads", f"must divide dim={self.dim}")
        if self.time_features % 2:
            raise self.invalid("time_features", "must be even")
        if self.pos_embed == "sincos" and self.dim % 4:
            raise self.invalid("dim", "must be a multiple of 4 for the 2-D sin-cos embedding")

    @property
    def null_token(self) -> int:
        return self.vocab_size

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.channels

    @classmethod
    def tiny(cls) -> "DiTConfig":
        """For unit tests: 64 patches of 4x4, 2 blocks of width 64, codes of 4 over 8."""
        return cls(patch_size=4, dim=64, depth=2, heads=4, mlp_ratio=2, time_features=32,
                   code_length=4, vocab_size=8)

    @classmethod
    def cpu(cls) -> "DiTConfig":
        """CPU-scale DLC experiments on 32x32 shapes: 64 patches of 4x4, 6 blocks of 192
        (4.6M parameters), codes of 32 tokens over 64."""
        return cls(patch_size=4, dim=192, depth=6, heads=3, code_length=32, vocab_size=64)

    @classmethod
    def paper(cls) -> "DiTConfig":
        """DiT-XL/2 (Peebles & Xie 2023, Table 1: depth 28, width 1152, 16 heads, patch 2), the
        backbone of the DLC paper, with DLC512 codes (512 tokens over 256) and CFG dropout 0.1.
        The paper runs it on 32x32x4 SD-VAE latents of 256x256 images; here the same 32x32 grid
        holds pixels (set ``channels=4`` for latents). For accelerators."""
        return cls(patch_size=2, dim=1152, depth=28, heads=16, code_length=512,
                   vocab_size=256, cfg_dropout=0.1)


@dataclasses.dataclass(frozen=True)
class DiTTrainConfig(Config):
    learning_rate: float = field(1e-4, gt=0, help="AdamW learning rate (constant after warmup)")
    weight_decay: float = field(0.0, ge=0, help="AdamW decoupled weight decay")
    warmup_steps: int = field(0, ge=0, help="linear learning-rate warmup")
    grad_clip: float = field(1.0, ge=0, help="global-norm gradient clipping (0: none)")
    batch_size: int = field(256, ge=1, help="examples per step")
    ema_decay: float = field(0.9999, ge=0, lt=1, help="EMA of the parameters (0: no EMA)")
    time_sampling: str = field("uniform", choices=("uniform", "logit_normal"),
                               help="distribution of t in the flow-matching loss")

    @classmethod
    def cpu(cls) -> "DiTTrainConfig":
        return cls(learning_rate=3e-4, warmup_steps=100, batch_size=64, ema_decay=0.999)


# --- pure functions ----------------------------------------------------------------------------


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``[B, H, W, C] -> [B, (H/p)(W/p), p p C]``: patches in row-major order, each flattened as
    ``(row in patch, column in patch, channel)``."""
    chex.assert_rank(x, 4)
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"patch size p={p} must divide the image size {h}x{w}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, (h/p)(w/p), p p c] -> [B, h, w, c]``."""
    chex.assert_shape(tokens, (None, (h // p) * (w // p), p * p * c))
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[N, dim]``: ``[sin(pos w_k), cos(pos w_k)]``, ``w_k = 10000^{-k/(dim/2)}`` (MAE/DiT)."""
    omega = 1.0 / 10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def sincos_2d_position_embedding(dim: int, grid: int) -> np.ndarray:
    """DiT's fixed position table ``[grid^2, dim]`` (``get_2d_sincos_pos_embed``): the first half
    of the features encodes the column, the second half the row, each by :func:`sincos_1d`;
    patches in row-major order."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x (1 + scale) + shift``; ``x [B, N, D]``, ``shift, scale [B, D]``."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The linear path ``x_t = (1 - t) x_0 + t eps`` (``t [B]`` broadcast over the rest)."""
    chex.assert_equal_shape([x0, eps])
    t = jnp.asarray(t, x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0 + t * eps


def target_velocity(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """``v = d x_t / dt = eps - x_0`` on the linear path."""
    chex.assert_equal_shape([x0, eps])
    return eps - x0


def sample_times(key: jax.Array, batch_size: int,
                 method: Literal["uniform", "logit_normal"] = "uniform") -> jax.Array:
    """``[B]`` training times in (0, 1): uniform, or logit-normal ``sigmoid(N(0, 1))`` (SD3
    eq. 19 with ``m = 0, s = 1``), which puts more weight on intermediate times."""
    if method == "uniform":
        return jax.random.uniform(key, (batch_size,))
    if method == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (batch_size,)))
    raise ValueError(f"time sampling method={method!r}; allowed: 'uniform', 'logit_normal'")


def flow_matching_loss(key: jax.Array, velocity_fn: VelocityFn, x0: jax.Array, *,
                       time_sampling: str = "uniform") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Conditional flow-matching loss (Lipman et al. 2022, eq. 23; rectified flow eq. 1)::

        L = E_{t, eps} mean_pixels || v_theta(x_t, t) - (eps - x_0) ||^2,
        x_t = (1 - t) x_0 + t eps

    with one ``t`` and one ``eps`` per example. ``velocity_fn(x_t, t [B]) -> [B, ...]``.
    Returns ``(loss, aux)``; ``aux["per_example"]`` is ``[B]``, ``aux["t"]`` the times."""
    chex.assert_rank(x0, {2, 3, 4})
    k_t, k_eps = jax.random.split(key)
    t = sample_times(k_t, x0.shape[0], time_sampling)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    v = velocity_fn(interpolate(x0, eps, t), t)
    chex.assert_equal_shape([v, x0])
    err = jnp.square(v.astype(jnp.float32) - target_velocity(x0, eps).astype(jnp.float32))
    per_example = jnp.mean(err.reshape(x0.shape[0], -1), axis=-1)
    return jnp.mean(per_example), {"per_example": per_example, "t": t}


def euler_integrate(velocity_fn: VelocityFn, x1: jax.Array, steps: int) -> jax.Array:
    """Integrate ``dx/dt = v(x, t)`` from ``t = 1`` (``x1``, noise) to ``t = 0`` with ``steps``
    Euler steps on the uniform grid ``t_k = 1 - k/steps``::

        x_{t_{k+1}} = x_{t_k} + (t_{k+1} - t_k) v(x_{t_k}, t_k)
    """
    if steps < 1:
        raise ValueError(f"steps={steps}; must be >= 1")
    ts = jnp.linspace(1.0, 0.0, steps + 1)
    batch = x1.shape[0]

    def body(k, x):
        t, s = ts[k], ts[k + 1]
        v = velocity_fn(x, jnp.full((batch,), t, x.dtype))
        return x + (s - t).astype(x.dtype) * v

    return jax.lax.fori_loop(0, steps, body, x1)


def cfg_combine(v_cond: jax.Array, v_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance ``v_uncond + w (v_cond - v_uncond)``, evaluated as
    ``v_cond + (w - 1)(v_cond - v_uncond)`` so that ``w = 1`` gives ``v_cond`` exactly."""
    chex.assert_equal_shape([v_cond, v_uncond])
    return v_cond + (jnp.asarray(scale, v_cond.dtype) - 1.0) * (v_cond - v_uncond)


# --- model -------------------------------------------------------------------------------------

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def _linear(din: int, dout: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
    return nnx.Linear(din, dout, kernel_init=_zeros if zero else _xavier, bias_init=_zeros,
                      rngs=rngs)


def _plain_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs)


class DiTBlock(nnx.Module):
    """adaLN-Zero block: ``(x [B, N, D], c [B, D]) -> [B, N, D]`` (identity at init)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.heads = cfg.heads
        d = cfg.dim
        self.norm1 = _plain_norm(d, rngs)
        self.qkv = _linear(d, 3 * d, rngs)
        self.proj = _linear(d, d, rngs)
        self.norm2 = _plain_norm(d, rngs)
        self.fc1 = _linear(d, cfg.mlp_ratio * d, rngs)
        self.fc2 = _linear(cfg.mlp_ratio * d, d, rngs)
        self.ada = _linear(d, 6 * d, rngs, zero=True)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
            self.ada(jax.nn.silu(c)), 6, axis=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        shape = (b, n, self.heads, d // self.heads)
        att = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape))
        x = x + gate1[:, None, :] * self.proj(att.reshape(b, n, d))
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None, :] * self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))


class FinalLayer(nnx.Module):
    """``LN -> adaLN(shift, scale) -> Linear(D, p p C)``, all modulation and output weights zero."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.norm = _plain_norm(cfg.dim, rngs)
        self.ada = _linear(cfg.dim, 2 * cfg.dim, rngs, zero=True)
        self.out = _linear(cfg.dim, cfg.patch_dim, rngs, zero=True)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.ada(jax.nn.silu(c)), 2, axis=-1)
        return self.out(modulate(self.norm(x), shift, scale))


class DiT(nnx.Module):
    """``(x [B, H, W, C], t [B], codes int [B, L] | None, drop bool [B] | None) -> [B, H, W, C]``
    velocity. ``codes=None`` (or ``unconditional=True``) means the null code for every example;
    ``drop[b]`` replaces example ``b``'s code by the null code."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.dim
        self.patch_embed = _linear(cfg.patch_dim, d, rngs)
        if cfg.pos_embed == "learned":
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.num_patches, d)))
        else:
            self.pos = None
        self.time1 = nnx.Linear(cfg.time_features, d, rngs=rngs,
                                kernel_init=nnx.initializers.normal(0.02))
        self.time2 = nnx.Linear(d, d, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
        self.code_embed = nnx.Param(0.02 * jax.random.normal(
            rngs.params(), (cfg.code_length, cfg.vocab_size + 1, d)))
        self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.final = FinalLayer(cfg, rngs=rngs)

    def position_embedding(self) -> jax.Array:
        cfg = self.config
        if self.pos is not None:
            return self.pos[...]
        return jnp.asarray(sincos_2d_position_embedding(cfg.dim, cfg.grid))

    def null_codes(self, batch: int) -> jax.Array:
        cfg = self.config
        return jnp.full((batch, cfg.code_length), cfg.null_token, jnp.int32)

    def code_embedding(self, codes: jax.Array | None, batch: int,
                       drop: jax.Array | None = None) -> jax.Array:
        """``mean_i E[i, T_i]`` ``[B, D]``; null code where ``codes is None``, ``drop`` or
        ``unconditional``."""
        cfg = self.config
        if codes is None or cfg.unconditional:
            codes = self.null_codes(batch)
        chex.assert_shape(codes, (batch, cfg.code_length))
        codes = codes.astype(jnp.int32)
        if drop is not None:
            chex.assert_shape(drop, (batch,))
            codes = jnp.where(drop[:, None], cfg.null_token, codes)
        table = self.code_embed[...]
        emb = table[jnp.arange(cfg.code_length)[None, :], codes]  # [B, L, D]
        return jnp.mean(emb, axis=1)

    def conditioning(self, t: jax.Array, codes: jax.Array | None, batch: int,
                     drop: jax.Array | None = None) -> jax.Array:
        """``c = MLP(sinusoid(t)) + mean_i E[i, T_i]``, ``[B, D]``."""
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        temb = self.time2(jax.nn.silu(self.time1(time_embedding(t, cfg.time_features))))
        return temb + self.code_embedding(codes, batch, drop)

    def __call__(self, x: jax.Array, t: jax.Array, codes: jax.Array | None = None,
                 drop: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        chex.assert_shape(x, (None, cfg.image_size, cfg.image_size, cfg.channels))
        b = x.shape[0]
        c = self.conditioning(t, codes, b, drop)
        h = self.patch_embed(patchify(x, cfg.patch_size)) + self.position_embedding()[None]
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)
        return unpatchify(out, cfg.patch_size, cfg.image_size, cfg.image_size, cfg.channels)


def guided_velocity(model: DiT, x: jax.Array, t: jax.Array, codes: jax.Array | None,
                    scale: float | jax.Array) -> jax.Array:
    """CFG velocity :func:`cfg_combine` of ``model(x, t, codes)`` and ``model(x, t, null)``
    (two separate forward passes, so the conditional one is exactly ``model(x, t, codes)``)."""
    v_cond = model(x, t, codes)
    v_uncond = model(x, t, None)
    return cfg_combine(v_cond, v_uncond, scale)


# --- sampling ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch", "guided"))
def _sample_jit(graphdef, state, key, codes, scale, *, steps, batch, guided):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    x1 = jax.random.normal(key, (batch, cfg.image_size, cfg.image_size, cfg.channels))
    if guided:
        fn = lambda x, t: guided_velocity(model, x, t, codes, scale)  # noqa: E731
    else:
        fn = lambda x, t: model(x, t, codes)  # noqa: E731
    return euler_integrate(fn, x1, steps)


def sample(model: DiT, key: jax.Array, codes: jax.Array | None = None, *, steps: int = 50,
           guidance_scale: float = 1.0, num_samples: int | None = None) -> jax.Array:
    """Generate images ``[B, H, W, C]`` (roughly in [-1, 1]; not clipped) by Euler integration
    of the (guided) velocity from ``x_1 ~ N(0, I)``; batched and jitted.

    Args:
      model: a :class:`DiT`.
      key: PRNG key of the initial noise.
      codes: int ``[B, L]`` codes, or None for the null code (unconditional samples).
      steps: Euler steps.
      guidance_scale: CFG scale ``w``; 1 is plain conditional sampling (one forward pass per
        step); other values run the conditional and the null-code pass.
      num_samples: ``B`` when ``codes`` is None.
    """
    cfg = model.config
    if codes is None:
        if num_samples is None:
            raise ValueError("num_samples is required when codes is None")
        batch = int(num_samples)
    else:
        codes = jnp.asarray(codes, jnp.int32)
        chex.assert_shape(codes, (None, cfg.code_length))
        batch = codes.shape[0]
        if num_samples is not None and num_samples != batch:
            raise ValueError(f"num_samples={num_samples} but codes has {batch} rows")
    if steps < 1:
        raise ValueError(f"steps={steps}; must be >= 1")
    guided = (codes is not None and not cfg.unconditional and float(guidance_scale) != 1.0)
    graphdef, state = nnx.split(model)
    return _sample_jit(graphdef, state, key, codes, jnp.float32(guidance_scale), steps=steps,
                       batch=batch, guided=guided)


# --- training ----------------------------------------------------------------------------------


def train_step_flops(cfg: DiTConfig, batch: int) -> float:
    """Model FLOPs of one training step (matmuls and attention; backward = 2 x forward), the
    numerator of MFU::

        forward per image = 2 N [depth (4 + 2 r) D^2 + 2 P D]      (qkv, proj, MLP; patch in/out)
                          + depth 4 N^2 D                           (QK^T and AV)
                          + 2 [depth 6 D^2 + 2 D^2 + F D + D^2]     (adaLN, final adaLN, t-MLP)
        step = 3 x batch x forward

    with ``N`` patches, ``D`` width, ``r`` MLP ratio, ``P = p^2 C`` values per patch and ``F``
    time features."""
    n, d, r = cfg.num_patches, cfg.dim, cfg.mlp_ratio
    tokens = 2 * n * (cfg.depth * (4 + 2 * r) * d * d + 2 * cfg.patch_dim * d)
    attention = cfg.depth * 4 * n * n * d
    per_image = 2 * (cfg.depth * 6 * d * d + 2 * d * d + cfg.time_features * d + d * d)
    return 3.0 * batch * (tokens + attention + per_image)




class DiTTrainState(NamedTuple):
    params: Any          # nnx.split(model, nnx.Param)[1]
    opt_state: Any
    ema: Any             # EMA of params (None when disabled)
    guard: guards.GuardState
    step: jax.Array      # int32 updates attempted


def make_optimizer(train: DiTTrainConfig) -> optax.GradientTransformation:
    """AdamW (DiT: lr 1e-4, no weight decay) with linear warmup and optional clipping."""
    lr = (optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps)
          if train.warmup_steps else train.learning_rate)
    adamw = optax.adamw(lr, weight_decay=train.weight_decay)
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
    return adamw


def init_train_state(params: Any, optimizer: optax.GradientTransformation, *,
                     ema: bool = True) -> DiTTrainState:
    return DiTTrainState(params=params, opt_state=optimizer.init(params),
                         ema=jax.tree.map(jnp.copy, params) if ema else None,
                         guard=guards.init_guard(), step=jnp.zeros((), jnp.int32))


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """``ema <- d ema + (1 - d) params`` with ``d = min(decay, (1 + step) / (10 + step))``
    (a warm-up so that short runs are not dominated by the initial weights)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    cfg_dropout: float | None = None, ema_decay: float = 0.0,
                    time_sampling: str = "uniform") -> Callable[..., Any]:
    """``step(state, key, images, codes) -> (state, metrics)``, pure and jitted: one guarded
    optax update on :func:`flow_matching_loss` of a batch.

    ``images`` float ``[B, H, W, C]`` (in [-1, 1]); ``codes`` int ``[B, L]`` or None
    (unconditional). Each example's code is dropped to the null code with probability
    ``cfg_dropout`` (default: the model config's). ``ema_decay > 0`` updates ``state.ema``
    (the state must have been made with ``ema=True``). A step with non-finite loss or
    gradients leaves parameters, optimizer state and EMA unchanged (:mod:`trainkit.guards`).
    ``step(..., drop_prob=p)`` overrides the dropout probability per call (it may be traced,
    e.g. ``vmap``-ped over models: an unconditional and a conditional model in one program).
    """

    def loss_fn(params, key, images, codes, drop_prob):
        model = nnx.merge(graphdef, params)
        p = model.config.cfg_dropout if cfg_dropout is None else cfg_dropout
        p = p if drop_prob is None else drop_prob
        k_drop, k_loss = jax.random.split(key)
        drop = jax.random.uniform(k_drop, (images.shape[0],)) < p
        fn = lambda x, t: model(x, t, codes, drop)  # noqa: E731
        loss, aux = flow_matching_loss(k_loss, fn, images, time_sampling=time_sampling)
        return loss, {"drop_rate": jnp.mean(drop.astype(jnp.float32)), **aux}

    @jax.jit
    def step(state: DiTTrainState, key, images, codes, drop_prob=None):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, key, images, codes, drop_prob)
        params, opt_state, guard, gm = guards.guarded_update(
            optimizer, grads, state.opt_state, state.params, loss, state.guard)
        ema = state.ema
        if ema_decay > 0:
            if ema is None:
                raise ValueError("ema_decay > 0 but the train state has no EMA "
                                 "(init_train_state(..., ema=True))")
            new_ema = ema_update(ema, params, ema_decay, state.step)
            ok = gm["skipped"] == 0
            ema = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_ema, ema)
        state = DiTTrainState(params, opt_state, ema, guard, state.step + 1)
        return state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                       "drop_rate": aux["drop_rate"], **gm}

    return step


class TrainedDiT(NamedTuple):
    model: DiT                 # the last parameters
    ema_model: DiT | None      # the EMA parameters (None without EMA)
    losses: np.ndarray         # [steps] training loss per step
    state: DiTTrainState


def train_dit(cfg: DiTConfig, images: Any, codes: Any | None, key: jax.Array, steps: int,
              progress: bool = True, *, train: DiTTrainConfig | None = None,
              max_nonfinite: int = 20, mesh=None) -> TrainedDiT:
    """Train a :class:`DiT` from scratch on ``images`` (``[N, H, W, C]`` floats in [-1, 1]) and
    their ``codes`` (int ``[N, L]``; None for an unconditional model, which also requires
    ``cfg.unconditional``), ``steps`` AdamW updates on random batches (drawn without
    replacement within a batch), with a tqdm bar showing the loss. ``mesh`` (several devices
    or processes): the state replicated on it and each batch split over its batch axes
    (:func:`trainkit.sharding.spread_batch`); the models come back with this process's own
    copy of the parameters (``TrainedDiT.state`` stays on the mesh).
    """
    from trainkit.sharding import local_replica, replicate, spread_batch

    train = train or DiTTrainConfig.cpu()
    images = jnp.asarray(images, jnp.float32)
    chex.assert_shape(images, (None, cfg.image_size, cfg.image_size, cfg.channels))
    n = images.shape[0]
    if codes is None and not cfg.unconditional:
        raise ValueError("codes is None: pass codes, or use DiTConfig(unconditional=True)")
    if codes is not None:
        codes = jnp.asarray(codes, jnp.int32)
        chex.assert_shape(codes, (n, cfg.code_length))
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"codes must be in [0, {cfg.vocab_size - 1}] (vocab_size); "
                             f"got values in [{lo}, {hi}]")
    if steps < 1:
        raise ValueError(f"steps={steps}; must be >= 1")
    k_init, k_train = jax.random.split(key)
    model = DiT(cfg, rngs=nnx.Rngs(params=k_init))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(train)
    use_ema = train.ema_decay > 0
    state = init_train_state(params, optimizer, ema=use_ema)
    step_fn = make_train_step(graphdef, optimizer, ema_decay=train.ema_decay,
                              time_sampling=train.time_sampling)
    batch = train.batch_size
    replace = batch > n
    state = replicate(state, mesh)

    @jax.jit
    def data_step(state, key):
        k_idx, k_step = jax.random.split(key)
        idx = spread_batch(jax.random.choice(k_idx, n, (batch,), replace=replace), mesh)
        return step_fn(state, k_step, images[idx], None if codes is None else codes[idx])

    from trainkit.run import Progress

    bar = Progress(steps, desc="dit", key_metric="loss") if progress else None
    losses = np.zeros(steps, np.float64)
    keys = replicate(jax.random.split(k_train, steps), mesh)
    for i in range(steps):
        state, metrics = data_step(state, keys[i])
        losses[i] = float(metrics["loss"])
        guards.check_streak(metrics, max_nonfinite, step=i + 1)
        if bar is not None:
            bar.update(i + 1, {"loss": losses[i]})
    if bar is not None:
        bar.close()
    trained = nnx.merge(graphdef, local_replica(state.params))
    ema_model = nnx.merge(graphdef, local_replica(state.ema)) if use_ema else None
    return TrainedDiT(trained, ema_model, losses, state)
