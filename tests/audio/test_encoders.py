"""FLAM encoders: shapes per preset, frame-count arithmetic against ceil(T / downsample), exact
masking (padding never changes valid outputs), heads exactly at their init values, unit-norm
projections, jit + grad of the FLAM loss through the model, parameter counts against a
closed-form count and the module docstring, config and input errors, the word vocabulary."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from audio import encoders as E
from audio import flam
from audio.minilm import MiniLM, MiniLMConfig
from trainkit.config import ConfigError


def _mel(rng, b, t, m, scale=10.0):
    return jnp.asarray(rng.normal(-30.0, scale, (b, t, m)), jnp.float32)


def _words(rng, k, s, vocab, lengths=None):
    ids = rng.integers(2, vocab, (k, s))
    lengths = rng.integers(1, s + 1, k) if lengths is None else np.asarray(lengths)
    mask = np.arange(s)[None, :] < lengths[:, None]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


# XLA's CPU compile time dominates these tests (a tiny model's loss gradient: ~40 s at -O2 on
# a loaded 2-core machine); unoptimised code compiles ~3x faster and gives the same numbers.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)


def _build(make):
    """``make()`` with every parameter initialised in one compiled program (eager init
    compiles each random draw separately)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, _jit(lambda: nnx.split(make())[1])())


def _run(model, *args):
    graphdef, state = nnx.split(model)
    return _jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


def _abstract(build):
    """(graphdef, abstract state): shapes only, nothing is initialised or compiled."""
    return nnx.split(nnx.eval_shape(build))


@pytest.fixture(scope="module")
def tiny():
    # Built once: XLA compiles each parameter's random init (seconds on a loaded CPU).
    return _build(lambda: E.FlamModel(E.FlamConfig.tiny(), rngs=nnx.Rngs(1)))


def _loss_and_grads(model, mel, texts, caps, labels, mask, text_mask):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        out = nnx.merge(graphdef, p, rest)(mel, texts, caps, mask)
        return out.total_loss(labels, text_mask).total, out

    (loss, out), grads = _jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, out, grads


B, K, T = 3, 4, 26  # 26 frames -> ceil(26 / 4) = 7; valid 26, 17, 10 -> 7, 5, 3


@pytest.fixture(scope="module")
def tiny_step(tiny):
    """One jitted value_and_grad of the FLAM loss through the tiny model at init: one XLA
    compile shared by the shape, norm, head and gradient tests."""
    rng = np.random.default_rng(7)
    mel = _mel(rng, B, T, 16)
    mask = jnp.arange(T)[None, :] < jnp.asarray([26, 17, 10])[:, None]
    texts, caps = _words(rng, K, 8, 64), _words(rng, B, 8, 64)
    labels = jnp.asarray(rng.random((B, K, 7)) < 0.3)
    text_mask = jnp.asarray([True, True, True, False])
    loss, out, grads = _loss_and_grads(tiny, mel, texts, caps, labels, mask, text_mask)
    return dict(loss=loss, out=out, grads=grads, labels=labels, text_mask=text_mask)


# --- shapes --------------------------------------------------------------------------------


def test_flam_shapes_tiny(tiny_step):
    out, j = tiny_step["out"], E.FlamConfig.tiny().joint_dim
    assert out.frames.shape == (B, 7, j) and out.frame_mask.shape == (B, 7)
    assert out.frame_mask.sum(1).tolist() == [7, 5, 3]
    assert out.text.shape == (K, j) and out.alpha.shape == out.beta.shape == (K,)
    assert out.audio_emb.shape == out.text_emb.shape == (B, j)
    assert out.temperature.shape == ()
    assert all(np.isfinite(np.asarray(x)).all() for x in out)


def test_flam_shapes_cpu_preset_abstract():
    cfg = E.FlamConfig.cpu()
    graphdef, state = _abstract(lambda: E.FlamModel(cfg, rngs=nnx.Rngs(0)))
    b, k, t = 4, 6, 1001  # 10 s at 100 frames/s -> ceil(1001 / 8) = 126 frames
    spec = jax.ShapeDtypeStruct
    words = lambda n: (spec((n, 12), jnp.int32), spec((n, 12), jnp.bool_))
    out = jax.eval_shape(lambda st, *a: nnx.merge(graphdef, st)(*a), state,
                         spec((b, t, 64), jnp.float32), words(k), words(b))
    assert out.frames.shape == (b, 126, 128) and out.frame_mask.shape == (b, 126)
    assert out.text.shape == (k, 128) and out.beta.shape == (k,)
    assert out.audio_emb.shape == out.text_emb.shape == (b, 128)


def test_flam_shapes_paper_preset_abstract():
    """paper(): MiniLM text branch, 1024 frames (10.24 s at 100 frames/s) -> 32 frames of 512."""
    cfg = E.FlamConfig.paper()

    def build():
        return E.FlamModel(cfg, text_encoder=MiniLM(MiniLMConfig.all_minilm_l6_v2()),
                           rngs=nnx.Rngs(0))

    graphdef, state = _abstract(build)
    b, k, t = 2, 5, 1024
    spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
    out = jax.eval_shape(lambda st, mel, texts, caps: nnx.merge(graphdef, st)(mel, texts, caps),
                         state, spec((b, t, 64)),
                         (spec((k, 16), jnp.int32), spec((k, 16), jnp.int32)),
                         (spec((b, 16), jnp.int32), spec((b, 16), jnp.int32)))
    assert out.frames.shape == (b, 32, 512)
    assert out.text.shape == (k, 512) and out.alpha.shape == (k,)
    assert out.audio_emb.shape == out.text_emb.shape == (b, 512)


def test_audio_encoder_shapes_per_preset_abstract():
    for name in ("tiny", "cpu", "paper"):
        cfg = getattr(E.AudioEncoderConfig, name)()
        graphdef, state = _abstract(lambda: E.AudioEncoder(cfg))
        t = 4 * cfg.downsample
        frames, clip, mask = jax.eval_shape(
            lambda st, x: nnx.merge(graphdef, st)(x), state,
            jax.ShapeDtypeStruct((3, t, cfg.n_mels), jnp.float32))
        assert frames.shape == (3, 4, cfg.width) and clip.shape == (3, cfg.width)
        assert mask.shape == (3, 4) and mask.dtype == jnp.bool_


# --- frame count arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize("strides", [(2, 2), (2, 3), (4,), (1, 2, 2, 2)])
def test_frame_count_is_ceil_t_over_downsample(strides):
    for t in range(1, 40):
        assert E.output_frames(t, strides) == math.ceil(t / math.prod(strides))
    cfg = E.AudioEncoderConfig(n_mels=8, stem_channels=(4,) * len(strides), time_strides=strides,
                               mel_strides=(1,) * len(strides), width=8, depth=1, num_heads=2,
                               mlp_dim=8)
    graphdef, state = _abstract(lambda: E.AudioEncoder(cfg))
    for t in (1, 7, 12, 13, 50):
        frames, clip, mask = jax.eval_shape(
            lambda st, x: nnx.merge(graphdef, st)(x), state,
            jax.ShapeDtypeStruct((2, t, 8), jnp.float32))
        assert frames.shape == (2, math.ceil(t / cfg.downsample), 8) == mask.shape + (8,)
        assert E.output_frames(t, cfg.time_strides) == frames.shape[1]


def test_paper_frame_rate():
    cfg = E.AudioEncoderConfig.paper()
    assert cfg.downsample == 32 and E.output_frames(1024, cfg.time_strides) == 32
    assert cfg.stem_mels == 2  # 64 mel bands halved five times


# --- masking -------------------------------------------------------------------------------


def test_padding_does_not_change_valid_outputs(tiny):
    """Clip b has n_b valid frames then garbage; its valid outputs must equal the outputs of
    the unpadded clip alone, for valid lengths that are not multiples of the stride too."""
    enc = tiny.audio_encoder
    graphdef, state = nnx.split(enc)
    run = _jit(lambda st, x, m: nnx.merge(graphdef, st)(x, m))
    rng = np.random.default_rng(2)
    t, lengths = 30, (30, 13, 7)
    clean = [_mel(rng, 1, n, 16) for n in lengths]
    padded = jnp.concatenate(
        [jnp.concatenate([c, 1e3 * _mel(rng, 1, t - c.shape[1], 16)], axis=1) for c in clean])
    mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    frames, clip, out_mask = run(state, padded, mask)
    for i, c in enumerate(clean[1:], start=1):  # clip 0 is unpadded: its own reference
        f_ref, clip_ref, _ = run(state, c, jnp.ones(c.shape[:2], bool))
        n_out = math.ceil(lengths[i] / enc.config.downsample)
        assert int(out_mask[i].sum()) == n_out == f_ref.shape[1]
        np.testing.assert_allclose(frames[i, :n_out], f_ref[0], atol=2e-5)
        np.testing.assert_allclose(clip[i], clip_ref[0], atol=2e-5)
        assert float(jnp.abs(frames[i, n_out:]).max()) == 0.0
    # without the mask the garbage changes the short clips: the mask is what protects them
    frames_nomask, _, _ = run(state, padded, jnp.ones((3, t), bool))
    n1 = math.ceil(lengths[1] / enc.config.downsample)
    assert float(jnp.abs(frames_nomask[1, :n1] - frames[1, :n1]).max()) > 1e-3
    np.testing.assert_allclose(frames_nomask[0], frames[0], atol=1e-6)


def test_text_encoder_ignores_padding_tokens(tiny):
    graphdef, state = nnx.split(tiny.text_encoder)
    run = _jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
    rng = np.random.default_rng(3)
    ids, mask = _words(rng, 3, 10, 64, lengths=(10, 4, 1))
    garbage = jnp.where(mask, ids, jnp.asarray(rng.integers(0, 64, ids.shape), jnp.int32))
    clean = jnp.where(mask, ids, 0)
    out, ref = run(state, garbage, mask), run(state, clean, mask)
    assert out.shape == (3, 32)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # ... and the mask matters: the same ids read as real tokens give other embeddings
    full = run(state, garbage, jnp.ones_like(mask))
    assert float(jnp.abs(full[1] - out[1]).max()) > 1e-3


# --- heads, projections -----------------------------------------------------------------------


def test_alpha_beta_exact_at_init_for_any_input(tiny):
    graphdef, state = nnx.split(tiny.heads)
    run = _jit(lambda st, x: nnx.merge(graphdef, st)(x))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 32)) * np.asarray([1e-3, 1.0, 1e3])[:, None, None]
    alpha, beta = run(state, jnp.asarray(x.reshape(21, 32), jnp.float32))
    np.testing.assert_allclose(alpha, flam.ALPHA_INIT, atol=1e-5, rtol=0)
    np.testing.assert_allclose(beta, flam.BETA_INIT, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="alpha_init"):
        E.AlphaBetaHeads(4, alpha_init=0.0, rngs=nnx.Rngs(0))


def test_flam_model_heads_and_unit_norms(tiny_step):
    out = tiny_step["out"]
    np.testing.assert_allclose(out.alpha, flam.ALPHA_INIT, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.beta, flam.BETA_INIT, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.temperature, 0.07, rtol=1e-6)
    valid = np.asarray(out.frame_mask)
    norms = np.linalg.norm(np.asarray(out.frames), axis=-1)
    np.testing.assert_allclose(norms[valid], 1.0, atol=1e-5)
    for emb in (out.text, out.audio_emb, out.text_emb):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)


def _np_projection(proj, x):
    h = np.asarray(x) @ np.asarray(proj.fc1.kernel[...]) + np.asarray(proj.fc1.bias[...])
    if proj.fc2 is not None:
        h = np.maximum(h, 0) @ np.asarray(proj.fc2.kernel[...]) + np.asarray(proj.fc2.bias[...])
    return h / np.linalg.norm(h, axis=-1, keepdims=True)


def test_projection_unit_norm_and_form(tiny):
    """W2 relu(W1 x + b1) + b2 (mlp) or W1 x + b1 (linear), L2-normalised, against numpy."""
    rng = np.random.default_rng(6)
    for proj in (tiny.audio_projection, E.Projection(6, 5, "linear", rngs=nnx.Rngs(0))):
        d_in, d_out = proj.fc1.kernel.shape
        x = jnp.asarray(rng.standard_normal((2, 3, d_in)) * 50, jnp.float32)
        graphdef, state = nnx.split(proj)
        y = _jit(lambda st, v: nnx.merge(graphdef, st)(v))(state, x)
        assert y.shape == (2, 3, d_out)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(y, _np_projection(proj, x), atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        E.Projection(6, 5, "attention", rngs=nnx.Rngs(0))


# --- jit + grad through the loss --------------------------------------------------------------


def _np_total_loss(out, labels, text_mask):
    """L_clip + 200 L_SED + L_prior in float64 from the model's outputs (definitions of
    audio/flam.py: mean over valid (b, k, l) of softplus(-z h); BCE(sigmoid(beta), zbar);
    symmetric InfoNCE at temperature exp(-logit_scale))."""
    f, t = np.float64(out.frames), np.float64(out.text)
    a, b = np.float64(out.alpha), np.float64(out.beta)
    fm, tm, y = np.asarray(out.frame_mask, float), np.asarray(text_mask, float), np.asarray(labels)
    h = a[None, :, None] * np.einsum("bld,kd->bkl", f, t) + b[None, :, None]
    z = 2.0 * y - 1.0
    w = fm[:, None, :] * tm[None, :, None]
    sed = np.sum(np.logaddexp(0, -z * h) * w) / np.sum(w)
    zbar = np.einsum("bkl,bl->k", y, fm) / fm.sum()
    prior = np.sum((np.logaddexp(0, b) - zbar * b) * tm) / tm.sum()
    s = np.float64(out.audio_emb) @ np.float64(out.text_emb).T / float(out.temperature)
    lse = lambda x, ax: np.log(np.sum(np.exp(x), axis=ax))
    clip = 0.5 * (np.mean(lse(s, 1) - np.diag(s)) + np.mean(lse(s, 0) - np.diag(s)))
    return clip + 200.0 * sed + prior


def test_jit_grad_through_flam_total_loss(tiny_step):
    loss, out, grads = tiny_step["loss"], tiny_step["out"], tiny_step["grads"]
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), _np_total_loss(out, tiny_step["labels"],
                                                           tiny_step["text_mask"]), rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # every part of the model is trained by the loss
    for part in (grads["audio_encoder"]["stem"][0]["conv"]["kernel"],
                 grads["audio_encoder"]["blocks"][0]["query"]["kernel"],
                 grads["text_encoder"]["tokens"]["embedding"],
                 grads["audio_projection"]["fc2"]["kernel"],
                 grads["text_projection"]["fc1"]["kernel"],
                 grads["heads"]["scale"]["fc2"]["kernel"],  # zero-initialised, still learns
                 grads["heads"]["bias"]["fc2"]["bias"],  # through L_prior only
                 grads["logit_scale"]):
        assert float(jnp.abs(part[...]).max()) > 0


@pytest.mark.slow  # builds another model (~5 s)
def test_text_source_embeddings():
    rng = np.random.default_rng(8)
    cfg = E.FlamConfig(audio=E.AudioEncoderConfig.tiny(), text_source="embeddings",
                       text_embed_dim=12, joint_dim=16)
    model = _build(lambda: E.FlamModel(cfg, rngs=nnx.Rngs(0)))
    assert model.text_encoder is None
    vec = lambda n: jnp.asarray(rng.standard_normal((n, 12)), jnp.float32)
    out = _run(model, _mel(rng, 2, 16, 16), vec(3), vec(2))
    assert out.text.shape == (3, 16) and out.text_emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.text), axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="text_source='embeddings'"):
        model.encode_text(vec(3)[:, :5])


@pytest.mark.slow  # builds and differentiates another model (~15 s)
def test_text_source_minilm_is_trained():
    rng = np.random.default_rng(8)
    cfg = E.FlamConfig(audio=E.AudioEncoderConfig.tiny(), text_source="minilm",
                       text_embed_dim=32, joint_dim=16)
    bert_cfg = MiniLMConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=16)
    model = _build(lambda: E.FlamModel(cfg, text_encoder=MiniLM(bert_cfg, rngs=nnx.Rngs(1)),
                                       rngs=nnx.Rngs(0)))
    labels = jnp.asarray(rng.random((2, 3, 4)) < 0.3)
    loss, _, grads = _loss_and_grads(model, _mel(rng, 2, 16, 16), _words(rng, 3, 7, 100),
                                     _words(rng, 2, 7, 100), labels, None, jnp.ones(3, bool))
    assert np.isfinite(float(loss))
    assert float(jnp.abs(grads["text_encoder"]["layers"][0]["query"]["kernel"][...]).max()) > 0
    with pytest.raises(ValueError, match="text_encoder"):
        E.FlamModel(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="text_embed_dim"):
        E.FlamModel(E.FlamConfig.paper(), text_encoder=model.text_encoder)


# --- parameter counts ------------------------------------------------------------------------


def _closed_form_audio_params(cfg: E.AudioEncoderConfig) -> int:
    """Conv stages (kernel k_t x k_m x c_in x c_out + bias + LayerNorm), flatten projection,
    pre-LN blocks (q, k, v, out: D x D + D each; MLP; two LayerNorms), final LayerNorm."""
    n, chans = 0, (1,) + cfg.stem_channels
    mels = cfg.n_mels
    for c_in, c_out, st, sm in zip(chans[:-1], chans[1:], cfg.time_strides, cfg.mel_strides):
        kt, km = max(3, 2 * st - 1), max(3, 2 * sm - 1)
        n += kt * km * c_in * c_out + c_out + 2 * c_out
        mels = math.ceil(mels / sm)
    d, f = cfg.width, cfg.mlp_dim
    n += mels * chans[-1] * d + d
    n += cfg.depth * (4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d)
    return n + 2 * d


def test_param_counts_closed_form_and_docstring():
    counts = E.preset_param_counts()
    doc = E.__doc__
    for name in ("tiny", "cpu", "paper"):
        cfg = getattr(E.FlamConfig, name)()
        c = counts[name]
        assert c["audio_encoder"] == _closed_form_audio_params(cfg.audio)
        if name != "paper":
            t, d, f = cfg.text, cfg.text.width, cfg.text.mlp_dim
            blocks = t.depth * (4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d)
            assert c["text_encoder"] == (t.vocab_size + t.max_length) * d + blocks + 2 * d
        else:  # BERT: embeddings, 6 post-LN layers (the pooler is not built)
            h, f, v = 384, 1536, 30522
            layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
            assert c["text_encoder"] == (v + 512 + 2) * h + 2 * h + 6 * layer
        row = next(line for line in doc.splitlines() if line.strip().startswith(name + " "))
        numbers = [int(x.replace(",", "")) for x in re.findall(r"[\d,]{4,}", row)]
        assert numbers == [c["audio_encoder"], c["text_encoder"], c["flam"],
                           c["flam_without_text_encoder"]], (name, row, c)


# --- configs, errors, vocabulary ---------------------------------------------------------------


def test_config_errors(tiny):
    with pytest.raises(ConfigError, match="time_strides"):
        E.AudioEncoderConfig(stem_channels=(8, 8), time_strides=(2,), mel_strides=(2, 2))
    with pytest.raises(ConfigError, match="num_heads"):
        E.AudioEncoderConfig(width=30, num_heads=4)
    with pytest.raises(ConfigError, match="width"):
        E.AudioEncoderConfig(width=33, num_heads=3)
    with pytest.raises(ConfigError, match="text_source"):
        E.FlamConfig(text_source="roberta")
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="n_mels=16"):
        jax.eval_shape(lambda x: tiny.encode_audio(x), _mel(rng, 1, 8, 20))
    with pytest.raises(ValueError, match="captions"):
        jax.eval_shape(lambda *a: tiny(*a), _mel(rng, 2, 8, 16), _words(rng, 3, 4, 64),
                       _words(rng, 3, 4, 64))
    with pytest.raises(ValueError, match="tuple"):
        tiny.encode_text(jnp.zeros((3, 32)))


def test_word_vocab(tmp_path):
    vocab = E.WordVocab.build(["A dog barks.", "a dog's bark", "Dog runs"], max_size=6)
    # counts: a 2, dog 2, then 1 each for '.', bark, barks, dog's, runs (ties alphabetical)
    assert vocab.tokens == ("[PAD]", "[UNK]", "a", "dog", ".", "bark")
    ids, mask = vocab.encode(["the dog barks.", ""], max_length=3)
    np.testing.assert_array_equal(ids, [[1, 3, 1], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, False]])
    vocab.save(tmp_path / "v.json")
    assert E.WordVocab.load(tmp_path / "v.json") == vocab
    with pytest.raises(ValueError, match="sequence of strings"):
        vocab.encode("a dog", 4)
    with pytest.raises(ValueError, match="not a WordVocab"):
        (tmp_path / "bad.json").write_text("{}")
        E.WordVocab.load(tmp_path / "bad.json")


def test_sinusoidal_positions_formula():
    p = E.sinusoidal_positions(50, 8)
    pos, i = 37, 2
    w = 10000.0 ** (-2 * i / 8)
    np.testing.assert_allclose(p[pos, 2 * i], math.sin(pos * w), atol=1e-6)
    np.testing.assert_allclose(p[pos, 2 * i + 1], math.cos(pos * w), atol=1e-6)
    # <P_a, P_b> depends only on a - b (sum_i cos(w_i (a - b)))
    np.testing.assert_allclose(p[10] @ p[3], p[40] @ p[33], atol=1e-5)
