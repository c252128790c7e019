"""generative.attribute_models: the pixel MLP (interface, training through
evaluation.train_attribute_classifier), the regressor's loss and read-back, error metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from generative import attribute_models as am
from generative import datasets, evaluation as ev


def test_pixel_mlp_interface_and_pooling():
    m = am.PixelMLP({"a": 2, "b": 3}, hidden=(8, 6), pool=4, rngs=nnx.Rngs(params=0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 32, 32, 3)), jnp.float32)
    f, logits = m(x)
    assert f.shape == (5, 6) and logits["a"].shape == (5, 2) and logits["b"].shape == (5, 3)
    # only 4x4 block means enter: permuting pixels inside every block changes nothing
    perm = x.reshape(5, 8, 4, 8, 4, 3)[:, :, ::-1, :, ::-1].reshape(5, 32, 32, 3)
    np.testing.assert_allclose(m(perm)[0], f, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        am.PixelMLP({"a": 2}, pool=5, rngs=nnx.Rngs(params=0))


def test_mlp_trains_through_train_attribute_classifier():
    """A brightness label (mean pixel > 0) is linear in the pooled pixels: a few steps learn it."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (256, 32, 32, 3)).astype(np.float32) + rng.normal(
        0, 0.5, (256, 1, 1, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    clf = ev.train_attribute_classifier(x, {"bright": y}, jax.random.key(0),
                                        num_classes={"bright": 2}, steps=150, batch_size=64,
                                        build=am.build_mlp((32,)), progress=False)
    assert isinstance(clf.model, am.PixelMLP)
    assert np.mean(clf.predict(x)["bright"] == y) > 0.9


def test_regressor_loss_is_zero_at_the_targets_and_reads_back():
    hue = jnp.array([0.1, 0.95])
    size = jnp.array([0.15, 0.25])
    ang = 2 * math.pi * hue
    out = {"kind": jnp.array([[50.0, 0, 0, 0, 0], [0, 0, 50.0, 0, 0]]),
           "background": jnp.array([[0, 50.0, 0, 0, 0], [0, 0, 0, 0, 50.0]]),
           "hue": jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1),
           "size": ((size - 0.2) / 0.05)[:, None]}
    targets = {"kind": jnp.array([0, 2]), "background": jnp.array([1, 4]), "hue": hue,
               "size": size}
    loss, aux = am.regressor_loss(out, targets, 0.2, 0.05)
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    # read-back of the same outputs through a Regressor wrapper
    class Fixed:
        def logits(self, images):
            return {k: np.asarray(v) for k, v in out.items()}

    pred = am.Regressor(Fixed(), 0.2, 0.05).predict(None)
    np.testing.assert_allclose(pred["hue"], [0.1, 0.95], atol=1e-6)
    np.testing.assert_allclose(pred["size"], [0.15, 0.25], atol=1e-6)
    assert pred["kind"].tolist() == [0, 2] and pred["background"].tolist() == [1, 4]
    err = am.regressor_errors(pred, {"kind": [0, 1], "background": [1, 4], "hue": [0.12, 0.01],
                                     "size": [0.15, 0.27]})
    assert err["kind_accuracy"] == 0.5 and err["background_accuracy"] == 1.0
    assert err["hue_mae"] == pytest.approx((0.02 + 0.06) / 2)  # 0.95 -> 0.01 wraps: 0.06
    assert err["size_mae"] == pytest.approx(0.01)
    assert err["size_mae_of_range"] == pytest.approx(0.01 / (datasets.SIZE_RANGE[1]
                                                             - datasets.SIZE_RANGE[0]))


def test_circular_error():
    np.testing.assert_allclose(am.circular_error([0.05, 0.5], [0.95, 0.0]), [0.1, 0.5])
