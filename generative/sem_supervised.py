"""A supervised control for DLC: the same ViT + SEM layer, trained to predict known labels
from the discrete code itself.

Not the paper's method: DLC (arXiv 2507.12318) reads its codes off a *self-supervised* encoder
(DINOv2 + SEM; here :mod:`generative.vit_dino`). This control answers the question the
self-supervised encoder cannot yet answer at laptop scale: does conditioning a DiT on a
discrete code help when the code does carry the image's content? The encoder is the DINO
model's backbone and SEM layer (same :class:`~generative.vit_dino.ViT`, same
:class:`~generative.sem.SEMHead`), followed by one linear classifier per label that reads the
*code*, not the soft SEM distribution, through a straight-through estimator::

    p, z = SEM(ViT(x))                      # [B, L, V] each; tokens T_i = argmax_v z_iv
    q = onehot(T) + p - stop_gradient(p)    # forward: the one-hot code; backward: d/dp
    logits_a = W_a vec(q) + b_a             # one head per label a
    loss = sum_a CE(logits_a, y_a)

so whatever the heads need to know has to be in the argmax tokens the DiT is conditioned on
(with heads on ``p`` the information could hide in the non-argmax mass of each group).
"""

from __future__ import annotations

from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from generative import vit_dino as vd
from generative.sem import SEMHead
from trainkit import guards


def straight_through_code(probs: jax.Array, z: jax.Array) -> jax.Array:
    """``onehot(argmax z) + probs - stop_gradient(probs)``, ``[..., L, V]``.

    The forward value is the one-hot code of the tokens (:func:`generative.dlc.tokens`); the
    gradient with respect to ``probs`` is the identity (the straight-through estimator,
    Bengio, Leonard, Courville 2013)."""
    chex.assert_equal_shape([probs, z])
    hard = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=probs.dtype)
    return hard + probs - jax.lax.stop_gradient(probs)


class AttributeSEMEncoder(nnx.Module):
    """``ViT -> SEMHead -> {label: Linear(L V -> classes)}`` on the straight-through code.

    ``model(x) -> {label: logits [B, classes]}``; ``model.embed(x) -> (sem [B, L, V],
    z [B, L, V])`` as :meth:`generative.vit_dino.DINOModel.embed` (so
    :func:`generative.vit_dino.extract_codes` takes codes from either encoder)."""

    def __init__(self, cfg: vd.DINOConfig, num_classes: Mapping[str, int], *, rngs: nnx.Rngs):
        if not num_classes:
            raise ValueError("num_classes must name at least one label")
        self.config = cfg
        self.labels = tuple(num_classes)
        self.backbone = vd.ViT(cfg.vit, rngs=rngs)
        self.sem = SEMHead(cfg.vit.dim, cfg.sem, rngs=rngs)
        n = cfg.sem.num_groups * cfg.sem.group_size
        self.heads = nnx.Dict({k: nnx.Linear(n, c, rngs=rngs) for k, c in num_classes.items()})

    def embed(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.sem(self.backbone(x), return_logits=True)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        probs, z = self.embed(x)
        q = straight_through_code(probs, z)
        flat = q.reshape(q.shape[0], -1)
        return {k: self.heads[k](flat) for k in self.labels}


def attribute_loss(logits: Mapping[str, jax.Array], labels: Mapping[str, jax.Array]
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``sum_a mean_batch CE(logits_a, y_a)`` and the per-label batch accuracies."""
    loss = sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean()
               for k in logits)
    acc = {f"acc_{k}": jnp.mean(jnp.argmax(logits[k], -1) == labels[k]) for k in logits}
    return loss, acc


def train_attribute_sem_encoder(cfg: vd.DINOConfig, images: np.ndarray | jax.Array,
                                labels: Mapping[str, np.ndarray], num_classes: Mapping[str, int],
                                key: jax.Array, steps: int, progress: bool = True, *, mesh=None
                                ) -> tuple[AttributeSEMEncoder, dict[str, np.ndarray]]:
    """Train :class:`AttributeSEMEncoder` on ``images`` ``[N, H, W, C]`` in ``[-1, 1]`` and
    integer ``labels`` (``{name: [N]}``) for ``steps`` steps.

    Uses the DINO config's architecture (``vit``, ``sem``) and optimiser (``batch_size``,
    ``lr``, ``min_lr``, ``warmup_steps``, ``weight_decay``, ``clip_grad``:
    :func:`generative.vit_dino.make_optimizer`), batches drawn uniformly with replacement,
    horizontal flips with ``flip_prob`` (they keep every label of the shapes), non-finite
    steps skipped (:func:`trainkit.guards.guarded_update`). Returns ``(model, history)`` with
    per-step ``loss``, ``acc_<label>``, ``grad_norm`` and the guard counters. ``mesh`` as in
    :func:`generative.vit_dino.train_sem_encoder` (batches split over its devices)."""
    from trainkit.sharding import local_replica, replicate, spread_batch

    images = jnp.asarray(images, jnp.float32)
    chex.assert_rank(images, 4)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if set(labels) != set(num_classes):
        raise ValueError(f"labels {sorted(labels)} and num_classes {sorted(num_classes)} must "
                         "name the same labels")
    n = images.shape[0]
    ys = {k: jnp.asarray(labels[k], jnp.int32) for k in num_classes}
    for k, y in ys.items():
        if y.shape != (n,):
            raise ValueError(f"labels[{k!r}] has shape {y.shape}; expected ({n},)")
    k_init, k_loop = jax.random.split(key)
    model = AttributeSEMEncoder(cfg, num_classes, rngs=nnx.Rngs(params=k_init))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = vd.make_optimizer(cfg, steps)

    def objective(params, x, y):
        return attribute_loss(nnx.merge(graphdef, params)(x), y)

    @jax.jit
    def step(carry, key, images, ys):
        params, opt_state, guard = carry
        k_idx, k_flip = jax.random.split(key)
        idx = spread_batch(jax.random.randint(k_idx, (cfg.batch_size,), 0, n), mesh)
        x = images[idx]
        flip = jax.random.bernoulli(k_flip, cfg.flip_prob, (cfg.batch_size, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
        (loss, acc), grads = jax.value_and_grad(objective, has_aux=True)(
            params, x, {k: y[idx] for k, y in ys.items()})
        params, opt_state, guard, gm = guards.guarded_update(optimizer, grads, opt_state,
                                                             params, loss, guard)
        return (params, opt_state, guard), {"loss": loss, "grad_norm": optax.global_norm(grads),
                                            **acc, **gm}

    from trainkit.loop import run_steps

    carry = replicate((params, optimizer.init(params), guards.init_guard()), mesh)
    images, ys = replicate((images, ys), mesh)
    (params, _, _), history = run_steps(lambda c, k: step(c, k, images, ys), carry,
                                        replicate(jax.random.split(k_loop, steps), mesh),
                                        desc="SEM encoder (attributes)", progress=progress)
    return nnx.merge(graphdef, local_replica(params)), history
