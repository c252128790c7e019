"""llm_rl.models against transformers on PyTorch: HF checkpoints in, ours out, same logits.

Each case builds a random tiny HF model from transformers' own config class, saves it with
transformers, loads it with our from_pretrained and compares logits on random ids with left
padding. The round trips go the other way: our save_pretrained, transformers loads.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402

from llm_rl.models import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,  # noqa: E402
                           Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained)
from tests.llm_rl.model_helpers import jitted, random_model  # noqa: E402

VOCAB, B, T = 101, 3, 11
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# (HF model class name, HF config kwargs). head_dim 16 with the llama3 settings above puts
# frequencies in all three bands (kept, blended, divided by factor).
CASES = {
    "qwen2-untied-bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3-tied": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16)),
    "qwen3-untied-attn-bias": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=8,
                                                        attention_bias=True)),
    "llama-llama3-rope": ("LlamaForCausalLM", dict(tie_word_embeddings=False, head_dim=16,
                                                   rope_parameters=dict(LLAMA3_ROPE))),
    "llama-tied-linear-rope-biases": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
}


def _hf_model(case: str, seed: int = 0):
    arch, extra = CASES[case]
    family = arch.replace("ForCausalLM", "")
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.1, rms_norm_eps=1e-5)
    kw.update(extra)
    cfg = getattr(transformers, family + "Config")(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # biases and norm scales are 0 / 1 at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    mask[0, -2:] = 0  # right padding
    return ids, mask


def _hf_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def _max_diff(a, b, mask):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[mask.astype(bool)].max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_float32(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ids, mask = _batch()
    ref = _hf_logits(hf, ids, mask)
    model, cfg = from_pretrained(tmp_path)
    assert type(model).__name__ == CASES[case][0]
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head is None) == cfg.tie_word_embeddings
    out = jitted(model)(ids, mask)
    assert out.dtype == jnp.float32 and out.shape == (B, T, VOCAB)
    assert np.abs(ref).max() > 1.0  # logits large enough for the tolerance to mean something
    diff = _max_diff(out, ref, mask)
    print(f"{case}: max |logits - HF| = {diff:.2e}")
    assert diff <= 1e-4


OURS = {
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config.tiny(vocab_size=VOCAB)),
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config.tiny(vocab_size=VOCAB, tie_word_embeddings=True)),
    "llama": lambda: (LlamaForCausalLM, LlamaConfig.tiny(vocab_size=VOCAB)),
}


def _load_hf(path, dtype):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("family", list(OURS))
def test_save_pretrained_loads_in_transformers_float32(family, tmp_path):
    cls, cfg = OURS[family]()
    model = random_model(cls, cfg, seed=1)
    save_pretrained(model, cfg, tmp_path)
    hf = _load_hf(tmp_path, torch.float32)
    assert type(hf).__name__ == cls.__name__
    ids, mask = _batch(1)
    diff = _max_diff(jitted(model)(ids, mask), _hf_logits(hf, ids, mask), mask)
    print(f"{family} save -> transformers (float32): max diff {diff:.2e}")
    assert diff <= 1e-4
    again, cfg2 = from_pretrained(tmp_path)  # and back: the same config and parameters
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(model))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_bfloat16_round_trip(family, tmp_path):
    """bf16 parameters are written as BF16 tensors bit for bit; transformers computing in
    bf16 matches our bf16 logits to bf16 accuracy (loose: 3% of the logit range, since the
    two differ in where they round: HF softmax/logits in bf16, ours in float32); and reading
    the same bf16 file into float32 on both sides matches to 1e-4."""
    cls, cfg = OURS[family]()
    model = random_model(cls, cfg, dtype=jnp.bfloat16, seed=2)
    assert model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    save_pretrained(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == ml_dtypes.bfloat16
    ours_q = np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...])
    np.testing.assert_array_equal(q.view(np.uint16), ours_q.reshape(cfg.hidden_size, -1).T.view(np.uint16))

    ids, mask = _batch(2)
    ours = np.asarray(jitted(model)(ids, mask))
    assert ours.dtype == np.float32
    hf_bf16 = _hf_logits(_load_hf(tmp_path, torch.bfloat16), ids, mask)
    diff = _max_diff(ours, hf_bf16, mask)
    scale = np.abs(hf_bf16[mask.astype(bool)]).max()
    print(f"{family} bf16 save -> transformers bf16: max diff {diff:.2e} (|logits| <= {scale:.2f})")
    assert diff <= 0.03 * scale

    back, _ = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint16),
                                                            np.asarray(b).view(np.uint16)),
                 nnx.state(back), nnx.state(model))
    f32, _ = from_pretrained(tmp_path, dtype=jnp.float32)
    hf_f32 = _hf_logits(_load_hf(tmp_path, torch.float32), ids, mask)
    diff32 = _max_diff(jitted(f32)(ids, mask), hf_f32, mask)
    print(f"{family} bf16 file read as float32, ours vs transformers: max diff {diff32:.2e}")
    assert diff32 <= 1e-4


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    cls, cfg = OURS["llama"]()
    model = random_model(cls, cfg, seed=3)
    save_pretrained(model, cfg, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).exists() for s in shards)
    hf = _load_hf(tmp_path, torch.float32)
    ids, mask = _batch(3)
    assert _max_diff(jitted(model)(ids, mask), _hf_logits(hf, ids, mask), mask) <= 1e-4
    back, _ = from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf = _hf_model("qwen3-untied-attn-bias", seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = _batch(4)
    model, _ = from_pretrained(tmp_path)
    assert _max_diff(jitted(model)(ids, mask), _hf_logits(hf, ids, mask), mask) <= 1e-4


def test_legacy_rope_scaling_config_and_value_head_from_lm(tmp_path):
    """An older-style config.json (top-level rope_theta + rope_scaling, as the released
    Llama-3.1 files have it) reads the same; value_head=True reuses the trunk."""
    hf = _hf_model("llama-llama3-rope", seed=5)
    hf.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    data = json.loads(cfg_path.read_text())
    params = data.pop("rope_parameters")
    data["rope_theta"] = params.pop("rope_theta")
    data["rope_scaling"] = params
    cfg_path.write_text(json.dumps(data))
    ids, mask = _batch(5)
    model, cfg = from_pretrained(tmp_path)
    assert cfg.rope.rope_type == "llama3" and cfg.rope.original_max_position_embeddings == 64
    assert _max_diff(jitted(model)(ids, mask), _hf_logits(hf, ids, mask), mask) <= 1e-4

    critic, _ = from_pretrained(tmp_path, value_head=True)
    values = critic(jnp.asarray(ids), jnp.asarray(mask))
    assert values.shape == (B, T) and values.dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, nnx.state(critic.model), nnx.state(model.model))
