"""generative.dit: patchify against an explicit loop and a strided convolution, DiT's sin-cos
table against its reference formula, adaLN-Zero identity at init, exact CFG at w = 1, the null
code, flow-matching loss and Euler sampler against closed forms for point-mass and Gaussian
data, guarded/EMA train step, and an overfit run on 8 rendered images."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from generative import datasets as D
from generative import dit
from trainkit.config import ConfigError

CFG = dit.DiTConfig.tiny()
L, V = CFG.code_length, CFG.vocab_size


def _randomized(cfg=CFG, seed=0, scale=0.2):
    """A DiT whose every parameter (adaLN and output layers included) is random, so that its
    output depends on x, t and the code (at init the output is exactly zero)."""
    model = dit.DiT(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)

    @jax.jit
    def perturb(params, key):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        return jax.tree.unflatten(tree, new)

    nnx.update(model, perturb(params, jax.random.key(seed + 100)))
    return model


def _inputs(b=3, seed=1):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (b, 32, 32, 3))
    t = jax.random.uniform(k2, (b,))
    codes = jax.random.randint(k3, (b, L), 0, V)
    return x, t, codes


@pytest.fixture(scope="module")
def model():
    return _randomized()


# --- patchify and embeddings -------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_matches_loop_and_round_trips(p):
    x = np.random.default_rng(p).normal(size=(2, 16, 8, 3)).astype(np.float32)
    tok = np.asarray(dit.patchify(jnp.asarray(x), p))
    gw = 8 // p
    for b in range(2):
        for i in range(16 // p):
            for j in range(gw):
                expect = x[b, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(-1)
                np.testing.assert_array_equal(tok[b, i * gw + j], expect)
    back = dit.unpatchify(jnp.asarray(tok), p, 16, 8, 3)
    np.testing.assert_array_equal(np.asarray(back), x)


def test_patchify_rejects_bad_patch_size():
    with pytest.raises(ValueError, match="patch size"):
        dit.patchify(jnp.zeros((1, 10, 10, 3)), 4)


def test_patch_embedding_is_a_strided_convolution():
    """Linear(patchify(x)) equals DiT's Conv2d(kernel p, stride p) with the reshaped kernel."""
    p, d = 4, 5
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    w = jax.random.normal(jax.random.key(1), (p * p * 3, d))
    ours = dit.patchify(x, p) @ w
    conv = jax.lax.conv_general_dilated(x, w.reshape(p, p, 3, d), (p, p), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(conv.reshape(2, -1, d)),
                               rtol=1e-5, atol=1e-5)


def _dit_reference_pos_embed(embed_dim, grid_size):
    """get_2d_sincos_pos_embed from facebookresearch/DiT models.py (MAE), transcribed."""
    def from_grid_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = from_grid_1d(embed_dim // 2, grid[0])
    emb_w = from_grid_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def test_sincos_table_matches_dit_reference():
    np.testing.assert_allclose(dit.sincos_2d_position_embedding(16, 4),
                               _dit_reference_pos_embed(16, 4), rtol=1e-6, atol=1e-6)


def test_config_validation():
    with pytest.raises(ConfigError, match="patch_size"):
        dit.DiTConfig(patch_size=5)
    with pytest.raises(ConfigError, match="heads"):
        dit.DiTConfig(dim=30, heads=4)
    with pytest.raises(ConfigError, match="cfg_dropout"):
        dit.DiTConfig(cfg_dropout=1.5)
    assert dit.DiTConfig.paper().num_patches == 256


# --- adaLN-Zero --------------------------------------------------------------------------------


def test_blocks_are_identity_and_output_zero_at_init():
    m = dit.DiT(CFG, rngs=nnx.Rngs(3))
    x, t, codes = _inputs()
    assert float(jnp.std(m.blocks[0].qkv.kernel[...])) > 0  # only adaLN/output are zero
    h = jax.random.normal(jax.random.key(5), (3, CFG.num_patches, CFG.dim))
    c = m.conditioning(t, codes, 3)
    assert float(jnp.std(c)) > 0  # a real conditioning vector goes in
    for block in m.blocks:
        np.testing.assert_array_equal(np.asarray(block(h, c)), np.asarray(h))
    np.testing.assert_array_equal(np.asarray(m(x, t, codes)), 0.0)
    # with non-zero modulation weights the same block is not the identity
    randomized = _randomized(seed=3)
    assert float(jnp.max(jnp.abs(randomized.blocks[0](h, c) - h))) > 1e-3


def test_learned_position_embedding_variant():
    cfg = dataclasses.replace(CFG, pos_embed="learned")
    m = _randomized(cfg)
    x, t, codes = _inputs()
    assert m(x, t, codes).shape == x.shape
    assert m.position_embedding().shape == (cfg.num_patches, cfg.dim)


# --- conditioning and CFG ----------------------------------------------------------------------


def test_code_embedding_is_mean_of_per_position_rows(model):
    _, _, codes = _inputs()
    table = np.asarray(model.code_embed[...])
    expect = np.stack([np.mean([table[i, codes[b, i]] for i in range(L)], axis=0)
                       for b in range(3)])
    np.testing.assert_allclose(np.asarray(model.code_embedding(codes, 3)), expect,
                               rtol=1e-6, atol=1e-7)


def test_output_depends_on_code(model):
    x, t, codes = _inputs()
    other = (codes + 1) % V
    assert float(jnp.max(jnp.abs(model(x, t, codes) - model(x, t, other)))) > 1e-3


def test_dropped_code_is_the_null_code_whatever_the_code(model):
    x, t, codes = _inputs()
    other = (codes + 3) % V
    drop = jnp.ones((3,), bool)
    null = np.asarray(model(x, t, None))
    np.testing.assert_array_equal(np.asarray(model(x, t, codes, drop)), null)
    np.testing.assert_array_equal(np.asarray(model(x, t, other, drop)), null)
    np.testing.assert_array_equal(np.asarray(model(x, t, model.null_codes(3))), null)
    # Mixed: only the dropped row changes to the null output.
    mixed = np.asarray(model(x, t, codes, jnp.array([True, False, False])))
    cond = np.asarray(model(x, t, codes))
    np.testing.assert_allclose(mixed[0], null[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[1:], cond[1:], rtol=1e-5, atol=1e-6)


def test_unconditional_model_ignores_codes():
    cfg = dataclasses.replace(CFG, unconditional=True)
    m = _randomized(cfg)
    x, t, codes = _inputs()
    np.testing.assert_array_equal(np.asarray(m(x, t, codes)), np.asarray(m(x, t, None)))


def test_cfg_scale_one_is_the_conditional_output_exactly(model):
    x, t, codes = _inputs()
    cond = np.asarray(model(x, t, codes))
    np.testing.assert_array_equal(np.asarray(dit.guided_velocity(model, x, t, codes, 1.0)), cond)


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_cfg_formula(model, w):
    x, t, codes = _inputs()
    cond, uncond = np.asarray(model(x, t, codes)), np.asarray(model(x, t, None))
    np.testing.assert_allclose(np.asarray(dit.guided_velocity(model, x, t, codes, w)),
                               uncond + w * (cond - uncond), rtol=1e-5, atol=1e-5)


# --- loss and sampler against closed forms -----------------------------------------------------


def test_interpolation_convention():
    x0, eps = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
    t = jnp.array([0.0, 1.0])
    xt = np.asarray(dit.interpolate(x0, eps, t))
    np.testing.assert_array_equal(xt[0], 2.0)  # t = 0: data
    np.testing.assert_array_equal(xt[1], -1.0)  # t = 1: noise
    np.testing.assert_array_equal(np.asarray(dit.target_velocity(x0, eps)), -3.0)


def test_true_velocity_of_a_point_mass_gives_zero_loss():
    """Data = a single image a: given x_t, eps = (x_t - (1-t) a)/t, so the true velocity is
    v(x_t, t) = eps - a = (x_t - a)/t, and the loss is zero."""
    a = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    x0 = jnp.repeat(a, 16, axis=0)

    def oracle(xt, t):
        return (xt - a) / t[:, None, None, None]

    loss, aux = dit.flow_matching_loss(jax.random.key(1), oracle, x0)
    assert float(loss) < 1e-8
    # ... and a wrong convention (v = x0 - eps) is far from zero:
    loss_wrong, _ = dit.flow_matching_loss(jax.random.key(1), lambda xt, t: -oracle(xt, t), x0)
    assert float(loss_wrong) > 1.0


def _gaussian_optimal_velocity(m, s):
    """x0 ~ N(m, s^2) per pixel: v*(x, t) = E[eps - x0 | x_t = x]
    = -m + (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2) (x - (1-t) m)."""
    def v(x, t):
        t = t[:, None]
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return -m + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * m)
    return v


def test_gaussian_optimal_velocity_attains_the_closed_form_minimum():
    """min loss = E_t [Var(v) - Cov(v, x_t)^2 / Var(x_t)]
    = int_0^1 (1 + s^2) - (t - (1-t) s^2)^2 / ((1-t)^2 s^2 + t^2) dt (by quadrature)."""
    m, s = 0.7, 0.5
    x0 = m + s * jax.random.normal(jax.random.key(0), (20_000, 8))
    loss, _ = dit.flow_matching_loss(jax.random.key(1), _gaussian_optimal_velocity(m, s), x0)
    ts = (np.arange(200_000) + 0.5) / 200_000
    expect = np.mean((1 + s ** 2) - (ts - (1 - ts) * s ** 2) ** 2
                     / ((1 - ts) ** 2 * s ** 2 + ts ** 2))
    assert abs(float(loss) - expect) < 0.01 * expect, (float(loss), expect)
    # The zero velocity has loss E (eps - x0)^2 = 1 + s^2 + m^2, far above the minimum.
    zero, _ = dit.flow_matching_loss(jax.random.key(1), lambda x, t: jnp.zeros_like(x), x0)
    assert abs(float(zero) - (1 + s ** 2 + m ** 2)) < 0.02
    assert expect < 0.5 * (1 + s ** 2 + m ** 2)


def test_logit_normal_times_in_unit_interval():
    t = np.asarray(dit.sample_times(jax.random.key(0), 20_000, "logit_normal"))
    assert 0 < t.min() and t.max() < 1
    assert abs(np.median(t) - 0.5) < 0.02
    with pytest.raises(ValueError, match="time sampling"):
        dit.sample_times(jax.random.key(0), 4, "beta")


def test_euler_sampler_transports_noise_to_the_gaussian():
    """With the optimal Gaussian velocity the ODE solution is x_t = (1-t) m + sigma_t z,
    sigma_t = sqrt((1-t)^2 s^2 + t^2), so x_0 = m + s z: Euler with many steps reaches it."""
    m, s = -0.4, 0.3
    z = jax.random.normal(jax.random.key(0), (64, 5))
    out = dit.euler_integrate(_gaussian_optimal_velocity(m, s), z, 400)
    np.testing.assert_allclose(np.asarray(out), np.asarray(m + s * z), atol=5e-3)
    # with very few steps the error is visible (the test is sensitive to the integrator)
    coarse = dit.euler_integrate(_gaussian_optimal_velocity(m, s), z, 2)
    assert float(jnp.max(jnp.abs(coarse - (m + s * z)))) > 1e-2


def test_sample_shapes_and_guidance(model):
    _, _, codes = _inputs(b=2)
    a = dit.sample(model, jax.random.key(0), codes, steps=3, guidance_scale=1.0)
    b = dit.sample(model, jax.random.key(0), codes, steps=3, guidance_scale=4.0)
    assert a.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(b)))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    # sampler = Euler on model(x, t, codes) (eager reference)
    ref = dit.euler_integrate(lambda x, t: model(x, t, codes),
                              jax.random.normal(jax.random.key(0), (2, 32, 32, 3)), 3)
    np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-4, atol=1e-4)
    u = dit.sample(model, jax.random.key(0), None, steps=2, num_samples=3)
    assert u.shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="num_samples"):
        dit.sample(model, jax.random.key(0), None, steps=2)


# --- training ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_step_ema_and_nonfinite_guard():
    m = dit.DiT(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m, nnx.Param)
    opt = optax.adamw(1e-3)
    state = dit.init_train_state(params, opt, ema=True)
    step = dit.make_train_step(graphdef, opt, ema_decay=0.5)
    x, _, codes = _inputs(b=4)
    new, metrics = step(state, jax.random.key(0), x, codes)
    assert int(metrics["skipped"]) == 0 and int(new.step) == 1
    # EMA with warm-up decay d = min(0.5, 1/10) = 0.1: ema = 0.1 old + 0.9 new
    for e, p0, p1 in zip(jax.tree.leaves(new.ema), jax.tree.leaves(params),
                         jax.tree.leaves(new.params)):
        np.testing.assert_allclose(np.asarray(e), 0.1 * np.asarray(p0) + 0.9 * np.asarray(p1),
                                   rtol=1e-5, atol=1e-7)
    bad, metrics = step(new, jax.random.key(1), x.at[0, 0, 0, 0].set(jnp.nan), codes)
    assert int(metrics["skipped"]) == 1 and int(metrics["nonfinite_total"]) == 1
    for a, b in zip(jax.tree.leaves((bad.params, bad.ema)), jax.tree.leaves((new.params, new.ema))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_dit_rejects_bad_codes():
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="vocab_size"):
        dit.train_dit(CFG, x, np.full((4, L), V), jax.random.key(0), 1, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        dit.train_dit(CFG, x, None, jax.random.key(0), 1, progress=False)


def _eval_loss(model, images, codes, n_keys=8):
    fn = lambda x, t: model(x, t, codes)  # noqa: E731
    return float(np.mean([dit.flow_matching_loss(jax.random.key(1000 + i), fn, images)[0]
                          for i in range(n_keys)]))


@pytest.mark.slow
def test_overfits_eight_images():
    """8 rendered shapes with distinct codes; the held-fixed-noise loss of the trained model
    falls by a clear factor from the initial model's (which outputs 0: loss = E|eps - x0|^2)."""
    images = np.stack([D.shape_example(0, "train", i)["image"] for i in range(8)])
    images = images.astype(np.float32) / 127.5 - 1.0
    codes = np.random.default_rng(0).integers(0, V, (8, L))
    train = dit.DiTTrainConfig(learning_rate=2e-3, warmup_steps=20, batch_size=8,
                               ema_decay=0.0, grad_clip=1.0)
    result = dit.train_dit(CFG, images, codes, jax.random.key(0), 250, progress=False,
                           train=train)
    init = dit.DiT(CFG, rngs=nnx.Rngs(0))
    before = _eval_loss(init, jnp.asarray(images), jnp.asarray(codes))
    after = _eval_loss(result.model, jnp.asarray(images), jnp.asarray(codes))
    print(f"overfit 8 images: eval loss {before:.4f} -> {after:.4f} "
          f"(x{before / after:.1f}); train loss first 10 {result.losses[:10].mean():.4f}, "
          f"last 10 {result.losses[-10:].mean():.4f}")
    assert after < before / 3
    assert np.all(np.isfinite(result.losses))


def test_train_step_flops_formula_matches_xla_count_of_forward_and_backward():
    """The MFU numerator against XLA's own FLOP count of the compiled loss gradient: XLA also
    counts element-wise work (a few percent here), never less than the matmuls."""
    cfg = dit.DiTConfig(patch_size=4, dim=128, depth=2, heads=4, code_length=4, vocab_size=8)
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = 8
    x = jnp.zeros((batch, 32, 32, 3))
    t = jnp.full((batch,), 0.5)
    codes = jnp.zeros((batch, 4), jnp.int32)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x, t, codes) ** 2)

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = float(cost["flops"]) / dit.train_step_flops(cfg, batch)
    assert 1.0 <= ratio < 1.08, ratio
