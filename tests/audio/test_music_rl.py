"""ReaLchords RL: the REINFORCE+baseline loss against exact enumeration of a tiny policy,
the penalties on hand-built sequences, reward models on a toy, and exact resume."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("music21")

from flax import nnx

from audio.music import (
    data,
    rl,
)
from audio.music import models as M
from audio.music import rewards as R
from tests.audio.test_music_models import synthetic_pieces
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir

VOCAB = data.Vocab()
SPACE = M.TokenSpace.from_vocab(VOCAB)


def build(make):
    """``make()`` with its parameters initialised in one compiled program (eager init compiles
    every random draw on its own: seconds each on a loaded CPU)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1], compiler_options=rl.FAST_COMPILE)())


# --- the loss: exact enumeration oracle -------------------------------------------------------


def _tabular_logp(theta, seqs):
    """log pi(a_0) + log pi(a_1 | a_0) per step, for a 2-step, 3-action tabular policy."""
    l0 = jax.nn.log_softmax(theta["first"])[seqs[:, 0]]
    l1 = jax.nn.log_softmax(theta["second"][seqs[:, 0]], axis=-1)[jnp.arange(len(seqs)), seqs[:, 1]]
    return jnp.stack([l0, l1], axis=1)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_reinforce_with_baseline_gradient_equals_exact_objective_gradient(beta):
    """sum_y pi(y) grad L(y) == -grad [E_pi R - beta KL(pi || q)] for any prefix baseline."""
    rng = np.random.default_rng(0)
    theta = {"first": jnp.asarray(rng.normal(size=3)), "second": jnp.asarray(rng.normal(size=(3, 3)))}
    ref = {"first": jnp.asarray(rng.normal(size=3)), "second": jnp.asarray(rng.normal(size=(3, 3)))}
    seqs = jnp.asarray(list(itertools.product(range(3), repeat=2)))
    reward = jnp.asarray(rng.normal(size=9))
    # a per-frame reward at step t may depend on a_<=t only (reward-to-go credits it to steps <= t)
    frame_reward = jnp.stack([jnp.asarray(rng.normal(size=3))[seqs[:, 0]],
                              jnp.asarray(rng.normal(size=9))], axis=1)
    # A baseline that depends on the prefix only: V_0 constant, V_1 a function of a_0.
    v1 = jnp.asarray(rng.normal(size=3))
    values = jnp.stack([jnp.full(9, 0.7), v1[seqs[:, 0]]], axis=1)
    mask = jnp.ones((9, 2))
    ref_logp = _tabular_logp(ref, seqs)

    def surrogate(th):
        logp = _tabular_logp(th, seqs)
        p = jnp.exp(jax.lax.stop_gradient(logp).sum(1))
        r = rl.token_rewards(logp, ref_logp, mask, beta=beta, sequence_reward=reward,
                             frame_reward=frame_reward)
        policy, _, _ = rl.reinforce_terms(logp, values, r, mask)
        return jnp.sum(p * policy)

    def objective(th):
        logp = _tabular_logp(th, seqs)
        p = jnp.exp(logp.sum(1))
        total = reward + frame_reward.sum(1) - beta * (logp.sum(1) - ref_logp.sum(1))
        return jnp.sum(p * total)

    got = jax.grad(surrogate)(theta)
    want = jax.grad(objective)(theta)
    for k in theta:
        np.testing.assert_allclose(np.asarray(got[k]), -np.asarray(want[k]), atol=1e-5)


def test_returns_and_value_loss_by_hand():
    r = jnp.asarray([[1.0, 2.0, 3.0, 5.0]])
    m = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(rl.returns_to_go(r, m)), [[6.0, 5.0, 3.0, 0.0]])
    v = jnp.asarray([[1.0, 1.0, 1.0, 9.0]])
    _, vloss, adv = rl.reinforce_terms(jnp.zeros((1, 4)), v, r, m)
    np.testing.assert_allclose(np.asarray(adv), [[5.0, 4.0, 2.0, 0.0]])
    np.testing.assert_allclose(np.asarray(vloss), [0.5 * (25 + 16 + 4) / 3])


# --- penalties --------------------------------------------------------------------------------


def test_held_chord_penalty_on_hand_built_sequences():
    f = 80
    chord = np.full((3, f), 5)
    onset = np.zeros((3, f), bool)
    onset[:, 0] = True
    chord[0, 40:] = 7  # 40 frames of chord 5 (penalised), then 40 of chord 7 (also > 32)
    onset[0, 40] = True
    onset[1, 32] = True  # re-struck every 32 frames: 32 + 32 + 16, nothing held > 32
    onset[1, 64] = True
    chord[2, :33] = -1  # 33 silent frames (not a chord), then 47 frames of chord 5
    mask = np.ones((3, f), bool)
    pen = np.asarray(rl.held_chord_penalty(jnp.asarray(chord), jnp.asarray(onset), jnp.asarray(mask)))
    assert pen[0].sum() == -80 and pen[1].sum() == 0
    assert pen[2, :33].sum() == 0 and pen[2, 33:].sum() == -47
    # exactly 32 frames is allowed, 33 is not
    c = np.full((1, 33), 1)
    o = np.zeros((1, 33), bool)
    assert float(rl.held_chord_penalty(jnp.asarray(c[:, :32]), jnp.asarray(o[:, :32]),
                                       jnp.ones((1, 32), bool)).sum()) == 0
    assert float(rl.held_chord_penalty(jnp.asarray(c), jnp.asarray(o), jnp.ones((1, 33), bool)).sum()) == -33


def test_silence_penalty_threshold_and_omitted_start():
    f = 108  # 100 frames after the 8 omitted
    chord = np.zeros((3, f), np.int32)
    mel_silent = np.zeros((3, f), bool)
    chord[0, :8] = -1  # silent only in the omitted start: free
    chord[1, 8:12] = -1  # 4 / 100 = 4%: not above 4%
    chord[2, 8:13] = -1  # 5%: every silent frame costs 1
    pen = np.asarray(rl.silence_penalty(jnp.asarray(chord), jnp.asarray(mel_silent), jnp.ones((3, f), bool)))
    assert pen.sum(1).tolist() == [0, 0, -5]
    mel_silent[2, 8:13] = True  # silent chords under a silent melody are fine
    pen = rl.silence_penalty(jnp.asarray(chord), jnp.asarray(mel_silent), jnp.ones((3, f), bool))
    assert float(pen.sum()) == 0


def test_penalties_of_a_rollout_with_an_early_eos():
    tables = rl.DecodeTables.from_vocab(VOCAB)
    f = 40
    melody = np.full((1, f), VOCAB.melody_token(60, False), np.int32)
    chords = np.full((1, f), VOCAB.chord_token(3, False), np.int32)
    chords[0, 0] = VOCAB.chord_token(3, True)
    chords[0, 36] = VOCAB.EOS  # stops 4 frames early
    chords[0, 37:] = VOCAB.PAD
    mask = np.arange(f)[None] <= 36
    out = M.Rollout(jnp.asarray(chords), jnp.zeros((1, f)), jnp.asarray(mask), jnp.asarray([36]),
                    jnp.asarray([True]))
    frame, seq, counts = rl.penalties(tables, jnp.asarray(melody), out)
    assert float(counts["early_eos_frames"][0]) == 4
    assert float(counts["held_frames"][0]) == 36  # one chord over frames 0..35
    assert float(counts["silent_frames"][0]) == 0
    np.testing.assert_allclose(float(seq[0]), -(36 + 4) / 10)
    assert float(jnp.abs(frame).sum()) == 0


# --- reward models ----------------------------------------------------------------------------


def test_auroc_by_hand():
    assert R.auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert R.auroc([0.1], [0.9]) == 0.0
    assert R.auroc([0.5, 0.7], [0.5, 0.6]) == pytest.approx((1 + 1 + 0.5 + 0) / 4)


def test_windows_cover_the_piece_with_half_overlap():
    x = jnp.arange(1, 11)[None]
    w = np.asarray(R.windows(x, 4))
    assert w[0].tolist() == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10]]
    # a constant score averages to itself, whatever the scales
    s = R.multiscale_reward(lambda m, c: jnp.ones(m.shape[0]) * 0.3, x, x, (8, 4, 2))
    np.testing.assert_allclose(np.asarray(s), [0.3], rtol=1e-6)


def null_auroc_sd(n_real: int, n_fake: int) -> float:
    """Standard deviation of the AUROC (Mann-Whitney U / (n m)) when real and fake scores are
    exchangeable (no ties): sqrt((n + m + 1) / (12 n m))."""
    return float(np.sqrt((n_real + n_fake + 1) / (12 * n_real * n_fake)))


def test_null_auroc_sd_matches_permutation_spread():
    rng = np.random.default_rng(0)
    draws = [R.auroc(*np.split(rng.permutation(100), 2)) for _ in range(4000)]
    assert np.std(draws) == pytest.approx(null_auroc_sd(50, 50), rel=0.06)


def test_reward_models_separate_real_from_mismatched_pairings_on_held_out_toys(capsys):
    """Threshold from the null, not from observed values: a model that ignored the pairing
    scores real and rolled pairings exchangeably, AUROC ~ 0.5 +- null_auroc_sd; we require
    > 0.5 + 4 sd (~0.62 with 160 held-out pieces; a chance pass has probability ~3e-5)."""
    frames = 16
    pieces = synthetic_pieces(64 + 160, frames, seed=0)
    train, test = pieces[:64], pieces[64:]
    bank = rl.FrameBank.build(train, VOCAB)
    cfg = R.RewardConfig(width=32, num_heads=2, head_dim=16, num_layers=1, mlp_dim=64, embed_dim=16,
                         max_frames=frames)
    opt = optax.adam(1e-2)
    mel = np.stack([VOCAB.melody_token_array(p.melody, p.melody_onset) for p in test])
    ch = np.stack([VOCAB.chord_token_array(p.chord, p.chord_onset) for p in test])
    result = {}
    for name, cls in (("contrastive", R.ContrastiveReward), ("discriminative", R.DiscriminativeReward)):
        gd, params = nnx.split(build(lambda cls=cls: cls(cfg, SPACE, rngs=nnx.Rngs(0))))
        chunk = rl.make_supervised_chunk(gd, rl.reward_model_loss, opt, bank, batch=16, frames=frames,
                                         fast_compile=True)
        state, _ = chunk(rl.init_train_state(params, opt, 0), 150)

        @functools.partial(jax.jit, compiler_options=rl.FAST_COMPILE)
        def real_and_fake(p, m, c, gd=gd):
            model = nnx.merge(gd, p)
            return (R.score(model, m, c, multiscale=False),
                    R.score(model, m, R.mismatched(c), multiscale=False))

        real, fake = real_and_fake(state.params, jnp.asarray(mel), jnp.asarray(ch))
        result[name] = R.auroc(np.asarray(real), np.asarray(fake))
    threshold = 0.5 + 4 * null_auroc_sd(len(test), len(test))
    with capsys.disabled():
        print(f"\nreward-model AUROC on {len(test)} held-out toy pieces after 150 steps: {result} "
              f"(threshold {threshold:.3f})")
    assert min(result.values()) > threshold, result


# --- RL step and exact resume -----------------------------------------------------------------


def test_rl_resume_gives_the_parameters_of_an_unbroken_run(tmp_path):
    frames = 8
    pieces = synthetic_pieces(6, frames, seed=1)
    bank = rl.FrameBank.build(pieces, VOCAB)
    cfg = M.ModelConfig(width=16, num_heads=1, head_dim=16, num_layers=1, mlp_dim=32, max_frames=frames)
    rcfg = R.RewardConfig(width=16, num_heads=1, head_dim=16, num_layers=1, mlp_dim=32, embed_dim=8,
                          max_frames=frames)
    online = build(lambda: M.OnlineDecoder(cfg, SPACE, rngs=nnx.Rngs(0)))
    frozen = rl.Frozen(nnx.split(build(lambda: M.OfflineTeacher(cfg, SPACE, rngs=nnx.Rngs(1)))),
                       nnx.split(online),
                       nnx.split(build(lambda: R.ContrastiveReward(rcfg, SPACE, rngs=nnx.Rngs(2)))),
                       nnx.split(build(lambda: R.DiscriminativeReward(rcfg, SPACE, rngs=nnx.Rngs(3)))))
    gd, params = nnx.split(online)
    vgd, vparams = nnx.split(build(lambda: M.ValueDecoder(cfg, SPACE, rngs=nnx.Rngs(4))))
    opt, vopt = optax.adam(1e-3), optax.adam(1e-3)
    settings = rl.RLSettings(batch=2, frames=frames)
    chunk = rl.make_rl_chunk(gd, vgd, opt, vopt, bank, rl.DecodeTables.from_vocab(VOCAB), settings,
                             frozen, "realchords", fast_compile=True)

    def train(path, steps, resume):
        state = rl.init_rl_state(params, vparams, opt, vopt, 7)
        loop = LoopSettings(num_steps=steps, chunk_size=2, save_every=2, desc="rl")
        state, logger = fit(RunDir(path), state, chunk, loop, resume=resume)
        logger.close()
        return state

    whole = train(tmp_path / "a", 4, False)
    train(tmp_path / "b", 2, False)
    resumed = train(tmp_path / "b", 4, True)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 4
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(whole.params))]
    assert any(moved)
    rows = RunDir(tmp_path / "b").read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["kl"]) for r in rows)
