"""llm_rl.models checkpoints: clear errors for broken or unsupported HF directories."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llm_rl.models import (CheckpointError, MissingTensorError, Qwen3Config, Qwen3ForCausalLM,
                           TensorShapeError, UnknownArchitectureError, from_pretrained,
                           save_pretrained)
from tests.llm_rl.model_helpers import random_model

KEY = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def ckpt(tmp_path):
    cfg = Qwen3Config.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8)
    save_pretrained(random_model(Qwen3ForCausalLM, cfg), cfg, tmp_path)
    return tmp_path


def _rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unknown_architecture_names_it_and_the_file(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownArchitectureError) as err:
        from_pretrained(ckpt)
    msg = str(err.value)
    assert "MistralForCausalLM" in msg and str(ckpt / "config.json") in msg
    assert "Qwen3ForCausalLM" in msg  # says what is supported


def test_model_type_is_used_when_architectures_is_absent(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["architectures"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model, _ = from_pretrained(ckpt)
    assert isinstance(model, Qwen3ForCausalLM)


def test_missing_tensor_names_key_and_file(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop(KEY))
    with pytest.raises(MissingTensorError) as err:
        from_pretrained(ckpt)
    msg = str(err.value)
    assert repr(KEY) in msg and str(ckpt / "model.safetensors") in msg
    assert "model.layers.1.mlp.up_proj.kernel" in msg  # and the parameter it was wanted for


def test_misshaped_tensor_names_key_file_and_shapes(ckpt):
    def change(t):
        t[KEY] = np.zeros((48, 31), np.float32)
    _rewrite(ckpt / "model.safetensors", change)
    with pytest.raises(TensorShapeError) as err:
        from_pretrained(ckpt)
    msg = str(err.value)
    assert repr(KEY) in msg and str(ckpt / "model.safetensors") in msg
    assert "(48, 31)" in msg and "(48, 32)" in msg


def test_sharded_checkpoint_errors_name_index_and_shard(tmp_path):
    cfg = Qwen3Config.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8)
    save_pretrained(random_model(Qwen3ForCausalLM, cfg), cfg, tmp_path, max_shard_bytes=20_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][KEY]
    # Listed by the index but absent from the shard: the error names the shard.
    _rewrite(tmp_path / shard, lambda t: t.pop(KEY))
    with pytest.raises(MissingTensorError) as err:
        from_pretrained(tmp_path)
    assert repr(KEY) in str(err.value) and str(tmp_path / shard) in str(err.value)
    # Not listed by the index at all: the error names the index.
    del index["weight_map"][KEY]
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingTensorError) as err:
        from_pretrained(tmp_path)
    assert repr(KEY) in str(err.value) and str(index_path) in str(err.value)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(Qwen3Config.tiny().to_hf_config()))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="line 1"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("change, words", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
])
def test_unsupported_config_features_are_refused_by_name(ckpt, change, words):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(change)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        from_pretrained(ckpt)
    assert words in str(err.value) and str(ckpt / "config.json") in str(err.value)


def test_truncated_safetensors_file_names_the_file(ckpt):
    # safetensors' own SafetensorError ("incomplete metadata, file not fully covered") named
    # neither the file nor what to do
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        from_pretrained(ckpt)
    assert str(path) in str(err.value) and "damaged or incomplete" in str(err.value)


def test_checkpoint_errors_are_the_trainkit_error_the_cli_reports():
    # one error family across the library: `python -m experiments` prints it in one line
    from trainkit.checkpoint import CheckpointError as TrainkitCheckpointError

    assert issubclass(CheckpointError, TrainkitCheckpointError)
    assert issubclass(MissingTensorError, KeyError) and issubclass(TensorShapeError, ValueError)
