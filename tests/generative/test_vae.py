"""generative.vae: the KL and the negative ELBO against closed forms, shapes, config checks,
and a few training steps lowering the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from generative import vae
from trainkit.config import ConfigError


def test_gaussian_kl_matches_closed_form_and_monte_carlo():
    mu = jnp.array([[0.0, 0.0], [1.0, -2.0]])
    logvar = jnp.array([[0.0, 0.0], [np.log(0.5), np.log(3.0)]])
    kl = vae.gaussian_kl(mu, logvar)
    assert float(kl[0]) == 0.0
    # KL(N(m, s^2) || N(0, 1)) = 1/2 (m^2 + s^2 - ln s^2 - 1), summed over dimensions
    expected = 0.5 * ((1 + 0.5 - np.log(0.5) - 1) + (4 + 3 - np.log(3.0) - 1))
    assert float(kl[1]) == pytest.approx(expected, rel=1e-6)
    # Monte Carlo: E_q[log q(z) - log p(z)]
    z = np.random.default_rng(0).normal(size=(200_000, 2)) * np.sqrt([0.5, 3.0]) + [1.0, -2.0]
    log_q = -0.5 * (((z - [1.0, -2.0]) ** 2) / [0.5, 3.0] + np.log([0.5, 3.0])).sum(1)
    log_p = -0.5 * (z ** 2).sum(1)
    assert float(kl[1]) == pytest.approx(np.mean(log_q - log_p), rel=0.02)


def test_vae_loss_is_the_negative_elbo_per_pixel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
    xm = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
    mu = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    lv = jnp.asarray(rng.normal(size=(3, 5)) * 0.3, jnp.float32)
    loss, aux = vae.vae_loss(x, xm, mu, lv, sigma=0.2, beta=0.5)
    sq = np.sum((np.asarray(x) - np.asarray(xm)) ** 2, axis=(1, 2, 3))
    lv_np = np.asarray(lv)
    kl = 0.5 * np.sum(np.asarray(mu) ** 2 + np.exp(lv_np) - lv_np - 1, axis=1)
    assert float(loss) == pytest.approx(np.mean((sq / (2 * 0.04) + 0.5 * kl) / 48), rel=1e-5)
    assert float(aux["rec"]) == pytest.approx(sq.mean() / 48, rel=1e-5)


def test_shapes_config_and_training_lowers_the_loss():
    cfg = vae.VAEConfig.tiny()
    model = vae.VAE(cfg, rngs=nnx.Rngs(params=0))
    x = jnp.zeros((2, 32, 32, 3))
    out, mu, lv = model(x, jax.random.key(0))
    assert out.shape == x.shape and mu.shape == (2, cfg.latent_dim) == lv.shape
    assert vae.sample(model, jax.random.key(1), 5).shape == (5, 32, 32, 3)
    with pytest.raises(ConfigError, match="widths"):
        vae.VAEConfig(image_size=30, widths=(8, 16))
    # a blob data set: a bright disc on a dark background at varying positions
    yy, xx = np.mgrid[:32, :32]
    rng = np.random.default_rng(0)
    imgs = np.stack([np.where((yy - cy) ** 2 + (xx - cx) ** 2 < 36, 0.8, -0.8)
                     for cy, cx in rng.integers(8, 24, (64, 2))]).astype(np.float32)
    imgs = np.repeat(imgs[..., None], 3, -1)
    _, hist = vae.train_vae(cfg, imgs, jax.random.key(2), 60,
                            train=vae.VAETrainConfig(learning_rate=3e-3, batch_size=16),
                            progress=False)
    assert np.mean(hist["loss"][-10:]) < 0.5 * np.mean(hist["loss"][:5])
