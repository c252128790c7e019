"""A small bidirectional transformer denoiser for Discrete Latent Codes (Flax NNX), and its
pure training step for the masked diffusion loss of :mod:`generative.discrete_diffusion`.

``CodeDenoiser(z_t [B, S] int, t [B]) -> logits [B, S, V + 1]``: token embedding (``V`` code
tokens, plus the mask token ``mask_id = V`` and, for text-to-code, ``extra_tokens`` prefix
tokens after it) + learned position embedding + time embedding (sinusoidal features of ``t``
through a 2-layer MLP, added to every position), ``depth`` pre-LayerNorm blocks of
bidirectional (unmasked) multi-head self-attention and a GELU MLP, a final LayerNorm and a
linear head over the ``V + 1`` code/mask entries (SUBS zeroes the mask entry;
:func:`generative.discrete_diffusion.subs_log_probs`). MDLM conditions its DiT on ``t`` with
adaLN; with SUBS and a log-linear schedule the number of masks already tells the model ``t``
(MDLM observes that time conditioning can then be dropped), so the plain additive embedding
here is enough.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from generative import discrete_diffusion
from trainkit.nn.layers import EncoderBlock
from trainkit.config import Config, field


@dataclasses.dataclass(frozen=True)
class CodeDenoiserConfig(Config):
    vocab_size: int = field(256, ge=2, help="V: code tokens 0..V-1 (the mask token is V)")
    length: int = field(32, ge=1, help="maximum sequence length (prefix + code)")
    extra_tokens: int = field(0, ge=0, help="prefix-only tokens with ids V+1.. (text-to-code)")
    dim: int = field(256, ge=8, help="model width")
    depth: int = field(4, ge=1, help="transformer blocks")
    heads: int = field(4, ge=1, help="attention heads (must divide dim)")
    mlp_ratio: int = field(4, ge=1, help="MLP hidden width / dim")
    time_features: int = field(64, ge=2, help="sinusoidal features of t (even)")

    def validate(self) -> None:
        if self.dim % self.heads:
            raise self.invalid("heads", f"must divide dim={self.dim}")
        if self.time_features % 2:
            raise self.invalid("time_features", "must be even")

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @classmethod
    def tiny(cls) -> "CodeDenoiserConfig":
        return cls(vocab_size=8, length=4, dim=64, depth=2, heads=4, mlp_ratio=2,
                   time_features=16)

    @classmethod
    def small(cls) -> "CodeDenoiserConfig":
        """For codes of 32 tokens over 64 (CPU-scale DLC experiments)."""
        return cls(vocab_size=64, length=32, dim=256, depth=4, heads=4)


def time_embedding(t: jax.Array, features: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features ``[cos(t w_k), sin(t w_k)]``, ``w_k = 1000 max_period^{-k/(F/2)}``
    (``t`` in [0, 1] is scaled by 1000 as for DDPM step indices). ``[B] -> [B, F]``."""
    half = features // 2
    freqs = 1000.0 * jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class CodeDenoiser(nnx.Module):
    def __init__(self, cfg: CodeDenoiserConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size + 1 + cfg.extra_tokens, cfg.dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.length, cfg.dim)))
        self.time1 = nnx.Linear(cfg.time_features, cfg.dim, rngs=rngs)
        self.time2 = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
        self.blocks = nnx.List([
            EncoderBlock(cfg.dim, cfg.heads, cfg.mlp_ratio * cfg.dim, eps=1e-6,
                         kernel_init=nnx.initializers.lecun_normal(), rngs=rngs)
            for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.head = nnx.Linear(cfg.dim, cfg.vocab_size + 1, rngs=rngs)

    def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
        cfg = self.config
        s = z.shape[1]
        if s > cfg.length:
            raise ValueError(f"sequence length {s} > config.length={cfg.length}")
        temb = self.time2(jax.nn.silu(self.time1(time_embedding(t, cfg.time_features))))
        x = self.embed(z) + self.pos[...][:s][None] + temb[:, None, :]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    t_min: float = 1e-3, maskable: Any = None) -> Callable[..., Any]:
    """``step(params, opt_state, key, x0) -> (params, opt_state, metrics)``, pure and jitted:
    one optax update on :func:`generative.discrete_diffusion.diffusion_loss` of the batch
    ``x0`` (int ``[B, L]`` codes). ``params`` is ``nnx.split(model, nnx.Param)[1]``.
    ``maskable`` (bool ``[L]``): only those positions are masked and scored; a conditioning
    prefix (text-to-code) is False."""
    mask = None if maskable is None else jnp.asarray(maskable, bool)

    def loss_fn(params, key, x0):
        model = nnx.merge(graphdef, params)
        return discrete_diffusion.diffusion_loss(key, model, x0, model.config.mask_id,
                                                 t_min=t_min, maskable=mask)

    @jax.jit
    def step(params, opt_state, key, x0):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key, x0)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                                   "mask_rate": aux["mask_rate"]}

    return step
