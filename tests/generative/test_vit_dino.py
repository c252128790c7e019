"""DINO + SEM encoder (generative.vit_dino): the loss against a NumPy transcription of DINO's
Algorithm 1, exact EMA / centre updates, no teacher gradient, ViT shapes for multi-crop,
augmentation oracles, kNN against scikit-learn, and a short training run on digits."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from generative import dlc
from generative import vit_dino as vd
from generative.datasets import bilinear_matrix, digits_arrays
from generative.sem import SEMConfig
from trainkit.config import ConfigError

SETTINGS = settings(max_examples=8, deadline=None)
seeds = st.integers(0, 2 ** 31 - 1)
# (n_global, n_crops, batch, K): a few shapes only, each new one recompiles.
loss_shapes = st.sampled_from([(1, 2, 1, 3), (2, 6, 4, 7), (3, 5, 2, 4)])


def _rng(seed):
    return np.random.default_rng(seed)


def _micro() -> vd.DINOConfig:
    """The smallest full model (16x16 images, one block): fast to compile for step tests."""
    return vd.DINOConfig(
        vit=vd.ViTConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2, mlp_ratio=2),
        sem=SEMConfig(num_groups=4, group_size=8), out_dim=32, head_hidden=16,
        head_bottleneck=8, n_global=2, n_local=1, global_size=16, local_size=8, batch_size=4)


@jax.jit(static_argnums=0)
def _apply(graphdef, params, x):
    return nnx.merge(graphdef, params)(x)


def _fwd(module, x):
    """``module(x)`` under one jit per (module graph, input shape)."""
    graphdef, params = nnx.split(module, nnx.Param)
    return _apply(graphdef, params, x)


# --- NumPy oracle: DINO Algorithm 1 / DINOLoss.forward of the reference code, literally ----------


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _np_log_softmax(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def np_dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, n_global):
    """main_dino.py DINOLoss.forward, transcribed: chunk, then loop over (teacher, student) pairs
    of different views."""
    b = teacher_output.shape[0] // n_global
    ncrops = student_output.shape[0] // b
    student_out = np.split(student_output / student_temp, ncrops)
    teacher_out = np.split(_np_softmax((teacher_output - center) / teacher_temp), n_global)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = np.sum(-q * _np_log_softmax(student_out[v]), axis=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def np_algorithm1_two_crops(s1, s2, t1, t2, center, tps, tpt):
    """Algorithm 1 of the paper: loss = H(t1, s2)/2 + H(t2, s1)/2."""
    def H(t, s):
        s = _np_softmax(s / tps)
        t = _np_softmax((t - center) / tpt)
        return -(t * np.log(s)).sum(axis=1).mean()
    return H(t1, s2) / 2 + H(t2, s1) / 2


class DinoLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(shape=loss_shapes, seed=seeds, tps=st.floats(0.05, 1.0), tpt=st.floats(0.02, 1.0))
    def test_matches_numpy_algorithm1(self, shape, seed, tps, tpt):
        g, v, b, k = shape
        r = _rng(seed)
        s = 3.0 * r.standard_normal((v * b, k))
        t = 3.0 * r.standard_normal((g * b, k))
        c = r.standard_normal(k)
        want = np_dino_loss(s, t, c, tps, tpt, g)
        fn = self.variant(vd.dino_loss, static_argnums=(5,))
        with jax.enable_x64(True):
            got64 = fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), tps, tpt, g)
        np.testing.assert_allclose(float(got64), want, rtol=1e-6, atol=1e-6)
        got32 = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                   jnp.asarray(c, jnp.float32), tps, tpt, g)
        np.testing.assert_allclose(float(got32), want, rtol=2e-5, atol=2e-5)

    @SETTINGS
    @given(seed=seeds)
    def test_two_crops_is_the_papers_pseudocode(self, seed):
        r = _rng(seed)
        b, k = 4, 6
        s1, s2, t1, t2 = (2.0 * r.standard_normal((b, k)) for _ in range(4))
        c = r.standard_normal(k)
        want = np_algorithm1_two_crops(s1, s2, t1, t2, c, 0.1, 0.04)
        with jax.enable_x64(True):
            got = vd.dino_loss(jnp.asarray(np.concatenate([s1, s2])),
                               jnp.asarray(np.concatenate([t1, t2])), jnp.asarray(c), 0.1, 0.04, 2)
        np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-6)

    @SETTINGS
    @given(shape=loss_shapes, seed=seeds)
    def test_gradient_closed_form_and_none_to_teacher(self, shape, seed):
        # d loss / d s_v[b] = 1/(N B tau_s) sum_{g != v} (P_s[v, b] - P_t[g, b]); zero for t, C.
        g, v, b, k = shape
        r = _rng(seed)
        s, t, c = r.standard_normal((v * b, k)), r.standard_normal((g * b, k)), r.standard_normal(k)
        tps, tpt = 0.2, 0.07
        with jax.enable_x64(True):
            gs, gt, gc = jax.jit(jax.grad(vd.dino_loss, argnums=(0, 1, 2)), static_argnums=5)(
                jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), tps, tpt, g)
        p_s = _np_softmax(s.reshape(v, b, k) / tps)
        p_t = _np_softmax((t.reshape(g, b, k) - c) / tpt)
        n_pairs = g * v - g
        want = np.zeros((v, b, k))
        for vi in range(v):
            for gi in range(g):
                if gi != vi:
                    want[vi] += (p_s[vi] - p_t[gi]) / (n_pairs * b * tps)
        np.testing.assert_allclose(np.asarray(gs), want.reshape(v * b, k), atol=1e-10)
        assert np.all(np.asarray(gt) == 0) and np.all(np.asarray(gc) == 0)

    def test_bad_shapes_are_rejected(self):
        with pytest.raises(ValueError, match="n_global"):
            vd.dino_loss(jnp.ones((6, 4)), jnp.ones((5, 4)), jnp.zeros(4), 0.1, 0.04, 2)
        with pytest.raises(ValueError, match="n_crops"):
            vd.dino_loss(jnp.ones((3, 4)), jnp.ones((4, 4)), jnp.zeros(4), 0.1, 0.04, 2)
        with pytest.raises(ValueError, match="n_global"):
            vd.dino_loss(jnp.ones((4, 4)), jnp.ones((4, 4)), jnp.zeros(4), 0.1, 0.04, 0)


# --- DINOv2's Sinkhorn-Knopp teacher and KoLeo, against NumPy transcriptions ----------------------


def np_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    """dinov2/loss/dino_clstoken_loss.py DINOLoss.sinkhorn_knopp_teacher, one process."""
    Q = np.exp(teacher_output / teacher_temp).T  # K x B
    B, K = Q.shape[1], Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(axis=1, keepdims=True)
        Q = Q / K
        Q = Q / Q.sum(axis=0, keepdims=True)
        Q = Q / B
    Q = Q * B
    return Q.T


def np_koleo(x, eps=1e-8):
    """dinov2/loss/koleo_loss.py KoLeoLoss.forward: F.normalize, diagonal -1, argmax, then
    nn.PairwiseDistance(2, eps) (which adds eps to the difference) and -log(d + eps)."""
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1)
    idx = np.argmax(dots, axis=1)
    d = np.linalg.norm(x - x[idx] + eps, axis=-1)
    return -np.log(d + eps).mean()


class Dinov2Test(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(seed=seeds, n=st.sampled_from([4, 9]), k=st.sampled_from([3, 16]),
           tpt=st.floats(0.04, 1.0), iters=st.integers(1, 5))
    def test_sinkhorn_matches_dinov2(self, seed, n, k, tpt, iters):
        t = 0.5 * _rng(seed).standard_normal((n, k))  # cosine-scale logits, as the head's
        want = np_sinkhorn_knopp_teacher(t, tpt, iters)
        fn = self.variant(vd.sinkhorn_knopp, static_argnums=(2,))
        got = np.asarray(fn(jnp.asarray(t, jnp.float32), tpt, iters))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # the last step normalises rows

    def test_sinkhorn_converges_to_equipartition_and_ignores_a_shared_offset(self):
        r = _rng(3)
        t = r.standard_normal((12, 5))
        p = np.asarray(vd.sinkhorn_knopp(jnp.asarray(t, jnp.float32), 0.5, 200))
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(p.sum(0), 12 / 5, atol=1e-4)  # every prototype gets N/K
        # an image-independent logit vector (what a centre removes) leaves the targets unchanged
        shifted = jnp.asarray(t + 3.0 * r.standard_normal(5), jnp.float32)
        np.testing.assert_allclose(vd.sinkhorn_knopp(shifted, 0.5, 200), p, atol=1e-4)
        with pytest.raises(ValueError, match="n_iterations"):
            vd.sinkhorn_knopp(jnp.ones((3, 2)), 0.1, 0)

    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(seed=seeds, n=st.sampled_from([2, 7]), d=st.sampled_from([3, 8]))
    def test_koleo_matches_dinov2_and_its_gradient(self, seed, n, d):
        x = _rng(seed).standard_normal((n, d))
        fn = self.variant(vd.koleo_loss)
        np.testing.assert_allclose(float(fn(jnp.asarray(x, jnp.float32))), np_koleo(x),
                                   rtol=1e-5, atol=1e-5)
        # gradient against central differences of the NumPy transcription (nearest neighbours
        # do not change under a 1e-5 step for generic points)
        with jax.enable_x64(True):
            g = np.asarray(jax.grad(vd.koleo_loss)(jnp.asarray(x)))
        h, num = 1e-6, np.zeros_like(x)
        for i in range(n):
            for j in range(d):
                e = np.zeros_like(x)
                e[i, j] = h
                num[i, j] = (np_koleo(x + e) - np_koleo(x - e)) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-6)

    def test_koleo_closed_forms(self):
        # the 4 vertices of a square on the unit circle: nearest distance sqrt(2) for all
        sq = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
        assert float(vd.koleo_loss(sq)) == pytest.approx(-np.log(np.sqrt(2)), abs=1e-6)
        # scale does not matter (rows are normalised): an equilateral triangle on the circle,
        # nearest distance sqrt(3)
        a = 2 * np.pi * np.arange(3) / 3
        tri = np.stack([np.cos(a), np.sin(a)], 1) * np.array([[3.0], [0.5], [1.0]])
        assert float(vd.koleo_loss(jnp.asarray(tri, jnp.float32))) == \
            pytest.approx(-np.log(np.sqrt(3.0)), abs=1e-6)
        with pytest.raises(ValueError, match="at least 2"):
            vd.koleo_loss(jnp.ones((1, 3)))

    def test_teacher_targets_and_config(self):
        r = _rng(4)
        t = jnp.asarray(r.standard_normal((6, 5)), jnp.float32)
        c = jnp.asarray(r.standard_normal(5), jnp.float32)
        np.testing.assert_allclose(vd.teacher_targets(t, c, 0.1, "center"),
                                   _np_softmax((np.asarray(t) - np.asarray(c)) / 0.1), atol=1e-6)
        np.testing.assert_allclose(vd.teacher_targets(t, c, 0.1, "sinkhorn", 4),
                                   vd.sinkhorn_knopp(t, 0.1, 4), atol=1e-7)
        with pytest.raises(ValueError, match="centering"):
            vd.teacher_targets(t, c, 0.1, "mean")
        with pytest.raises(ConfigError, match="centering"):
            vd.DINOConfig(centering="mean")
        with pytest.raises(ConfigError, match="koleo_weight"):
            vd.DINOConfig(koleo_weight=-0.1)


# --- centre, EMA, schedules ----------------------------------------------------------------------


class UpdatesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(seed=seeds, m=st.floats(0.0, 1.0))
    def test_center_update(self, seed, m):
        r = _rng(seed)
        c = r.standard_normal(5).astype(np.float32)
        t = r.standard_normal((12, 5)).astype(np.float32)
        got = self.variant(vd.update_center)(jnp.asarray(c), jnp.asarray(t), m)
        want = m * c.astype(np.float64) + (1 - m) * t.astype(np.float64).mean(0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        # m = 1 keeps the centre bit for bit, m = 0 replaces it by the batch mean
        np.testing.assert_array_equal(vd.update_center(jnp.asarray(c), jnp.asarray(t), 1.0), c)
        np.testing.assert_allclose(vd.update_center(jnp.asarray(c), jnp.asarray(t), 0.0),
                                   t.mean(0), rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(seed=seeds, m=st.floats(0.0, 1.0))
    def test_ema_update(self, seed, m):
        r = _rng(seed)
        teacher = {"a": r.standard_normal((3, 4)), "b": {"c": r.standard_normal(2)}}
        student = {"a": r.standard_normal((3, 4)), "b": {"c": r.standard_normal(2)}}
        with jax.enable_x64(True):
            got = self.variant(vd.ema_update)(jax.tree.map(jnp.asarray, teacher),
                                              jax.tree.map(jnp.asarray, student), m)
        want = jax.tree.map(lambda t, s: m * t + (1 - m) * s, teacher, student)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-13),
                     got, want)
        t32, s32 = (jax.tree.map(lambda x: x.astype(np.float32), d) for d in (teacher, student))
        jax.tree.map(np.testing.assert_array_equal, vd.ema_update(t32, s32, 1.0), t32)
        jax.tree.map(np.testing.assert_array_equal, vd.ema_update(t32, s32, 0.0), s32)

    def test_schedules(self):
        m0, total = 0.996, 100
        got = np.asarray([vd.momentum_schedule(k, total, m0) for k in (0, 50, 100, 150)])
        np.testing.assert_allclose(got, [m0, (1 + m0) / 2, 1.0, 1.0], atol=1e-7)
        k = 30
        np.testing.assert_allclose(vd.momentum_schedule(k, total, m0),
                                   1 - (1 - m0) * (np.cos(np.pi * k / total) + 1) / 2, atol=1e-7)
        temps = [float(vd.teacher_temp_schedule(k, 0.04, 0.07, 10)) for k in (0, 5, 10, 20)]
        np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07], atol=1e-7)
        assert float(vd.teacher_temp_schedule(0, 0.04, 0.07, 0)) == pytest.approx(0.07)


# --- models -------------------------------------------------------------------------------------


def _images(n, seed=0, size=32):
    return jnp.asarray(_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


class ModelTest(chex.TestCase):
    def test_vit_shapes_for_global_and_local_crops(self):
        cfg = vd.ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2)  # grid 4x4
        vit = vd.ViT(cfg, rngs=nnx.Rngs(0))
        tokens = nnx.jit(lambda m, x: m.tokens(x))
        t32, t16 = tokens(vit, _images(3)), tokens(vit, _images(3, size=16))
        chex.assert_shape(t32, (3, 1 + 16, cfg.dim))  # global crop: CLS + 4x4 patches
        chex.assert_shape(t16, (3, 1 + 4, cfg.dim))  # local crop: CLS + 2x2 patches
        chex.assert_shape(tokens(vit, jnp.zeros((2, 24, 40, 3))), (2, 1 + 3 * 5, cfg.dim))
        # the CLS feature is the first output token
        np.testing.assert_allclose(_fwd(vit, _images(3)), t32[:, 0], atol=1e-5)
        chex.assert_shape(_fwd(vit, _images(3, size=16)), (3, cfg.dim))
        with pytest.raises(ValueError, match="patch_size"):
            vit(_images(1, size=20))
        with pytest.raises(ValueError, match="channels"):
            vit(jnp.zeros((1, 32, 32, 1)))

    def test_position_embedding_interpolation(self):
        cfg = vd.ViTConfig.tiny()
        vit = vd.ViT(cfg, rngs=nnx.Rngs(0))
        pos = np.asarray(vit.pos[...])
        np.testing.assert_array_equal(vit.position_embedding(4, 4), pos)
        # a grid that is constant in space stays constant after resizing; CLS is kept
        const = np.broadcast_to(_rng(1).standard_normal(cfg.dim), (1, 17, cfg.dim)).copy()
        vit.pos[...] = jnp.asarray(const)
        small = np.asarray(vit.position_embedding(2, 2))
        chex.assert_shape(small, (1, 5, cfg.dim))
        np.testing.assert_allclose(small, np.broadcast_to(const[:, :1], (1, 5, cfg.dim)),
                                   atol=1e-5)
        # against jax.image.resize (bicubic, antialiased when shrinking) of a random grid
        vit.pos[...] = jnp.asarray(_rng(2).standard_normal((1, 17, cfg.dim)), jnp.float32)
        grid = vit.pos[0, 1:].reshape(4, 4, cfg.dim)
        for gh, gw in ((2, 2), (3, 5)):
            want = jax.image.resize(grid, (gh, gw, cfg.dim), method="bicubic")
            got = vit.position_embedding(gh, gw)
            np.testing.assert_allclose(got[0, 1:], want.reshape(gh * gw, cfg.dim), atol=1e-5)
            np.testing.assert_array_equal(got[0, 0], vit.pos[0, 0])

    def test_patch_embedding_is_a_strided_convolution(self):
        cfg = vd.ViTConfig(image_size=16, patch_size=4, in_channels=3, dim=8, depth=1, heads=2)
        vit = vd.ViT(cfg, rngs=nnx.Rngs(0))
        x = _images(2, size=16)
        p, c, d = 4, 3, 8
        patches = x.reshape(2, 4, p, 4, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, -1)
        ours = vit.patch(patches)
        kernel = vit.patch.kernel[...].reshape(p, p, c, d)  # HWIO
        conv = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        conv = conv.reshape(2, 16, d) + vit.patch.bias[...]
        np.testing.assert_allclose(ours, conv, atol=1e-5)

    def test_sem_rows_sum_to_one_and_tokens_are_argmax(self):
        cfg = _micro()
        model = vd.DINOModel(cfg, rngs=nnx.Rngs(0))
        L, V = cfg.sem.num_groups, cfg.sem.group_size
        embed = nnx.jit(lambda m, x: m.embed(x))
        for size in (16, 8):
            probs, z = embed(model, _images(5, size=size))
            chex.assert_shape([probs, z], (5, L, V))
            assert np.all(np.asarray(probs) >= 0)
            np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
            np.testing.assert_array_equal(dlc.tokens(probs), dlc.tokens(z))
        chex.assert_shape(_fwd(model, _images(5, size=16)), (5, cfg.out_dim))

    def test_head_last_layer_is_weight_normalised(self):
        cfg = vd.DINOConfig.tiny()
        head = vd.DINOHead(12, cfg, rngs=nnx.Rngs(0))
        x = _rng(0).standard_normal((4, 12)).astype(np.float32)
        # scaling v leaves the output unchanged; the output is the cosine between the unit
        # bottleneck feature and the unit columns of v, so it lies in [-1, 1]
        out = head(jnp.asarray(x))
        head.last_v[...] = 7.0 * head.last_v[...]
        np.testing.assert_allclose(head(jnp.asarray(x)), out, atol=1e-6)
        assert np.all(np.abs(np.asarray(out)) <= 1 + 1e-6)

    def test_kernel_inits(self):
        cfg = vd.ViTConfig(image_size=16, patch_size=4, dim=48, depth=1, heads=4, mlp_ratio=2)
        vit = vd.ViT(cfg, rngs=nnx.Rngs(0))
        # patch embedding: PyTorch's Conv2d default, U(+-1/sqrt(fan_in)) for weight and bias
        bound = 1 / np.sqrt(4 * 4 * 3)
        for w in (vit.patch.kernel[...], vit.patch.bias[...]):
            w = np.asarray(w)
            assert np.all(np.abs(w) <= bound) and np.abs(w).max() > 0.9 * bound
        k = np.asarray(vit.patch.kernel[...])
        assert abs(k.std() - bound / np.sqrt(3)) < 0.1 * bound
        # fan_in: std 1/sqrt(fan_in) for q (fan-in dim), out (heads * head_dim) and the MLP
        blk = vit.blocks[0]
        for w, fan_in in ((blk.query.kernel, 48), (blk.out.kernel, 48), (blk.fc1.kernel, 48),
                          (blk.fc2.kernel, 96)):
            w = np.asarray(w[...])
            assert abs(w.std() * np.sqrt(fan_in) - 1) < 0.1, (w.shape, w.std())
        dino = vd.ViT(vd.ViTConfig(**{**_fields(cfg), "kernel_init": "dino"}), rngs=nnx.Rngs(0))
        # flax's truncated_normal(0.02) cuts at +-2 std: std 0.02 * 0.8796 (PyTorch's
        # trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. not at all: std 0.02)
        assert abs(np.asarray(dino.blocks[0].fc1.kernel[...]).std() - 0.02 * 0.8796) < 0.0015
        with pytest.raises(ConfigError, match="kernel_init"):
            vd.ViTConfig(kernel_init="xavier")

    def test_config_validation(self):
        with pytest.raises(ConfigError, match="heads"):
            vd.ViTConfig(dim=30, heads=4)
        with pytest.raises(ConfigError, match="patch_size"):
            vd.ViTConfig(image_size=32, patch_size=5)
        with pytest.raises(ConfigError, match="local_size"):
            vd.DINOConfig(vit=vd.ViTConfig.tiny(), local_size=12)
        with pytest.raises(ConfigError, match="global_scale"):
            vd.DINOConfig(global_scale=(0.5, 0.2))
        with pytest.raises(ConfigError, match="student_temp"):
            vd.DINOConfig(student_temp=0.0)
        assert vd.DINOConfig.paper().sem.num_groups == 512


# --- augmentation -------------------------------------------------------------------------------


class AugmentTest(chex.TestCase):
    def test_interp_matrix_is_the_bilinear_resize(self):
        # the whole image resized from 8 to 32: the data set's own bilinear upscaling matrix
        np.testing.assert_allclose(vd._interp_matrix(jnp.float32(0), jnp.float32(8), 8, 32),
                                   bilinear_matrix(8, 32), atol=1e-6)
        # a full-size crop to the same size is the identity
        np.testing.assert_allclose(vd._interp_matrix(jnp.float32(0), jnp.float32(10), 10, 10),
                                   np.eye(10), atol=1e-6)

    def test_full_crop_is_identity_and_crop_is_a_sub_window(self):
        img = _images(1, 3)[0]
        out = vd.random_resized_crop(jax.random.key(0), img, 32, (1.0, 1.0), (1.0, 1.0))
        np.testing.assert_allclose(out, img, atol=1e-5)
        # a 16x16 crop (area 1/4, ratio 1) resized to 16x16 is an exact window when its corner
        # lands on integer pixels; in general every output value lies within the input range
        ramp = jnp.broadcast_to(jnp.arange(32.0)[None, :, None], (32, 32, 1))
        crop = vd.random_resized_crop(jax.random.key(5), ramp, 16, (0.25, 0.25), (1.0, 1.0))
        cols = np.asarray(crop[0, :, 0])
        np.testing.assert_allclose(np.diff(cols), 1.0, atol=1e-5)  # unit steps: no rescaling
        assert 0 <= cols[0] and cols[-1] <= 31

    def test_flip_jitter_grey_and_keys(self):
        cfg = vd.DINOConfig.tiny()
        img = _images(1, 4)[0]
        plain = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, jitter_prob=0.0,
                     grayscale_prob=0.0, global_scale=(1.0, 1.0))
        ident = vd.DINOConfig(**{**_fields(cfg), **plain, "flip_prob": 0.0})
        # the crop's aspect ratio is random in [3/4, 4/3] even at scale 1, so compare flips of
        # the same draw: same key, flip probability 0 vs 1
        flipped = vd.DINOConfig(**{**_fields(cfg), **plain, "flip_prob": 1.0})
        a = vd.augment(jax.random.key(1), img, 32, (1.0, 1.0), ident)
        b = vd.augment(jax.random.key(1), img, 32, (1.0, 1.0), flipped)
        np.testing.assert_allclose(b, a[:, ::-1], atol=1e-6)
        # zero-strength jitter is the identity (YIQ round trip)
        x01 = (img + 1) / 2
        np.testing.assert_allclose(vd.color_jitter(jax.random.key(2), x01, 0, 0, 0, 0), x01,
                                   atol=1e-5)
        grey = vd.DINOConfig(**{**_fields(cfg), "grayscale_prob": 1.0})
        g = np.asarray(vd.augment(jax.random.key(3), img, 16, (0.2, 0.5), grey))
        np.testing.assert_allclose(g[..., 0], g[..., 1], atol=1e-6)
        np.testing.assert_allclose(g[..., 0], g[..., 2], atol=1e-6)

    def test_multi_crop_shapes_range_and_independent_keys(self):
        cfg = _micro()
        x = _images(4, size=16)
        x = x.at[1].set(x[0])  # two identical images still get different views
        crops = jax.jit(lambda k, x: vd.multi_crop(k, x, cfg))
        glob, loc = crops(jax.random.key(0), x)
        chex.assert_shape(glob, (cfg.n_global, 4, 16, 16, 3))
        chex.assert_shape(loc, (cfg.n_local, 4, 8, 8, 3))
        for v in (glob, loc):
            assert float(v.min()) >= -1 - 1e-6 and float(v.max()) <= 1 + 1e-6
        assert float(jnp.abs(glob[0, 0] - glob[0, 1]).max()) > 1e-3
        assert float(jnp.abs(glob[0, 0] - glob[1, 0]).max()) > 1e-3
        glob2, _ = crops(jax.random.key(0), x)
        np.testing.assert_array_equal(glob2, glob)
        glob3, _ = crops(jax.random.key(1), x)
        assert float(jnp.abs(glob3 - glob).max()) > 1e-3
        no_local = vd.DINOConfig(**{**_fields(cfg), "n_local": 0})
        assert jax.eval_shape(lambda k: vd.multi_crop(k, x, no_local), jax.random.key(0))[1] \
            is None


def _fields(cfg):
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


# --- the train step --------------------------------------------------------------------------------


TOTAL = 50


@pytest.fixture(scope="module")
def micro_step():
    """A micro model, its optimiser state and one compiled train step, shared by the tests."""
    cfg = _micro()
    model = vd.DINOModel(cfg, rngs=nnx.Rngs(0))
    opt = vd.make_optimizer(cfg, TOTAL)
    graphdef, state = vd.init_state(model, opt)
    return cfg, graphdef, state, vd.make_train_step(graphdef, opt, cfg, TOTAL)


@pytest.mark.slow  # compiles the full train step (~20-60 s on 2 shared cores)
def test_teacher_has_no_gradient(micro_step):
    cfg, graphdef, state, _ = micro_step
    teacher = jax.tree.map(lambda p: p + 0.01, state.student)
    glob, loc = vd.multi_crop(jax.random.key(1), _images(4, size=16), cfg)
    center = jnp.asarray(_rng(2).standard_normal(cfg.out_dim), jnp.float32)
    grad = jax.jit(jax.grad(lambda s, t: vd.dino_objective(s, t, graphdef, center, glob, loc,
                                                           0.1, 0.04)[0], argnums=(0, 1)))
    g_s, g_t = grad(state.student, teacher)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_t))
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_s)) > 0


@pytest.mark.slow  # compiles the objective (~10-30 s on 2 shared cores)
def test_objective_adds_koleo_of_student_cls_and_sinkhorn_targets(micro_step):
    cfg, graphdef, state, _ = micro_step
    glob, loc = vd.multi_crop(jax.random.key(1), _images(4, size=16), cfg)
    teacher = jax.tree.map(lambda p: p + 0.01, state.student)
    center = jnp.zeros((cfg.out_dim,))
    obj = jax.jit(vd.dino_objective, static_argnums=(2, 8, 9, 10))
    loss, aux = obj(state.student, teacher, graphdef, center, glob, loc, 0.1, 0.04,
                    "sinkhorn", 3, 0.5)
    # rebuild both terms from the models' forward passes and the NumPy transcriptions
    flat = lambda c: np.asarray(c).reshape(-1, *c.shape[2:])  # noqa: E731
    t_out = np.asarray(_apply(graphdef, teacher, flat(glob)), np.float64)
    s_out = np.concatenate([np.asarray(_apply(graphdef, state.student, flat(glob))),
                            np.asarray(_apply(graphdef, state.student, flat(loc)))])
    p_t = np_sinkhorn_knopp_teacher(t_out, 0.04, 3)
    b, k = 4, cfg.out_dim
    log_p_s = _np_log_softmax(s_out.reshape(-1, b, k) / 0.1)
    ce = [-(p_t.reshape(2, b, k)[g] * log_p_s[v]).sum(-1).mean()
          for g in range(2) for v in range(3) if v != g]
    student = nnx.merge(graphdef, state.student)
    cls = np.asarray(nnx.jit(lambda m, x: m.backbone(x))(student, flat(glob)), np.float64)
    koleo = np_koleo(cls[:b]) + np_koleo(cls[b:])
    np.testing.assert_allclose(float(aux["dino_loss"]), np.mean(ce), rtol=1e-4)
    np.testing.assert_allclose(float(aux["koleo_loss"]), koleo, rtol=1e-4)
    np.testing.assert_allclose(float(loss), np.mean(ce) + 0.5 * koleo, rtol=1e-4)


@pytest.mark.slow  # compiles the full train step (~20-60 s on 2 shared cores)
def test_step_updates_student_then_ema_teacher_and_center(micro_step):
    cfg, graphdef, state, step = micro_step
    jax.tree.map(np.testing.assert_array_equal, state.teacher, state.student)
    x = _images(cfg.batch_size, 7, size=16)
    state1, m1 = step(state, jax.random.key(3), x)
    assert int(m1["skipped"]) == 0
    # perturb the teacher and centre so that both EMAs are visible, then step again
    state1 = state1._replace(teacher=jax.tree.map(lambda p: p + 0.05, state1.teacher),
                             center=jnp.asarray(_rng(1).standard_normal(cfg.out_dim),
                                                jnp.float32))
    key = jax.random.key(4)
    state2, m2 = step(state1, key, x)
    assert int(state2.step) == 2 and int(m2["skipped"]) == 0
    m = float(vd.momentum_schedule(1, TOTAL, cfg.momentum))
    assert float(m2["momentum"]) == pytest.approx(m, abs=1e-7)
    # teacher_2 = m teacher_1 + (1 - m) student_2: the EMA is taken after the student update
    want = jax.tree.map(lambda t, s: m * np.asarray(t, np.float64)
                        + (1 - m) * np.asarray(s, np.float64), state1.teacher, state2.student)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7),
                 state2.teacher, want)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in
               zip(jax.tree.leaves(state1.student), jax.tree.leaves(state2.student)))
    # centre_2 = c centre_1 + (1 - c) mean of teacher_1's raw outputs on this step's global crops
    glob, _ = jax.jit(lambda k, x: vd.multi_crop(k, x, cfg))(key, x)
    t_out = np.asarray(_apply(graphdef, state1.teacher, glob.reshape(-1, *glob.shape[2:])),
                       np.float64)
    c = cfg.center_momentum
    want_c = c * np.asarray(state1.center, np.float64) + (1 - c) * t_out.mean(0)
    np.testing.assert_allclose(state2.center, want_c, atol=1e-5)
    assert np.isfinite(float(m2["loss"]))


@pytest.mark.slow  # compiles the full train step (~20-60 s on 2 shared cores)
def test_nonfinite_batch_is_skipped(micro_step):
    cfg, _, state, step = micro_step
    bad = _images(cfg.batch_size, size=16).at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, jax.random.key(0), bad)
    assert int(metrics["skipped"]) == 1 and int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.student, state.student)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)


# --- codes and kNN -----------------------------------------------------------------------------------


def np_knn_weighted(train, y_train, test, k, T, num_classes):
    """DINO eval_knn.py knn_classifier, transcribed for one pass (cosine, exp(s/T) votes)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds = []
    for x in test:
        sims = train @ x
        idx = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in idx:
            votes[y_train[j]] += np.exp(sims[j] / T)
        preds.append(np.argmax(votes))
    return np.asarray(preds)


class KnnTest(chex.TestCase):
    @SETTINGS
    @given(seed=seeds, k=st.sampled_from([1, 3, 5, 10]))
    def test_against_sklearn_and_dino_transcription(self, seed, k):
        from sklearn.neighbors import KNeighborsClassifier

        r = _rng(seed)
        centers = 2.0 * r.standard_normal((4, 6))
        y_train, y_test = r.integers(0, 4, 60), r.integers(0, 4, 25)
        train = centers[y_train] + r.standard_normal((60, 6))
        test = centers[y_test] + r.standard_normal((25, 6))
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        want = float((clf.fit(train, y_train).predict(test) == y_test).mean())
        got = vd.knn_accuracy(train, y_train, test, y_test, k, temperature=None)
        assert got == pytest.approx(want)
        want_w = float((np_knn_weighted(train, y_train, test, k, 0.07, 4) == y_test).mean())
        assert vd.knn_accuracy(train, y_train, test, y_test, k, batch_size=7) == \
            pytest.approx(want_w)

    def test_sem_features_are_flattened_and_bad_k_rejected(self):
        r = _rng(0)
        f = r.standard_normal((10, 3, 4))
        y = np.arange(10) % 2
        assert vd.knn_accuracy(f, y, f, y, 1) == 1.0  # each point is its own neighbour
        with pytest.raises(ValueError, match="k must be"):
            vd.knn_accuracy(f, y, f, y, 11)
        with pytest.raises(ValueError, match="temperature"):
            vd.knn_accuracy(f, y, f, y, 3, temperature=0.0)

    def test_extract_codes(self):
        cfg = _micro()
        model = vd.DINOModel(cfg, rngs=nnx.Rngs(0))
        x = _images(7, 9, size=16)
        toks, probs = vd.extract_codes(model, x, batch_size=3)
        chex.assert_shape(toks, (7, cfg.sem.num_groups))
        chex.assert_shape(probs, (7, cfg.sem.num_groups, cfg.sem.group_size))
        assert toks.dtype == jnp.int32
        np.testing.assert_array_equal(toks, np.argmax(np.asarray(probs), -1))
        want, _ = nnx.jit(lambda m, x: m.embed(x))(model, x)
        np.testing.assert_allclose(probs, want, atol=1e-5)
        toks2, _ = vd.extract_codes(model, x, batch_size=100)
        np.testing.assert_array_equal(toks2, toks)


# --- a short training run -------------------------------------------------------------------------


# Second attempt (driver /tmp/dino_exp2/run.py, log /tmp/dino_exp2/log.jsonl): 300 steps, seed 0,
# batch 32, kNN k=20 of the teacher on the last 300 digits; "traj" is DINO loss (+ KoLeo where on)
# and teacher-target entropy, steps 0 -> 299. Untrained encoder (fan-in init): SEM 0.393, codes
# 0.243, CLS 0.407 with 400 training digits; 0.477 / 0.283 / 0.507 with 1497; chance 0.10.
#
# Bug hunt: frozen teacher (m=1) and frozen zero centre: loss 3.20 -> 2.61 with the teacher
# entropy at 2.57, i.e. the student matches the teacher (KL ~0.04): the gradient/optimiser path
# is right. dino_loss/update_center/ema/head/step were rechecked against the reference code
# (and the NumPy oracles below); no bug. The real cause: DINO's std-0.02 init at width 32 makes
# the untrained CLS feature nearly image-independent (mean cosine 0.998 between digits), so
# the centred teacher has nothing to sharpen. The patch embedding is now PyTorch's Conv2d
# default (as in DINO) and the blocks/head use a 1/fan-in variance (cosine 0.887).
#
# | change (tiny, fan-in init, 400 digits unless said)  | traj                 | SEM   | codes | CLS   | distinct |
# |------------------------------------------------------|----------------------|-------|-------|-------|----------|
# | DINO 0.02 init, running centre, K=128 (old default)  | 3.2/2.5 -> 4.85/4.85 | 0.230 | 0.097 | 0.257 | 6        |
# | fan-in init, running centre                          | 2.4/0.9 -> 4.85/4.84 | 0.357 | 0.140 | 0.337 | 9        |
# | + Sinkhorn-Knopp teacher (3 its)                     | 6.4/3.9 -> 4.85/4.80 | 0.347 | 0.183 | 0.350 | 25       |
# | + Sinkhorn + KoLeo 0.1                               | 6.6/3.9 -> 4.84/4.64 | 0.413 | 0.290 | 0.453 | 279      |
# | + Sinkhorn + KoLeo 0.1 + tau_t 0.02                  | 6.5/2.9 -> 4.84/4.07 | 0.390 | 0.327 | 0.463 | 289      |
# | + Sinkhorn + KoLeo 0.1, K=64, 1497 digits            | 6.1/3.3 -> 4.16/3.86 | 0.513 | 0.327 | 0.560 | 288      |
# | same + tau_t 0.02 + lr 6.25e-5 (5e-4 B/256)          | 6.0/2.4 -> 4.22/2.45 | 0.437 | 0.287 | 0.487 | 169      |
#
# First attempt (0.02 init, 400/300 digits from index 400): still informative: the SEM layer and
# the input scaling are not the cause (collapse without them); lr 1e-4, DINO's last-layer
# freeze, no local crops, m0 0.9/0.99, tau_t 0.04 -> 0.07 all collapsed as well.
#
# Where it stands: Sinkhorn + KoLeo stop the code collapse (~290 distinct codes) and put SEM /
# codes / CLS above 2x chance and a little above the untrained encoder (+0.04 SEM, +0.04 codes,
# +0.05 CLS with 1497 digits), but the DINO term still ends at log K (the student's
# distribution goes uniform; KoLeo alone spreads the CLS features), so it is not yet learning.
# Next to try: longer runs (1000+ steps) of the K=64 row, milder crops for 8x8 digits
# (local crops of 5-40% of a 32 px upscaled digit cover 1-3 original pixels), tau_s 0.1 -> 0.2.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "observed: with the tiny preset (fan-in init, Sinkhorn teacher, KoLeo 0.1, K=64) the codes "
    "no longer collapse (~290 distinct) but kNN on SEM/codes is only ~0.04 above the untrained "
    "encoder and the DINO loss ends at log K; see the table above. Strict, so the marker must "
    "go when a fix makes it pass."))
def test_training_on_digits_lowers_loss_and_codes_beat_chance():
    images, labels = digits_arrays()
    x = images.astype(np.float32) / 127.5 - 1.0
    n_test = 300
    n_train = len(x) - n_test  # all 1797 digits minus a held-out 300
    cfg = vd.DINOConfig.tiny()
    steps = 300
    t0 = time.time()
    teacher, hist = vd.train_sem_encoder(cfg, x[:n_train], jax.random.key(0), steps,
                                         progress=False)
    train_s = time.time() - t0
    assert hist["loss"].shape == (steps,) and np.all(np.isfinite(hist["loss"]))
    assert hist["skipped"].sum() == 0
    first, last = hist["dino_loss"][:20].mean(), hist["dino_loss"][-20:].mean()

    V = cfg.sem.group_size
    tr_tok, tr_sem = vd.extract_codes(teacher, x[:n_train])
    te_tok, te_sem = vd.extract_codes(teacher, x[-n_test:])
    y_tr, y_te = labels[:n_train], labels[-n_test:]
    acc_sem = vd.knn_accuracy(tr_sem, y_tr, te_sem, y_te, 20)
    acc_code = vd.knn_accuracy(jax.nn.one_hot(tr_tok, V), y_tr, jax.nn.one_hot(te_tok, V), y_te,
                               20)
    untrained = vd.DINOModel(cfg, rngs=nnx.Rngs(params=jax.random.split(jax.random.key(0))[0]))
    u_tr_tok, u_tr = vd.extract_codes(untrained, x[:n_train])
    u_te_tok, u_te = vd.extract_codes(untrained, x[-n_test:])
    acc_untrained = vd.knn_accuracy(u_tr, y_tr, u_te, y_te, 20)
    acc_untrained_code = vd.knn_accuracy(jax.nn.one_hot(u_tr_tok, V), y_tr,
                                         jax.nn.one_hot(u_te_tok, V), y_te, 20)
    print(f"\nDINO+SEM tiny on {n_train} digits, {steps} steps in {train_s:.1f}s: loss "
          f"{first:.3f} -> {last:.3f}; kNN(k=20) SEM {acc_sem:.3f}, codes {acc_code:.3f} "
          f"(untrained: SEM {acc_untrained:.3f}, codes {acc_untrained_code:.3f}; chance 0.1); "
          f"distinct codes {len(np.unique(np.asarray(te_tok), axis=0))}/{n_test}")
    assert last < first - 0.05
    assert last < np.log(cfg.out_dim) - 0.2  # not the uniform solution
    # 2x chance (0.1, ten balanced classes) and a clear margin over the untrained encoder
    assert acc_sem > max(0.2, acc_untrained + 0.1)
    assert acc_code > max(0.2, acc_untrained_code + 0.1)
