"""Helpers for the llm_rl.models tests. Random tiny models get their values from numpy (no
compilation: eager or jitted initialisation costs seconds per model on 2 busy CPU cores), and
forward passes run under one jit."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_model(cls, cfg, *, dtype=jnp.float32, seed=0, noise=0.1):
    """``cls(cfg, param_dtype=dtype)`` with random parameters: norm scales ``1 + noise * z``,
    everything else (kernels, embeddings, biases) ``noise * z``, ``z ~ N(0, 1)``."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        spec = var.get_value()
        value = noise * rng.standard_normal(spec.shape) + (1.0 if path[-1] == "scale" else 0.0)
        leaves.append((path, var.replace(jnp.asarray(value.astype(np.float32), spec.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def jitted(model):
    """``f(input_ids, attention_mask=None, positions=None)``: the model's call under jax.jit."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, mask, pos: nnx.merge(graphdef, s)(ids, mask, pos))
    return lambda ids, mask=None, positions=None: fn(state, jnp.asarray(ids),
                                                     None if mask is None else jnp.asarray(mask),
                                                     None if positions is None else jnp.asarray(positions))
