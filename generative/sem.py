"""Simplicial Embedding (SEM): a representation constrained to a product of L simplices.

Lavoie, Tsirigotis, Schwarzer, Vani, Noukhovitch, Kawaguchi, Courville (2022), "Simplicial
Embeddings in Self-Supervised Learning and Downstream Classification", arXiv 2204.00616, Sec. 3
(eq. 1): a vector ``z`` of size ``L V`` is split into ``L`` groups ``z_i`` of ``V`` entries and
each group goes through a softmax with temperature ``tau``::

    SEM(z)_{i, v} = exp(z_{i v} / tau) / sum_{u=1}^{V} exp(z_{i u} / tau),   i = 1..L

so every row ``SEM(z)_i`` lies on the probability simplex ``Delta^{V-1}``. Small ``tau`` pushes
the rows towards one-hot vectors (the argmax of the group), large ``tau`` towards uniform.

Discrete Latent Codes (Lavoie, Noukhovitch, Courville 2025, "Compositional Discrete Latent Code
for High Fidelity, Productive Diffusion Models", arXiv 2507.12318, Sec. 3) put a SEM layer on top
of a self-supervised encoder's feature ``h``: ``z = LayerNorm(W h)``, the LayerNorm taken over
the whole projected vector of size ``L V`` *after* the linear projection and *before* the
reshape to ``[L, V]`` and the per-group softmax; the image's code is the per-group argmax
(:func:`generative.dlc.tokens`).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
from flax import nnx

from trainkit.config import Config, field


def simplicial_embedding(z: jax.Array, L: int, V: int, tau: float | jax.Array = 1.0) -> jax.Array:
    """SEM (Lavoie et al. 2022, eq. 1): ``softmax(z_i / tau)`` over each of ``L`` groups of ``V``.

    Args:
      z: ``[..., L * V]`` pre-SEM features (group ``i`` is ``z[..., i*V:(i+1)*V]``).
      L: number of groups (simplices, code length).
      V: group size (vertices of each simplex, vocabulary size).
      tau: softmax temperature ``> 0``.
    Returns:
      ``[..., L, V]``; every row ``[..., i, :]`` is non-negative and sums to 1.
    """
    chex.assert_axis_dimension(z, -1, L * V)
    groups = z.reshape(*z.shape[:-1], L, V)
    return jax.nn.softmax(groups / tau, axis=-1)


@dataclasses.dataclass(frozen=True)
class SEMConfig(Config):
    num_groups: int = field(32, ge=1, help="L: tokens per code (simplices)")
    group_size: int = field(64, ge=2, help="V: vocabulary size (vertices of each simplex)")
    tau: float = field(1.0, gt=0, help="softmax temperature of the SEM groups")
    layer_norm: bool = field(True, help="LayerNorm over the L*V projection before the softmax "
                                        "(as in the DLC paper)")

    @classmethod
    def tiny(cls) -> "SEMConfig":
        return cls(num_groups=4, group_size=8, tau=1.0)

    @classmethod
    def dlc_512(cls) -> "SEMConfig":
        """DLC512 of the paper: 512 tokens over a vocabulary of 256 (arXiv 2507.12318)."""
        return cls(num_groups=512, group_size=256, tau=1.0)


class SEMHead(nnx.Module):
    """``h [..., in] -> SEM(LayerNorm(W h + b), L, V, tau) [..., L, V]``.

    ``__call__(h, return_logits=True)`` also returns the pre-softmax ``z`` ``[..., L, V]``
    (tokens are its argmax, which does not depend on ``tau``)."""

    def __init__(self, in_features: int, config: SEMConfig, *, rngs: nnx.Rngs):
        self.config = config
        n = config.num_groups * config.group_size
        self.proj = nnx.Linear(in_features, n, rngs=rngs)
        self.norm = nnx.LayerNorm(n, rngs=rngs) if config.layer_norm else None

    def __call__(self, h: jax.Array, return_logits: bool = False):
        cfg = self.config
        z = self.proj(h)
        if self.norm is not None:
            z = self.norm(z)
        probs = simplicial_embedding(z, cfg.num_groups, cfg.group_size, cfg.tau)
        if return_logits:
            return probs, z.reshape(*z.shape[:-1], cfg.num_groups, cfg.group_size)
        return probs
