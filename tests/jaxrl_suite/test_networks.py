"""Networks: shapes, exact numpy oracles of the forward equations, and the neuron-layer map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_suite.networks import (ACTIVATIONS, KINDS, NetworkConfig, leaf_paths, make_network,
                                  map_leaves_at, tree_get)
from trainkit.config import ConfigError

NP_ACT = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "tanh": np.tanh,
    "silu": lambda x: x / (1 + np.exp(-x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
}


def _np_forward(cfg, p, x):
    """The module docstring's equations in numpy, reading weights from the pure-dict params."""
    act = NP_ACT[cfg.activation]

    def unit(u, h):
        h = h @ np.asarray(u["dense"]["kernel"]) + np.asarray(u["dense"]["bias"])
        if cfg.layer_norm:
            mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
            h = (h - mu) / np.sqrt(var + 1e-6)
            h = h * np.asarray(u["norm"]["scale"]) + np.asarray(u["norm"]["bias"])
        return h

    x = np.asarray(x, np.float64)
    if cfg.kind == "mlp":
        for i in range(cfg.depth):
            x = act(unit(p["hidden"][i], x))
        z = x
    else:
        e = act(unit(p["encoder"], x))
        z = e
        for i in range(cfg.depth):
            u = z + e if (cfg.kind == "multiskip" and i > 0) else z
            z = z + unit(p["blocks"][i]["out"], act(unit(p["blocks"][i]["inner"], u)))
    return z @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_forward_matches_numpy_equations(kind, layer_norm):
    names = list(ACTIVATIONS)
    # every activation on the plain MLP; one (rotating) activation per other combination
    chosen = names if (kind, layer_norm) == ("mlp", False) else [
        names[(KINDS.index(kind) * 2 + layer_norm) % len(names)]]
    for activation in chosen:
        cfg = NetworkConfig(kind=kind, depth=3, width=6, layer_norm=layer_norm,
                            activation=activation)
        model = make_network(cfg, 4, 3, nnx.Rngs(1))
        x = jax.random.normal(jax.random.key(0), (5, 4))
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        np.testing.assert_allclose(np.asarray(model(x)), _np_forward(cfg, pure, x), rtol=2e-5,
                                   atol=2e-5, err_msg=f"{kind} {activation}")


def test_multiskip_really_adds_encoder_features():
    """Same weights, residual vs multiskip: outputs differ for depth >= 2 and agree for depth 1."""
    for depth, same in ((1, True), (2, False)):
        res = make_network(NetworkConfig(kind="residual", depth=depth, width=8), 3, 1, nnx.Rngs(0))
        ms = make_network(NetworkConfig(kind="multiskip", depth=depth, width=8), 3, 1, nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(0), (4, 3))
        assert np.allclose(res(x), ms(x)) == same


@pytest.mark.parametrize("kind", KINDS)
def test_neuron_layers_address_params_and_activations(kind):
    cfg = NetworkConfig(kind=kind, depth=2, width=8, layer_norm=True)
    model = make_network(cfg, 5, 2, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    out, acts = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, return_activations=True))(
        params, jnp.ones((7, 5)))
    assert out.shape == (7, 2)
    layers = model.neuron_layers()
    assert {l.name for l in layers} | {"features"} == set(acts)
    assert acts["features"].shape == (7, 8)
    for layer in layers:
        assert acts[layer.name].shape == (7, layer.width)
        # The name is the module path, which holds the layer's Dense.
        module = tuple(int(p) if p.isdigit() else p for p in layer.name.split("/"))
        assert layer.kernel[:-2] == module
        assert tree_get(params, layer.kernel).shape[-1] == layer.width
        for path in (layer.bias, layer.norm_scale, layer.norm_bias):
            assert tree_get(params, path).shape == (layer.width,)
        for path in layer.outgoing or ():
            assert tree_get(params, path).shape[0] == layer.width
        assert model.output_kernel not in {layer.kernel}  # the head is never a neuron layer
    assert model.neuron_layers() == layers and hash(layers) == hash(model.neuron_layers())
    isolable = [l.name for l in layers if l.isolable]
    if kind == "mlp":
        assert isolable == ["hidden/0", "hidden/1"]
        assert layers[-1].outgoing == (model.output_kernel,)
    else:
        assert isolable == ["blocks/0/inner", "blocks/1/inner"]


def test_pure_dict_and_state_share_paths():
    model = make_network(NetworkConfig.tiny(), 3, 1, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert set(leaf_paths(state)) == set(leaf_paths(nnx.to_pure_dict(state)))
    path = model.neuron_layers()[0].kernel
    doubled = map_leaves_at(state, {path: lambda w: 2 * w})
    np.testing.assert_array_equal(tree_get(doubled, path), 2 * tree_get(state, path))
    with pytest.raises(KeyError, match="hidden/0/dense/kernl"):
        tree_get(state, ("hidden", 0, "dense", "kernl"))


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="kind"):
        NetworkConfig(kind="transformer")
    with pytest.raises(ConfigError, match="depth"):
        NetworkConfig(depth=0)
    with pytest.raises(ConfigError, match="activation"):
        NetworkConfig(activation="swish")
    for preset in (NetworkConfig.tiny, NetworkConfig.sac_mlp, NetworkConfig.bro,
                   NetworkConfig.multiskip_deep):
        cfg = preset()
        model = nnx.eval_shape(lambda: make_network(cfg, 4, 1, nnx.Rngs(0)))
        layers = model.neuron_layers()
        assert len(layers) == (cfg.depth if cfg.kind == "mlp" else 1 + 2 * cfg.depth)
        assert all(l.width == cfg.width and (l.norm_scale is not None) == cfg.layer_norm
                   for l in layers)
