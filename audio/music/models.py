"""ReaLchords generative models: the online decoder and the offline encoder-decoder teacher,
with KV-cache samplers (Wu et al., "Adaptive Accompaniment with ReaLchords", ICML 2024,
Sec. 3; shapes after lukewys/realchords-pytorch ``realchords/model/gen_model.py``, MIT).

Tokens are the shared vocabulary of :mod:`audio.music.data` (``TokenSpace`` is the part the
models need). A piece of T frames is the interleaved sequence

    [BOS, c_0, m_0, c_1, m_1, ..., c_{T-1}, m_{T-1}, EOS]        (length 2T + 2)

so chord ``c_t`` sits at index ``2t + 1`` and is predicted from the prefix ending at index
``2t`` (BOS or ``m_{t-1}``): the online model is pi(c_t | m_<t, c_<t) (paper Eq. 1). The
"chord slots" are the positions 0, 2, ..., 2T whose next token is a chord (or, at the last
one, EOS). The online model never predicts melody: at chord slots its logits are masked to
the chord tokens and EOS (:func:`chord_slot_logits`), and its loss is the cross-entropy at
chord slots only (:func:`online_nll`). Melody positions are forced from the given melody
when sampling.

The offline teacher (paper Sec. 3.2) encodes the whole melody m_0..m_{T-1} bidirectionally
and decodes ``[BOS, c_0, ..., c_{T-1}]`` causally with cross-attention, predicting
``[c_0, ..., c_{T-1}, EOS]``: pi_off(c_t | m, c_<t).

Both models are stacks of :class:`trainkit.nn.layers.DecoderBlock` (causal, KV cache; the
teacher's encoder uses the same block with a bidirectional mask) with learned absolute
positions and the output tied to the token embedding. The paper's size is T5 v1.1 small
(8 layers, 6 heads of 64, width 512, MLP 1024): :meth:`ModelConfig.paper`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainkit.config import Config, field
from trainkit.nn.layers import DecoderBlock, Dense, Embed, LayerNorm, param


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    width: int = field(64, ge=8, help="model width d")
    num_heads: int = field(4, ge=1)
    head_dim: int = field(16, ge=1, help="attention width = num_heads * head_dim")
    num_layers: int = field(2, ge=1, help="decoder layers (and teacher encoder layers)")
    mlp_dim: int = field(128, ge=8)
    max_frames: int = field(256, ge=1, help="longest piece in frames (16th notes)")

    @classmethod
    def paper(cls) -> ModelConfig:
        """T5 v1.1 small, the paper's size: 8 layers, 6 heads of 64, d = 512, MLP 1024."""
        return cls(width=512, num_heads=6, head_dim=64, num_layers=8, mlp_dim=1024, max_frames=256)

    @classmethod
    def tiny(cls) -> ModelConfig:
        return cls(width=32, num_heads=2, head_dim=16, num_layers=1, mlp_dim=64, max_frames=32)


class TokenSpace(NamedTuple):
    """What the models need of :class:`audio.music.data.Vocab`."""

    size: int
    pad: int
    bos: int
    eos: int
    chord_tokens: tuple[int, ...]  # every chord token id (tuples: the space is static, hashable)
    melody_tokens: tuple[int, ...]

    @classmethod
    def from_vocab(cls, vocab) -> TokenSpace:
        return cls(int(vocab.size), int(vocab.PAD), int(vocab.BOS), int(vocab.EOS),
                   tuple(int(t) for t in vocab.chord_tokens), tuple(int(t) for t in vocab.melody_tokens))

    def chord_slot_allowed(self) -> np.ndarray:
        """bool [V]: the tokens a chord slot may emit (chord tokens and EOS)."""
        allowed = np.zeros(self.size, bool)
        allowed[list(self.chord_tokens)] = True
        allowed[self.eos] = True
        return allowed


# --- pure functions ----------------------------------------------------------------------------


def chord_slot_logits(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Logits with every token a chord slot may not emit set to -inf (float32)."""
    return jnp.where(jnp.asarray(allowed), logits.astype(jnp.float32), -jnp.inf)


def melody_frames(tokens: jax.Array, num_frames: int) -> jax.Array:
    """The melody tokens [B, F] of interleaved sequences [B, 2F + 2] (index 2t + 2); PAD past
    a piece's end."""
    chex.assert_rank(tokens, 2)
    return tokens[:, 2:2 * num_frames + 2:2]


def chord_frames(tokens: jax.Array, num_frames: int) -> jax.Array:
    """The chord-slot tokens [B, F] of interleaved sequences (index 2t + 1)."""
    chex.assert_rank(tokens, 2)
    return tokens[:, 1:2 * num_frames + 1:2]


def interleave_tokens(chords: jax.Array, melody: jax.Array, end: jax.Array, *, pad: int, bos: int,
                      eos: int) -> jax.Array:
    """[BOS, c_0, m_0, ..., c_{e-1}, m_{e-1}, EOS, PAD...] [B, 2F + 2] from chord and melody
    tokens [B, F] and the end frame e [B] (the EOS goes at index 2e + 1; frames >= e are PAD)."""
    b, f = chords.shape
    t = jnp.arange(f)
    keep = t[None] < end[:, None]
    pairs = jnp.stack([jnp.where(keep, chords, pad), jnp.where(keep, melody, pad)], axis=-1)
    body = pairs.reshape(b, 2 * f)
    tokens = jnp.concatenate([jnp.full((b, 1), bos, body.dtype), body,
                              jnp.full((b, 1), pad, body.dtype)], axis=1)
    return tokens.at[jnp.arange(b), 2 * end + 1].set(eos)


def online_nll(logits: jax.Array, tokens: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-slot negative log-likelihood [B, F+1] of the chord (and final EOS) tokens, and its
    mask: -log softmax(mask(logits[2t]))[tokens[2t + 1]], for t = 0..F (the paper's MLE
    pretraining, only the model's own part). ``logits`` [B, 2F + 2, V] of ``tokens``."""
    chex.assert_rank([logits, tokens], [3, 2])
    slot_logits = chord_slot_logits(logits[:, 0:-1:2], allowed)  # positions 0, 2, ..., 2F
    targets = tokens[:, 1::2]  # 1, 3, ..., 2F + 1
    mask = targets != 0
    logp = jax.nn.log_softmax(slot_logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask, -picked, 0.0), mask


# --- models -----------------------------------------------------------------------------------


def _causal(n: int, offset: jax.Array | int = 0, slots: int | None = None) -> jax.Array:
    """bool [n, S]: query i (at slot offset + i) may attend slots <= offset + i."""
    slots = n if slots is None else slots
    return jnp.arange(slots)[None, :] <= (jnp.arange(n)[:, None] + offset)


class _Stack(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab: int, length: int, *, cross: bool, embed: Embed | None,
                 rngs: nnx.Rngs):
        self.embed = embed if embed is not None else Embed(vocab, cfg.width, param_dtype=jnp.float32, rngs=rngs)
        self.positions = param(rngs, "normal", (length, cfg.width), jnp.float32, (None, "embed"))
        self.blocks = nnx.List([
            DecoderBlock(cfg.width, cfg.num_heads, cfg.mlp_dim, eps=1e-6, cross=cross,
                         head_dim=cfg.head_dim, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = LayerNorm(cfg.width, eps=1e-6)

    def inputs(self, ids: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
        pos = jax.lax.dynamic_slice_in_dim(self.positions[...], jnp.asarray(offset, jnp.int32), ids.shape[1])
        return self.embed(ids.astype(jnp.int32)) + pos[None]


class OnlineDecoder(nnx.Module):
    """The online model: a causal transformer over interleaved tokens (paper Sec. 3.1).

    ``model(tokens [B, L]) -> logits [B, L, V]`` (raw; mask with :func:`chord_slot_logits`
    at chord slots). :meth:`init_cache` / :meth:`decode` run the same layers token block by
    token block with a KV cache."""

    def __init__(self, cfg: ModelConfig, space: TokenSpace, *, rngs: nnx.Rngs):
        self.config, self.space = cfg, space
        self.length = 2 * cfg.max_frames + 2
        self.stack = _Stack(cfg, space.size, self.length, cross=False, embed=None, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.stack.embed.attend(self.hidden(tokens))

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final-LayerNorm features [B, L, D] (the logits are their product with the embedding)."""
        chex.assert_rank(tokens, 2)
        n = tokens.shape[1]
        if n > self.length:
            raise ValueError(f"sequence of {n} tokens is longer than the model's {self.length} "
                             f"(max_frames={self.config.max_frames})")
        x = self.stack.inputs(tokens)
        mask = jnp.broadcast_to(_causal(n)[None], (tokens.shape[0], n, n))
        for block in self.stack.blocks:
            x, _ = block(x, mask)
        return self.stack.norm(x)

    def init_cache(self, batch: int, slots: int | None = None) -> list[tuple[jax.Array, jax.Array]]:
        slots = self.length if slots is None else slots
        return [block.init_cache(batch, slots) for block in self.stack.blocks]

    def decode(self, ids: jax.Array, cache, index: jax.Array | int):
        """Logits [B, n, V] of ``ids`` [B, n] placed at positions ``index .. index + n - 1``,
        attending to the cached prefix; returns ``(logits, cache)``."""
        n = ids.shape[1]
        slots = cache[0][0].shape[2]  # head-major [B, N, S, H]
        x = self.stack.inputs(ids, index)
        mask = jnp.broadcast_to(_causal(n, index, slots)[None], (ids.shape[0], n, slots))
        new = []
        for block, kv in zip(self.stack.blocks, cache):
            x, kv = block(x, mask, kv=kv, write_index=index)
            new.append(kv)
        return self.stack.embed.attend(self.stack.norm(x)), new


class ValueDecoder(nnx.Module):
    """The RL baseline V(m_<t, c_<t): an online-decoder trunk (initialised from the policy, as
    the reference's critic) and a linear head, read at the chord slots:
    ``value(tokens [B, 2F + 2]) -> [B, F]`` (the value before choosing c_t)."""

    def __init__(self, cfg: ModelConfig, space: TokenSpace, *, rngs: nnx.Rngs):
        self.trunk = OnlineDecoder(cfg, space, rngs=rngs)
        self.head = Dense((cfg.width,), (1,), ("embed", None), use_bias=True, param_dtype=jnp.float32,
                          rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        f = (tokens.shape[1] - 2) // 2
        return self.head(self.trunk.hidden(tokens)[:, 0:2 * f:2])[..., 0]


class OfflineTeacher(nnx.Module):
    """The offline encoder-decoder (paper Sec. 3.2): ``teacher(melody [B, F], chords_in
    [B, F + 1]) -> logits [B, F + 1, V]`` where ``chords_in = [BOS, c_0, ..., c_{F-1}]`` and
    position t predicts c_t (t < F) or EOS (t = F). Melody PAD frames are masked out of the
    encoder. Encoder and decoder share the token embedding."""

    def __init__(self, cfg: ModelConfig, space: TokenSpace, *, rngs: nnx.Rngs):
        self.config, self.space = cfg, space
        self.encoder = _Stack(cfg, space.size, cfg.max_frames, cross=False, embed=None, rngs=rngs)
        self.decoder = _Stack(cfg, space.size, cfg.max_frames + 1, cross=True,
                              embed=self.encoder.embed, rngs=rngs)

    def encode(self, melody: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(melody, 2)
        b, f = melody.shape
        if f > self.config.max_frames:
            raise ValueError(f"melody of {f} frames is longer than max_frames={self.config.max_frames}")
        valid = melody != self.space.pad
        x = self.encoder.inputs(melody)
        mask = jnp.broadcast_to(valid[:, None, :], (b, f, f))
        for block in self.encoder.blocks:
            x, _ = block(x, mask)
        return self.encoder.norm(x), valid

    def cross_kv(self, memory: jax.Array):
        return [block.cross_keys_values(memory) for block in self.decoder.blocks]

    def __call__(self, melody: jax.Array, chords_in: jax.Array) -> jax.Array:
        memory, valid = self.encode(melody)
        b, n = chords_in.shape
        x = self.decoder.inputs(chords_in)
        mask = jnp.broadcast_to(_causal(n)[None], (b, n, n))
        mem_mask = jnp.broadcast_to(valid[:, None, :], (b, n, valid.shape[1]))
        for block in self.decoder.blocks:
            x, _ = block(x, mask, memory=memory, memory_mask=mem_mask)
        return self.decoder.embed.attend(self.decoder.norm(x))

    def decode(self, ids, cache, index, cross_kv, valid):
        n = ids.shape[1]
        slots = cache[0][0].shape[2]  # head-major [B, N, S, H]
        x = self.decoder.inputs(ids, index)
        mask = jnp.broadcast_to(_causal(n, index, slots)[None], (ids.shape[0], n, slots))
        mem_mask = jnp.broadcast_to(valid[:, None, :], (ids.shape[0], n, valid.shape[1]))
        new = []
        for block, kv, ckv in zip(self.decoder.blocks, cache, cross_kv):
            x, kv = block(x, mask, kv=kv, write_index=index, cross_kv=ckv, memory_mask=mem_mask)
            new.append(kv)
        return self.decoder.embed.attend(self.decoder.norm(x)), new

    def init_cache(self, batch: int):
        return [block.init_cache(batch, self.config.max_frames + 1) for block in self.decoder.blocks]


def teacher_inputs(chords: jax.Array, *, bos: int) -> jax.Array:
    """[BOS, c_0, ..., c_{F-1}] [B, F + 1] from chord-slot tokens [B, F]."""
    return jnp.concatenate([jnp.full((chords.shape[0], 1), bos, chords.dtype), chords], axis=1)


def teacher_targets(chords: jax.Array, end: jax.Array, *, pad: int, eos: int) -> jax.Array:
    """[c_0, ..., c_{e-1}, EOS, PAD...] [B, F + 1]: the teacher's targets for end frames e."""
    b, f = chords.shape
    t = jnp.arange(f + 1)
    body = jnp.concatenate([chords, jnp.full((b, 1), pad, chords.dtype)], axis=1)
    body = jnp.where(t[None] < end[:, None], body, pad)
    return jnp.where(t[None] == end[:, None], eos, body)


def teacher_nll(logits: jax.Array, targets: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position NLL [B, F+1] of the teacher's targets (PAD masked), chord-slot-masked."""
    logp = jax.nn.log_softmax(chord_slot_logits(logits, allowed), axis=-1)
    mask = targets != 0
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask, -picked, 0.0), mask


# --- sampling ---------------------------------------------------------------------------------


class Rollout(NamedTuple):
    chords: jax.Array  # [B, F] chord-slot tokens (EOS at an early stop, PAD after the end)
    logp: jax.Array  # [B, F] log-prob of each chord token under the sampling distribution
    mask: jax.Array  # [B, F] bool: frames that are actions (t < end, incl. an early EOS)
    end: jax.Array  # [B] frames played before EOS (the melody's length, or the early-EOS frame)
    eos_early: jax.Array  # [B] bool: the model emitted EOS before the melody ended


def _pick(logits, key, temperature, greedy):
    logp_all = jax.nn.log_softmax(logits / (1.0 if greedy else temperature), axis=-1)
    if greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        token = jax.random.categorical(key, logp_all, axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]


def sample_online(model: OnlineDecoder, melody: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                  greedy: bool = False, allow_eos: bool = True) -> Rollout:
    """Play chords along ``melody`` [B, F] (PAD after each piece's end) with the online model
    and a KV cache: at frame t sample c_t from the masked chord-slot logits (they saw m_<t,
    c_<t), then feed [c_t, m_t] (the melody forced from the input) in one cached step. A row
    that emits EOS stops. ``allow_eos=False`` masks EOS (evaluation plays the whole melody).
    Jitted per (shape, setting)."""
    graphdef, params = nnx.split(model)
    return _sample_online(graphdef, params, jnp.asarray(melody, jnp.int32), key,
                          float(temperature), bool(greedy), bool(allow_eos))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _sample_online(graphdef, params, melody, key, temperature, greedy, allow_eos) -> Rollout:
    return rollout_online(nnx.merge(graphdef, params), melody, key, temperature=temperature,
                          greedy=greedy, allow_eos=allow_eos)


def rollout_online(model: OnlineDecoder, melody: jax.Array, key: jax.Array, *, temperature: float,
                   greedy: bool, allow_eos: bool) -> Rollout:
    """The body of :func:`sample_online`, for use inside a jitted step."""
    space = model.space
    b, f = melody.shape
    allowed = space.chord_slot_allowed()
    if not allow_eos:
        allowed[space.eos] = False
    allowed = jnp.asarray(allowed)
    length = jnp.sum(melody != space.pad, axis=1)
    cache = model.init_cache(b, 2 * f + 2)
    logits, cache = model.decode(jnp.full((b, 1), space.bos, jnp.int32), cache, 0)

    def frame(carry, xs):
        cache, last, done = carry
        t, m_t, k = xs
        token, logp = _pick(chord_slot_logits(last, allowed), k, temperature, greedy)
        act = (~done) & (t < length)
        token = jnp.where(act, token, space.pad)
        stop = act & (token == space.eos)
        m_in = jnp.where(act & ~stop, m_t, space.pad)
        out, cache = model.decode(jnp.stack([token, m_in], axis=1), cache, 2 * t + 1)
        return (cache, out[:, -1], done | stop), (token, jnp.where(act, logp, 0.0), act, stop)

    keys = jax.random.split(key, f)
    (_, _, _), (chords, logp, act, stop) = jax.lax.scan(
        frame, (cache, logits[:, -1], jnp.zeros((b,), bool)), (jnp.arange(f), melody.T, keys))
    chords, logp, act, stop = chords.T, logp.T, act.T, stop.T
    eos_early = jnp.any(stop, axis=1)
    end = jnp.where(eos_early, jnp.argmax(stop, axis=1), length).astype(jnp.int32)
    return Rollout(chords, logp, act, end, eos_early)


def online_logp(model: OnlineDecoder, melody: jax.Array, rollout: Rollout) -> jax.Array:
    """log pi(c_t | m_<t, c_<t) [B, F] of a rollout's chord tokens from one uncached pass
    (0 outside ``rollout.mask``): the differentiable log-probs of the RL loss, and the oracle
    of the cached sampler."""
    space = model.space
    tokens = interleave_tokens(rollout.chords, melody, rollout.end, pad=space.pad, bos=space.bos,
                               eos=space.eos)
    logits = model(tokens)
    f = melody.shape[1]
    logp = jax.nn.log_softmax(chord_slot_logits(logits[:, 0:2 * f:2], space.chord_slot_allowed()), axis=-1)
    safe = jnp.where(rollout.mask, rollout.chords, 0)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(rollout.mask, picked, 0.0)


def teacher_logp(teacher: OfflineTeacher, melody: jax.Array, rollout: Rollout, *,
                 allow_eos: bool = True) -> jax.Array:
    """log pi_off(c_t | m, c_<t) [B, F] of a rollout's chord tokens (0 outside the mask);
    ``allow_eos=False`` renormalises without EOS (as :func:`sample_teacher` samples)."""
    space = teacher.space
    allowed = space.chord_slot_allowed()
    allowed[space.eos] = allow_eos
    chords = jnp.where(rollout.mask & (rollout.chords != space.eos), rollout.chords, space.pad)
    logits = teacher(melody, teacher_inputs(chords, bos=space.bos))[:, :-1]
    logp = jax.nn.log_softmax(chord_slot_logits(logits, allowed), axis=-1)
    safe = jnp.where(rollout.mask, rollout.chords, 0)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(rollout.mask, picked, 0.0)


def sample_teacher(teacher: OfflineTeacher, melody: jax.Array, key: jax.Array, *,
                   temperature: float = 1.0, greedy: bool = False) -> Rollout:
    """Chords for the whole ``melody`` [B, F] from the offline teacher (encoder once, cached
    decoder; EOS masked: the teacher plays every frame). ``end`` is the melody's length."""
    graphdef, params = nnx.split(teacher)
    return _sample_teacher(graphdef, params, jnp.asarray(melody, jnp.int32), key, float(temperature),
                           bool(greedy))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _sample_teacher(graphdef, params, melody, key, temperature, greedy) -> Rollout:
    teacher = nnx.merge(graphdef, params)
    space = teacher.space
    b, f = melody.shape
    allowed = space.chord_slot_allowed()
    allowed[space.eos] = False
    allowed = jnp.asarray(allowed)
    memory, valid = teacher.encode(melody)
    cross = teacher.cross_kv(memory)
    length = jnp.sum(valid, axis=1)
    cache = teacher.init_cache(b)

    def frame(carry, xs):
        cache, prev = carry
        t, k = xs
        logits, cache = teacher.decode(prev[:, None], cache, t, cross, valid)
        token, logp = _pick(chord_slot_logits(logits[:, -1], allowed), k, temperature, greedy)
        act = t < length
        token = jnp.where(act, token, space.pad)
        return (cache, token), (token, jnp.where(act, logp, 0.0), act)

    keys = jax.random.split(key, f)
    _, (chords, logp, act) = jax.lax.scan(frame, (cache, jnp.full((b,), space.bos, jnp.int32)),
                                          (jnp.arange(f), keys))
    return Rollout(chords.T, logp.T, act.T, length.astype(jnp.int32), jnp.zeros((b,), bool))


def param_count(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))

