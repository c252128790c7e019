"""The multi-skip residual MLP of Castanyer et al. (2025) (``kind="multiskip_paper"``): NumPy
oracle of its equations, the skip structure, gradient flow at depth, sizes, and its use as a
config choice of the agents (PQN, PPO, DQN) with the Kron optimizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_suite.networks import ALL_KINDS, SG_SIZES, NetworkConfig, make_network, map_leaves_at

relu = lambda x: np.maximum(x, 0)


def _ln(u, h):
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + 1e-6) * np.asarray(u["norm"]["scale"]) + np.asarray(
        u["norm"]["bias"])


def _unit(u, h, layer_norm=True):
    h = h @ np.asarray(u["dense"]["kernel"]) + np.asarray(u["dense"]["bias"])
    return _ln(u, h) if layer_norm else h


def np_multiskip(p, x, depth, layer_norm=True):
    """h0 = LN(W_in x); z = h0; z <- z + LN(W1 relu(LN(W0 relu(z)))) + h0; y = W_head z."""
    g = _unit(p["encoder"], np.asarray(x, np.float64), layer_norm)
    z = g
    for i in range(depth):
        b = p["blocks"][i]
        z = z + _unit(b["out"], relu(_unit(b["inner"], relu(z), layer_norm)), layer_norm) + g
    return z @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])


@pytest.mark.parametrize("layer_norm", [True, False])
def test_forward_matches_numpy_equations(layer_norm):
    cfg = NetworkConfig(kind="multiskip_paper", depth=3, width=6, layer_norm=layer_norm)
    model = make_network(cfg, 4, 3, nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out, acts = model(x, return_activations=True)
    assert out.shape == (5, 3)
    np.testing.assert_allclose(np.asarray(out), np_multiskip(pure, x, 3, layer_norm), rtol=3e-5,
                               atol=3e-5)
    assert set(acts) == {"encoder", "features"} | {f"blocks/{i}/{k}" for i in range(3)
                                                   for k in ("inner", "out")}
    assert all(a.shape == (5, 6) for a in acts.values())


def test_global_skip_reaches_every_block():
    """With every block's branch silenced (LN scale and bias 0: F = 0), z_L = (L + 1) h0."""
    depth = 4
    cfg = NetworkConfig(kind="multiskip_paper", depth=depth, width=8, layer_norm=True)
    model = make_network(cfg, 3, 2, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    zero = {("blocks", i, "out", "norm", k): jnp.zeros_like for i in range(depth)
            for k in ("scale", "bias")}
    silenced = map_leaves_at(params, zero)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    _, acts = nnx.merge(graphdef, silenced)(x, return_activations=True)
    np.testing.assert_allclose(acts["features"], (depth + 1) * acts["encoder"], rtol=1e-5,
                               atol=1e-5)
    # and the plain residual stream (no global skip) would give h0 itself: the skip is real
    _, res_acts = make_network(NetworkConfig(kind="residual", depth=depth, width=8,
                                             layer_norm=True), 3, 2, nnx.Rngs(0))(
        x, return_activations=True)
    assert not np.allclose(res_acts["features"], (depth + 1) * res_acts["encoder"])


def _first_last_grad_ratio(cfg, seed=0):
    model = make_network(cfg, 16, 4, nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(seed), (64, 16))
    y = jax.random.normal(jax.random.key(seed + 1), (64, 4))
    grads = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(params)
    layers = model.neuron_layers()
    first = jnp.linalg.norm(jnp.asarray(_get(grads, layers[0].kernel)))
    last = jnp.linalg.norm(jnp.asarray(_get(grads, layers[-1].kernel)))
    return float(first), float(first / last)


def _get(tree, path):
    from jaxrl_suite.networks import tree_get
    return tree_get(tree, path)


def test_gradient_reaches_first_layer_at_depth():
    """Depth 16 (33 Dense layers): the first layer's gradient is not vanishing relative to the
    last block's with the multi-skip net, while a plain tanh MLP of the same depth and no
    LayerNorm loses it by orders of magnitude."""
    ms_first, ms_ratio = _first_last_grad_ratio(
        NetworkConfig(kind="multiskip_paper", depth=16, width=32, layer_norm=True))
    _, mlp_ratio = _first_last_grad_ratio(
        NetworkConfig(kind="mlp", depth=33, width=32, layer_norm=False, activation="tanh",
                      kernel_init="lecun_normal"))
    assert ms_first > 0 and np.isfinite(ms_first)
    assert ms_ratio > 0.1
    assert mlp_ratio < 0.1 * ms_ratio


def test_sizes_and_choices():
    assert "multiskip_paper" in ALL_KINDS
    for size, (width, depth) in SG_SIZES.items():
        cfg = NetworkConfig.stable_gradients(size)
        assert (cfg.width, cfg.depth, cfg.kind, cfg.layer_norm) == (width, depth,
                                                                    "multiskip_paper", True)
    assert NetworkConfig.stable_gradients("large", kind="mlp").kind == "mlp"
    with pytest.raises(ValueError, match="size"):
        NetworkConfig.stable_gradients("huge")


# --- agents --------------------------------------------------------------------------------


NET = NetworkConfig(kind="multiskip_paper", depth=2, width=16, layer_norm=True)


def _churn_oracle(apply, before, after, obs):
    """Recompute an agent's logged churn from the two parameter sets (numpy, float64)."""
    out0, acts0 = apply(before, obs)
    out1, acts1 = apply(after, obs)
    f0, f1 = (np.asarray(a["features"], np.float64) for a in (acts0, acts1))
    return np.asarray(out0, np.float64), np.asarray(out1, np.float64), float(
        np.mean(np.linalg.norm(f1 - f0, axis=-1)))


@pytest.mark.parametrize("optimizer", ["kron"])  # RAdam: the same checks, another ~40 s of CI
def test_pqn_with_multiskip_conv_and_kron_on_minatar(optimizer):
    """The conv encoder + multi-skip net on Breakout-MinAtar (10 x 10 x 4 images, flattened by
    the env): one update at a time, with gradient flow, health (Hessian) and churn logged; the
    logged churn of update 2 equals its recomputation from the parameters before and after."""
    from jaxrl_suite.agents import pqn
    from jaxrl_suite.envs import make

    env = make("gymnax/Breakout-MinAtar")
    net = dataclasses.replace(NET, encoder="conv", conv_channels=(4,))
    cfg = pqn.PQNConfig.smoke(network=net, optimizer=optimizer, grad_diagnostics=True,
                              health_every=1, hessian_samples=2, churn_samples=8)
    agent = pqn.make_agent(cfg, env)
    step = jax.jit(agent.train_chunk, static_argnums=1)
    s0 = agent.init(jax.random.key(0))
    s1, _ = step(s0, 1)
    s2, m2 = step(s1, 1)
    assert np.isfinite(np.asarray(m2["loss"])).all()
    assert "grad/norm/torso/0/conv" in m2 and "grad/cos/blocks/1/inner/dense" in m2
    assert np.all(np.abs(np.asarray(m2["grad/cos/encoder/dense"])) <= 1.0 + 1e-5)
    assert np.isfinite(np.asarray(m2["health/q/hessian_trace"])).all()
    assert 0 <= float(m2["health/q/dormant/torso/0"][0]) <= 1  # conv channels are neurons
    assert not np.allclose(s0.params["torso"][0]["conv"]["kernel"],
                           s2.params["torso"][0]["conv"]["kernel"])
    # the reference batch: drawn from the first rollout, then fixed
    np.testing.assert_array_equal(s1.churn_obs, s2.churn_obs)
    assert s1.churn_obs.shape == (8, env.observation_size) and np.any(s1.churn_obs != 0)
    apply = lambda p, o: nnx.merge(agent.graphdef, p)(o, return_activations=True)
    q0, q1, repr_l2 = _churn_oracle(apply, s1.params, s2.params, s2.churn_obs)
    np.testing.assert_allclose(m2["churn/q"][0], np.mean(np.abs(q1 - q0)), rtol=1e-4)
    np.testing.assert_allclose(m2["churn/repr_l2"][0], repr_l2, rtol=1e-3,
                               atol=1e-6)  # float32 features: 1e-6 is rounding
    np.testing.assert_allclose(m2["churn/greedy_changed"][0],
                               np.mean(q0.argmax(-1) != q1.argmax(-1)))


@pytest.mark.parametrize("optimizer", ["adam", "kron"])
def test_ppo_with_multiskip_and_kron(optimizer):
    from jaxrl_suite.agents import ppo
    from jaxrl_suite.envs import make

    env = make("gymnax/CartPole-v1")
    net = NetworkConfig(kind="multiskip_paper", depth=2, width=16, layer_norm=True,
                        kernel_init="orthogonal")
    cfg = ppo.PPOConfig.smoke(network=net, optimizer=optimizer, grad_diagnostics=True,
                              churn_samples=8)
    agent = ppo.make_agent(cfg, env)
    step = jax.jit(agent.train_chunk, static_argnums=1)
    s1, _ = step(agent.init(jax.random.key(0)), 1)
    s2, m = step(s1, 1)
    assert np.isfinite(np.asarray(m["loss"])).all()
    assert "grad/norm/actor/encoder/dense" in m and "grad/cos/critic/head" in m
    # policy and value churn of update 2, recomputed from the parameters around it
    apply = lambda p, o: nnx.merge(agent.actor_graphdef, p["actor"])(o, return_activations=True)
    l0, l1, repr_l2 = _churn_oracle(apply, s1.params, s2.params, s2.churn_obs)
    p0, p1 = (np.exp(l - l.max(-1, keepdims=True)) for l in (l0, l1))
    p0, p1 = p0 / p0.sum(-1, keepdims=True), p1 / p1.sum(-1, keepdims=True)
    np.testing.assert_allclose(m["churn/policy_kl"][0],
                               np.mean(np.sum(p0 * np.log(p0 / p1), -1)), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(m["churn/policy_tv"][0], np.mean(0.5 * np.abs(p1 - p0).sum(-1)),
                               rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(m["churn/repr_l2"][0], repr_l2, rtol=1e-3,
                               atol=1e-6)  # float32 features: 1e-6 is rounding
    v = lambda p: np.asarray(nnx.merge(agent.critic_graphdef, p["critic"])(s2.churn_obs))[:, 0]
    np.testing.assert_allclose(m["churn/value"][0], np.mean(np.abs(v(s2.params) - v(s1.params))),
                               rtol=1e-4)
    assert float(m["churn/policy_tv"][0]) > 0  # the update moved the policy


def test_dqn_with_multiskip_and_kron():
    from jaxrl_suite.agents import dqn
    from jaxrl_suite.envs import make

    env = make("gymnax/CartPole-v1")
    cfg = dqn.DQNConfig.smoke(network=NET, optimizer="kron")
    agent = dqn.make_agent(cfg, env)
    state, m = jax.jit(agent.train_chunk, static_argnums=1)(agent.init(jax.random.key(0)), 12)
    loss = np.asarray(m["loss"])
    assert np.isnan(loss[:7]).all()  # buffer below learning_starts = 32 (4 envs per update)
    assert np.isfinite(loss[8:]).all()
