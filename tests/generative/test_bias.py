"""generative.bias: rates, shifts, bootstrap intervals (self-shift, coverage by simulation),
boundary diagnostics, sensitivity sweeps and verdicts, against exact oracles."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from generative import bias as B
from generative import datasets

# --- rates, bias, shift -----------------------------------------------------------------------


class RateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rate_bias_shift_abs(self):
        y_gen = jnp.array([1, 0, 1, 1], jnp.int32)  # 0.75
        y_val = jnp.array([0, 0, 1, 0, 1], jnp.int32)  # 0.4

        @self.variant
        def f(a, b):
            pg, pv = B.attribute_rate(a), B.attribute_rate(b)
            return pg, pv, B.shift(pg, pv), B.absolute_shift(pv, pg), B.bias(pg, 0.5)

        pg, pv, s, abs_s, bias = f(y_gen, y_val)
        np.testing.assert_allclose([pg, pv, s, abs_s, bias], [0.75, 0.4, 0.35, 0.35, 0.25],
                                   rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_threshold_sweep_and_by_classifier_match_numpy(self):
        rng = np.random.default_rng(0)
        lg, lr = rng.normal(0.3, 1, 200), rng.normal(0, 1, 150)
        thr = np.array([-1.0, 0.0, 0.5, 2.0])
        out = self.variant(B.threshold_sweep)(jnp.asarray(lg), jnp.asarray(lr), jnp.asarray(thr))
        oracle = [(lg > t).mean() - (lr > t).mean() for t in thr]
        np.testing.assert_allclose(out, oracle, atol=1e-6)
        cg, cr = rng.normal(size=(3, 40)), rng.normal(size=(3, 30))
        by = self.variant(B.shifts_by_classifier)(jnp.asarray(cg), jnp.asarray(cr))
        np.testing.assert_allclose(by, (cg > 0).mean(1) - (cr > 0).mean(1), atol=1e-6)


def test_binary_logit_is_log_odds_of_softmax():
    logits = jnp.array([[0.3, 1.2], [2.0, -1.0]])
    p1 = jax.nn.softmax(logits)[:, 1]
    np.testing.assert_allclose(B.binary_logit(logits), np.log(p1 / (1 - p1)), rtol=1e-5)


def test_sensitivity():
    s = B.sensitivity(jnp.array([0.01, -0.02, 0.04]))
    assert float(s["range"]) == pytest.approx(0.06)
    assert float(s["std"]) == pytest.approx(np.std([0.01, -0.02, 0.04], ddof=1), rel=1e-5)
    assert bool(s["sign_disagreement"])
    assert not bool(B.sensitivity(jnp.array([0.01, 0.03]))["sign_disagreement"])
    assert float(B.sensitivity(jnp.array([0.2]))["std"]) == 0.0


# --- bootstrap ------------------------------------------------------------------------------------


def test_percentile_interval_matches_numpy():
    x = np.random.default_rng(1).normal(size=501)
    lo, hi = B.percentile_interval(jnp.asarray(x), 0.9)
    np.testing.assert_allclose([lo, hi], np.quantile(x, [0.05, 0.95]), rtol=1e-5)
    with pytest.raises(ValueError, match="confidence"):
        B.percentile_interval(jnp.asarray(x), 1.0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=2, max_size=300), st.integers(0, 2 ** 30))
def test_shift_of_a_set_against_itself_is_zero_within_its_ci(labels, seed):
    y = jnp.asarray(labels, jnp.int32)
    ci = B.bootstrap_shift(jax.random.key(seed), y, y, num_resamples=200)
    assert float(ci.shift) == 0.0 and float(ci.abs_shift) == 0.0
    assert float(ci.low) <= 0.0 <= float(ci.high)
    if 0 < sum(labels) < len(labels):  # a non-constant set has a non-degenerate interval
        assert float(ci.high) > float(ci.low) and float(ci.se) > 0


def test_index_and_count_bootstraps_agree():
    """For 0/1 labels the binomial shortcut has the distribution of index resampling: the
    standard errors agree with each other and with the binomial formula."""
    rng = np.random.default_rng(2)
    yg, yr = (rng.uniform(size=400) < 0.3).astype(np.int32), (rng.uniform(size=300) < 0.6)
    yr = yr.astype(np.int32)
    a = B.bootstrap_shift(jax.random.key(0), jnp.asarray(yg), jnp.asarray(yr),
                          num_resamples=4000)
    b = B.bootstrap_shift_counts(jax.random.key(1), yg.sum(), 400, yr.sum(), 300,
                                 num_resamples=4000)
    pg, pr = yg.mean(), yr.mean()
    se = math.sqrt(pg * (1 - pg) / 400 + pr * (1 - pr) / 300)
    assert float(a.shift) == pytest.approx(float(b.shift), abs=1e-6)
    # the bootstrap SE of B = 4000 draws is within a few percent of the truth
    assert float(a.se) == pytest.approx(se, rel=0.06)
    assert float(b.se) == pytest.approx(se, rel=0.06)
    assert float(a.low) == pytest.approx(float(b.low), abs=0.012)


def _coverage(key, p_gen, p_ref, n_gen, n_ref, sims, confidence, one_sided_resampling=False):
    """Fraction of ``sims`` synthetic experiments whose bootstrap CI covers p_gen - p_ref."""
    k_data, k_boot = jax.random.split(key)
    kg, kr = jax.random.split(k_data)
    k_gen = jax.random.binomial(kg, n_gen, p_gen, (sims,))
    k_ref = jax.random.binomial(kr, n_ref, p_ref, (sims,))

    def one(k, a, b):
        ci = B.bootstrap_shift_counts(k, a, n_gen, b, n_ref, num_resamples=500,
                                      confidence=confidence)
        if one_sided_resampling:  # a wrong interval: only the generated set's variability
            half = (ci.high - ci.low) / 2 * jnp.sqrt(
                (a / n_gen) * (1 - a / n_gen) / n_gen
                / jnp.maximum(ci.se ** 2, 1e-12))
            ci = ci._replace(low=ci.shift - half, high=ci.shift + half)
        return B.covers(ci, p_gen - p_ref)

    hits = jax.jit(jax.vmap(one))(jax.random.split(k_boot, sims), k_gen, k_ref)
    return float(jnp.mean(hits))


SIMS = 600


def _tolerance(confidence: float, sims: int = SIMS) -> float:
    """4 binomial standard errors of a coverage estimated from ``sims`` experiments (a
    two-sided false alarm rate of 6e-5 per check) plus 0.01 for the percentile bootstrap's
    known O(1/n) under-coverage at these sizes."""
    return 4.0 * math.sqrt(confidence * (1 - confidence) / sims) + 0.01


@settings(max_examples=4, deadline=None)
@given(st.floats(0.1, 0.9), st.floats(0.1, 0.9), st.integers(300, 800), st.integers(300, 800),
       st.sampled_from([0.8, 0.95]), st.integers(0, 2 ** 30))
def test_bootstrap_ci_covers_the_true_shift_at_its_nominal_rate(p_gen, p_ref, n_gen, n_ref,
                                                                 confidence, seed):
    cov = _coverage(jax.random.key(seed), p_gen, p_ref, n_gen, n_ref, SIMS, confidence)
    assert abs(cov - confidence) <= _tolerance(confidence), (cov, confidence)


def test_coverage_check_rejects_an_interval_that_ignores_the_reference_set():
    """The check has power: an interval built from the generated set's variability alone
    (equal sizes and rates: its width is 1/sqrt(2) of the right one) covers ~0.83 at 95%."""
    cov = _coverage(jax.random.key(3), 0.4, 0.4, 500, 500, SIMS, 0.95,
                    one_sided_resampling=True)
    assert abs(cov - 0.95) > _tolerance(0.95), cov


def test_covers_and_zero_shift_draws_cover_zero_at_the_nominal_rate():
    """Two independent sets of one distribution: the CI contains 0 at the nominal rate."""
    cov = _coverage(jax.random.key(4), 0.3, 0.3, 500, 400, SIMS, 0.95)
    assert abs(cov - 0.95) <= _tolerance(0.95), cov


# --- boundary diagnostics --------------------------------------------------------------------------


class BoundaryTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_boundary_mass_exact(self):
        s = jnp.array([-2.0, -0.5, 0.2, 0.99, 1.0, 3.0])
        out = self.variant(B.boundary_mass)(s, 0.0, 1.0)
        assert float(out) == pytest.approx(3 / 6)
        out = self.variant(B.boundary_mass)(s, 1.0, 0.5)  # 0.99, 1.0
        assert float(out) == pytest.approx(2 / 6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_logit_histogram_matches_numpy(self):
        x = np.random.default_rng(5).normal(0, 3, 1000)
        dens, edges = self.variant(lambda v: B.logit_histogram(v, 0.5, 4.0, 10))(jnp.asarray(x))
        counts, np_edges = np.histogram(x, bins=10, range=(-3.5, 4.5))
        np.testing.assert_allclose(edges, np_edges, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dens) * 1000 * 0.8, counts, atol=1e-3)


def test_distance_to_boundaries_wraps_on_a_circle():
    v = jnp.array([0.02, 0.98, 0.45, 0.7])
    d = B.distance_to_boundaries(v, jnp.array([0.0, 0.5]), period=1.0)
    np.testing.assert_allclose(d, [0.02, 0.02, 0.05, 0.2], atol=1e-6)
    d = B.distance_to_boundaries(v, jnp.array([0.0, 0.5]))  # no wrap
    np.testing.assert_allclose(d, [0.02, 0.48, 0.05, 0.2], atol=1e-6)


# --- verdicts, correlations -----------------------------------------------------------------------


@pytest.mark.parametrize("true_ci,meas_ci,expected", [
    ((-0.01, 0.02, 0.005), (0.03, 0.08, 0.05), "invents"),
    ((0.03, 0.08, 0.05), (-0.01, 0.02, 0.005), "hides"),
    ((0.03, 0.08, 0.05), (-0.08, -0.02, -0.05), "flips"),
    ((0.01, 0.03, 0.02), (0.06, 0.09, 0.075), "exaggerates"),
    ((0.06, 0.09, 0.075), (0.01, 0.03, 0.02), "understates"),
    ((0.02, 0.06, 0.04), (0.03, 0.07, 0.05), "agrees"),
    ((-0.02, 0.02, 0.0), (-0.03, 0.01, -0.01), "agrees"),
])
def test_shift_verdict(true_ci, meas_ci, expected):
    tl, th, t = true_ci
    ml, mh, m = meas_ci
    assert B.shift_verdict(tl, th, ml, mh, t, m) == expected
    assert expected in B.VERDICTS


def test_pearson_and_spearman_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(6)
    x = rng.normal(size=30)
    y = x ** 3 + rng.normal(size=30)
    y[:5] = y[0]  # ties
    assert B.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-9)
    assert B.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-9)
    assert math.isnan(B.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        B.pearson([1.0], [2.0])


# --- attributes of the shapes ---------------------------------------------------------------------


def test_shape_attribute_labels_from_recorded_parameters():
    attrs = B.shape_attributes(size_threshold=0.21, hue_band=(0.9, 1.0))
    warm = attrs["warm"]
    np.testing.assert_array_equal(warm.label([0.95, 1.95, 0.2, 0.9, 0.0]), [1, 1, 0, 1, 0])
    assert attrs["large"].label([0.2099, 0.21])[0] == 0 and attrs["large"].label([0.21])[0] == 1
    np.testing.assert_array_equal(attrs["large"].boundaries(), [0.21])
    np.testing.assert_array_equal(warm.boundaries(), [0.0, 0.9])  # 1.0 wraps to 0.0
    circle = attrs["circle"]
    assert not circle.spectrum and circle.label([0, 1, 4]).tolist() == [1, 0, 0]
    examples = [datasets.shape_example(0, "train", i) for i in range(20)]
    raw = {k: np.array([e[k] for e in examples]) for k in datasets.SHAPE_FIELDS}
    images = np.stack([e["image"] for e in examples])
    labels = B.attribute_labels(attrs, B.attribute_values(raw, images))
    np.testing.assert_array_equal(labels["circle"], raw["kind"] == 0)
    np.testing.assert_array_equal(labels["striped"], raw["background"] == 1)
    np.testing.assert_array_equal(labels["large"], raw["size"] >= 0.21)


def test_brightness_of_constant_images():
    white = np.full((2, 4, 4, 3), 255, np.uint8)
    assert B.brightness(white) == pytest.approx([1.0, 1.0])
    green = np.zeros((1, 4, 4, 3), np.float32) - 1.0
    green[..., 1] = 1.0  # pure green in [-1, 1]
    assert B.brightness(green)[0] == pytest.approx(0.7152)
    with pytest.raises(ValueError, match="images"):
        B.brightness(np.zeros((4, 4, 3)))


def test_paired_discrepancy_is_measured_minus_true_and_narrower_than_unpaired():
    rng = np.random.default_rng(7)
    t_gen, t_ref = (rng.uniform(size=800) < 0.4), (rng.uniform(size=600) < 0.5)
    flip = lambda t, p: np.where(rng.uniform(size=t.shape) < p, ~t, t)  # noqa: E731
    m_gen, m_ref = flip(t_gen, 0.05), flip(t_ref, 0.02)
    j = lambda x: jnp.asarray(x.astype(np.int32))  # noqa: E731
    ci = B.bootstrap_discrepancy(jax.random.key(0), j(m_gen), j(t_gen), j(m_ref), j(t_ref),
                                 num_resamples=2000)
    expected = (m_gen.mean() - m_ref.mean()) - (t_gen.mean() - t_ref.mean())
    assert float(ci.shift) == pytest.approx(expected, abs=1e-6)
    # paired: the interval reflects only the flips, much narrower than the shift's own CI
    own = B.bootstrap_shift(jax.random.key(1), j(t_gen), j(t_ref), num_resamples=2000)
    assert float(ci.high - ci.low) < 0.6 * float(own.high - own.low)
    # a faithful classifier (m = t) has a discrepancy of exactly 0 with a zero-width interval
    same = B.bootstrap_discrepancy(jax.random.key(2), j(t_gen), j(t_gen), j(t_ref), j(t_ref),
                                   num_resamples=100)
    assert float(same.low) == float(same.high) == float(same.shift) == 0.0
