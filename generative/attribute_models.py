"""Attribute readers of the bias-shift experiment (Flax NNX): a second classifier architecture
and the renderer-parameter regressor that gives generated images their "true" attributes.

* :class:`PixelMLP`: ``images [B, 32, 32, 3] -> (features [B, F], {head: logits})``, the
  interface of :class:`generative.evaluation.AttributeCNN`, so it trains with
  :func:`generative.evaluation.train_attribute_classifier` (``build=``) and runs in
  :class:`generative.evaluation.AttributeClassifier`. The image is average-pooled by
  ``pool`` (32x32 -> 8x8 by default), flattened, and passed through ``len(hidden)`` GELU
  layers; the last hidden layer (before its GELU) is the feature vector. No convolution, no
  translation invariance: a different inductive bias from the CNN, with a decision boundary
  of its own.
* Renderer-parameter regressor (:func:`train_regressor`, :class:`Regressor`): an
  :class:`~generative.evaluation.AttributeCNN` body whose heads are read as ``kind`` (5-way
  logits), ``background`` (5-way logits), ``hue`` as the unit vector ``(cos 2 pi h,
  sin 2 pi h)`` (hue is circular) and ``size`` standardised; trained on renders with::

      L = CE(kind) + CE(background) + ||u_hat - u(h)||^2 + ((s_hat - (s - m)/d))^2

  (``m, d``: mean and standard deviation of the training sizes). Read back:
  ``h_hat = atan2(u_2, u_1) / 2 pi mod 1``, ``s_hat * d + m``. Generated images have no
  parameters; this is what stands in for them, and its error on held-out renders
  (:func:`regressor_errors`) is the error of every "true" attribute of a generated image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from generative import datasets
from generative import evaluation as ev

# --- pixel MLP classifier --------------------------------------------------------------------------


class PixelMLP(nnx.Module):
    """``images [B, S, S, 3] -> (features [B, F], {name: logits [B, n_name]})`` (module doc)."""

    def __init__(self, heads: Mapping[str, int], *, hidden: Sequence[int] = (256, 128),
                 pool: int = 4, image_size: int = datasets.IMAGE_SIZE, rngs: nnx.Rngs):
        if image_size % pool or not hidden:
            raise ValueError(f"pool={pool} must divide image_size={image_size}, and hidden "
                             f"{tuple(hidden)} needs at least one layer")
        self.pool = pool
        self.head_names = tuple(heads)
        din = (image_size // pool) ** 2 * 3
        layers = []
        for h in hidden:
            layers.append(nnx.Linear(din, h, rngs=rngs))
            din = h
        self.layers = nnx.List(layers)
        self.heads = nnx.Dict({name: nnx.Linear(din, n, rngs=rngs) for name, n in heads.items()})

    def features(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, 4)
        b, s, _, c = x.shape
        p = self.pool
        h = x.reshape(b, s // p, p, s // p, p, c).mean(axis=(2, 4)).reshape(b, -1)
        for i, layer in enumerate(self.layers):
            h = layer(h if i == 0 else jax.nn.gelu(h))
        return h

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        f = self.features(x)
        g = jax.nn.gelu(f)
        return f, {name: self.heads[name](g) for name in self.head_names}


def build_mlp(hidden: Sequence[int] = (256, 128), pool: int = 4):
    """A ``build(num_classes, rngs)`` for :func:`generative.evaluation.train_attribute_classifier`."""
    return lambda num_classes, rngs: PixelMLP(num_classes, hidden=hidden, pool=pool, rngs=rngs)


# --- renderer-parameter regressor ------------------------------------------------------------------

REGRESSOR_HEADS = {"kind": len(datasets.SHAPE_KINDS), "background": len(datasets.BACKGROUND_KINDS),
                   "hue": 2, "size": 1}


def regressor_loss(out: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                   size_mean: float, size_std: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The regressor's loss (module docstring); ``targets``: ``kind``, ``background`` int
    ``[B]``, ``hue`` and ``size`` float ``[B]``."""
    chex.assert_shape(out["hue"], (None, 2))
    ce_k = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out["kind"], targets["kind"]))
    ce_b = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out["background"],
                                                                    targets["background"]))
    ang = 2.0 * jnp.pi * targets["hue"]
    u = jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    hue = jnp.mean(jnp.sum(jnp.square(out["hue"] - u), -1))
    size = jnp.mean(jnp.square(out["size"][:, 0] - (targets["size"] - size_mean) / size_std))
    total = ce_k + ce_b + hue + size
    return total, {"ce_kind": ce_k, "ce_background": ce_b, "mse_hue": hue, "mse_size": size}


@dataclasses.dataclass
class Regressor:
    """A trained regressor: :meth:`predict` gives ``kind``, ``background`` (int), ``hue`` (in
    [0, 1)) and ``size`` (float) of images; :meth:`features` its 128-d features."""

    classifier: ev.AttributeClassifier
    size_mean: float
    size_std: float

    def predict(self, images: Any) -> dict[str, np.ndarray]:
        out = self.classifier.logits(images)
        hue = np.mod(np.arctan2(out["hue"][:, 1], out["hue"][:, 0]) / (2 * math.pi), 1.0)
        return {"kind": np.argmax(out["kind"], -1).astype(np.int32),
                "background": np.argmax(out["background"], -1).astype(np.int32),
                "hue": hue.astype(np.float64),
                "size": out["size"][:, 0].astype(np.float64) * self.size_std + self.size_mean}

    def features(self, images: Any) -> np.ndarray:
        return self.classifier.features(images)


def _dihedral(key: jax.Array, x: jax.Array) -> jax.Array:
    """A random flip / transpose per image (every recorded attribute is invariant)."""
    b = x.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    pick = lambda k: jax.random.bernoulli(k, 0.5, (b, 1, 1, 1))  # noqa: E731
    x = jnp.where(pick(k1), x[:, :, ::-1], x)
    x = jnp.where(pick(k2), jnp.swapaxes(x, 1, 2), x)
    return jnp.where(pick(k3), x[:, ::-1], x)


def train_regressor(images: Any, raw: Mapping[str, Any], key: jax.Array, *, steps: int = 1000,
                    batch_size: int = 64, learning_rate: float = 2e-3,
                    widths: Sequence[int] = (32, 64, 128), progress: bool = True,
                    mesh=None) -> Regressor:
    """Train the renderer-parameter regressor on renders ``images [N, 32, 32, 3]`` (uint8 or
    floats in [-1, 1]) and their recorded ``raw`` parameters (``kind``, ``background``,
    ``hue``, ``size`` ``[N]``): AdamW with warmup and cosine decay, dihedral augmentation.
    ``mesh``: each batch split over its devices (as
    :func:`generative.evaluation.train_attribute_classifier`)."""
    from trainkit.loop import run_steps
    from trainkit.sharding import local_replica, replicate, spread_batch

    x_all = jnp.asarray(ev._as_float_images(images))
    n = x_all.shape[0]
    targets = {"kind": jnp.asarray(raw["kind"], jnp.int32),
               "background": jnp.asarray(raw["background"], jnp.int32),
               "hue": jnp.asarray(raw["hue"], jnp.float32),
               "size": jnp.asarray(raw["size"], jnp.float32)}
    for k, v in targets.items():
        if v.shape != (n,):
            raise ValueError(f"raw[{k!r}] has shape {v.shape}; expected ({n},)")
    if steps < 1:
        raise ValueError(f"steps={steps}; must be >= 1")
    size_mean = float(jnp.mean(targets["size"]))
    size_std = float(jnp.std(targets["size"])) or 1.0
    k_init, k_loop = jax.random.split(key)
    model = ev.AttributeCNN(REGRESSOR_HEADS, widths=widths, rngs=nnx.Rngs(params=k_init))
    graphdef, params = nnx.split(model, nnx.Param)
    warmup = min(100, steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                  max(steps, warmup + 1))
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    bs = min(batch_size, n)

    @jax.jit
    def step(state, key):
        params, opt_state = state
        k_idx, k_aug = jax.random.split(key)
        idx = spread_batch(jax.random.choice(k_idx, n, (bs,), replace=False), mesh)
        x = _dihedral(k_aug, x_all[idx])
        y = {k: v[idx] for k, v in targets.items()}

        def loss_fn(p):
            _, out = nnx.merge(graphdef, p)(x)
            return regressor_loss(out, y, size_mean, size_std)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, **aux}

    (params, _), _ = run_steps(step, replicate((params, optimizer.init(params)), mesh),
                               replicate(jax.random.split(k_loop, steps), mesh),
                               desc="parameter regressor", progress=progress)
    clf = ev.AttributeClassifier(nnx.merge(graphdef, local_replica(params)), dict(REGRESSOR_HEADS))
    return Regressor(clf, size_mean, size_std)


def circular_error(a: Any, b: Any, period: float = 1.0) -> np.ndarray:
    """``|a - b|`` on a circle of circumference ``period``."""
    d = np.mod(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), period)
    return np.minimum(d, period - d)


def regressor_errors(pred: Mapping[str, np.ndarray], raw: Mapping[str, Any]) -> dict[str, float]:
    """Error of regressed parameters against the recorded ones: kind and background accuracy,
    hue mean absolute circular error, size mean absolute error (and as a fraction of the
    size range)."""
    lo, hi = datasets.SIZE_RANGE
    size_mae = float(np.mean(np.abs(pred["size"] - np.asarray(raw["size"]))))
    return {"kind_accuracy": float(np.mean(pred["kind"] == np.asarray(raw["kind"]))),
            "background_accuracy": float(np.mean(pred["background"]
                                                 == np.asarray(raw["background"]))),
            "hue_mae": float(np.mean(circular_error(pred["hue"], raw["hue"]))),
            "size_mae": size_mae, "size_mae_of_range": size_mae / (hi - lo)}
