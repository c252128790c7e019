"""ReaLchords models: the online model is causal in the melody, the KV-cache samplers equal
one uncached pass, the teacher sees the future, the MLE loss counts only chord slots."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("music21")

from flax import nnx

from audio.music import data
from audio.music import models as M

F = 12
VOCAB = data.Vocab()
SPACE = M.TokenSpace.from_vocab(VOCAB)
CFG = M.ModelConfig(width=32, num_heads=2, head_dim=16, num_layers=1, mlp_dim=64, max_frames=F)


def synthetic_pieces(n: int, frames: int, seed: int = 0) -> list:
    """Toy pieces whose melody notes are tones of the current major triad (chords of 8 or 16
    frames, notes of 2 or 4): real pairings are learnably different from mismatched ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        chord = np.zeros(frames, np.int32)
        con = np.zeros(frames, bool)
        mel = np.zeros(frames, np.int32)
        mon = np.zeros(frames, bool)
        t = 0
        while t < frames:
            d = int(rng.choice([8, 16]))
            c = data.chord_index(f"{data.ROOT_NAMES[int(rng.integers(0, 12))]}:maj")
            chord[t:t + d] = c
            con[t] = True
            u = t
            while u < min(t + d, frames):
                nd = int(rng.choice([2, 4]))
                mel[u:u + nd] = 60 + int(rng.choice(data.chord_pitch_classes(c)))
                mon[u] = True
                u += nd
            t += d
        out.append(data.Piece(f"toy{i}", mel, mon, chord, con))
    return out


def jitted(module, fn):
    """``fn(module, *args)`` as one compiled program (eager transformer calls compile op by op)."""
    graphdef, params = nnx.split(module)
    return jax.jit(lambda *args: fn(nnx.merge(graphdef, params), *args))


def random_melody(rng, b: int, f: int) -> np.ndarray:
    return rng.choice(VOCAB.melody_tokens, size=(b, f)).astype(np.int32)


@pytest.fixture(scope="module")
def online():
    return M.OnlineDecoder(CFG, SPACE, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def online_logits():
    # Two layers: a one-position look-ahead leaks melody m_t into slot 2t only through a
    # second layer (slot 2t -> c_t at 2t+1 -> m_t at 2t+2).
    deep = M.OnlineDecoder(dataclasses.replace(CFG, num_layers=2), SPACE, rngs=nnx.Rngs(0))
    return jitted(deep, lambda m, tokens: m(tokens))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(0, F - 1))
def test_online_chord_at_t_ignores_melody_at_and_after_t(online_logits, seed, t):
    rng = np.random.default_rng(seed)
    chords = rng.choice(VOCAB.chord_tokens, size=(1, F)).astype(np.int32)
    mel = random_melody(rng, 1, F)
    changed = mel.copy()
    changed[:, t:] = random_melody(rng, 1, F - t)
    end = jnp.asarray([F])
    a = M.interleave_tokens(jnp.asarray(chords), jnp.asarray(mel), end, pad=0, bos=1, eos=2)
    b = M.interleave_tokens(jnp.asarray(chords), jnp.asarray(changed), end, pad=0, bos=1, eos=2)
    la, lb = online_logits(a), online_logits(b)
    slots = np.arange(0, 2 * t + 1, 2)  # chord slots 0..t predict c_0..c_t
    np.testing.assert_array_equal(np.asarray(la)[:, slots], np.asarray(lb)[:, slots])
    if t + 1 < F:  # and the melody does reach later chords (the test can fail)
        assert not np.allclose(np.asarray(la)[:, 2 * F], np.asarray(lb)[:, 2 * F])


def test_cached_online_sampler_equals_uncached_pass(online):
    rng = np.random.default_rng(1)
    mel = random_melody(rng, 4, F)
    mel[1, 7:] = 0  # a shorter piece
    out = M.sample_online(online, mel, jax.random.key(3))
    assert out.chords.shape == (4, F) and int(out.end[1]) <= 7
    lp = jitted(online, M.online_logp)(jnp.asarray(mel), out)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(out.logp), atol=2e-5)
    assert np.isin(np.asarray(out.chords)[np.asarray(out.mask) & ~np.asarray(out.eos_early)[:, None]],
                   VOCAB.chord_tokens).all()


def test_teacher_sampler_matches_its_forward_and_sees_the_future():
    teacher = M.OfflineTeacher(CFG, SPACE, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    mel = random_melody(rng, 3, F)
    mel[2, 9:] = 0
    out = M.sample_teacher(teacher, mel, jax.random.key(4))
    logp = jitted(teacher, lambda t, m, o: M.teacher_logp(t, m, o, allow_eos=False))
    lp = logp(jnp.asarray(mel), out)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(out.logp), atol=2e-5)
    assert np.asarray(out.mask).sum(1).tolist() == [F, F, 9]
    # the chord at frame 0 depends on the melody's last frame (offline: it sees the future)
    changed = mel.copy()
    changed[0, F - 1] = VOCAB.melody_token(72, True) if mel[0, F - 1] != VOCAB.melody_token(72, True) \
        else VOCAB.melody_token(60, True)
    assert not np.isclose(float(logp(jnp.asarray(changed), out)[0, 0]), float(lp[0, 0]))


def test_online_nll_counts_chord_slots_only():
    # Hand-made case: V = 5 with chord tokens {3, 4}; EOS = 2. Two frames.
    allowed = np.array([False, False, True, True, True])
    tokens = jnp.asarray([[1, 3, 0 + 1, 4, 1, 2]])  # BOS c0 m0 c1 m1 EOS (melody token ids are ignored)
    logits = jnp.zeros((1, 6, 5))
    nll, mask = M.online_nll(logits, tokens, allowed)
    # uniform over the 3 allowed tokens at every chord slot: -log(1/3) each, 3 slots
    np.testing.assert_allclose(np.asarray(nll), np.full((1, 3), np.log(3.0)), rtol=1e-6)
    assert np.asarray(mask).all()
    # logits at melody positions (odd indices) do not matter
    noisy = logits.at[:, 1::2].set(jax.random.normal(jax.random.key(0), (1, 3, 5)))
    np.testing.assert_allclose(np.asarray(M.online_nll(noisy, tokens, allowed)[0]), np.asarray(nll))


def test_decoder_rejects_too_long_sequences(online):
    with pytest.raises(ValueError, match="max_frames"):
        online(jnp.zeros((1, 2 * F + 4), jnp.int32))


def test_paper_config_sizes():
    cfg = M.ModelConfig.paper()
    assert (cfg.width, cfg.num_heads, cfg.head_dim, cfg.num_layers) == (512, 6, 64, 8)
