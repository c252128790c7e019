"""Observation normalisation with running moments, as pure functions.

Agents keep a :class:`RunningMeanStd` in their own train state::

    stats = init(env.observation_size)
    stats = update(stats, obs_batch)          # [..., size]: every leading axis is a sample axis
    x = normalize(stats, obs)                 # (obs - mean) / sqrt(var + eps), clipped

``update`` merges the batch's moments into the running ones with the parallel algorithm of
Chan, Golub & LeVeque (1979, "Updating formulae and a pairwise algorithm for computing sample
variances", eq. 2.1b), exact in exact arithmetic: for running moments
``(mean_a, var_a, n_a)`` and batch moments ``(mean_b, var_b, n_b)``::

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    var   = (n_a var_a + n_b var_b + delta^2 n_a n_b / n) / n

so merging batches one at a time gives the mean and (population, ``ddof=0``) variance of their
concatenation. ``var`` is per feature. Starting from ``init`` (``count = 0``, ``mean = 0``,
``var = 1``) the first update returns exactly the first batch's moments, and ``normalize`` with
fresh stats is the identity (up to ``eps``). This is what Stable-Baselines3's and Gymnasium's
``RunningMeanStd`` compute, without their ``count = 1e-4`` pseudo-sample.

``count`` is int32 (exact up to 2^31 - 1 samples); moments are float32.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RunningMeanStd:
    mean: jax.Array  # [size] float32
    var: jax.Array  # [size] float32, population variance
    count: jax.Array  # [] int32, samples seen


def init(size: int) -> RunningMeanStd:
    """Stats of no data: ``mean = 0``, ``var = 1``, ``count = 0``."""
    return RunningMeanStd(mean=jnp.zeros((size,), jnp.float32),
                          var=jnp.ones((size,), jnp.float32),
                          count=jnp.zeros((), jnp.int32))


def update(stats: RunningMeanStd, batch: jax.Array) -> RunningMeanStd:
    """Merge the moments of ``batch`` (``[..., size]``, at least one sample) into ``stats``.

    Chan et al. (1979) eq. 2.1b; see the module docstring for the formula.
    """
    size = stats.mean.shape[-1]
    chex.assert_rank(stats.mean, 1)
    batch = jnp.asarray(batch, jnp.float32)
    chex.assert_axis_dimension(batch, -1, size)
    batch = batch.reshape(-1, size)
    n_b = batch.shape[0]
    if n_b == 0:
        return stats
    mean_b = jnp.mean(batch, axis=0)
    var_b = jnp.mean(jnp.square(batch - mean_b), axis=0)
    n_a = stats.count.astype(jnp.float32)
    n = n_a + n_b
    delta = mean_b - stats.mean
    w_b = n_b / n  # share of the batch in the merged sample
    mean = stats.mean + delta * w_b
    var = (1.0 - w_b) * stats.var + w_b * var_b + jnp.square(delta) * (1.0 - w_b) * w_b
    return RunningMeanStd(mean=mean, var=var, count=stats.count + n_b)


def normalize(stats: RunningMeanStd, x: jax.Array, clip: float | None = 10.0,
              eps: float = 1e-8) -> jax.Array:
    """``clip((x - mean) / sqrt(var + eps), -clip, clip)`` over the last axis of ``x``.

    ``clip=None`` disables clipping.
    """
    chex.assert_axis_dimension(x, -1, stats.mean.shape[-1])
    y = (jnp.asarray(x, jnp.float32) - stats.mean) / jnp.sqrt(stats.var + eps)
    if clip is not None:
        y = jnp.clip(y, -clip, clip)
    return y
