"""Health metrics against direct numpy computations on hand-made activations and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import assume, given, settings, strategies as st

from jaxrl_suite import health
from jaxrl_suite.networks import NetworkConfig, make_network, map_leaves_at, tree_get

SETTINGS = settings(max_examples=25, deadline=None)


def _np_tau_scores(h):
    m = np.abs(np.asarray(h, np.float64)).mean(axis=tuple(range(h.ndim - 1)))
    return m / m.mean()


def _np_grama(g):
    g = np.abs(np.asarray(g, np.float64))
    m = g.mean(axis=tuple(range(g.ndim - 1))) if g.ndim > 1 else g
    return m / m.mean()


class ScoreOracleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_tau_dormant_hand_made(self):
        # neuron 0 always 0 (dormant), neuron 1 small, neuron 2 large, neuron 3 negative-valued
        h = jnp.array([[0.0, 0.1, 2.0, -1.0],
                       [0.0, 0.1, 4.0, -3.0]])
        s = self.variant(health.tau_dormant_scores)(h)
        # mean |h| per neuron = [0, 0.1, 3, 2]; layer mean = 5.1 / 4
        np.testing.assert_allclose(s, np.array([0, 0.1, 3, 2]) / (5.1 / 4), rtol=1e-6)
        assert s[0] == 0.0
        np.testing.assert_array_equal(self.variant(health.dormant_mask)(s, 0.1),
                                      [True, True, False, False])
        assert float(self.variant(health.inactive_fraction)(s, 0.0)) == 0.25

    @chex.variants(with_jit=True, without_jit=True)
    def test_tau_dormant_conv_averages_space(self):
        h = jax.random.normal(jax.random.key(0), (3, 5, 4, 6))
        h = h.at[..., 2].set(0.0)
        s = self.variant(health.tau_dormant_scores)(h)
        np.testing.assert_allclose(s, _np_tau_scores(np.asarray(h)), rtol=1e-5)
        assert s[2] == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_grama_hand_made(self):
        # kernel grad [in=2, out=3]: neuron 0 gets no gradient, neuron 2 twice neuron 1
        g = jnp.array([[0.0, 1.0, -2.0],
                       [0.0, -3.0, 6.0]])
        s = self.variant(health.grama_scores)(g)
        # g_j = mean_i |g_ij| = [0, 2, 4]; mean_k g_k = 2
        np.testing.assert_allclose(s, [0.0, 1.0, 2.0], rtol=1e-6)
        # LayerNorm scale gradient: a vector, |dL/dgamma_j| / mean
        grama = self.variant(health.grama_scores)
        np.testing.assert_allclose(grama(jnp.array([1.0, -3.0, 0.0, 0.0])), [1.0, 3.0, 0.0, 0.0],
                                   rtol=1e-6)
        conv = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
        np.testing.assert_allclose(grama(conv), _np_grama(conv), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_zero_layer_scores_zero(self):
        z = jnp.zeros((4, 3))
        np.testing.assert_array_equal(self.variant(health.tau_dormant_scores)(z), np.zeros(3))
        np.testing.assert_array_equal(self.variant(health.grama_scores)(z), np.zeros(3))

    def test_rank_is_checked(self):
        with pytest.raises(AssertionError):
            health.tau_dormant_scores(jnp.ones(3))
        with pytest.raises(AssertionError):
            health.srank(jnp.ones(3))


arrays = st.integers(0, 2 ** 31 - 1).map(lambda seed: np.random.default_rng(seed))


@SETTINGS
@given(rng=arrays, scale=st.floats(1e-3, 1e3), dead=st.integers(0, 7))
def test_scores_properties(rng, scale, dead):
    """Oracle, mean 1, scale invariance, and a zero neuron scoring exactly 0, jit and not."""
    h = rng.normal(size=(16, 8)).astype(np.float32)
    h[:, dead] = 0.0
    for fn, oracle in ((health.tau_dormant_scores, _np_tau_scores),
                       (health.grama_scores, _np_grama)):
        for f in (fn, jax.jit(fn)):
            s = np.asarray(f(jnp.asarray(h)))
            np.testing.assert_allclose(s, oracle(h), rtol=1e-5, atol=1e-7)
            assert abs(s.mean() - 1.0) < 1e-5
            assert s[dead] == 0.0
            np.testing.assert_allclose(np.asarray(f(jnp.asarray(h * np.float32(scale)))), s,
                                       rtol=1e-5, atol=1e-7)


def _with_singular_values(rng, sigma, n=12, d=6):
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = np.zeros((n, d))
    s[np.arange(len(sigma)), np.arange(len(sigma))] = sigma
    return (u @ s @ v.T).astype(np.float32)


class SrankTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_known_singular_values(self):
        rng = np.random.default_rng(0)
        phi = _with_singular_values(rng, [8.0, 4.0, 2.0, 1.0, 0.05, 0.0])
        f = self.variant(health.srank, static_argnames="delta")
        # cumulative sums 8, 12, 14, 15, 15.05 over a total of 15.05
        assert int(f(phi, delta=0.01)) == 4  # needs >= 14.8995
        assert int(f(phi, delta=0.1)) == 3  # needs >= 13.545
        assert int(f(phi, delta=0.3)) == 2  # needs >= 10.535
        assert int(f(phi, delta=0.5)) == 1  # needs >= 7.525
        assert int(f(_with_singular_values(rng, [3.0]), delta=0.01)) == 1
        assert int(f(jnp.zeros((5, 4)), delta=0.01)) == 0

    @SETTINGS
    @given(rng=arrays, delta=st.sampled_from([0.01, 0.05, 0.2]))
    def test_random_spectra(self, rng, delta):
        sigma = np.sort(rng.exponential(size=6))[::-1]
        cum = np.cumsum(sigma)
        need = (1 - delta) * cum[-1]
        assume(np.min(np.abs(cum - need)) > 1e-3 * cum[-1])  # away from the boundary
        expected = int(np.argmax(cum >= need)) + 1
        assert int(jax.jit(health.srank, static_argnames="delta")(
            _with_singular_values(rng, sigma), delta=delta)) == expected


@SETTINGS
@given(rng=arrays)
def test_srank_of_rank_deficient_features_is_exact(rng):
    """Features of rank 3 spread over all 64 dimensions (dead directions, as in a collapsed
    critic): srank must see exactly 3 singular values. This pins the SVD: sigma from
    eigvalsh(F^T F) in float32 turns the 61 zero singular values into ~sqrt(eps)*sigma_1
    noise, ~0.05 in total here, which pushes srank_0.01 from 2 to 3."""
    u, _ = np.linalg.qr(rng.normal(size=(256, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(64, 3)))
    phi = ((u * np.array([10.0, 1.0, 0.1])) @ v.T).astype(np.float32)
    # cumulative sums 10, 11, 11.1: srank_0.01 needs >= 10.989 -> 2; srank_0.001 -> 3
    assert int(health.srank(jnp.asarray(phi), delta=0.01)) == 2
    assert int(health.srank(jnp.asarray(phi), delta=0.001)) == 3


def test_layer_norms_group_by_module():
    tree = {"a": {"kernel": jnp.array([[3.0, 0.0]]), "bias": jnp.array([4.0, 0.0])},
            "b": {"kernel": jnp.array([1.0, 1.0, 1.0, 1.0])}}
    norms = jax.jit(health.layer_norms)(tree)
    assert set(norms) == {"a", "b"}
    np.testing.assert_allclose(norms["a"], 5.0)
    np.testing.assert_allclose(norms["b"], 2.0)


@pytest.mark.parametrize("kind", ["mlp", "residual"])
def test_health_report_under_jit(kind):
    cfg = NetworkConfig(kind=kind, depth=2, width=16, layer_norm=kind != "mlp")
    model = make_network(cfg, 4, 2, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    layers = model.neuron_layers()
    # Kill neuron 3 of the first layer for every input (a bias of -1e4 before the ReLU; after a
    # LayerNorm the same is done through its bias entry).
    first = layers[0]
    path = first.norm_bias if first.norm_bias is not None else first.bias
    params = map_leaves_at(params, {path: lambda b: b.at[3].set(-1e4)})
    x = jax.random.normal(jax.random.key(1), (64, 4))

    @jax.jit
    def report(params):
        grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(params)
        _, acts = nnx.merge(graphdef, params)(x, return_activations=True)
        rep = health.health_report(graphdef, params, x, grads, tau_dormant=0.1, tau_grama=0.1)
        return rep, grads, acts

    rep, grads, acts = report(params)
    for layer in layers:
        for key in ("dormant", "dead", "grama"):
            assert 0.0 <= float(rep[f"{key}/{layer.name}"]) <= 1.0
    # Oracle for the first layer, from the activations and gradients computed directly.
    h = np.asarray(acts[first.name])
    assert np.all(h[:, 3] == 0.0)
    s = _np_tau_scores(h)
    assert float(rep[f"dead/{first.name}"]) == pytest.approx(np.mean(s <= 0.0))
    assert float(rep[f"dormant/{first.name}"]) == pytest.approx(np.mean(s <= 0.1))
    assert float(rep[f"dead/{first.name}"]) >= 1 / 16
    if kind == "mlp":
        g = np.asarray(grads["hidden"][0]["dense"]["kernel"])
    else:
        # With a LayerNorm the score reads dL/dgamma; the kernel gradient of the dead neuron is
        # not 0 (the LayerNorm Jacobian mixes in the other neurons' gradients), gamma's is.
        g = np.asarray(grads["encoder"]["norm"]["scale"][...])
        g_kernel = np.asarray(grads["encoder"]["dense"]["kernel"][...])
        assert _np_grama(g_kernel)[3] > 0.01
        assert float(rep[f"grama_kernel/{first.name}"]) == pytest.approx(
            np.mean(_np_grama(g_kernel) <= 0.1))
    assert float(rep[f"grama/{first.name}"]) == pytest.approx(np.mean(_np_grama(g) <= 0.1))
    assert _np_grama(g)[3] == 0.0  # a dead ReLU neuron gets no gradient: GraMa sees it too
    n = sum(l.width for l in layers)
    assert float(rep["dead/all"]) == pytest.approx(
        sum(float(rep[f"dead/{l.name}"]) * l.width for l in layers) / n)
    # grama_kernel/all: every layer scored by its own kernel gradient, width-weighted (in the
    # plain MLP the same as grama/all; with LayerNorm it reads the kernels, not gamma)
    kernel_fracs = [np.mean(_np_grama(np.asarray(tree_get(grads, l.kernel))) <= 0.1) for l in layers]
    assert float(rep["grama_kernel/all"]) == pytest.approx(
        sum(f * l.width for f, l in zip(kernel_fracs, layers)) / n, abs=1e-6)
    if kind == "mlp":
        assert float(rep["grama_kernel/all"]) == pytest.approx(float(rep["grama/all"]))
    feats = np.asarray(acts["features"], np.float64)
    sig = np.linalg.svd(feats, compute_uv=False)
    assert int(rep["srank"]) == int(np.argmax(np.cumsum(sig) >= 0.99 * sig.sum())) + 1
    np.testing.assert_allclose(rep["grad_norm/global"], optax.global_norm(grads), rtol=1e-5)
    np.testing.assert_allclose(rep["weight_norm/head"],
                               np.sqrt(np.sum(np.asarray(params["head"]["kernel"][...]) ** 2)
                                       + np.sum(np.asarray(params["head"]["bias"][...]) ** 2)),
                               rtol=1e-5)
    assert all(jnp.ndim(v) == 0 for v in rep.values())
    # the per-layer score helpers
    redo = health.redo_scores(acts, layers)
    assert set(redo) == {l.name for l in layers if l.isolable}
    auto = health.grama_layer_scores(grads, layers)
    by_kernel = health.grama_layer_scores(grads, layers, source="kernel")
    assert set(by_kernel) == set(auto) == {l.name for l in layers}
    np.testing.assert_allclose(auto[first.name], _np_grama(g), rtol=1e-5)
    np.testing.assert_allclose(by_kernel[first.name],
                               _np_grama(np.asarray(tree_get(grads, first.kernel))), rtol=1e-5)
    with pytest.raises(ValueError, match="source"):
        health.grama_layer_scores(grads, layers, source="bias")


# --- churn across one update ------------------------------------------------------------------


class ChurnOracleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_representation_churn_hand_computed(self):
        before = jnp.array([[3.0, 4.0], [0.0, 0.0]])
        after = jnp.array([[0.0, 4.0], [2.0, 0.0]])
        out = self.variant(health.representation_churn)(before, after)
        # distances 3 and 2 -> l2 2.5; mean norm before (5 + 0) / 2 = 2.5 -> relative 1 (after:
        # 3); cosines 16 / (5 * 4) = 0.8 and 0 (a zero vector) -> mean(0.2, 1) = 0.6
        np.testing.assert_allclose([out["l2"], out["relative"], out["cosine"]], [2.5, 1.0, 0.6],
                                   rtol=1e-6)
        zero = self.variant(health.representation_churn)(jnp.zeros((2, 2)), after)
        assert float(zero["relative"]) == 0.0 and np.isfinite(float(zero["cosine"]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_q_churn_hand_computed(self):
        q0 = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
        q1 = jnp.array([[1.0, 4.0, 3.0], [0.0, 0.0, 0.5]])
        out = self.variant(health.q_churn)(q0, q1)
        # |dQ| = 2 and 0.5 over 6 entries; greedy action 2 -> 1 in row 0, 2 -> 2 in row 1
        np.testing.assert_allclose(out["q"], 2.5 / 6, rtol=1e-6)
        np.testing.assert_allclose(out["greedy_changed"], 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_policy_churn_hand_computed(self):
        l0 = jnp.log(jnp.array([[0.5, 0.5], [0.2, 0.8]]))
        l1 = jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]])) + 3.0  # a shift leaves pi unchanged
        out = self.variant(health.policy_churn)(l0, l1)
        # row 0: KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = ln(5/3), TV = 0.4; row 1: 0, 0
        np.testing.assert_allclose(out["kl"], np.log(5 / 3) / 2, rtol=1e-5)
        np.testing.assert_allclose(out["tv"], 0.2, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gaussian_policy_churn_hand_computed(self):
        m0, m1 = jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])
        ls0, ls1 = jnp.zeros(2), jnp.log(jnp.array([2.0, 1.0]))
        out = self.variant(health.gaussian_policy_churn)(m0, m1, ls0, ls1)
        # dim 0: ln 2 + (1 + 1) / (2 * 4) - 1/2; dim 1: 0
        np.testing.assert_allclose(out["kl"], np.log(2) + 0.25 - 0.5, rtol=1e-6)


_policy_churn = jax.jit(health.policy_churn)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 5.0))
def test_policy_churn_properties_against_numpy(seed, scale):
    rng = np.random.default_rng(seed)
    l0, l1 = rng.normal(size=(5, 4)) * scale, rng.normal(size=(5, 4)) * scale  # one shape: one compile
    p0 = np.exp(l0) / np.exp(l0).sum(-1, keepdims=True)
    p1 = np.exp(l1) / np.exp(l1).sum(-1, keepdims=True)
    out = _policy_churn(jnp.asarray(l0, jnp.float32), jnp.asarray(l1, jnp.float32))
    np.testing.assert_allclose(out["kl"], np.mean(np.sum(p0 * np.log(p0 / p1), -1)), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(out["tv"], np.mean(0.5 * np.abs(p1 - p0).sum(-1)), rtol=1e-4,
                               atol=1e-6)
    assert float(out["kl"]) >= -1e-6 and 0.0 <= float(out["tv"]) <= 1.0
    same = _policy_churn(jnp.asarray(l0, jnp.float32), jnp.asarray(l0, jnp.float32))
    assert abs(float(same["kl"])) < 1e-6 and float(same["tv"]) == 0.0


def test_churn_reference_is_drawn_once():
    ref = jnp.zeros((3, 2))
    cand = jnp.arange(20.0).reshape(10, 2)
    first = health.churn_reference(ref, cand, jnp.array(True), jax.random.key(0))
    rows = {tuple(r) for r in np.asarray(first)}
    assert len(rows) == 3 and rows <= {tuple(r) for r in np.asarray(cand)}  # distinct rows
    later = health.churn_reference(first, cand + 100, jnp.array(False), jax.random.key(1))
    np.testing.assert_array_equal(later, first)
