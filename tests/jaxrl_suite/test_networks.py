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


# --- the conv encoder ---------------------------------------------------------------------------


def _np_conv3x3_valid(x, k, b):
    """x [n, H, W, C], k [3, 3, C, D]: out[n, i, j, d] = sum_{u, v, c} x[n, i+u, j+v, c] k[u, v, c, d]."""
    n, h, w, _ = x.shape
    out = np.zeros((n, h - 2, w - 2, k.shape[-1]))
    for u in range(3):
        for v in range(3):
            out += np.einsum("nijc,cd->nijd", x[:, u:u + h - 2, v:v + w - 2], k[u, v])
    return out + b


@pytest.mark.parametrize("kind", ["mlp", "multiskip_paper"])
def test_conv_encoder_matches_numpy_and_addresses_neurons(kind):
    cfg = NetworkConfig(kind=kind, depth=1, width=8, layer_norm=True, encoder="conv",
                        image_hw=(6, 5), conv_channels=(4, 3))
    model = make_network(cfg, 6 * 5 * 2, 3, nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (7, 6 * 5 * 2))  # flat, as the envs hand it over
    out, acts = model(x, return_activations=True)
    assert out.shape == (7, 3)
    assert acts["torso/0"].shape == (7, 4, 3, 4) and acts["torso/1"].shape == (7, 2, 1, 3)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    h = np.asarray(x, np.float64).reshape(7, 6, 5, 2)  # row-major [H, W, C], as gymnax flattens
    for i in range(2):
        u = p["torso"][i]
        h = _np_conv3x3_valid(h, np.asarray(u["conv"]["kernel"]), np.asarray(u["conv"]["bias"]))
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        h = (h - mu) / np.sqrt(var + 1e-6) * np.asarray(u["norm"]["scale"]) + np.asarray(
            u["norm"]["bias"])
        h = np.maximum(h, 0)
        np.testing.assert_allclose(np.asarray(acts[f"torso/{i}"]), h, rtol=1e-4, atol=1e-5)
    # the head sees what the MLP of this kind makes of the flattened torso output
    body = make_network(NetworkConfig(kind=kind, depth=1, width=8, layer_norm=True), 6, 3,
                        nnx.Rngs(0))
    nnx.update(body, nnx.State({k: v for k, v in nnx.state(model, nnx.Param).items()
                                if k != "torso"}))
    np.testing.assert_allclose(np.asarray(body(jnp.asarray(h.reshape(7, 6), jnp.float32))),
                               np.asarray(out), rtol=1e-4, atol=1e-5)
    layers = model.neuron_layers()
    assert [l.name for l in layers[:2]] == ["torso/0", "torso/1"]
    assert layers[0].outgoing == (("torso", 1, "conv", "kernel"),) and layers[1].outgoing is None
    state = nnx.state(model, nnx.Param)
    for l in layers[:2]:
        assert tree_get(state, l.kernel).shape[-1] == l.width
        assert tree_get(state, l.norm_scale).shape == (l.width,)
    assert tree_get(state, layers[0].outgoing[0]).shape[-2] == layers[0].width


def test_conv_encoder_errors():
    with pytest.raises(ConfigError, match="conv_channels"):
        NetworkConfig(encoder="conv", image_hw=(4, 4), conv_channels=(2, 2))  # 4 - 4 < 1
    with pytest.raises(ValueError, match="image_hw"):
        make_network(NetworkConfig(encoder="conv"), 250, 2, nnx.Rngs(0))  # not 10 x 10 x C
