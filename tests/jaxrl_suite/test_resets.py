"""ReDo and ReGraMa resets: exact contracts on weights, moments and the network function."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from jaxrl_suite import health, resets
from jaxrl_suite.networks import NetworkConfig, leaf_paths, make_network
from trainkit.config import ConfigError

OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "clip+adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
}


# --- selection --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), tau=st.floats(0.0, 2.0),
       fraction=st.floats(0.01, 1.0), n_ties=st.integers(0, 6))
def test_selection_counts_are_exact(seed, tau, fraction, n_ties):
    rng = np.random.default_rng(seed)
    scores = rng.exponential(size=16).astype(np.float32)
    scores[:n_ties] = scores[0]  # ties must not change the counts
    k = int(np.floor(fraction * 16 + 1e-9))
    below = scores <= np.float32(tau)
    jitted = jax.jit(resets.select_neurons, static_argnames=("mode", "fraction"))
    for select in (resets.select_neurons, jitted):
        thr = np.asarray(select(jnp.asarray(scores), tau=tau, mode="threshold"))
        bot = np.asarray(select(jnp.asarray(scores), mode="bottom", fraction=fraction))
        cap = np.asarray(select(jnp.asarray(scores), tau=tau, mode="capped", fraction=fraction))
        np.testing.assert_array_equal(thr, below)
        assert bot.sum() == k
        assert cap.sum() == min(below.sum(), k)
        assert not np.any(cap & ~below)
        # the chosen are the lowest: every chosen score <= every unchosen one
        for chosen in (bot, cap):
            if chosen.any() and (~chosen).any():
                pool = scores if chosen is bot else np.where(below, scores, np.inf)
                assert pool[chosen].max() <= pool[~chosen].min()


def test_selection_rounding_and_errors():
    s = jnp.arange(100.0)
    assert int(resets.select_neurons(s, mode="bottom", fraction=0.29).sum()) == 29
    with pytest.raises(ValueError, match="fraction"):
        resets.select_neurons(s, mode="bottom")
    with pytest.raises(ValueError, match="mode"):
        resets.select_neurons(s, mode="top")
    with pytest.raises(ConfigError, match="fraction"):
        resets.ResetConfig(mode="capped")
    with pytest.raises(ConfigError, match="method"):
        resets.ResetConfig(method="redo2")
    assert resets.ResetConfig(mode="bottom", fraction=0.1).fraction == 0.1


# --- fixtures ---------------------------------------------------------------------------------


def _distinct(v, offset):
    """Distinct non-zero values of ``v``'s shape (so a misplaced edit cannot go unnoticed)."""
    return offset + 0.01 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape) / v.size


@functools.lru_cache(maxsize=None)
def _setup(kind, layer_norm, opt_name):
    """A small network (width 8, depth 2) whose parameters, biases and LayerNorm entries
    included, differ from their initial values, and an optimizer state whose moments are all
    live (distinct non-zero values), as after some training."""
    cfg = NetworkConfig(kind=kind, depth=2, width=8, layer_norm=layer_norm)
    model = make_network(cfg, 3, 2, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda v: v + _distinct(v, 0.05), params)
    opt_state = OPTIMIZERS[opt_name]().init(params)
    opt_state = jax.tree.map(lambda v: v + _distinct(v, 0.5) if jnp.ndim(v) else v + 7, opt_state)
    x = jax.random.normal(jax.random.key(1), (32, 3))
    return graphdef, params, opt_state, model.neuron_layers(), x


def _moments(opt_state, params):
    """Every params-shaped subtree of the optimizer state (found independently of resets)."""
    treedef = jax.tree.structure(params)
    found = []
    jax.tree.map(lambda n: found.append(n) if jax.tree.structure(n) == treedef else None,
                 opt_state, is_leaf=lambda n: jax.tree.structure(n) == treedef)
    return found


def _np(tree):
    return {p: np.asarray(v) for p, v in leaf_paths(tree).items()}


def _masked_forward(graphdef, params, x, drop):
    """The old network with the ``drop`` neurons' activations forced to 0 (removed)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    act = jax.nn.relu
    if cfg.kind == "mlp":
        h = x
        for i, unit in enumerate(model.hidden):
            h = act(unit(h)) * ~drop.get(f"hidden/{i}", False)
        return model.head(h)
    e = act(model.encoder(x))
    z = e
    for i, block in enumerate(model.blocks):
        u = z + e if (cfg.kind == "multiskip" and i > 0) else z
        a = act(block.inner(u)) * ~drop.get(f"blocks/{i}/inner", False)
        z = z + block.out(a)
    return model.head(z)


def _scores(layers, which):
    """Hand-made scores: neuron j of layer l scores 0.01 if j in which[l] else 1."""
    out = {}
    for l in layers:
        if l.name in which:
            out[l.name] = jnp.ones(l.width).at[jnp.asarray(which[l.name])].set(0.01)
    return out


def _check_reset(old_p, new_p, old_s, new_s, layers, masks, zero_outgoing):
    """Every leaf entry is either (a) untouched and bit-identical, (b) an incoming entry of a
    reset neuron, re-drawn, with moments 0, or (c) an outgoing row of a reset neuron, 0 with
    moments 0 (ReDo) or untouched (ReGraMa)."""
    old, new = _np(old_p), _np(new_p)
    touched = {p: np.zeros(v.shape, bool) for p, v in old.items()}
    by_name = {l.name: l for l in layers}
    for name, mask in masks.items():
        mask = np.asarray(mask)
        layer = by_name[name]
        kernel = layer.kernel
        # incoming kernel columns re-drawn: every entry changed (continuous init)
        assert np.all(new[kernel][:, mask] != old[kernel][:, mask])
        touched[kernel][:, mask] = True
        inits = ((layer.bias, 0.0), (layer.norm_scale, 1.0), (layer.norm_bias, 0.0))
        for path, init_value in inits:
            if path is not None:
                np.testing.assert_array_equal(new[path][mask], init_value)
                touched[path][mask] = True
        for path in layer.outgoing or ():
            if zero_outgoing:
                np.testing.assert_array_equal(new[path][mask, :], 0.0)
                touched[path][mask, :] = True
    for path in old:
        np.testing.assert_array_equal(new[path][~touched[path]], old[path][~touched[path]],
                                      err_msg=f"untouched entries of {path} changed")
    old_m, new_m = _moments(old_s, old_p), _moments(new_s, new_p)
    assert len(old_m) == len(new_m) >= 2  # Adam's mu and nu
    for om, nm in zip(old_m, new_m):
        om, nm = _np(om), _np(nm)
        for path in om:
            np.testing.assert_array_equal(nm[path][touched[path]], 0.0)
            np.testing.assert_array_equal(nm[path][~touched[path]], om[path][~touched[path]])
            assert np.any(om[path] != 0)  # the fixture's moments were live
    # everything that is not a moment (Adam's count, ...) is untouched
    strip = lambda s: [np.asarray(v) for v in jax.tree.leaves(s) if jnp.ndim(v) == 0]
    for a, b in zip(strip(old_s), strip(new_s)):
        np.testing.assert_array_equal(a, b)
    return touched


# --- ReDo -------------------------------------------------------------------------------------


class RedoTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_redo_mlp_contract_and_function(self):
        graphdef, params, opt_state, layers, x = _setup("mlp", False, "clip+adamw")
        scores = _scores(layers, {"hidden/0": [0, 3], "hidden/1": [1, 7]})
        reset = self.variant(functools.partial(resets.redo_reset, layers=layers, tau=0.1))
        new_p, new_s, info = reset(params, opt_state, scores, jax.random.key(3))
        assert int(info.total) == 4
        assert {k: int(v) for k, v in info.counts.items()} == {"hidden/0": 2, "hidden/1": 2}
        touched = _check_reset(params, new_p, opt_state, new_s, layers, info.masks,
                               zero_outgoing=True)
        # the output layer: its columns (and bias) untouched, only ReDo's rows are zero
        head = ("head", "kernel")
        assert not touched[("head", "bias")].any()
        last = np.asarray(info.masks["hidden/1"])
        assert touched[head][last].all() and not touched[head][~last].any()
        # the function equals the old one with the reset neurons removed
        out_new = nnx.merge(graphdef, new_p)(x)
        out_ref = _masked_forward(graphdef, params, x, info.masks)
        np.testing.assert_allclose(out_new, out_ref, rtol=1e-6, atol=1e-6)
        assert not np.allclose(out_new, nnx.merge(graphdef, params)(x))  # removal mattered

    @chex.variants(with_jit=True, without_jit=True)
    def test_redo_residual_inner_neurons(self):
        for kind in ("residual", "multiskip"):
            graphdef, params, opt_state, layers, x = _setup(kind, False, "clip+adamw")
            scores = _scores(layers, {"blocks/0/inner": [2], "blocks/1/inner": [0, 5, 6]})
            reset = self.variant(functools.partial(resets.redo_reset, layers=layers, tau=0.1))
            new_p, new_s, info = reset(params, opt_state, scores, jax.random.key(0))
            assert int(info.total) == 4
            _check_reset(params, new_p, opt_state, new_s, layers, info.masks, zero_outgoing=True)
            np.testing.assert_allclose(nnx.merge(graphdef, new_p)(x),
                                       _masked_forward(graphdef, params, x, info.masks),
                                       rtol=1e-6, atol=1e-6)

    def test_moments_found_for_each_optimizer(self):
        """adam / adamw (and the clip chain above): moments are found by structure, eagerly."""
        for opt_name in ("adam", "adamw"):
            _, params, opt_state, layers, _ = _setup("mlp", False, opt_name)
            scores = _scores(layers, {"hidden/0": [5], "hidden/1": [0, 6]})
            new_p, new_s, info = resets.redo_reset(params, opt_state, scores, jax.random.key(4),
                                                   layers=layers)
            _check_reset(params, new_p, opt_state, new_s, layers, info.masks, zero_outgoing=True)

    def test_redo_refuses_stream_writers_output_layer_and_unknown(self):
        _, params, opt_state, layers, _ = _setup("residual", False, "adam")
        with pytest.raises(ValueError, match="residual stream"):
            resets.redo_reset(params, opt_state, {"encoder": jnp.zeros(8)}, jax.random.key(0),
                              layers=layers)
        for name in ("head", "hidden/9"):
            with pytest.raises(KeyError, match="output layer is never reset"):
                resets.redo_reset(params, opt_state, {name: jnp.zeros(8)}, jax.random.key(0),
                                  layers=layers)
        with pytest.raises(AssertionError):  # wrong score shape
            resets.redo_reset(params, opt_state, {"blocks/0/inner": jnp.zeros(5)},
                              jax.random.key(0), layers=layers)

    def test_redo_with_layer_norm_touches_only_its_entries(self):
        graphdef, params, opt_state, layers, x = _setup("mlp", True, "adamw")
        scores = _scores(layers, {"hidden/0": [1], "hidden/1": [4, 5]})
        new_p, new_s, info = jax.jit(functools.partial(resets.redo_reset, layers=layers))(
            params, opt_state, scores, jax.random.key(0))
        _check_reset(params, new_p, opt_state, new_s, layers, info.masks, zero_outgoing=True)

    def test_pure_dict_params(self):
        _, params, _, layers, _ = _setup("mlp", False, "adam")
        pure = nnx.to_pure_dict(params)
        opt = optax.adam(1e-3)
        state = opt.init(pure)
        state = jax.tree.map(lambda v: v + _distinct(v, 1.0) if jnp.ndim(v) else v, state)
        scores = _scores(layers, {"hidden/1": [0]})
        new_p, new_s, info = resets.redo_reset(pure, state, scores, jax.random.key(0),
                                               layers=layers)
        _check_reset(pure, new_p, state, new_s, layers, info.masks, zero_outgoing=True)


# --- ReGraMa ----------------------------------------------------------------------------------


class RegramaTest(chex.TestCase):
    def test_regrama_keeps_outgoing(self):
        for kind, layer_norm, wrap in (("mlp", False, lambda f: f), ("residual", True, jax.jit)):
            graphdef, params, opt_state, layers, x = _setup(kind, layer_norm, "clip+adamw")
            which = ({"hidden/0": [0, 2], "hidden/1": [7]} if kind == "mlp" else
                     {"encoder": [1], "blocks/0/inner": [3], "blocks/1/out": [0, 4]})
            reset = wrap(functools.partial(resets.regrama_reset, layers=layers, tau=0.1))
            new_p, new_s, info = reset(params, opt_state, _scores(layers, which), jax.random.key(1))
            assert int(info.total) == sum(len(v) for v in which.values())
            touched = _check_reset(params, new_p, opt_state, new_s, layers, info.masks,
                                   zero_outgoing=False)
            old, new = _np(params), _np(new_p)
            for name, mask in info.masks.items():  # outgoing rows kept, bit for bit (except
                layer = next(l for l in layers if l.name == name)  # columns the next layer
                for path in layer.outgoing or ():                   # re-drew as its incoming)
                    rows = np.asarray(mask)
                    keep = ~touched[path][rows]
                    assert keep.any() and np.all(old[path][rows][keep] != 0)
                    np.testing.assert_array_equal(new[path][rows][keep], old[path][rows][keep])
            assert not touched[("head", "kernel")].any() and not touched[("head", "bias")].any()

    def test_regrama_from_real_grama_scores(self):
        """End to end: scores from gradients, bottom-25% mode, exact counts per layer."""
        graphdef, params, opt_state, layers, x = _setup("residual", True, "clip+adamw")
        grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2)))(params)
        scores = health.grama_layer_scores(grads, layers)
        new_p, new_s, info = resets.regrama_reset(params, opt_state, scores, jax.random.key(0),
                                                  layers=layers, mode="bottom", fraction=0.25)
        assert {k: int(v) for k, v in info.counts.items()} == {l.name: 2 for l in layers}
        _check_reset(params, new_p, opt_state, new_s, layers, info.masks, zero_outgoing=False)


# --- inside lax.cond --------------------------------------------------------------------------


def test_maybe_reset_under_jit_and_cond():
    graphdef, params, opt_state, layers, x = _setup("mlp", False, "clip+adamw")
    scores = _scores(layers, {"hidden/0": [0, 1, 2], "hidden/1": [3]})
    config = resets.ResetConfig(method="redo", tau=0.1, mode="capped", fraction=0.25)

    @jax.jit
    def step(pred, params, opt_state, key):
        return resets.maybe_reset(pred, config, params, opt_state, scores, key, layers=layers)

    p0, s0, i0 = step(jnp.bool_(False), params, opt_state, jax.random.key(2))
    chex.assert_trees_all_equal(p0, params)
    chex.assert_trees_all_equal(s0, opt_state)
    assert int(i0.total) == 0
    p1, s1, i1 = step(jnp.bool_(True), params, opt_state, jax.random.key(2))
    direct = resets.reset_fn(config)(params, opt_state, scores, jax.random.key(2), layers=layers)
    chex.assert_trees_all_equal((p1, s1, i1), direct)
    # capped: 3 qualify in hidden/0 but at most floor(0.25 * 8) = 2 are reset
    assert {k: int(v) for k, v in i1.counts.items()} == {"hidden/0": 2, "hidden/1": 1}


# --- demonstration ----------------------------------------------------------------------------


def test_large_lr_on_nonstationary_targets_makes_dormant_neurons_redo_revives_them():
    """A ReLU MLP (3 x 64) fits y = 3 sin(x . w_k) whose w_k changes every 250 steps (4 tasks),
    with Adam at lr 1e-2 ("large") or 1e-3. Measured on a probe batch (tau = 0.1, 4 seeds, when
    written): lr 1e-2 -> 48-54% dormant (44-45% completely dead); lr 1e-3 -> 12-21% dormant;
    one ReDo reset at lr 1e-2 -> 9-19% dormant, 0.5-4% dead."""
    cfg = NetworkConfig(kind="mlp", depth=3, width=64, activation="relu")
    model = make_network(cfg, 8, 1, nnx.Rngs(0))
    graphdef, layers = nnx.graphdef(model), model.neuron_layers()
    opt = optax.scale_by_adam()
    probe = jax.random.normal(jax.random.key(99), (256, 8))
    steps, tasks = 250, 4

    def fractions(params):
        _, acts = nnx.merge(graphdef, params)(probe, return_activations=True)
        scores = health.redo_scores(acts, layers)
        n = sum(v.shape[0] for v in scores.values())
        frac = lambda tau: sum(jnp.sum(v <= tau) for v in scores.values()) / n
        return frac(0.1), frac(0.0), scores

    @jax.jit
    def run(lr):
        params = nnx.state(make_network(cfg, 8, 1, nnx.Rngs(jax.random.key(0))), nnx.Param)

        def step(carry, t):
            p, s = carry
            x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (64, 8))
            w = jax.random.normal(jax.random.fold_in(jax.random.key(7), t // steps), (8, 1))
            y = 3.0 * jnp.sin(x @ w)
            g = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(p)
            u, s = opt.update(g, s, p)
            return (jax.tree.map(lambda a, b: a - lr * b, p, u), s), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt.init(params)),
                                              jnp.arange(steps * tasks))
        dormant, dead, scores = fractions(params)
        params, _, info = resets.redo_reset(params, opt_state, scores, jax.random.key(5),
                                            layers=layers, tau=0.1)
        dormant_after, dead_after, _ = fractions(params)
        return dormant, dead, dormant_after, dead_after, info.total

    big = [float(v) for v in run(1e-2)]
    small = [float(v) for v in run(1e-3)]
    print(f"lr 1e-2: dormant {big[0]:.3f} dead {big[1]:.3f} -> after ReDo dormant {big[2]:.3f} "
          f"dead {big[3]:.3f} ({int(big[4])} reset); lr 1e-3: dormant {small[0]:.3f}")
    assert big[0] > 0.3 and big[1] > 0.25  # many dormant (and dead) neurons
    assert big[0] > small[0] + 0.15  # more than with a small learning rate
    assert big[2] < 0.5 * big[0] and big[3] < 0.1  # ReDo revives most of them
    assert int(big[4]) == round(big[0] * 3 * 64)  # exactly the tau-dormant ones were reset
