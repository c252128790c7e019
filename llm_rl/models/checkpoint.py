"""Read and write HF-format checkpoints (``config.json`` + safetensors) for the model zoo.

:func:`from_pretrained` reads a local HF directory: ``config.json`` picks the family (by
``architectures``, else ``model_type``), the family's declarative key table
(:mod:`llm_rl.models.keymap`) says where each NNX parameter comes from, and each tensor is
read alone (``safe_open(..., framework="numpy")``; bfloat16 arrives as an ``ml_dtypes``
array), checked, transformed, cast and, given a mesh, placed straight onto its
``NamedSharding`` with ``jax.make_array_from_callback`` (each device receives only its shard;
host memory holds one tensor at a time).

:func:`save_pretrained` writes the inverse: ``config.json`` and ``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json`` beyond
``max_shard_bytes``; transformers' ``AutoModelForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llm_rl.models import llama, qwen2, qwen3
from llm_rl.models.keymap import IGNORED_HF_KEYS
from llm_rl.models.layers import CausalLM, DecoderConfig, ValueModel
from trainkit.checkpoint import CheckpointError
from trainkit.config import ConfigError
from trainkit.nn.keymap import (KeyRule, MissingTensorError, TensorShapeError, find_rule,
                                open_safetensors, read_config_json)
from trainkit.sharding import DEFAULT_RULES, param_shardings, to_host

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class UnknownArchitectureError(CheckpointError):
    """``config.json`` names an architecture the zoo does not implement."""


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str
    model_type: str
    config_class: type[DecoderConfig]
    model_class: type[CausalLM]
    keys: tuple[KeyRule, ...]


FAMILIES: tuple[Family, ...] = tuple(
    Family(m.config_class.architecture, m.config_class.model_type, m.config_class, m, keys)
    for m, keys in ((qwen2.Qwen2ForCausalLM, qwen2.HF_KEYS), (qwen3.Qwen3ForCausalLM, qwen3.HF_KEYS),
                    (llama.LlamaForCausalLM, llama.HF_KEYS)))


def family_for(hf: dict[str, Any], where: str = "config.json") -> Family:
    """The family named by ``architectures`` (or, when that is absent, ``model_type``)."""
    archs = hf.get("architectures") or []
    by_arch = {f.architecture: f for f in FAMILIES}
    for arch in archs:
        if arch in by_arch:
            return by_arch[arch]
    if not archs:
        for fam in FAMILIES:
            if hf.get("model_type") == fam.model_type:
                return fam
    known = ", ".join(f.architecture for f in FAMILIES)
    raise UnknownArchitectureError(
        f"{where}: unsupported architecture (architectures={archs!r}, "
        f"model_type={hf.get('model_type')!r}); supported: {known}")


def family_of_config(cfg: DecoderConfig) -> Family:
    for fam in FAMILIES:
        if type(cfg) is fam.config_class:
            return fam
    raise UnknownArchitectureError(f"no checkpoint family for config type {type(cfg).__name__}")


def _flat(state: Any) -> list[tuple[tuple, Any]]:
    return list(nnx.to_flat_state(state))


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


class _Tensors:
    """The tensors of one checkpoint directory (single file or index + shards)."""

    def __init__(self, root: Path, stack: contextlib.ExitStack):
        self.root, self._stack, self._open = root, stack, {}
        if (root / SINGLE_FILE).exists():
            self.index = None
            self.weight_map = {k: SINGLE_FILE for k in self._handle(SINGLE_FILE).keys()}
        elif (root / INDEX_FILE).exists():
            self.index = root / INDEX_FILE
            try:
                self.weight_map = dict(json.loads(self.index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{self.index}: not a safetensors index ({err})") from None
        else:
            raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                                  "checkpoints are supported)")

    def _handle(self, filename: str):
        if filename not in self._open:
            path = self.root / filename
            if not path.exists():
                raise CheckpointError(f"{path}: missing (listed in {self.index})")
            self._open[filename] = self._stack.enter_context(open_safetensors(path))
        return self._open[filename]

    def _locate(self, key: str, wanted_by: str):
        filename = self.weight_map.get(key)
        where = self.index if self.index is not None else self.root / SINGLE_FILE
        if filename is None:
            raise MissingTensorError(f"tensor {key!r} (for parameter {wanted_by}) is missing from {where}")
        handle = self._handle(filename)
        if key not in handle.keys():
            raise MissingTensorError(f"tensor {key!r} (for parameter {wanted_by}) is missing from "
                                     f"{self.root / filename} (the index {self.index} lists it there)")
        return handle, self.root / filename

    def read(self, key: str, expected_shape: tuple[int, ...], wanted_by: str) -> np.ndarray:
        handle, file = self._locate(key, wanted_by)
        shape = tuple(handle.get_slice(key).get_shape())
        if shape != tuple(expected_shape):
            raise TensorShapeError(f"tensor {key!r} in {file} has shape {shape}, expected "
                                   f"{tuple(expected_shape)} for parameter {wanted_by}")
        return handle.get_tensor(key)


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None, *, value_head: bool = False,
                    seed: int = 0) -> tuple[nnx.Module, DecoderConfig]:
    """Load ``(model, config)`` from a local HF directory.

    ``dtype``: parameter (and compute) dtype. ``mesh``/``rules``: place every parameter on
    ``NamedSharding(mesh, logical_to_mesh(axes, rules))`` as it is read (default rules
    :data:`trainkit.sharding.DEFAULT_RULES`). ``value_head=True`` returns a
    :class:`~llm_rl.models.layers.ValueModel`: the trunk from the checkpoint, the scalar head
    initialised from ``seed`` (the LM head, if any, is not read).

    Raises :class:`UnknownArchitectureError`, :class:`MissingTensorError`,
    :class:`TensorShapeError` or :class:`CheckpointError`, each naming the file and key."""
    root = Path(path)
    hf = read_config_json(root)
    fam = family_for(hf, str(root / "config.json"))
    try:
        cfg = fam.config_class.from_hf_config(hf)
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{root / 'config.json'}: {err}") from None
    model_cls = ValueModel if value_head else fam.model_class
    build = lambda: model_cls(cfg, param_dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    rules = DEFAULT_RULES if rules is None else rules
    shardings = ({_name(p): v.get_value() for p, v in _flat(param_shardings(abstract, mesh, rules))}
                 if mesh is not None else {})
    fresh_prefixes = getattr(model_cls, "FRESH_PARAMS", ())
    is_fresh = lambda name: any(name == f or name.startswith(f + ".") for f in fresh_prefixes)
    fresh = {}
    if fresh_prefixes:  # initialise only those (jit drops the rest of the init as dead code)
        fresh = jax.jit(lambda: {_name(p): v.get_value() for p, v in _flat(nnx.state(build()))
                                 if is_fresh(_name(p))})()
    used: set[str] = set()
    leaves = []
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(root, stack)
        for p, var in _flat(abstract):
            name, spec = _name(p), var.get_value()
            if is_fresh(name):
                value = _place(np.asarray(fresh[name]), shardings.get(name))
            else:
                found = find_rule(fam.keys, name)
                if found is None:
                    raise CheckpointError(f"{fam.architecture}: no HF key rule for parameter {name}")
                rule, key = found
                host = tensors.read(key, rule.transform.hf_shape(spec.shape), name)
                # astype(copy=False): no host copy when the file already has the dtype; the
                # only other copy is the device's (benchmarks/RESULTS.md, loading memory).
                host = np.asarray(rule.transform.to_nnx(host, spec.shape)).astype(spec.dtype, copy=False)
                value = _place(host, shardings.get(name))
                del host
                used.add(key)
            leaves.append((p, var.replace(value)))
        unused = sorted(k for k in tensors.weight_map if k not in used and not IGNORED_HF_KEYS.match(k)
                        and not (k == "lm_head.weight" and (cfg.tie_word_embeddings or value_head)))
    if unused:
        log.warning("%s: %d tensors not used by %s: %s", root, len(unused), model_cls.__name__,
                    ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves)), cfg


def _dtype_name(dtype: Any) -> str:
    return {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(
        np.dtype(dtype).name, np.dtype(dtype).name)


def save_pretrained(model: nnx.Module, config: DecoderConfig | None, path: str | os.PathLike, *,
                    dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as an HF checkpoint that ``transformers`` loads.

    ``config`` defaults to ``model.config`` (and must equal it if given). ``dtype`` casts the
    saved tensors (default: the parameter dtype). Tensors are written in key-table order into
    shards of at most ``max_shard_bytes`` (a single ``model.safetensors`` when everything
    fits). Call it on every process of a multi-host run: parameters are gathered
    (:func:`trainkit.sharding.to_host`) shard by shard, and process 0 writes."""
    if isinstance(model, ValueModel):
        raise TypeError("a ValueModel has no transformers counterpart; save its params with "
                        "trainkit checkpoints (save_pretrained writes causal LMs)")
    config = model.config if config is None else config
    if config != model.config:
        raise ValueError(f"config {config} does not describe this model ({model.config})")
    fam = family_of_config(config)
    root = Path(path)
    writer = jax.process_index() == 0
    if writer:
        root.mkdir(parents=True, exist_ok=True)
    entries = []  # (hf key, variable, rule)
    for p, var in _flat(nnx.state(model, nnx.Param)):
        found = find_rule(fam.keys, _name(p))
        if found is None:
            raise CheckpointError(f"{fam.architecture}: no HF key rule for parameter {_name(p)}")
        entries.append((found[1], var.get_value(), found[0]))
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(entries[0][1].dtype)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1].shape) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    from safetensors.numpy import save_file

    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for filename, shard in zip(names, shards):
        arrays = {key: np.ascontiguousarray(rule.transform.to_hf(to_host(value).astype(out_dtype)))
                  for key, value, rule in shard}
        weight_map.update({key: filename for key in arrays})
        total += sum(a.nbytes for a in arrays.values())
        if writer:
            save_file(arrays, str(root / filename), metadata={"format": "pt"})
    if writer:
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf = {**config.to_hf_config(), "dtype": _dtype_name(out_dtype), "torch_dtype": _dtype_name(out_dtype)}
        (root / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return root
