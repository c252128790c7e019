"""Masked discrete diffusion (MDLM): exact-enumeration NELBO oracles, forward masking rate, SUBS,
the ancestral sampler's exact output law on a toy distribution, and a smoke training run."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from generative import discrete_diffusion as dd
from generative.code_denoiser import CodeDenoiser, CodeDenoiserConfig, make_train_step

V = 3
MASK = V


def _toy_distribution(seed, L):
    p = np.random.default_rng(seed).dirichlet(np.ones(V ** L))
    return p.reshape((V,) * L)


def _all_sequences(L):
    return np.array(list(itertools.product(range(V), repeat=L)), np.int32)


def _conditionals(p, z):
    """[L, V] marginals of each position of x ~ p given the unmasked entries of z."""
    L = p.ndim
    w = p.copy()
    for l, tok in enumerate(z):
        if tok != MASK:
            keep = np.zeros(V, bool)
            keep[tok] = True
            w = w * keep.reshape([V if i == l else 1 for i in range(L)])
    out = np.stack([w.sum(axis=tuple(i for i in range(L) if i != l)) for l in range(L)])
    total = out.sum(-1, keepdims=True)
    return np.where(total > 0, out / np.where(total > 0, total, 1), 1.0 / V)


def _table_denoiser(logits_table, L):
    """denoise_fn looking logits up by the (mixed-radix) index of z in {0..V}^L."""
    radix = jnp.asarray([(V + 1) ** (L - 1 - l) for l in range(L)], jnp.int32)
    table = jnp.asarray(logits_table, jnp.float32)

    def denoise(z, t):
        del t
        return table[z[:, -L:] @ radix]

    return denoise


def _true_denoiser(p):
    """The optimal denoiser: exact conditionals of p. The mask logit is set *high* (+5) so that
    the tests also check that SUBS removes it."""
    L = p.ndim
    rows = []
    for z in itertools.product(range(V + 1), repeat=L):
        logits = np.log(np.maximum(_conditionals(p, z), 1e-30))
        rows.append(np.concatenate([logits, np.full((L, 1), 5.0)], -1))
    return _table_denoiser(np.stack(rows), L)


def _exact_nelbo(denoise, L, t_lo=0.0, t_hi=1.0):
    """NELBO(x) for every x in {0..V-1}^L: int_{t_lo}^{t_hi} sum_M P(M|t) nelbo_terms dt by
    enumerating the 2^L mask patterns and Gauss-Legendre in t (the integrand is a polynomial
    of degree L-1 for a t-independent denoiser, so 8 nodes are exact)."""
    xs = jnp.asarray(_all_sequences(L))
    nodes, weights = np.polynomial.legendre.leggauss(8)
    ts = t_lo + (t_hi - t_lo) * (nodes + 1) / 2
    weights = weights * (t_hi - t_lo) / 2
    total = np.zeros(len(xs))
    for pattern in itertools.product([False, True], repeat=L):
        m = np.array(pattern)
        z = jnp.where(jnp.asarray(m)[None], MASK, xs)
        k = int(m.sum())
        for t, w in zip(ts, weights):
            tt = jnp.full((len(xs),), t, jnp.float32)
            f = np.asarray(dd.nelbo_terms(denoise(z, tt), xs, z, tt, MASK), np.float64)
            total += w * t ** k * (1 - t) ** (L - k) * f
    return total


def _beta_closed_form(p):
    """sum_{M != {}} B(|M|, L-|M|+1) sum_{l in M} -log p(x_l | x_{~M}), straight from p."""
    L = p.ndim
    xs = _all_sequences(L)
    out = np.zeros(len(xs))
    for i, x in enumerate(xs):
        for pattern in itertools.product([False, True], repeat=L):
            k = sum(pattern)
            if k == 0:
                continue
            beta = math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1)
            z = [MASK if mk else tok for mk, tok in zip(pattern, x)]
            cond = _conditionals(p, z)
            out[i] += beta * sum(-math.log(cond[l, x[l]]) for l in range(L) if pattern[l])
    return out


# --- the NELBO against exact enumeration -------------------------------------------------------


@pytest.mark.parametrize("L", [2, 3])
def test_exact_nelbo_of_the_true_denoiser_is_the_entropy(L):
    p = _toy_distribution(L, L)
    nelbo = _exact_nelbo(_true_denoiser(p), L)
    np.testing.assert_allclose(nelbo, _beta_closed_form(p), rtol=1e-5)
    entropy = -np.sum(p * np.log(p))
    np.testing.assert_allclose(np.sum(p.reshape(-1) * nelbo), entropy, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_nelbo_of_any_denoiser_bounds_the_entropy(seed):
    # NELBO(x) >= -log p_theta(x) for the model's own distribution, and cross-entropy >= H(p).
    L = 2
    p = _toy_distribution(seed, L)
    rng = np.random.default_rng(seed)
    table = 2.0 * rng.standard_normal(((V + 1) ** L, L, V + 1))
    expected = np.sum(p.reshape(-1) * _exact_nelbo(_table_denoiser(table, L), L))
    assert expected >= -np.sum(p * np.log(p)) - 1e-6


def test_monte_carlo_loss_matches_the_exact_truncated_nelbo():
    # diffusion_loss draws t ~ U[t_min, 1] (antithetic) and z_t ~ q; its mean over keys is
    # E_x [ 1/(1-t_min) int_{t_min}^1 ... dt ] / L, computed exactly by enumeration.
    L, t_min = 3, 1e-3
    p = _toy_distribution(7, L)
    denoise = _true_denoiser(p)
    xs = _all_sequences(L)
    exact = np.mean(_exact_nelbo(denoise, L, t_min, 1.0)) / (1 - t_min) / L
    batch = jnp.asarray(np.tile(xs, (4, 1)))  # every sequence 4 times, equal weights
    losses = jax.jit(jax.vmap(lambda k: dd.diffusion_loss(k, denoise, batch, MASK,
                                                          t_min=t_min)[0]))(
        jax.random.split(jax.random.key(0), 400))
    losses = np.asarray(losses, np.float64)
    se = losses.std(ddof=1) / np.sqrt(len(losses))
    assert abs(losses.mean() - exact) <= 5 * se, (losses.mean(), exact, se)


def test_nelbo_terms_hand_case():
    # L=2, x=[1, 2], z=[m, 2] at t=0.25: weight 4, one masked position with model prob q(1)
    logits = jnp.log(jnp.array([[[0.2, 0.5, 0.3, 1.0], [0.1, 0.1, 0.8, 1.0]]]))
    got = dd.nelbo_terms(logits, jnp.array([[1, 2]]), jnp.array([[MASK, 2]]),
                         jnp.array([0.25]), MASK)
    np.testing.assert_allclose(got, [4 * -math.log(0.5)], rtol=1e-5)
    none_masked = dd.nelbo_terms(logits, jnp.array([[1, 2]]), jnp.array([[1, 2]]),
                                 jnp.array([0.25]), MASK)
    assert float(none_masked[0]) == 0.0


# --- forward process and SUBS ------------------------------------------------------------------


class MaskTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_masking_rate_matches_t(self):
        x0 = jnp.zeros((200, 100), jnp.int32)
        n = x0.size
        for i, t in enumerate((0.1, 0.5, 0.9)):
            z = self.variant(dd.mask_tokens, static_argnums=3)(jax.random.key(i), x0,
                                                              jnp.full((200,), t), MASK)
            rate = float(jnp.mean(z == MASK))
            assert abs(rate - t) <= 5 * math.sqrt(t * (1 - t) / n), (t, rate)
            assert bool(jnp.all((z == MASK) | (z == x0)))
        # per-sequence times: row b masked at rate t_b
        t = jnp.linspace(0.0, 1.0, 200)
        z = self.variant(dd.mask_tokens, static_argnums=3)(jax.random.key(9), x0, t, MASK)
        assert int(jnp.sum(z[0] == MASK)) == 0 and int(jnp.sum(z[-1] == MASK)) == 100
        rates = np.asarray(jnp.mean(z == MASK, axis=1))
        assert np.abs(rates - np.asarray(t)).max() <= 5 * math.sqrt(0.25 / 100)

    def test_maskable_prefix_is_never_masked(self):
        x0 = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % V
        maskable = jnp.array([False, False, True, True, True, True])
        z = dd.mask_tokens(jax.random.key(0), x0, jnp.ones(2), MASK, maskable)
        np.testing.assert_array_equal(z[:, :2], x0[:, :2])
        assert bool(jnp.all(z[:, 2:] == MASK))

    def test_subs_zero_mask_probability_and_carry_over(self):
        logits = jax.random.normal(jax.random.key(0), (2, 4, V + 1)).at[..., MASK].set(50.0)
        z = jnp.array([[MASK, 0, MASK, 2], [1, MASK, MASK, MASK]])
        logp = dd.subs_log_probs(logits, z, MASK)
        probs = np.asarray(jnp.exp(logp))
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
        assert probs[..., MASK].max() == 0.0
        real = np.asarray(logits[..., :V], np.float64)
        want = np.exp(real - real.max(-1, keepdims=True))
        want /= want.sum(-1, keepdims=True)
        is_mask = np.asarray(z) == MASK
        np.testing.assert_allclose(probs[..., :V][is_mask], want[is_mask], atol=1e-6)
        np.testing.assert_array_equal(probs[~is_mask],
                                      np.eye(V + 1)[np.asarray(z)[~is_mask]])


# --- sampler -----------------------------------------------------------------------------------


def _point_mass_denoiser(target):
    target = jnp.asarray(target)

    def denoise(z, t):
        return 30.0 * jax.nn.one_hot(jnp.broadcast_to(target, z.shape), V + 1)

    return denoise


@pytest.mark.parametrize("steps", [1, 7])
def test_sampler_with_perfect_denoiser_returns_the_point(steps):
    target = jnp.array([2, 0, 1, 1, 0], jnp.int32)
    out = dd.sample(jax.random.key(steps), _point_mass_denoiser(target), 5, steps, MASK,
                    batch_size=16)
    chex.assert_shape(out, (16, 5))
    np.testing.assert_array_equal(out, np.broadcast_to(target, (16, 5)))


def test_sampler_carry_over_and_unmasking_schedule():
    # A denoiser that, at every unmasked position, wants a *different* token: carry-over must
    # keep the token anyway. Mask-token logits are high too: zero masking probability.
    def contrary(z, t):
        want = jnp.where(z == MASK, 0, (z + 1) % V)
        return 10.0 * jax.nn.one_hot(want, V + 1) + 20.0 * jax.nn.one_hot(MASK, V + 1)

    steps, B, L = 8, 500, 16
    out, traj = dd.sample(jax.random.key(0), contrary, L, steps, MASK, batch_size=B,
                          return_trajectory=True)
    traj = np.asarray(traj)
    chex.assert_shape(traj, (steps + 1, B, L))
    assert np.all(traj[0] == MASK) and not np.any(traj[-1] == MASK)
    np.testing.assert_array_equal(traj[-1], out)
    for k in range(steps):
        was = traj[k] != MASK
        np.testing.assert_array_equal(traj[k + 1][was], traj[k][was])  # never changes
        # masked fraction after step k+1 is t = 1 - (k+1)/steps in expectation
        t = 1 - (k + 1) / steps
        frac = np.mean(traj[k + 1] == MASK)
        assert abs(frac - t) <= 5 * math.sqrt(max(t * (1 - t), 1e-12) / (B * L)) + 1e-12


@pytest.mark.parametrize("steps", [1, 4])
def test_sampler_output_law_on_a_toy_distribution(steps):
    # With the exact conditionals of p (L=2) and a uniform time grid, both positions unmask in
    # the same step with probability sum_k t_k^2 ((t_k - s_k)/t_k)^2 = 1/steps, and then they
    # are drawn from the product of marginals; otherwise the chain rule gives p exactly:
    #   law = (1 - 1/steps) p + (1/steps) p_1 (x) p_2.
    p = _toy_distribution(11, 2)
    law = (1 - 1 / steps) * p + (1 / steps) * np.outer(p.sum(1), p.sum(0))
    n = 40_000
    out = np.asarray(jax.jit(lambda k: dd.sample(k, _true_denoiser(p), 2, steps, MASK,
                                                 batch_size=n))(jax.random.key(steps)))
    freq = np.bincount(out[:, 0] * V + out[:, 1], minlength=V * V).reshape(V, V) / n
    sd = np.sqrt(law * (1 - law) / n)
    assert np.all(np.abs(freq - law) <= 5 * sd + 1e-12), (freq, law)
    if steps == 4:  # and the test can tell the two laws apart
        assert np.abs(law - np.outer(p.sum(1), p.sum(0))).max() > 10 * sd.max()


def test_sampler_with_prefix_keeps_it_and_conditions_on_it():
    # denoiser: the code token at position l copies prefix token l
    P, L = 3, 3

    def copy_prefix(z, t):
        want = jnp.concatenate([z[:, :P], z[:, :P]], axis=1)
        return 30.0 * jax.nn.one_hot(want, V + 1)

    prefix = jnp.array([[0, 1, 2], [2, 2, 1]], jnp.int32)
    out, traj = dd.sample(jax.random.key(0), copy_prefix, L, 4, MASK, batch_size=2,
                          prefix=prefix, return_trajectory=True)
    np.testing.assert_array_equal(out, prefix)
    np.testing.assert_array_equal(np.asarray(traj)[:, :, :P],
                                  np.broadcast_to(prefix, (5, 2, P)))
    one = dd.sample(jax.random.key(1), copy_prefix, L, 2, MASK, batch_size=3,
                    prefix=jnp.array([1, 0, 2]))
    np.testing.assert_array_equal(one, np.broadcast_to([1, 0, 2], (3, 3)))


def test_loss_with_prefix_counts_only_code_tokens():
    # Position 0 is a visible prefix, position 1 the code: z_1 is masked with probability t,
    # so NELBO(x) = int (1/t) t -log p(x_1 | x_0) dt = -log p(x_1 | x_0) per code token (also
    # after truncating t to [t_min, 1] and renormalising). Monte Carlo over keys matches it.
    p = _toy_distribution(3, 2)
    denoise = _true_denoiser(p)
    xs = _all_sequences(2)
    x0 = jnp.asarray(np.tile(xs, (4, 1)))
    exact = np.mean([-math.log(p[a, b] / p[a].sum()) for a, b in xs])
    maskable = jnp.array([False, True])

    def one(k):
        loss, aux = dd.diffusion_loss(k, denoise, x0, MASK, maskable=maskable)
        return loss, aux["mask_rate"]

    losses, rates = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 400))
    losses = np.asarray(losses, np.float64)
    se = losses.std(ddof=1) / np.sqrt(len(losses))
    assert abs(losses.mean() - exact) <= 5 * se, (losses.mean(), exact, se)
    # half the positions are maskable, each masked at rate E[t] = (1 + t_min) / 2
    assert abs(float(np.mean(rates)) - 0.5 * (1 + 1e-3) / 2) < 0.02


# --- smoke training ----------------------------------------------------------------------------


@pytest.mark.slow
def test_denoiser_learns_a_toy_code_constraint():
    # Codes of L=4 tokens over V=8: x_0, x_2, x_3 uniform and x_1 = x_0. Entropy per token
    # H/L = 3 log 8 / 4 = 1.56 nats; a model of the marginals only (uniform) has NELBO per
    # token exactly log 8 = 2.08. Samples from independent tokens satisfy x_1 = x_0 with
    # probability exactly 1/8.
    cfg = CodeDenoiserConfig.tiny()
    model = CodeDenoiser(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)
    step = make_train_step(graphdef, optimizer)

    def batch(key, n):
        x = jax.random.randint(key, (n, 4), 0, 8)
        return x.at[:, 1].set(x[:, 0])

    eval_x = batch(jax.random.key(123), 4096)

    @jax.jit
    def eval_loss(params):
        m = nnx.merge(graphdef, params)
        return dd.diffusion_loss(jax.random.key(7), m, eval_x, cfg.mask_id)[0]

    before = float(eval_loss(params))
    key = jax.random.key(0)
    for _ in range(300):
        key, k1, k2 = jax.random.split(key, 3)
        params, opt_state, metrics = step(params, opt_state, k1, batch(k2, 256))
        assert np.isfinite(float(metrics["loss"]))
    after = float(eval_loss(params))
    # more than half of the gap between the marginals-only model and the entropy is closed
    assert after < before and after < (math.log(8) + 0.75 * math.log(8)) / 2, (before, after)
    samples = dd.sample(jax.random.key(1), nnx.merge(graphdef, params), 4, 16, cfg.mask_id,
                        batch_size=1000)
    agree = float(jnp.mean(samples[:, 1] == samples[:, 0]))
    # a perfect model with 16 steps gets >= 1 - (1/16)(7/8) ~ 0.95 (simultaneous unmasking);
    # chance is 0.125
    assert agree > 0.8, agree
    assert int(jnp.sum(samples == cfg.mask_id)) == 0


def test_train_step_never_masks_a_prefix():
    """With ``maskable`` False on a prefix (caption word ids above the mask id), the step masks
    only code positions: the mask rate never exceeds the code's share of the sequence (without
    ``maskable`` it averages ~1/2 of all positions)."""
    cfg = CodeDenoiserConfig(vocab_size=4, length=6, extra_tokens=3, dim=16, depth=1, heads=2)
    model = CodeDenoiser(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.sgd(0.0)
    maskable = np.arange(6) >= 4  # 4 prefix positions, 2 code positions
    step = make_train_step(graphdef, opt, maskable=maskable)
    x0 = jnp.asarray(np.tile([5, 6, 7, 5, 1, 2], (64, 1)), jnp.int32)  # prefix ids > mask id
    rates = [float(step(params, opt.init(params), jax.random.key(i), x0)[2]["mask_rate"])
             for i in range(5)]
    assert max(rates) <= 2 / 6 and min(rates) > 0
