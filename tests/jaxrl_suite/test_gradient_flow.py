"""Gradient-flow and curvature diagnostics of jaxrl_suite.health against closed forms on
quadratics: Hutchinson trace, power-iteration top eigenvalue, per-layer cosines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_suite import health


def _quadratic(h):
    """loss(p) = 0.5 w^T H w + 0.5 b^T b over params {"w": [d], "b": [2]}: Hessian diag(H, I)."""
    h = jnp.asarray(h, jnp.float32)
    return lambda p: 0.5 * p["w"] @ h @ p["w"] + 0.5 * jnp.sum(p["b"] ** 2)


PARAMS = {"w": jnp.ones((5,)), "b": jnp.ones((2,))}


@pytest.mark.parametrize("jit", [False, True])
def test_hutchinson_exact_for_diagonal_hessian(jit):
    d = np.array([3.0, -1.0, 0.5, 2.0, 7.0])
    f = lambda k: health.hutchinson_trace(_quadratic(np.diag(d)), PARAMS, k, 3)
    f = jax.jit(f) if jit else f
    # Rademacher probes: v^T diag(d) v = sum d exactly, for every probe
    np.testing.assert_allclose(float(f(jax.random.key(0))), d.sum() + 2.0, rtol=1e-6)


def test_hutchinson_unbiased_for_dense_hessian():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    h = a @ a.T
    est = float(health.hutchinson_trace(_quadratic(h), PARAMS, jax.random.key(1), 4000))
    # variance of v^T H v with Rademacher v is 2 sum_{i != j} H_ij^2
    sd = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)) / 4000)
    assert abs(est - (np.trace(h) + 2.0)) < 5 * sd


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_power_iteration_finds_top_eigenvalue(seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    eig = np.array([10.0, 4.0, 2.0, 0.5, 0.1]) * rng.uniform(0.5, 2.0)
    h = (q * eig) @ q.T
    got = float(jax.jit(lambda k: health.hessian_top_eigenvalue(_quadratic(h), PARAMS, k, 40))(
        jax.random.key(seed)))
    np.testing.assert_allclose(got, max(eig.max(), 1.0), rtol=1e-3)


def test_power_iteration_keeps_the_sign_of_a_dominant_negative_eigenvalue():
    h = np.diag([-6.0, 1.0, 0.5, 0.2, 0.1])
    got = float(health.hessian_top_eigenvalue(_quadratic(h), PARAMS, jax.random.key(0), 60))
    np.testing.assert_allclose(got, -6.0, rtol=1e-3)


def test_layer_cosines_and_gradient_flow():
    a = {"l0": {"kernel": jnp.array([[1.0, 0.0]]), "bias": jnp.array([0.0])},
         "l1": {"kernel": jnp.array([[1.0, 1.0]]), "bias": jnp.array([1.0])}}
    b = {"l0": {"kernel": jnp.array([[0.0, 2.0]]), "bias": jnp.array([0.0])},
         "l1": {"kernel": jnp.array([[-2.0, -2.0]]), "bias": jnp.array([-2.0])}}
    cos = health.layer_cosines(a, b)
    np.testing.assert_allclose(float(cos["l0"]), 0.0, atol=1e-7)  # orthogonal
    np.testing.assert_allclose(float(cos["l1"]), -1.0, rtol=1e-6)  # opposite
    assert float(health.layer_cosines(a, jax.tree.map(jnp.zeros_like, a))["l0"]) == 0.0
    flow = health.gradient_flow(b, a)
    np.testing.assert_allclose(float(flow["grad/norm/l1"]), np.sqrt(12.0), rtol=1e-6)
    assert set(flow) == {"grad/norm/l0", "grad/norm/l1", "grad/cos/l0", "grad/cos/l1"}
    assert set(health.gradient_flow(b)) == {"grad/norm/l0", "grad/norm/l1"}
