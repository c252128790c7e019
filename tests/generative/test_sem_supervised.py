"""The supervised control encoder of DLC: the straight-through code, heads that read the code
only, and a short training run whose codes carry a label the untrained encoder's do not."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from generative import dlc
from generative import evaluation as ev
from generative import sem_supervised as ss
from generative import vit_dino as vd
from generative.datasets import shape_example
from generative.sem import SEMConfig


def _tiny(batch_size=32, lr=1e-3):
    return dataclasses.replace(vd.DINOConfig.tiny(), sem=SEMConfig(num_groups=4, group_size=8),
                               batch_size=batch_size, lr=lr)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), tau=st.floats(0.1, 3.0))
def test_straight_through_is_the_code_forward_and_identity_backward(seed, tau):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
    probs = jax.nn.softmax(z / tau, axis=-1)
    q = ss.straight_through_code(probs, z)
    np.testing.assert_allclose(q, jax.nn.one_hot(dlc.tokens(z), 6), atol=1e-6)
    # d/dp sum(q * w) = w: the gradient passes to the SEM distribution unchanged
    g = jax.grad(lambda p: jnp.sum(ss.straight_through_code(p, z) * w))(probs)
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_heads_read_the_one_hot_code():
    cfg = _tiny()
    model = ss.AttributeSEMEncoder(cfg, {"a": 3, "b": 5}, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)), jnp.float32)
    out = model(x)
    assert set(out) == {"a", "b"} and out["a"].shape == (6, 3) and out["b"].shape == (6, 5)
    toks, _ = vd.extract_codes(model, x)  # extract_codes takes either encoder
    code = jax.nn.one_hot(toks, cfg.sem.group_size).reshape(6, -1)
    for name in ("a", "b"):
        np.testing.assert_allclose(out[name], model.heads[name](code), atol=1e-5)


def test_bad_labels_are_refused():
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="same labels"):
        ss.train_attribute_sem_encoder(_tiny(), x, {"a": np.zeros(4)}, {"b": 2},
                                       jax.random.key(0), 1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        ss.train_attribute_sem_encoder(_tiny(), x, {"a": np.zeros(3)}, {"a": 2},
                                       jax.random.key(0), 1, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        ss.AttributeSEMEncoder(_tiny(), {}, rngs=nnx.Rngs(0))


def test_training_puts_the_colour_in_the_code():
    ex = [shape_example(0, "train", i) for i in range(700)]
    images = np.stack([e["image"] for e in ex]).astype(np.float32) / 127.5 - 1.0
    labels = ev.shape_attribute_labels({k: np.array([e[k] for e in ex])
                                        for k in ("kind", "hue", "size", "background",
                                                  "background_hue")})
    y = {"colour": labels["colour"]}
    classes = {"colour": ev.SHAPE_ATTRIBUTES["colour"]}
    cfg, steps, key = _tiny(lr=2e-3), 150, jax.random.key(0)
    model, hist = ss.train_attribute_sem_encoder(cfg, images[:500], {"colour": y["colour"][:500]},
                                                 classes, key, steps, progress=False)
    assert hist["loss"].shape == (steps,) and hist["skipped"].sum() == 0
    assert hist["loss"][-20:].mean() < hist["loss"][:20].mean() - 0.3
    untrained = ss.AttributeSEMEncoder(cfg, classes,
                                       rngs=nnx.Rngs(params=jax.random.split(key)[0]))
    V = cfg.sem.group_size

    def code_knn(m):
        tr, _ = vd.extract_codes(m, images[:500])
        te, _ = vd.extract_codes(m, images[500:])
        return vd.knn_accuracy(jax.nn.one_hot(tr, V), y["colour"][:500], jax.nn.one_hot(te, V),
                               y["colour"][500:], 10, num_classes=classes["colour"])

    trained, chance = code_knn(model), code_knn(untrained)
    print(f"\ncolour kNN on codes: trained {trained:.3f}, untrained {chance:.3f}")
    assert trained > chance + 0.15
