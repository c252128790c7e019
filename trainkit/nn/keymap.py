"""Declarative mapping between HF safetensors keys and NNX parameter paths, and the errors and
readers every HF-checkpoint loader of the library shares (the LM zoo's ``from_pretrained``,
the MiniLM text encoder).

A table is a tuple of :class:`KeyRule` rows ``(hf, nnx, transform)``. ``hf`` and ``nnx`` are
templates whose ``{name}`` fields match a layer index; each template compiles to a regex, so
a row maps both ways: an NNX path to the HF key it is read from (loading) and written to
(saving). ``transform`` says how the tensor changes on the way:

- :data:`SAME`: same shape (norm scales, embeddings).
- :class:`Flatten`: HF stores ``prod(shape)`` values as a vector (q/k/v biases ``[N*H]``,
  ours ``[N, H]``).
- :class:`Linear`: an ``nn.Linear`` weight ``[out, in]`` becomes our kernel ``[in..., out...]``
  (transpose, then split heads): ``n_in`` leading dims of our kernel are input dims.

Parameters that no row matches are a bug (or, for a value head, listed in the model's
``FRESH_PARAMS`` and initialised instead of read).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainkit.checkpoint import CheckpointError


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the key table asks for is not in the checkpoint (the message names the file,
    the HF key and the parameter)."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0])


class TensorShapeError(CheckpointError, ValueError):
    """A tensor has another shape than the parameter it is read into."""


def read_config_json(root: Path) -> dict[str, Any]:
    """``root/config.json`` as a dict; :class:`CheckpointError` naming the file (and the line of
    a JSON error) when it is missing or broken."""
    path = Path(root) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (not an HF model directory?)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def check_json_file(path: Path, error: type[Exception] = CheckpointError) -> None:
    """Raise ``error`` naming ``path`` (and the line) if ``path`` exists but is not valid JSON,
    as a truncated download or copy leaves it; a missing file is left to the caller."""
    if not Path(path).is_file():
        return
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}: line {err.lineno}: not valid JSON ({err.msg}); the file is damaged "
                    "or incomplete: copy or save it again") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; the file is damaged: copy or save it again") from None


def open_safetensors(path: Path):
    """``safe_open(path, framework="numpy")``; a truncated or otherwise unreadable file raises
    :class:`CheckpointError` naming it instead of safetensors' own error (which names neither
    the file nor what to do)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as err:  # safetensors raises its own (Rust-side) error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); the file is "
                              "damaged or incomplete: copy or save it again") from None


class Transform:
    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def to_nnx(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Same(Transform):
    def hf_shape(self, shape):
        return tuple(shape)

    def to_nnx(self, x, shape):
        return x

    def to_hf(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class Flatten(Transform):
    def hf_shape(self, shape):
        return (math.prod(shape),)

    def to_nnx(self, x, shape):
        return x.reshape(shape)

    def to_hf(self, x):
        return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    """HF ``W [out, in]`` <-> kernel ``[in_dims..., out_dims...]`` with ``n_in`` input dims:
    ``kernel = W^T`` reshaped."""

    n_in: int = 1

    def hf_shape(self, shape):
        return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

    def to_nnx(self, x, shape):
        # A view (transpose, then split/merge axes by strides): the loader copies once, onto
        # the device, instead of holding a transposed host copy as well.
        return x.T.reshape(shape)

    def to_hf(self, x):
        n_in = math.prod(x.shape[:self.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)


SAME = Same()


@functools.lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\d+)")
    return re.compile("".join(out) + r"\Z")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str
    nnx: str
    transform: Transform = SAME

    def nnx_to_hf(self, path: str) -> str | None:
        m = _compile(self.nnx).match(path)
        return self.hf.format(**m.groupdict()) if m else None

    def hf_to_nnx(self, key: str) -> str | None:
        m = _compile(self.hf).match(key)
        return self.nnx.format(**m.groupdict()) if m else None


def find_rule(rules: Sequence[KeyRule], nnx_path: str) -> tuple[KeyRule, str] | None:
    """The first rule whose NNX template matches ``nnx_path``, with the HF key it maps to."""
    for rule in rules:
        key = rule.nnx_to_hf(nnx_path)
        if key is not None:
            return rule, key
    return None
