"""llm_rl.models: properties of the layers and models that need no reference implementation
(RoPE, causality, padding invariance, token_logprobs, value head, configs and presets)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from llm_rl.models import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                           Qwen3Config, Qwen3ForCausalLM, RopeConfig, ValueModel, token_logprobs)
from llm_rl.models.layers import apply_rope, rope_frequencies
from tests.llm_rl.model_helpers import jitted, random_model
from trainkit.config import ConfigError

V, T = 64, 10


SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, head_dim=8)


def _model(cls=Qwen3ForCausalLM, cfg=None, dtype=jnp.float32, seed=0):
    return random_model(cls, cfg or Qwen3Config.tiny(**SMALL), dtype=dtype, seed=seed)


@pytest.fixture(scope="module")
def lm_fn():
    return jitted(_model(LlamaForCausalLM, LlamaConfig.tiny(**SMALL)))


# --- RoPE ----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.integers(-1000, 1000),
       rope_type=st.sampled_from(["default", "llama3"]))
def test_rope_preserves_norms_and_depends_on_relative_position_only(seed, shift, rope_type):
    rope = RopeConfig(rope_type=rope_type, theta=10000.0, factor=8.0,
                      original_max_position_embeddings=32)
    inv = rope_frequencies(16, rope)
    kq, kk, kp = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (1, 6, 2, 16))
    k = jax.random.normal(kk, (1, 6, 2, 16))
    pos = jax.random.randint(kp, (1, 6), 0, 5000)
    rq, rk = apply_rope(q, pos, inv), apply_rope(k, pos, inv)
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
    # <R_p q, R_s k> depends on p - s only: shifting every position leaves all dot products.
    dots = jnp.einsum("bihd,bjhd->bhij", rq, rk)
    shifted = jnp.einsum("bihd,bjhd->bhij", apply_rope(q, pos + 3000 + shift, inv),
                         apply_rope(k, pos + 3000 + shift, inv))
    np.testing.assert_allclose(shifted, dots, atol=2e-3)


def test_llama3_frequency_bands():
    default = RopeConfig(theta=500000.0)
    llama3 = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=64)
    base, scaled = rope_frequencies(16, default), rope_frequencies(16, llama3)
    wavelen = 2 * np.pi / base
    high, low = wavelen < 64 / 4, wavelen > 64 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()  # the tiny setting exercises all three
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)  # kept
    np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)  # divided by factor
    assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)  # blended
    # factor 1 is no scaling at all
    np.testing.assert_allclose(rope_frequencies(16, dataclasses.replace(llama3, factor=1.0)), base, rtol=1e-6)
    # linear: every frequency divided by factor
    lin = RopeConfig(rope_type="linear", theta=500000.0, factor=2.0)
    np.testing.assert_allclose(rope_frequencies(16, lin), base / 2, rtol=1e-6)


# --- causality and padding -----------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(t=st.integers(0, T - 2), seed=st.integers(0, 2**16))
def test_logits_at_t_do_not_depend_on_later_tokens(lm_fn, t, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (2, T)).astype(np.int32)
    changed = ids.copy()
    changed[:, t + 1:] = rng.integers(0, V, (2, T - t - 1))
    mask = np.ones((2, T), np.int32)
    a, b = np.asarray(lm_fn(ids, mask)), np.asarray(lm_fn(changed, mask))
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
    if (changed[:, t + 1] != ids[:, t + 1]).any():
        assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-5)  # later ones do change


@settings(max_examples=10, deadline=None)
@given(pad=st.integers(1, T - 2), pad_id=st.integers(0, V - 1), seed=st.integers(0, 2**16))
def test_left_padding_invariance(lm_fn, pad, pad_id, seed):
    """A left-padded sequence gets the same logits at its real tokens (the last one included)
    as the unpadded sequence, whatever the pad token id."""
    rng = np.random.default_rng(seed)
    n = T - pad
    real = rng.integers(0, V, (1, n)).astype(np.int32)
    padded = np.concatenate([np.full((1, pad), pad_id, np.int32), real], axis=1)
    mask = np.concatenate([np.zeros((1, pad), np.int32), np.ones((1, n), np.int32)], axis=1)
    # Same shapes for the jitted function: the unpadded sequence is right-padded instead.
    unpadded = np.concatenate([real, np.zeros((1, pad), np.int32)], axis=1)
    umask = mask[:, ::-1].copy()
    a = np.asarray(lm_fn(padded, mask))[0, pad:]
    b = np.asarray(lm_fn(unpadded, umask))[0, :n]
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(a[-1], b[-1], atol=2e-5)


@pytest.fixture(scope="module")
def qwen3_fn():
    return jitted(_model())


def test_padded_rows_are_finite(qwen3_fn):
    ids = np.zeros((2, 6), np.int32)
    mask = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
    assert bool(jnp.all(jnp.isfinite(qwen3_fn(ids, mask))))


def test_explicit_positions_override_the_default(qwen3_fn):
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    ones = np.ones((2, 6), np.int32)
    call = lambda pos: np.asarray(qwen3_fn(ids, ones, np.broadcast_to(pos, (2, 6)).astype(np.int32)))
    default = np.asarray(qwen3_fn(ids, ones))
    np.testing.assert_allclose(call(np.arange(6)), default, atol=1e-6)
    # RoPE is relative: shifting every position changes nothing (up to float32 rounding) ...
    np.testing.assert_allclose(call(np.arange(6) + 7), default, atol=1e-4)
    # ... but changing the gaps between tokens changes the logits after the gap.
    gapped = call(np.array([0, 1, 2, 10, 11, 12]))
    np.testing.assert_allclose(gapped[:, :3], default[:, :3], atol=1e-6)
    assert not np.allclose(gapped[:, 3:], default[:, 3:], atol=1e-3)


# --- dtypes, value head ----------------------------------------------------------------------


@pytest.mark.parametrize("cls, cfg", [
    (Qwen2ForCausalLM, Qwen2Config.tiny(**SMALL)),
    (LlamaForCausalLM, LlamaConfig.tiny(**SMALL, tie_word_embeddings=True)),
])
def test_bfloat16_params_give_float32_logits(cls, cfg):
    model = _model(cls, cfg, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    logits = jitted(model)(np.ones((2, 4), np.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 4, V)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_model_shape_dtype_and_axes(dtype):
    critic = random_model(ValueModel, Qwen3Config.tiny(**SMALL), dtype=dtype)
    values = jitted(critic)(np.ones((3, 5), np.int32), np.ones((3, 5), np.int32))
    assert values.shape == (3, 5) and values.dtype == jnp.float32
    assert critic.value_head.kernel.get_metadata()["out_sharding"] == ("embed", None)
    assert critic.value_head.kernel.get_value().dtype == dtype
    assert not hasattr(critic, "lm_head")


def test_every_parameter_has_logical_axes():
    for cls, cfg in [(Qwen2ForCausalLM, Qwen2Config.tiny()), (Qwen3ForCausalLM, Qwen3Config.tiny()),
                     (LlamaForCausalLM, LlamaConfig.tiny(attention_bias=True, mlp_bias=True))]:
        state = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
        for path, var in nnx.to_flat_state(state):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == len(var.get_value().shape), (path, axes)


# --- token_logprobs --------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_token_logprobs_against_numpy(jit):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 7, 11)) * 5).astype(np.float32)
    logits[0, 2] += 1e4  # a huge offset: a naive exp would overflow
    tokens = rng.integers(0, 11, (3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    fn = jax.jit(token_logprobs) if jit else token_logprobs
    out = np.asarray(fn(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)))
    assert out.shape == (3, 6) and out.dtype == np.float32
    x = logits.astype(np.float64)
    expected = np.zeros((3, 6))
    for b in range(3):
        for t in range(6):
            if mask[b, t] and mask[b, t + 1]:
                row = x[b, t] - x[b, t].max()
                expected[b, t] = row[tokens[b, t + 1]] - np.log(np.exp(row).sum())
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert out[1, 2] == 0 and out[1, 3] != 0  # first real token has no context: masked
    assert np.all(out[2, -2:] == 0)


def test_token_logprobs_with_a_model_and_bf16():
    model = jitted(_model(dtype=jnp.bfloat16))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), jnp.int32)
    out = token_logprobs(model, tokens, mask)
    ref = jax.nn.log_softmax(model(tokens, mask)[:, :-1], axis=-1)
    ref = jnp.take_along_axis(ref, tokens[:, 1:, None], axis=-1)[..., 0]
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert bool(jnp.all(out <= 0))


# --- configs and presets ---------------------------------------------------------------------


def _n_params(cls, cfg):
    state = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("cls, cfg, total, non_embedding", [
    # Published sizes (model cards): billions of parameters, total and without embeddings.
    (Qwen3ForCausalLM, Qwen3Config.qwen3_0_6b(), 0.6, 0.44),
    (Qwen3ForCausalLM, Qwen3Config.qwen3_4b(), 4.0, 3.6),
    (Qwen3ForCausalLM, Qwen3Config.qwen3_8b(), 8.2, 6.95),
    (Qwen3ForCausalLM, Qwen3Config.qwen3_14b(), 14.8, 13.2),
    (Qwen2ForCausalLM, Qwen2Config.qwen2_5_7b(), 7.61, 6.53),
    (Qwen2ForCausalLM, Qwen2Config.qwen2_5_0_5b(), 0.49, 0.36),
])
def test_preset_parameter_counts_match_published_sizes(cls, cfg, total, non_embedding):
    n = _n_params(cls, cfg)
    emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert abs(n / 1e9 - total) < 0.05 * total, n
    assert abs((n - emb) / 1e9 - non_embedding) < 0.01 * non_embedding + 0.005, n - emb


def test_llama3_1_8b_parameter_count_is_exact():
    assert _n_params(LlamaForCausalLM, LlamaConfig.llama3_1_8b()) == 8_030_261_248


LLAMA_3_1_8B_CONFIG_JSON = {  # as published (transformers 4.43 layout)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}

QWEN3_8B_CONFIG_JSON = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}

QWEN2_5_7B_CONFIG_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064}


@pytest.mark.parametrize("cls, hf, preset", [
    (LlamaConfig, LLAMA_3_1_8B_CONFIG_JSON, LlamaConfig.llama3_1_8b()),
    (Qwen3Config, QWEN3_8B_CONFIG_JSON, Qwen3Config.qwen3_8b()),
    (Qwen2Config, QWEN2_5_7B_CONFIG_JSON, Qwen2Config.qwen2_5_7b()),
])
def test_presets_equal_the_released_config_json(cls, hf, preset):
    assert cls.from_hf_config(hf) == preset
    assert cls.from_hf_config(preset.to_hf_config()) == preset  # and our own output reads back


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Qwen3Config.tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="head_dim"):
        LlamaConfig.tiny(head_dim=7)
    with pytest.raises(ConfigError, match="high_freq_factor"):
        RopeConfig(rope_type="llama3", low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(TypeError, match="Qwen3Config"):
        Qwen3ForCausalLM(LlamaConfig.tiny())
    chex.assert_equal(Qwen3Config.tiny().use_qk_norm, True)
    chex.assert_equal(Qwen2Config.tiny().use_qkv_bias and not Qwen2Config.tiny().use_o_bias, True)
