"""ReaLchords self-supervised reward models (Wu et al., ICML 2024, Sec. 3.3; shapes after
lukewys/realchords-pytorch ``realchords/model/reward_model.py`` and
``realchords/rl/reward/model_based_rewards.py``, MIT).

Inputs are frame tokens of :mod:`audio.music.data`: ``melody`` and ``chords`` [B, F] (PAD
past a piece's end; :func:`audio.music.models.melody_frames` / ``chord_frames`` split an
interleaved sequence).

- Contrastive (C): a melody encoder and a chord encoder (bidirectional transformers, masked
  mean pool, linear projection, L2 normalisation) trained with the symmetric InfoNCE loss
  (CLIP; :func:`info_nce`) on the real pairings of a batch; reward = cosine similarity
  ``<z_m, z_c>`` in [-1, 1].
- Discriminative (D): one encoder over ``[melody, SEP, chords]`` (SEP = BOS, as the
  reference) pooled to one logit; trained by binary cross-entropy to tell real pairings from
  mismatched ones (the chords of another piece of the batch, :func:`mismatched`); reward =
  P(real) = sigmoid(logit) in [0, 1].
- Multi-scale (ReaLchords-M): the reward averaged over sliding windows of
  ``max_frames / 2 .. max_frames / 16`` frames with 50% overlap (:func:`windows`), each
  scale's windows averaged, then the scales averaged (:func:`multiscale_reward`). The models
  are trained on crops of all these lengths so that they score windows as well as pieces.

:func:`auroc` (Mann-Whitney) measures how well a reward separates real from mismatched
pairings on held-out pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audio.music.models import TokenSpace
from trainkit.config import Config, field
from trainkit.nn.layers import DecoderBlock, Dense, Embed, LayerNorm, param


@dataclasses.dataclass(frozen=True)
class RewardConfig(Config):
    width: int = field(64, ge=8)
    num_heads: int = field(4, ge=1)
    head_dim: int = field(16, ge=1)
    num_layers: int = field(2, ge=1)
    mlp_dim: int = field(128, ge=8)
    embed_dim: int = field(32, ge=2, help="contrastive embedding size")
    max_frames: int = field(256, ge=1)

    @classmethod
    def paper(cls) -> RewardConfig:
        return cls(width=512, num_heads=6, head_dim=64, num_layers=8, mlp_dim=1024, embed_dim=512,
                   max_frames=256)


# --- pure functions ---------------------------------------------------------------------------


def info_nce(z_melody: jax.Array, z_chord: jax.Array, log_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Eq. in Fig. 3): with S = exp(s) Zm Zc^T,
    loss = (CE(S, I) + CE(S^T, I)) / 2 over the B real pairings of a batch (row i's positive
    is column i). ``z`` [B, D] unit vectors."""
    chex.assert_equal_shape([z_melody, z_chord])
    logits = jnp.exp(log_scale) * z_melody @ z_chord.T
    diag = jnp.arange(logits.shape[0])
    lm = jax.nn.log_softmax(logits, axis=1)[diag, diag]
    lc = jax.nn.log_softmax(logits, axis=0)[diag, diag]
    return -0.5 * (jnp.mean(lm) + jnp.mean(lc))


def binary_cross_entropy(logit_real: jax.Array, logit_fake: jax.Array) -> jax.Array:
    """-mean log sigmoid(l_real) - mean log(1 - sigmoid(l_fake))."""
    return -0.5 * (jnp.mean(jax.nn.log_sigmoid(logit_real)) + jnp.mean(jax.nn.log_sigmoid(-logit_fake)))


def mismatched(chords: jax.Array, shift: int = 1) -> jax.Array:
    """Chords of another piece for each melody: the batch rolled by ``shift`` rows."""
    return jnp.roll(chords, shift, axis=0)


def auroc(real: np.ndarray, fake: np.ndarray) -> float:
    """Area under the ROC curve of scores for real (positive) vs fake pairings: the
    probability that a random real scores above a random fake, ties counting one half
    (Mann-Whitney U / (n_real n_fake))."""
    real, fake = np.asarray(real, np.float64).ravel(), np.asarray(fake, np.float64).ravel()
    if real.size == 0 or fake.size == 0:
        raise ValueError("auroc needs at least one real and one fake score")
    greater = (real[:, None] > fake[None, :]).sum()
    ties = (real[:, None] == fake[None, :]).sum()
    return float((greater + 0.5 * ties) / (real.size * fake.size))


def window_scales(max_frames: int) -> tuple[int, ...]:
    """Window lengths max_frames / 2, / 4, / 8, / 16 (paper: 1/2 .. 1/16 of 256 frames)."""
    return tuple(w for w in (max_frames // 2, max_frames // 4, max_frames // 8, max_frames // 16) if w >= 2)


def windows(x: jax.Array, window: int) -> jax.Array:
    """Sliding windows [B, W, window] of ``x`` [B, F] with hop window / 2 (50% overlap),
    starting at 0, window/2, ...; the last windows run past F and are PAD (0) filled."""
    _b, f = x.shape
    hop = max(window // 2, 1)
    n = max(1, -(-(f - window) // hop) + 1) if f > window else 1
    padded = jnp.pad(x, ((0, 0), (0, (n - 1) * hop + window - f)))
    idx = jnp.arange(n)[:, None] * hop + jnp.arange(window)[None]
    return padded[:, idx]


def multiscale_reward(score: Callable[[jax.Array, jax.Array], jax.Array], melody: jax.Array,
                      chords: jax.Array, scales: tuple[int, ...]) -> jax.Array:
    """mean over scales w of [mean over windows with a played frame of score(window)] [B];
    ``score(melody [N, w], chords [N, w]) -> [N]``."""
    b = melody.shape[0]
    per_scale = []
    for w in scales:
        mw, cw = windows(melody, w), windows(chords, w)
        n = mw.shape[1]
        s = score(mw.reshape(b * n, w), cw.reshape(b * n, w)).reshape(b, n)
        valid = (mw[..., 0] != 0).astype(s.dtype)  # the window starts inside the piece
        per_scale.append(jnp.sum(s * valid, 1) / jnp.maximum(jnp.sum(valid, 1), 1.0))
    return jnp.mean(jnp.stack(per_scale), axis=0)


# --- models -----------------------------------------------------------------------------------


class SequenceEncoder(nnx.Module):
    """Tokens [B, L] -> masked-mean-pooled features [B, D]: embedding + learned positions,
    bidirectional :class:`DecoderBlock` s over the non-PAD tokens, final LayerNorm."""

    def __init__(self, cfg: RewardConfig, vocab: int, length: int, *, rngs: nnx.Rngs):
        self.embed = Embed(vocab, cfg.width, param_dtype=jnp.float32, rngs=rngs)
        self.positions = param(rngs, "normal", (length, cfg.width), jnp.float32, (None, "embed"))
        self.blocks = nnx.List([DecoderBlock(cfg.width, cfg.num_heads, cfg.mlp_dim, eps=1e-6,
                                             head_dim=cfg.head_dim, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = LayerNorm(cfg.width, eps=1e-6)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        b, n = tokens.shape
        valid = tokens != 0
        x = self.embed(tokens.astype(jnp.int32)) + self.positions[...][:n][None]
        mask = jnp.broadcast_to(valid[:, None, :], (b, n, n))
        for block in self.blocks:
            x, _ = block(x, mask)
        x = self.norm(x)
        w = valid.astype(x.dtype)[..., None]
        return jnp.sum(x * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)


class ContrastiveReward(nnx.Module):
    """``model(melody, chords) -> (z_m, z_c)`` unit vectors [B, E]; reward ``<z_m, z_c>``."""

    def __init__(self, cfg: RewardConfig, space: TokenSpace, *, rngs: nnx.Rngs):
        self.config = cfg
        self.melody_encoder = SequenceEncoder(cfg, space.size, cfg.max_frames, rngs=rngs)
        self.chord_encoder = SequenceEncoder(cfg, space.size, cfg.max_frames, rngs=rngs)
        self.melody_proj = Dense((cfg.width,), (cfg.embed_dim,), ("embed", None), use_bias=False,
                                 param_dtype=jnp.float32, rngs=rngs)
        self.chord_proj = Dense((cfg.width,), (cfg.embed_dim,), ("embed", None), use_bias=False,
                                param_dtype=jnp.float32, rngs=rngs)
        self.log_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))  # CLIP's init

    def __call__(self, melody: jax.Array, chords: jax.Array) -> tuple[jax.Array, jax.Array]:
        def unit(z):
            return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
        return (unit(self.melody_proj(self.melody_encoder(melody))),
                unit(self.chord_proj(self.chord_encoder(chords))))

    def loss(self, melody: jax.Array, chords: jax.Array) -> jax.Array:
        zm, zc = self(melody, chords)
        return info_nce(zm, zc, self.log_scale[...])

    def reward(self, melody: jax.Array, chords: jax.Array) -> jax.Array:
        zm, zc = self(melody, chords)
        return jnp.sum(zm * zc, axis=-1)


class DiscriminativeReward(nnx.Module):
    """``model(melody, chords) -> logit [B]`` of P(real pairing) over ``[melody, SEP, chords]``."""

    def __init__(self, cfg: RewardConfig, space: TokenSpace, *, rngs: nnx.Rngs):
        self.config, self.sep = cfg, space.bos
        self.encoder = SequenceEncoder(cfg, space.size, 2 * cfg.max_frames + 1, rngs=rngs)
        self.head = Dense((cfg.width,), (1,), ("embed", None), use_bias=True,
                          param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, melody: jax.Array, chords: jax.Array) -> jax.Array:
        sep = jnp.full((melody.shape[0], 1), self.sep, melody.dtype)
        return self.head(self.encoder(jnp.concatenate([melody, sep, chords], axis=1)))[:, 0]

    def loss(self, melody: jax.Array, chords: jax.Array) -> jax.Array:
        return binary_cross_entropy(self(melody, chords), self(melody, mismatched(chords)))

    def reward(self, melody: jax.Array, chords: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self(melody, chords))


def score(model, melody: jax.Array, chords: jax.Array, *, multiscale: bool) -> jax.Array:
    """The reward [B] of ``model`` (contrastive or discriminative) for frame tokens [B, F];
    with ``multiscale`` the window average of :func:`multiscale_reward` over
    :func:`window_scales` of the model's ``max_frames``."""
    chex.assert_equal_shape([melody, chords])
    if not multiscale:
        return model.reward(melody, chords)
    f = model.config.max_frames

    def padded(m, c):
        # Windows are PAD-filled to max_frames: the layout of the shorter training crops
        # (the discriminator's SEP sits at position max_frames in both).
        width = ((0, 0), (0, max(f - m.shape[1], 0)))
        return model.reward(jnp.pad(m, width), jnp.pad(c, width))

    return multiscale_reward(padded, melody, chords, window_scales(f))
