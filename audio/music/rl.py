"""ReaLchords training: MLE pretraining of the online model and the offline teacher, reward-
model training, and RL fine-tuning of the online model with the teacher-KL term and the
penalties (Wu et al., ICML 2024, Sec. 3.3-3.4, Eq. 3; the reference's rewards and
penalties: lukewys/realchords-pytorch ``realchords/rl/reward/*.py``, MIT).

The RL objective on the policy's own samples (melodies from the training set, chords played
by the online model pi):

    J(pi) = E_{c ~ pi(.|m)} [ R(m, c) ] - beta KL(pi(.|m) || pi_anchor(.|m)),   beta = 0.5,

with pi_anchor the offline teacher (distillation, "KD") or, for the reward-only ablations
C / D / C+D, the pretrained online MLE model (the usual RLHF anchor). Per token t (the chord
slots of one rollout, action mask m_t):

    r_t = -beta k1_t + p_t + [t = last] (scale * R_model + P_seq),   k1_t = log pi - log pi_anchor

(``llm_rl.kl.estimate`` with k1 in the reward: unbiased for grad KL), R_model the sum of the
reward models' scores (contrastive cosine, discriminative P(real); optionally multi-scale),
scale = 50 (the paper's reward scale), p_t the per-frame silence penalty and P_seq the
sequence penalties (held chord, early EOS). The penalties follow the reference
``rule_based_rewards.py``: -1 per offending frame, divided by 10 "to make it comparable with
other rewards"; a chord held > 32 frames costs every frame of that chord; silent chords under
a sounding melody cost -1 each once they exceed 4% of the frames after the first 8; an EOS
e frames before the melody ends costs -e.

REINFORCE with a learned value baseline (gamma = 1): G_t = sum_{s >= t} r_s,
A_t = G_t - V_t, policy loss -mean_b sum_t m_t stop_grad(A_t) log pi(c_t | ...), value loss
0.5 (V_t - G_t)^2 (``llm_rl.algorithms.value_loss``, no clipping), both with Adam (lr 1e-4).
:func:`reinforce_terms` is the pure loss; tests/audio/test_music_rl.py checks by exact
enumeration of a tiny policy that its expected gradient is grad J.

Every stage's state is a pytree with its step and PRNG key, trained by
:func:`trainkit.loop.fit` (checkpoints at chunk boundaries; batches are drawn on the device
from the step's key), so a resumed stage ends with exactly the parameters of an unbroken one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from audio.music import models as M
from audio.music import rewards as R
from llm_rl.algorithms import aggregate, terminal_rewards, value_loss, whiten
from llm_rl.kl import estimate
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.sharding import spread_batch

# --- pure functions: penalties ----------------------------------------------------------------


class DecodeTables(NamedTuple):
    """Token-id lookup tables [V] (jnp) for decoding frame tokens inside jitted code."""

    chord: jax.Array  # chord index, -1 chord silence, -2 not a chord token
    onset: jax.Array  # bool: an onset token (melody or chord)
    melody_silent: jax.Array  # bool: the melody-silence token

    @classmethod
    def from_vocab(cls, vocab) -> DecodeTables:
        v = np.arange(vocab.size)
        chord = np.full(vocab.size, -2, np.int32)
        is_chord = vocab.is_chord(v)
        chord[is_chord] = vocab.decode_chord(v[is_chord])[0]
        return cls(jnp.asarray(chord), jnp.asarray(vocab.is_onset(v)),
                   jnp.asarray(v == vocab.melody_silence))


def held_chord_penalty(chord: jax.Array, onset: jax.Array, mask: jax.Array,
                       threshold: int = 32) -> jax.Array:
    """-1 on every frame [B, F] of a chord held longer than ``threshold`` frames.

    A chord is a maximal run of frames with the same (non-silent) chord index that starts at
    an onset or where the index changes; silence (-1) is never a held chord."""
    chex.assert_equal_shape([chord, onset, mask])
    sounding = (chord >= 0) & mask
    prev = jnp.concatenate([jnp.full_like(chord[:, :1], -3), chord[:, :-1]], axis=1)
    starts = sounding & (onset | (chord != prev))
    seg = jnp.cumsum(starts | ~sounding, axis=1)  # segment id; silent frames are their own
    same = seg[:, :, None] == seg[:, None, :]
    length = jnp.sum(same & sounding[:, None, :], axis=2)
    return -(sounding & (length > threshold)).astype(jnp.float32)


def silence_penalty(chord: jax.Array, melody_silent: jax.Array, mask: jax.Array, *,
                    max_ratio: float = 0.04, omit: int = 8) -> jax.Array:
    """-1 [B, F] on each frame after the first ``omit`` where the chord is silent under a
    sounding melody, if such frames exceed ``max_ratio`` of the played frames after
    ``omit`` (the reference's ``SilencePenalty``)."""
    chex.assert_equal_shape([chord, melody_silent, mask])
    after = mask & (jnp.arange(chord.shape[1])[None] >= omit)
    bad = after & (chord == -1) & ~melody_silent
    ratio = jnp.sum(bad, 1) / jnp.maximum(jnp.sum(after, 1), 1)
    return -(bad & (ratio > max_ratio)[:, None]).astype(jnp.float32)


def early_eos_penalty(end: jax.Array, length: jax.Array) -> jax.Array:
    """-(frames of melody left unaccompanied) [B]: min(end - length, 0)."""
    return jnp.minimum(end - length, 0).astype(jnp.float32)


def penalties(tables: DecodeTables, melody: jax.Array, rollout: M.Rollout, *, threshold: int = 32,
              max_ratio: float = 0.04, omit: int = 8, divide: float = 10.0
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(per-frame penalty [B, F], per-sequence penalty [B], counts) of a rollout, divided by
    ``divide`` (the reference's /10). The per-frame silence penalty stays on its frame; the
    held-chord and early-EOS penalties are sequence-level (the reference puts them on the last
    token)."""
    chords = jnp.where(rollout.mask, rollout.chords, 0)
    chord = tables.chord[chords]
    onset = tables.onset[chords]
    played = rollout.mask & (chord >= -1)  # the EOS action is not a played frame
    length = jnp.sum(melody != 0, axis=1)
    held = held_chord_penalty(chord, onset, played, threshold)
    silent = silence_penalty(chord, tables.melody_silent[melody], played, max_ratio=max_ratio, omit=omit)
    eos = early_eos_penalty(rollout.end, length)
    counts = {"held_frames": -jnp.sum(held, 1), "silent_frames": -jnp.sum(silent, 1),
              "early_eos_frames": -eos}
    return silent / divide, (jnp.sum(held, 1) + eos) / divide, counts


# --- pure functions: the RL loss --------------------------------------------------------------


def returns_to_go(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """G_t = sum_{s >= t} m_s r_s [B, F] (gamma = 1), 0 outside the mask."""
    r = rewards * mask
    return jnp.flip(jnp.cumsum(jnp.flip(r, 1), 1), 1) * mask


def token_rewards(logp: jax.Array, anchor_logp: jax.Array, mask: jax.Array, *, beta: float,
                  sequence_reward: jax.Array, frame_reward: jax.Array | None = None) -> jax.Array:
    """r_t [B, F] = -beta k1_t + frame_reward_t + [t = last action] sequence_reward (detached)."""
    chex.assert_equal_shape([logp, anchor_logp, mask])
    m = mask.astype(jnp.float32)
    kl = estimate(jax.lax.stop_gradient(logp), jax.lax.stop_gradient(anchor_logp), "k1") * m
    r = -beta * kl + terminal_rewards(sequence_reward, m)
    if frame_reward is not None:
        r = r + frame_reward * m
    return jax.lax.stop_gradient(r)


def reinforce_terms(logp: jax.Array, values: jax.Array, rewards: jax.Array, mask: jax.Array, *,
                    normalize: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sequence REINFORCE-with-baseline policy loss [B], per-sequence value loss [B], and
    the advantages [B, F]:

        A_t = G_t - V_t (stop-gradient),  L_pi(b) = -sum_t m_t A_t log pi_t,
        L_V(b) = 0.5 sum_t m_t (V_t - G_t)^2 / sum_t m_t.

    With ``normalize`` the advantages are whitened over the batch (``llm_rl.algorithms.whiten``;
    biased, off by default)."""
    chex.assert_equal_shape([logp, values, rewards, mask])
    m = mask.astype(jnp.float32)
    g = returns_to_go(rewards, m)
    adv = jax.lax.stop_gradient(g - values) * m
    if normalize:
        adv = whiten(adv, m)
    policy = -jnp.sum(adv * logp * m, axis=1)
    vloss = 0.5 * jnp.sum(jnp.square(values - jax.lax.stop_gradient(g)) * m, 1) / jnp.maximum(m.sum(1), 1.0)
    return policy, vloss, adv


def reinforce_loss(logp, values, rewards, mask, *, normalize: bool = False) -> tuple[jax.Array, dict]:
    """mean_b L_pi + the token-mean value loss (``llm_rl.algorithms.value_loss``)."""
    policy, _, adv = reinforce_terms(logp, values, rewards, mask, normalize=normalize)
    m = mask.astype(jnp.float32)
    g = returns_to_go(rewards, m)
    vl = value_loss(values, values, g, m, clip_eps=None)
    return jnp.mean(policy) + vl, {"policy_loss": jnp.mean(policy), "value_loss": vl,
                                   "return": aggregate(g, m, "token_mean"),
                                   "advantage": aggregate(adv, m, "token_mean")}


# --- data on the device -----------------------------------------------------------------------


class FrameBank(NamedTuple):
    """Training pieces (and their transpositions) as frame tokens on the device:
    melody, chords [N, L] (PAD past each piece's end), length [N]."""

    melody: jax.Array
    chords: jax.Array
    length: jax.Array

    @classmethod
    def build(cls, pieces: Sequence, vocab, shifts: Sequence[int] = (0,)) -> FrameBank:
        from audio.music import data

        items = [data.transpose(p, s) if s else p for p in pieces for s in shifts]
        if not items:
            raise ValueError("FrameBank.build: no pieces")
        n = max(len(p) for p in items)
        mel = np.zeros((len(items), n), np.int32)
        ch = np.zeros((len(items), n), np.int32)
        for i, p in enumerate(items):
            mel[i, :len(p)] = vocab.melody_token_array(p.melody, p.melody_onset)
            ch[i, :len(p)] = vocab.chord_token_array(p.chord, p.chord_onset)
        return cls(jnp.asarray(mel), jnp.asarray(ch), jnp.asarray([len(p) for p in items], jnp.int32))


def sample_crops(bank: FrameBank, key: jax.Array, batch: int, frames: int,
                 beat: int = 4) -> tuple[jax.Array, jax.Array]:
    """``batch`` random windows (melody, chords) [batch, frames] starting on a beat; pieces
    shorter than ``frames`` come whole, PAD-filled."""
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (batch,), 0, bank.length.shape[0])
    room = jnp.maximum(bank.length[idx] - frames, 0) // beat
    start = (jax.random.randint(k2, (batch,), 0, 1 << 20) % (room + 1)) * beat
    pad = jnp.zeros((bank.melody.shape[0], frames), jnp.int32)
    mel = jnp.concatenate([bank.melody, pad], 1)
    ch = jnp.concatenate([bank.chords, pad], 1)
    take = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, frames))
    return take(mel[idx], start), take(ch[idx], start)


def random_lengths(melody: jax.Array, chords: jax.Array, key: jax.Array,
                   lengths: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Cut each row to a length drawn from ``lengths`` (PAD after): the reward models see
    windows of every multi-scale size during training."""
    n = jax.random.choice(key, jnp.asarray(lengths), (melody.shape[0],))
    keep = jnp.arange(melody.shape[1])[None] < n[:, None]
    return jnp.where(keep, melody, 0), jnp.where(keep, chords, 0)


# --- supervised stages (MLE, reward models) ---------------------------------------------------


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    guard: GuardState


def init_train_state(params, optimizer, seed: int) -> TrainState:
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32),
                      jax.random.key(seed), init_guard())


def online_mle_loss(model: M.OnlineDecoder, melody, chords) -> jax.Array:
    space = model.space
    end = jnp.sum(melody != space.pad, 1)
    tokens = M.interleave_tokens(chords, melody, end, pad=space.pad, bos=space.bos, eos=space.eos)
    nll, mask = M.online_nll(model(tokens), tokens, space.chord_slot_allowed())
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1)


def teacher_mle_loss(teacher: M.OfflineTeacher, melody, chords) -> jax.Array:
    space = teacher.space
    end = jnp.sum(melody != space.pad, 1)
    chords = jnp.where(melody != space.pad, chords, space.pad)
    logits = teacher(melody, M.teacher_inputs(chords, bos=space.bos))
    targets = M.teacher_targets(chords, end, pad=space.pad, eos=space.eos)
    nll, mask = M.teacher_nll(logits, targets, space.chord_slot_allowed())
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1)


def reward_model_loss(model, melody, chords) -> jax.Array:
    return model.loss(melody, chords)


# XLA options that compile several times faster on CPU (no LLVM optimisation) and run slower:
# for tests, whose cost is almost all compilation.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def batch_spread(mesh, batch: int):
    """The mesh a step splits its ``batch`` crops over (:func:`trainkit.sharding.spread_batch`;
    None: no mesh), checked up front. With a mesh, the state, the bank and the frozen models
    are replicated on it (:func:`trainkit.sharding.replicate`) and every step draws the same
    crops as without one (a partitionable PRNG), each device computing its share of them: the
    rollouts, the losses and their gradients, reduced over every device of every process.
    ``ValueError`` when ``batch`` does not divide over the batch axes."""
    if mesh is not None:
        jax.eval_shape(lambda: spread_batch(jnp.zeros((batch,)), mesh))  # the divisibility check
    return mesh


def make_supervised_chunk(graphdef, loss: Callable, optimizer, bank: FrameBank, *, batch: int,
                          frames: int, crop_lengths: Sequence[int] | None = None,
                          fast_compile: bool = False, mesh=None):
    """``chunk(state, n) -> (state, metrics)`` running n steps of ``loss(model, melody,
    chords)`` on random crops of ``bank`` drawn from each step's key (see the module
    docstring); ``crop_lengths`` draws shorter windows too (reward models). The step is
    compiled once per (graphdef, loss, optimizer, sizes): seeds reuse it. ``fast_compile``
    compiles it with :data:`FAST_COMPILE` (same numbers up to float rounding). ``mesh``: each
    batch split over its devices (:func:`batch_spread`)."""
    lengths = tuple(int(x) for x in crop_lengths) if crop_lengths else None
    step = _supervised_step_fast if fast_compile else _supervised_step
    spread = batch_spread(mesh, batch)
    return _chunk_of(lambda state: step(graphdef, loss, optimizer, batch, frames, lengths, spread,
                                        state, bank))


def _supervised_step_impl(graphdef, loss, optimizer, batch, frames, crop_lengths, spread,
                          state: TrainState, bank: FrameBank):
    key = jax.random.fold_in(state.key, state.step)
    k_data, k_len = jax.random.split(key)
    melody, chords = sample_crops(bank, k_data, batch, frames)
    if spread is not None:
        melody, chords = spread_batch((melody, chords), spread)
    if crop_lengths:
        melody, chords = random_lengths(melody, chords, k_len, crop_lengths)

    def f(params):
        return loss(nnx.merge(graphdef, params), melody, chords)

    value, grads = jax.value_and_grad(f)(state.params)
    params, opt_state, guard, gm = guarded_update(optimizer, grads, state.opt_state, state.params,
                                                  value, state.guard)
    return (TrainState(params, opt_state, state.step + 1, state.key, guard),
            {"loss": value, "grad_norm": optax.global_norm(grads), **gm})


_supervised_step = jax.jit(_supervised_step_impl, static_argnums=(0, 1, 2, 3, 4, 5, 6))
_supervised_step_fast = jax.jit(_supervised_step_impl, static_argnums=(0, 1, 2, 3, 4, 5, 6),
                                compiler_options=FAST_COMPILE)


def _chunk_of(step):
    def chunk(state, n):
        rows = []
        for _ in range(n):
            state, metrics = step(state)
            rows.append(metrics)
        return state, {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
    return chunk


# --- RL ---------------------------------------------------------------------------------------


# Each method is a weight vector (contrastive, discriminative, anchor = teacher, penalties), so
# all methods share one compiled step; ReaLchords-M differs in a static flag (multi-scale).
# Every method keeps the penalties (the reference applies them to all RL runs): without the
# early-EOS penalty, KD learned to emit EOS at the first frame (no tokens, no KL) within 40
# steps in a toy run.
METHODS = {
    "kd": (0.0, 0.0, 1.0, 1.0),
    "c": (1.0, 0.0, 0.0, 1.0),
    "d": (0.0, 1.0, 0.0, 1.0),
    "c+d": (1.0, 1.0, 0.0, 1.0),
    "realchords": (1.0, 1.0, 1.0, 1.0),
    "realchords-m": (1.0, 1.0, 1.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Static RL settings (hashable: part of the compiled step)."""

    beta: float = 0.5
    reward_scale: float = 50.0
    multiscale: bool = False
    batch: int = 16
    frames: int = 64
    temperature: float = 1.0
    normalize_advantages: bool = False


class RLState(NamedTuple):
    params: Any
    value_params: Any
    opt_state: Any
    value_opt_state: Any
    step: jax.Array
    key: jax.Array
    guard: GuardState


def init_rl_state(params, value_params, optimizer, value_optimizer, seed: int) -> RLState:
    return RLState(params, value_params, optimizer.init(params), value_optimizer.init(value_params),
                   jnp.zeros((), jnp.int32), jax.random.key(seed), init_guard())


class Frozen(NamedTuple):
    """The fixed models of an RL run: (graphdef, params) of the teacher, the pretrained online
    model and each reward model."""

    teacher: tuple
    online: tuple
    contrastive: tuple
    discriminative: tuple


def make_rl_chunk(graphdef, value_graphdef, optimizer, value_optimizer, bank: FrameBank,
                  tables: DecodeTables, settings: RLSettings, frozen: Frozen, method: str, *,
                  fast_compile: bool = False, mesh=None):
    """``chunk(state, n) -> (state, metrics)``: n RL updates, each on a fresh batch of the
    policy's own rollouts (one update per batch, as the reference's single epoch); ``method``
    one of :data:`METHODS`; ``fast_compile`` and ``mesh`` as in :func:`make_supervised_chunk`
    (with a mesh the rollouts too are split over its devices)."""
    if method not in METHODS:
        raise ValueError(f"RL method {method!r}: must be one of {', '.join(METHODS)}")
    if method == "realchords-m":
        settings = dataclasses.replace(settings, multiscale=True)
    weights = jnp.asarray(METHODS[method], jnp.float32)
    gds = tuple(g for g, _ in frozen)
    params = tuple(p for _, p in frozen)
    step = _rl_step_fast if fast_compile else _rl_step
    spread = batch_spread(mesh, settings.batch)
    return _chunk_of(lambda state: step(graphdef, value_graphdef, optimizer, value_optimizer,
                                        settings, gds, spread, state, bank, tables, params, weights))


def _rl_step_impl(graphdef, value_graphdef, optimizer, value_optimizer, s: RLSettings, frozen_gds,
                  spread, state: RLState, bank: FrameBank, tables: DecodeTables, frozen_params,
                  weights):
    w_c, w_d, w_teacher, w_pen = weights[0], weights[1], weights[2], weights[3]
    teacher, online, contrastive, discriminative = (
        nnx.merge(g, p) for g, p in zip(frozen_gds, frozen_params))
    key = jax.random.fold_in(state.key, state.step)
    k_data, k_roll = jax.random.split(key)
    melody, _ = sample_crops(bank, k_data, s.batch, s.frames)
    if spread is not None:
        melody = spread_batch(melody, spread)
    policy = nnx.merge(graphdef, state.params)
    space = policy.space
    rollout = M.rollout_online(policy, melody, k_roll, temperature=s.temperature, greedy=False,
                               allow_eos=True)
    rollout = jax.tree.map(jax.lax.stop_gradient, rollout)
    played = jnp.where(rollout.mask & (rollout.chords != space.eos), rollout.chords, space.pad)
    anchor_lp = (w_teacher * M.teacher_logp(teacher, melody, rollout)
                 + (1 - w_teacher) * M.online_logp(online, melody, rollout))
    r_c = R.score(contrastive, melody, played, multiscale=s.multiscale)
    r_d = R.score(discriminative, melody, played, multiscale=s.multiscale)
    reward = w_c * r_c + w_d * r_d
    frame_pen, seq_pen, counts = penalties(tables, melody, rollout)
    rewards = token_rewards(rollout.logp, anchor_lp, rollout.mask, beta=s.beta,
                            sequence_reward=s.reward_scale * reward + w_pen * seq_pen,
                            frame_reward=w_pen * frame_pen)
    tokens = M.interleave_tokens(rollout.chords, melody, rollout.end, pad=space.pad, bos=space.bos,
                                 eos=space.eos)

    def loss(params, value_params):
        logp = M.online_logp(nnx.merge(graphdef, params), melody, rollout)
        values = nnx.merge(value_graphdef, value_params)(tokens)
        return reinforce_loss(logp, values, rewards, rollout.mask, normalize=s.normalize_advantages)

    (value, aux), (g, vg) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        state.params, state.value_params)
    params, opt_state, guard, gm = guarded_update(optimizer, g, state.opt_state, state.params,
                                                  value, state.guard)
    # The critic follows the policy's guard: a non-finite step leaves both untouched.
    vparams, vopt, _, _ = guarded_update(value_optimizer, vg, state.value_opt_state,
                                         state.value_params,
                                         jnp.where(gm["skipped"] == 0, value, jnp.nan), init_guard())
    kl = estimate(rollout.logp, anchor_lp, "k1") * rollout.mask
    metrics = {"loss": value, **aux, "reward_contrastive": jnp.mean(r_c),
               "reward_discriminative": jnp.mean(r_d), "reward_model": jnp.mean(reward),
               "kl": jnp.mean(jnp.sum(kl, 1)),
               "neg_logp": -aggregate(rollout.logp, rollout.mask, "token_mean"),
               "early_eos": jnp.mean(rollout.eos_early.astype(jnp.float32)),
               **{k: jnp.mean(v) for k, v in counts.items()}, **gm}
    return RLState(params, vparams, opt_state, vopt, state.step + 1, state.key, guard), metrics


_rl_step = jax.jit(_rl_step_impl, static_argnums=(0, 1, 2, 3, 4, 5, 6))
_rl_step_fast = jax.jit(_rl_step_impl, static_argnums=(0, 1, 2, 3, 4, 5, 6),
                        compiler_options=FAST_COMPILE)
