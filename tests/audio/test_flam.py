"""FLAM losses against float64 numpy oracles and closed forms; chunked frame loss against the
direct one (values, gradients, memory); logit-adjustment gradient routing."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from audio import flam

SETTINGS = settings(max_examples=15, deadline=None)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_sed(frames, text, alpha, beta, labels, fm, tm):
    """Triple loop over (b, k, l) in float64: the definition, term by term."""
    b_, l_, _ = frames.shape
    k_ = text.shape[0]
    total, count = 0.0, 0.0
    for b in range(b_):
        for k in range(k_):
            for l in range(l_):
                m = fm[b, l] * tm[k]
                if m == 0:
                    continue
                h = alpha[k] * float(np.dot(frames[b, l], text[k])) + beta[k]
                z = 1.0 if labels[b, k, l] else -1.0
                total += -math.log(_sigmoid(z * h))
                count += 1
    return total / max(count, 1.0)


def _inputs(seed, b, k, l, d, dtype=np.float32, mask=True):
    rng = np.random.default_rng(seed)
    frames = rng.standard_normal((b, l, d))
    frames /= np.linalg.norm(frames, axis=-1, keepdims=True)
    text = rng.standard_normal((k, d))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    alpha = rng.uniform(1.0, 15.0, k)
    beta = rng.normal(-4.0, 2.0, k)
    labels = rng.random((b, k, l)) < 0.25
    fm = rng.random((b, l)) < 0.8 if mask else np.ones((b, l), bool)
    tm = rng.random(k) < 0.85 if mask else np.ones(k, bool)
    cast = lambda a: a.astype(dtype)
    return cast(frames), cast(text), cast(alpha), cast(beta), labels, fm, tm


# --- logits and the frame loss ---------------------------------------------------------------


class FrameLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_frame_logits_oracle(self):
        frames, text, alpha, beta, *_ = _inputs(0, 3, 5, 4, 6)
        h = self.variant(flam.frame_logits)(frames, text, alpha, beta)
        ref = (alpha[None, :, None] * np.einsum("bld,kd->bkl", frames.astype(np.float64), text)
               + beta[None, :, None])
        chex.assert_shape(h, (3, 5, 4))
        np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_frame_loss_matches_triple_loop(self):
        frames, text, alpha, beta, labels, fm, tm = _inputs(1, 3, 6, 5, 4)
        got = self.variant(flam.frame_loss)(frames, text, alpha, beta, labels, fm, tm)
        ref = _np_sed(frames.astype(np.float64), text.astype(np.float64), alpha, beta, labels,
                      fm, tm)
        np.testing.assert_allclose(got, ref, rtol=1e-5)

    def test_label_convention_and_sign(self):
        # labels are {0, 1}; bool, int and float give the same loss.
        frames, text, alpha, beta, labels, fm, tm = _inputs(2, 2, 3, 4, 5)
        h = flam.frame_logits(frames, text, alpha, beta)
        ref = flam.sed_loss(h, labels, fm, tm)
        for y in (labels.astype(np.int32), labels.astype(np.float32), labels.astype(np.int8)):
            np.testing.assert_allclose(flam.sed_loss(h, y, fm, tm), ref, rtol=1e-6)
        # A confident correct logit costs ~0, a confident wrong one ~|h|.
        y = jnp.array([[[1, 0]]])
        np.testing.assert_allclose(flam.sed_loss(jnp.array([[[20.0, -20.0]]]), y), 0.0, atol=1e-8)
        np.testing.assert_allclose(flam.sed_loss(jnp.array([[[-20.0, 20.0]]]), y), 20.0, rtol=1e-6)
        # log 2 at h = 0, whatever the label.
        np.testing.assert_allclose(flam.sed_loss(jnp.zeros((1, 1, 2)), y), math.log(2), rtol=1e-6)

    def test_masked_entries_do_not_count(self):
        frames, text, alpha, beta, labels, _, _ = _inputs(3, 2, 3, 4, 5, mask=False)
        fm = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
        full = flam.frame_loss(frames, text, alpha, beta, labels, fm)
        # Changing embeddings and labels of masked frames changes nothing.
        frames2 = frames.copy()
        frames2[0, 2:] = -frames2[0, 2:]
        labels2 = labels.copy()
        labels2[0, :, 2:] = ~labels2[0, :, 2:]
        np.testing.assert_allclose(flam.frame_loss(frames2, text, alpha, beta, labels2, fm),
                                   full, rtol=1e-6)
        # The normaliser is the number of valid triples (6 frames x 3 texts).
        h = np.asarray(flam.frame_logits(frames, text, alpha, beta), np.float64)
        per = _softplus(-(2.0 * labels - 1) * h) * fm[:, None, :]
        np.testing.assert_allclose(full, per.sum() / 18.0, rtol=1e-5)
        # Nothing valid: 0, not NaN.
        assert float(flam.frame_loss(frames, text, alpha, beta, labels, np.zeros_like(fm))) == 0.0

    def test_beta_gradient_of_frame_loss_is_exactly_zero(self):
        frames, text, alpha, beta, labels, fm, tm = _inputs(4, 3, 4, 5, 6)
        loss = lambda b, **kw: flam.frame_loss(frames, text, alpha, b, labels, fm, tm, **kw)
        g = jax.grad(loss)(jnp.asarray(beta))
        assert np.all(np.asarray(g) == 0.0)
        g_free = jax.grad(lambda b: loss(b, stop_beta_grad=False))(jnp.asarray(beta))
        # Without the stop-gradient beta gets d/dh summed over its (b, l): non-zero.
        assert np.all(np.abs(np.asarray(g_free)[tm]) > 0)

    def test_shape_checks(self):
        frames, text, alpha, beta, labels, *_ = _inputs(5, 2, 3, 4, 5)
        with pytest.raises(AssertionError):
            flam.frame_logits(frames, text[:, :4], alpha, beta)
        with pytest.raises(AssertionError):
            flam.frame_loss(frames, text, alpha, beta, labels[:, :2])
        with pytest.raises(AssertionError):
            flam.prior_loss(beta[:2], labels)


# --- the chunked frame loss ---------------------------------------------------------------------


def _grads(fn, frames, text, alpha, beta, labels, fm, tm):
    fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    return fn(*map(jnp.asarray, (frames, text, alpha, beta, labels, fm, tm)))


# Shapes from small pools (each new shape or chunk compiles; the pools keep the test fast)
# that include N < chunk, N = chunk, chunk | N and chunk not dividing N (N = K or B).
@given(b=st.sampled_from([1, 3, 7]), k=st.sampled_from([1, 5, 12]), l=st.sampled_from([1, 4]),
       d=st.sampled_from([2, 5]), chunk=st.sampled_from([1, 4, 5, 16]), masked=st.booleans(),
       stop=st.booleans(), axis=st.sampled_from(["text", "batch"]),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10, deadline=None)
def test_chunked_equals_direct_value_and_grads(b, k, l, d, chunk, masked, stop, axis, seed):
    frames, text, alpha, beta, labels, fm, tm = _inputs(seed, b, k, l, d, mask=masked)
    direct = lambda f, t, a, be, y, m1, m2: flam.frame_loss(f, t, a, be, y, m1, m2,
                                                            stop_beta_grad=stop)
    chunked = lambda f, t, a, be, y, m1, m2: flam.sed_loss_chunked(f, t, a, be, y, chunk, m1, m2,
                                                                   axis=axis, stop_beta_grad=stop)
    v1, g1 = _grads(direct, frames, text, alpha, beta, labels, fm, tm)
    v2, g2 = _grads(chunked, frames, text, alpha, beta, labels, fm, tm)
    np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-6)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    if stop:
        assert np.all(np.asarray(g2[3]) == 0.0)


@pytest.mark.parametrize("axis", ["text", "batch"])
def test_chunked_matches_oracle_on_non_dividing_chunks(axis):
    # N = 10 with chunk 4: chunks [0:4], [4:8], and the last slid back to [6:10] whose first
    # two items must not be counted twice.
    frames, text, alpha, beta, labels, fm, tm = _inputs(7, 10, 10, 4, 3)
    ref = _np_sed(frames.astype(np.float64), text.astype(np.float64), alpha, beta, labels, fm, tm)
    for chunk in (3, 4, 10, 64):
        got = flam.sed_loss_chunked(frames, text, alpha, beta, labels, chunk, fm, tm, axis=axis)
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk"):
        flam.sed_loss_chunked(frames, text, alpha, beta, labels, 0)
    with pytest.raises(ValueError, match="axis"):
        flam.sed_loss_chunked(frames, text, alpha, beta, labels, 2, axis="frames")


def test_chunked_never_materialises_the_full_logits():
    """Compiled temporary memory: the direct loss and its gradient hold [B, K, L] float32
    buffers; chunked by texts only [B, chunk, L] chunks plus the [B, L, D] gradient; chunked
    by clips only [chunk, K, L] chunks (plus at most the gradient buffers)."""
    b, k, l, d, chunk = 8, 512, 64, 16, 16
    sd = jax.ShapeDtypeStruct
    args = (sd((b, l, d), jnp.float32), sd((k, d), jnp.float32), sd((k,), jnp.float32),
            sd((k,), jnp.float32), sd((b, k, l), jnp.bool_))

    def temp_bytes(loss):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        analysis = fn.lower(*args).compile().memory_analysis()
        if analysis is None:
            pytest.skip("backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    full = b * k * l * 4
    naive = temp_bytes(lambda f, t, a, be, y: flam.frame_loss(f, t, a, be, y))
    chunked = temp_bytes(lambda f, t, a, be, y: flam.sed_loss_chunked(f, t, a, be, y, chunk,
                                                                     axis="text"))
    by_clip = temp_bytes(lambda f, t, a, be, y: flam.sed_loss_chunked(f, t, a, be, y, 1,
                                                                     axis="batch"))
    assert naive >= full
    assert chunked < full / 4
    assert chunked < 4 * (b * chunk * l * 4) + 2 * (b * l * d * 4) + k * (d + 2) * 4 * 2
    assert by_clip <= full / b * 4 + 2 * (b * l * d * 4) + k * (d + 2) * 4 * 2


# --- prior loss ---------------------------------------------------------------------------------


def test_prior_loss_closed_form():
    # 2 clips x 3 texts x 4 frames; rates: text 0 -> 2/8, text 1 -> 0, text 2 -> 8/8.
    labels = np.zeros((2, 3, 4), bool)
    labels[0, 0, :2] = True
    labels[:, 2, :] = True
    np.testing.assert_allclose(flam.positive_rate(labels), [0.25, 0.0, 1.0])
    beta = jnp.array([0.3, -2.0, 1.5])
    zbar = np.array([0.25, 0.0, 1.0])
    bce = -(zbar * np.log(_sigmoid(np.asarray(beta, np.float64)))
            + (1 - zbar) * np.log(1 - _sigmoid(np.asarray(beta, np.float64))))
    np.testing.assert_allclose(flam.prior_loss(beta, labels), bce.mean(), rtol=1e-6)
    # Gradient (sigmoid(beta) - zbar) / K; zero at beta = logit(zbar).
    g = jax.grad(flam.prior_loss)(beta, labels)
    np.testing.assert_allclose(g, (_sigmoid(np.asarray(beta, np.float64)) - zbar) / 3, rtol=1e-5)
    g0 = jax.grad(flam.prior_loss)(jnp.array([math.log(0.25 / 0.75)]), labels[:, :1])
    np.testing.assert_allclose(g0, [0.0], atol=1e-7)


def test_prior_loss_masks():
    labels = np.zeros((2, 2, 4), bool)
    labels[0, 0, :2] = True
    labels[1, 0, :] = True  # clip 1 is padding: its frames are masked
    fm = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(flam.positive_rate(labels, fm), [0.5, 0.0])
    beta = jnp.array([0.0, -1.0])
    tm = np.array([True, False])
    # Only text 0 counts: BCE(sigmoid(0), 0.5) = log 2.
    np.testing.assert_allclose(flam.prior_loss(beta, labels, fm, tm), math.log(2), rtol=1e-6)
    assert np.asarray(jax.grad(flam.prior_loss)(beta, labels, fm, tm))[1] == 0.0


# --- calibrated score ---------------------------------------------------------------------------


finite = st.floats(-15.0, 15.0, allow_nan=False)


@given(finite, finite)
@settings(max_examples=200, deadline=None)
def test_unbiased_score_range_and_identity(h, b):
    s = float(flam.unbiased_score(jnp.array([h], jnp.float32), jnp.array([b], jnp.float32))[0])
    assert 0.0 < s < 1.0
    h64, b64 = float(np.float32(h)), float(np.float32(b))
    ratio = _sigmoid(h64) / (_sigmoid(h64) + _sigmoid(b64))
    closed = _sigmoid((h64 - b64) - (_softplus(h64) - _softplus(b64)))
    assert abs(ratio - closed) < 1e-12
    assert abs(s - ratio) < 1e-6


@given(finite)
@settings(max_examples=100, deadline=None)
def test_unbiased_score_is_half_exactly_when_h_equals_beta(v):
    s = flam.unbiased_score(jnp.full((2, 1, 3), v, jnp.float32), jnp.array([v], jnp.float32))
    assert np.all(np.asarray(s) == 0.5)


def test_logit_adjustment_for_rare_events():
    """For a rare text (beta << 0) and h << 0, s = sigmoid(h - beta): the score depends only on
    alpha <e_l, e(y)>, the prior removed; the error is at most max(e^h, e^beta) / 4."""
    beta = jnp.array([-12.0, -9.0])
    h = jnp.stack([jnp.linspace(-20.0, -6.0, 15), jnp.linspace(-18.0, -5.0, 15)])  # [K, L]
    s = np.asarray(flam.unbiased_score(h, beta), np.float64)
    h64, b64 = np.asarray(h, np.float64), np.asarray(beta, np.float64)[:, None]
    approx = _sigmoid(h64 - b64)
    bound = np.maximum(np.exp(h64), np.exp(b64)) / 4
    assert np.all(np.abs(s - approx) <= bound + 1e-7)
    assert np.abs(s - approx).max() < 2e-3
    # Monotone in h, and a frame at the prior's own logit gets 1/2 (not sigmoid(-12) ~ 6e-6).
    assert np.all(np.diff(s, axis=1) > 0)
    # For a common event the raw sigmoid(h) and the calibrated score differ a lot.
    common = float(flam.unbiased_score(jnp.array([2.0]), jnp.array([2.0]))[0])
    assert common == 0.5 and _sigmoid(2.0) > 0.88


# --- clip InfoNCE and the total ----------------------------------------------------------------


def _np_infonce(a, t, temp):
    s = a.astype(np.float64) @ t.astype(np.float64).T / temp
    def ce(m):
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))
    return 0.5 * (ce(s) + ce(s.T))


class InfoNCETest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        rng = np.random.default_rng(8)
        for b, d, temp in ((5, 8, 0.07), (16, 4, 1.0), (1, 3, 0.5)):
            a = rng.standard_normal((b, d)).astype(np.float32)
            t = rng.standard_normal((b, d)).astype(np.float32)
            a /= np.linalg.norm(a, axis=1, keepdims=True)
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            got = self.variant(flam.clip_infonce)(a, t, temp)
            np.testing.assert_allclose(got, _np_infonce(a, t, temp), rtol=1e-5, atol=1e-6)

    def test_symmetric_and_limits(self):
        rng = np.random.default_rng(9)
        a = rng.standard_normal((6, 5)).astype(np.float32)
        t = rng.standard_normal((6, 5)).astype(np.float32)
        np.testing.assert_allclose(flam.clip_infonce(a, t, 0.1), flam.clip_infonce(t, a, 0.1),
                                   rtol=1e-6)
        # Orthonormal matched pairs at low temperature: ~0; all-equal embeddings: log B.
        eye = np.eye(6, dtype=np.float32)
        assert float(flam.clip_infonce(eye, eye, 0.01)) < 1e-6
        ones = np.ones((6, 5), np.float32)
        np.testing.assert_allclose(flam.clip_infonce(ones, ones, 0.1), math.log(6), rtol=1e-6)
        # Learnable temperature: finite, non-zero gradient through exp(-logit_scale).
        g = jax.grad(lambda ls: flam.clip_infonce(a, t, jnp.exp(-ls)))(flam.CLIP_LOGIT_SCALE_INIT)
        assert np.isfinite(g) and g != 0


@pytest.mark.parametrize("chunk,chunk_axis", [(None, "text"), (3, "text"), (2, "batch")])
def test_total_loss_routes_beta_gradient_to_prior_only(chunk, chunk_axis):
    frames, text, alpha, beta, labels, fm, tm = _inputs(10, 3, 7, 5, 4)
    rng = np.random.default_rng(11)
    audio_emb = rng.standard_normal((4, 6)).astype(np.float32)
    text_emb = rng.standard_normal((4, 6)).astype(np.float32)

    def total(frames, text, alpha, beta, temp):
        return flam.total_loss(frames, text, alpha, beta, labels, audio_emb, text_emb, temp,
                               fm, tm, chunk=chunk, chunk_axis=chunk_axis).total

    args = tuple(map(jnp.asarray, (frames, text, alpha, beta))) + (jnp.float32(0.07),)
    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3, 4)))(*args)
    g_prior = jax.grad(flam.prior_loss)(jnp.asarray(beta), labels, fm, tm)
    np.testing.assert_allclose(grads[3], g_prior, rtol=1e-6, atol=1e-9)

    def not_prior(beta):
        parts = flam.total_loss(args[0], args[1], args[2], beta, labels, audio_emb, text_emb,
                                0.07, fm, tm, chunk=chunk, chunk_axis=chunk_axis)
        return parts.clip + 200.0 * parts.sed

    assert np.all(np.asarray(jax.jit(jax.grad(not_prior))(args[3])) == 0.0)
    # The other gradients carry the weighted frame loss and the clip loss.
    g_sed = jax.grad(lambda a: flam.frame_loss(frames, text, a, beta, labels, fm, tm))(args[2])
    np.testing.assert_allclose(grads[2], 200.0 * np.asarray(g_sed), rtol=1e-4, atol=1e-6)
    g_clip = jax.grad(lambda tp: flam.clip_infonce(audio_emb, text_emb, tp))(args[4])
    np.testing.assert_allclose(grads[4], g_clip, rtol=1e-5)
    # Components add up with the weight as a parameter; the value of the text-0 prior is the
    # only place beta enters.
    parts = flam.total_loss(*args[:4], labels, audio_emb, text_emb, 0.07, fm, tm,
                            sed_weight=3.0, chunk=chunk, chunk_axis=chunk_axis)
    np.testing.assert_allclose(parts.total, parts.clip + 3.0 * parts.sed + parts.prior, rtol=1e-6)
    np.testing.assert_allclose(parts.sed, _np_sed(frames.astype(np.float64),
                                                  text.astype(np.float64), alpha, beta, labels,
                                                  fm, tm), rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 2])
def test_no_logit_adjustment_trains_beta_by_the_frame_loss(chunk):
    """The ablation arm: with ``logit_adjustment=0`` beta's gradient is ``w dL_SED/dbeta``
    (oracle: :func:`frame_loss` without the stop-gradient) and L_prior is out of the total;
    a traced flag of 1 gives the official objective's gradients exactly (the vmapped step
    passes it as an array)."""
    frames, text, alpha, beta, labels, fm, tm = _inputs(12, 3, 7, 5, 4)
    rng = np.random.default_rng(12)
    audio_emb = rng.standard_normal((4, 6)).astype(np.float32)
    text_emb = rng.standard_normal((4, 6)).astype(np.float32)
    args = tuple(map(jnp.asarray, (frames, text, alpha, beta)))

    def total(alpha, beta, la):
        return flam.total_loss(args[0], args[1], alpha, beta, labels, audio_emb, text_emb, 0.07,
                               fm, tm, sed_weight=3.0, chunk=chunk, logit_adjustment=la).total

    grad = jax.grad(total, argnums=(0, 1))
    g_alpha, g_beta = grad(args[2], args[3], jnp.float32(0.0))
    g_sed = jax.grad(lambda b: flam.frame_loss(frames, text, alpha, b, labels, fm, tm,
                                               stop_beta_grad=False))(args[3])
    np.testing.assert_allclose(g_beta, 3.0 * np.asarray(g_sed), rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(g_beta)).max() > 1e-4  # the frame loss does reach beta
    parts = flam.total_loss(*args, labels, audio_emb, text_emb, 0.07, fm, tm, sed_weight=3.0,
                            chunk=chunk, logit_adjustment=0.0)
    np.testing.assert_allclose(parts.total, parts.clip + 3.0 * parts.sed, rtol=1e-6)
    official = jax.grad(lambda a, b: flam.total_loss(
        args[0], args[1], a, b, labels, audio_emb, text_emb, 0.07, fm, tm, sed_weight=3.0,
        chunk=chunk).total, argnums=(0, 1))(args[2], args[3])
    traced = grad(args[2], args[3], jnp.float32(1.0))
    for got, want in zip(traced, official):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    g_prior = jax.grad(flam.prior_loss)(args[3], labels, fm, tm)
    np.testing.assert_allclose(traced[1], g_prior, rtol=1e-6, atol=1e-9)
    # the flag routes beta's gradient only: alpha sees the same logits either way
    np.testing.assert_allclose(g_alpha, traced[0], rtol=1e-6, atol=1e-9)


# --- ring (shard_map) variant on the 8 simulated devices ----------------------------------------


@pytest.mark.parametrize("stop", [True, False])
def test_ring_equals_direct_on_8_devices(stop):
    from trainkit.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices (tests/conftest.py)")
    mesh = make_mesh(data=8, devices=jax.devices()[:8])
    frames, text, alpha, beta, labels, fm, tm = _inputs(12, 16, 24, 3, 5)
    direct = lambda f, t, a, be, y, m1, m2: flam.frame_loss(f, t, a, be, y, m1, m2,
                                                            stop_beta_grad=stop)
    ring = lambda f, t, a, be, y, m1, m2: flam.sed_loss_ring(f, t, a, be, y, m1, m2, mesh=mesh,
                                                             stop_beta_grad=stop)
    v1, g1 = _grads(direct, frames, text, alpha, beta, labels, fm, tm)
    v2, g2 = _grads(ring, frames, text, alpha, beta, labels, fm, tm)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g2[3]) == 0.0) == stop
    with pytest.raises(ValueError, match="divisible"):
        flam.sed_loss_ring(frames[:12], text, alpha, beta, labels[:12], mesh=mesh)
