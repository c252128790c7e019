"""A small convolutional VAE image generator (Flax NNX): the second generator family of the
bias-shift experiment (beside the DiT of :mod:`generative.dit`).

Kingma & Welling (2014), "Auto-Encoding Variational Bayes", arXiv 1312.6114. Encoder
``q(z | x) = N(mu(x), diag exp(logvar(x)))``, prior ``p(z) = N(0, I)``, decoder mean
``g(z)`` with a Gaussian likelihood of fixed scale ``sigma``; the loss is the negative ELBO per
pixel (``D = H W C``; beta-VAE weighting ``beta``, Higgins et al. 2017)::

    L(x) = (1/D) [ ||x - g(z)||^2 / (2 sigma^2) + beta KL(q(z|x) || p(z)) ],
    KL    = 1/2 sum_j (mu_j^2 + exp(logvar_j) - logvar_j - 1),
    z     = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)    (reparameterisation)

(:func:`gaussian_kl`, :func:`vae_loss`). Samples are ``g(z)``, ``z ~ N(0, I)`` (the decoder
mean, as is usual for image VAEs).

Architecture: encoder ``len(widths)`` stride-2 3x3 convolutions (GELU) from ``S`` to
``S / 2^k`` pixels, flattened into a Linear to ``2 * latent_dim``; the decoder mirrors it
(Linear, then per stage nearest-neighbour 2x upsampling and a 3x3 convolution, GELU), ending in
a 3x3 convolution to ``C`` channels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trainkit import guards
from trainkit.config import Config, field


@dataclasses.dataclass(frozen=True)
class VAEConfig(Config):
    image_size: int = field(32, ge=2, help="image height = width (pixels)")
    channels: int = field(3, ge=1, help="image channels")
    widths: tuple[int, ...] = field((32, 64), help="channels of the stride-2 stages")
    latent_dim: int = field(32, ge=1, help="dimension of z")
    sigma: float = field(0.1, gt=0, help="fixed scale of the Gaussian likelihood ([-1, 1] "
                                         "pixel units)")
    beta: float = field(1.0, ge=0, help="weight of the KL term (1: the ELBO)")

    def validate(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise self.invalid("widths", "at least one stage, every width >= 1")
        if self.image_size % 2 ** len(self.widths):
            raise self.invalid("widths", f"{len(self.widths)} stride-2 stages must divide "
                                         f"image_size={self.image_size}")

    @property
    def bottom(self) -> int:
        return self.image_size // 2 ** len(self.widths)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(widths=(8, 16), latent_dim=8)


@dataclasses.dataclass(frozen=True)
class VAETrainConfig(Config):
    learning_rate: float = field(1e-3, gt=0, help="Adam learning rate")
    batch_size: int = field(64, ge=1)
    grad_clip: float = field(1.0, ge=0, help="global-norm clipping (0: none)")


class VAE(nnx.Module):
    """``encode(x) -> (mu, logvar)``, ``decode(z) -> x_mean``; ``__call__(x, key)`` returns
    ``(x_mean, mu, logvar)`` with a reparameterised ``z``."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        enc, cin = [], cfg.channels
        for w in cfg.widths:
            enc.append(nnx.Conv(cin, w, (3, 3), strides=(2, 2), rngs=rngs))
            cin = w
        self.enc = nnx.List(enc)
        flat = cfg.bottom * cfg.bottom * cfg.widths[-1]
        self.to_latent = nnx.Linear(flat, 2 * cfg.latent_dim, rngs=rngs)
        self.from_latent = nnx.Linear(cfg.latent_dim, flat, rngs=rngs)
        dec, cin = [], cfg.widths[-1]
        for w in reversed(cfg.widths):
            dec.append(nnx.Conv(cin, w, (3, 3), rngs=rngs))
            cin = w
        self.dec = nnx.List(dec)
        self.out = nnx.Conv(cin, cfg.channels, (3, 3), rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        chex.assert_shape(x, (None, cfg.image_size, cfg.image_size, cfg.channels))
        h = x
        for conv in self.enc:
            h = jax.nn.gelu(conv(h))
        mu, logvar = jnp.split(self.to_latent(h.reshape(h.shape[0], -1)), 2, axis=-1)
        return mu, jnp.clip(logvar, -12.0, 8.0)

    def decode(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        chex.assert_shape(z, (None, cfg.latent_dim))
        h = jax.nn.gelu(self.from_latent(z)).reshape(z.shape[0], cfg.bottom, cfg.bottom, -1)
        for conv in self.dec:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = jax.nn.gelu(conv(h))
        return self.out(h)

    def __call__(self, x: jax.Array, key: jax.Array):
        mu, logvar = self.encode(x)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
        return self.decode(z), mu, logvar


def gaussian_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """``[B]`` ``KL(N(mu, exp(logvar)) || N(0, I)) = 1/2 sum_j (mu^2 + e^logvar - logvar - 1)``."""
    chex.assert_equal_shape([mu, logvar])
    return 0.5 * jnp.sum(mu ** 2 + jnp.exp(logvar) - logvar - 1.0, axis=-1)


def vae_loss(x: jax.Array, x_mean: jax.Array, mu: jax.Array, logvar: jax.Array, sigma: float,
             beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative ELBO per pixel (module docstring), mean over the batch; aux: ``rec`` (mean
    squared error per pixel) and ``kl`` (nats per image)."""
    chex.assert_equal_shape([x, x_mean])
    d = np.prod(x.shape[1:])
    sq = jnp.sum(jnp.square(x - x_mean).reshape(x.shape[0], -1), axis=-1)
    kl = gaussian_kl(mu, logvar)
    loss = jnp.mean((sq / (2.0 * sigma ** 2) + beta * kl) / d)
    return loss, {"rec": jnp.mean(sq) / d, "kl": jnp.mean(kl)}


class VAETrainState(NamedTuple):
    params: Any
    opt_state: Any
    guard: guards.GuardState


def make_optimizer(train: VAETrainConfig) -> optax.GradientTransformation:
    adam = optax.adam(train.learning_rate)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adam) if train.grad_clip \
        else adam


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation
                    ) -> Callable[..., Any]:
    """``step(state, key, images) -> (state, metrics)``: one guarded optax update on
    :func:`vae_loss` (pure, jitted)."""

    def loss_fn(params, key, x):
        model = nnx.merge(graphdef, params)
        x_mean, mu, logvar = model(x, key)
        return vae_loss(x, x_mean, mu, logvar, model.config.sigma, model.config.beta)

    @jax.jit
    def step(state: VAETrainState, key, images):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key, images)
        params, opt_state, guard, gm = guards.guarded_update(
            optimizer, grads, state.opt_state, state.params, loss, state.guard)
        return VAETrainState(params, opt_state, guard), {"loss": loss, **aux, **gm}

    return step


def train_vae(cfg: VAEConfig, images: Any, key: jax.Array, steps: int, *,
              train: VAETrainConfig | None = None, progress: bool = True, mesh=None
              ) -> tuple[VAE, dict[str, np.ndarray]]:
    """Train a :class:`VAE` on ``images [N, H, W, C]`` (floats in [-1, 1]) for ``steps``
    updates on random batches; returns the model and the per-step metrics. ``mesh``: each
    batch split over its devices (as :func:`generative.dit.train_dit`)."""
    from trainkit.loop import run_steps
    from trainkit.sharding import local_replica, replicate, spread_batch

    train = train or VAETrainConfig()
    images = jnp.asarray(images, jnp.float32)
    chex.assert_shape(images, (None, cfg.image_size, cfg.image_size, cfg.channels))
    if steps < 1:
        raise ValueError(f"steps={steps}; must be >= 1")
    n, bs = images.shape[0], train.batch_size
    k_init, k_loop = jax.random.split(key)
    graphdef, params = nnx.split(VAE(cfg, rngs=nnx.Rngs(params=k_init)), nnx.Param)
    optimizer = make_optimizer(train)
    one = make_train_step(graphdef, optimizer)

    @jax.jit
    def step(state, key):
        k_idx, k_step = jax.random.split(key)
        idx = spread_batch(jax.random.choice(k_idx, n, (bs,), replace=bs > n), mesh)
        return one(state, k_step, images[idx])

    state = replicate(VAETrainState(params, optimizer.init(params), guards.init_guard()), mesh)
    state, hist = run_steps(step, state, replicate(jax.random.split(k_loop, steps), mesh),
                            desc="vae", progress=progress)
    return nnx.merge(graphdef, local_replica(state.params)), hist


def sample(model: VAE, key: jax.Array, num_samples: int) -> jax.Array:
    """``[N, H, W, C]`` decoder means ``g(z)`` of ``z ~ N(0, I)`` (not clipped)."""
    graphdef, state = nnx.split(model)
    z = jax.random.normal(key, (int(num_samples), model.config.latent_dim))
    return _decode(graphdef, state, z)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)
