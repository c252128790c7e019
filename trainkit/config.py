"""Frozen-dataclass configs: validated at construction, overridable from the CLI, saved as JSON.

A config is a frozen dataclass deriving from :class:`Config` whose fields are declared with
:func:`field` (bounds, choices, help). Construction validates every field, so a bad value
never reaches training code::

    @dataclasses.dataclass(frozen=True)
    class Optim(Config):
        lr: float = field(1e-3, gt=0, help="peak learning rate")
        schedule: str = field("cosine", choices=("cosine", "constant"))

    cfg = apply_overrides(Optim(), ["lr=3e-4"])   # -> Optim(lr=0.0003, ...)
    apply_overrides(cfg, ["lr=-1"])               # ConfigError: 'lr' = -1.0: must be > 0

Supported field types: bool, int, float, str, ``Literal[...]``, ``Optional[T]``,
``tuple[T, ...]``/``tuple[T1, T2]`` and nested :class:`Config` groups.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import contextvars
import types
import typing
from typing import Any, Literal, Sequence, TypeVar

C = TypeVar("C", bound="Config")

# While a list of overrides is applied, cross-field rules (``validate``) wait until the end,
# so that ``--set a=x --set b=y`` and ``--set b=y --set a=x`` are accepted alike.
_DEFER_CROSS_FIELD = contextvars.ContextVar("defer_cross_field", default=False)

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A config value is invalid. ``str(err)`` is one line naming the field, value and rule."""

    def __init__(self, path: str, value: Any, allowed: str):
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"config field '{path}' = {value!r} is invalid: {allowed}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its path prefixed by the enclosing group's name."""
        return ConfigError(f"{prefix}.{self.path}", self.value, self.allowed)


class UnknownKeyError(ConfigError):
    def __init__(self, path: str, known: Sequence[str]):
        close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else (
            f"known keys: {', '.join(known)}")
        self.path, self.value, self.allowed = path, None, hint
        ValueError.__init__(self, f"unknown config key '{path}': {hint}")


def field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, choices: Sequence[Any] | None = None, help: str = ""):
    """A config field with its validation rules (checked in ``Config.__post_init__``)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt,
            "choices": tuple(choices) if choices is not None else None, "help": help}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Config)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            name = f"a comma-separated list of {_type_name(args[0])}"
        else:
            name = "a tuple (" + ", ".join(_type_name(a) for a in args) + ")"
    elif isinstance(tp, type):
        name = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
                str: "a string"}.get(tp, tp.__name__)
    else:
        name = str(tp)
    return name + (" or none" if optional else "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in canonical form (int -> float,
    list -> tuple). Raises ConfigError naming ``path``."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(path, value, f"must be {_type_name(tp)}")
    tp = inner
    origin = typing.get_origin(tp)
    bad = ConfigError(path, value, f"must be {_type_name(tp)}")
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    return value  # unannotated/exotic types are the config author's responsibility


@dataclasses.dataclass(frozen=True)
class Config:
    """Base for frozen configs. Subclasses may override :meth:`validate` for cross-field rules
    and raise ``ConfigError`` via :meth:`invalid`."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            value = _coerce(value, hints.get(f.name, Any), f.name)
            object.__setattr__(self, f.name, value)
            _check_rules(f, value)
        if not _DEFER_CROSS_FIELD.get():
            self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ``self.invalid(...)`` on failure."""

    def invalid(self, name: str, allowed: str) -> ConfigError:
        return ConfigError(name, getattr(self, name), allowed)


def _check_rules(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f.name, value, "must be one of " + ", ".join(repr(c) for c in choices))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, value, "must be a finite number")
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f.name, value, f"must be {word} {bound}")


# --- keys, overrides -------------------------------------------------------------------------


def keys(cfg_or_cls: Config | type[Config], prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config (``["optim.lr", "steps", ...]``)."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_config_type(tp):
            out.extend(keys(tp, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


def describe(cfg: Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, current value, help) for every leaf of ``cfg``."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            out.extend(describe(value, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, value, f.metadata.get("help", "")))
    return out


def parse_value(text: str, tp: Any, path: str = "value") -> Any:
    """Parse a command-line string into the type annotated as ``tp``."""
    inner, optional = _unwrap_optional(tp)
    stripped = text.strip()
    if optional and stripped.lower() in _NONE_WORDS:
        return None
    tp = inner
    origin = typing.get_origin(tp)
    bad = ConfigError(path, text, f"must be {_type_name(tp if not optional else typing.Optional[tp])}")
    if origin is Literal:
        for choice in typing.get_args(tp):
            if stripped == str(choice):
                return choice
        raise bad
    if origin is tuple:
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError:
                raise bad from None
            return _coerce(items, tp, path)
        parts = [p for p in stripped.strip("()").split(",") if p.strip()]
        args = typing.get_args(tp)
        item_types = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(parts):
            raise bad
        return tuple(parse_value(p, t, f"{path}[{i}]") for i, (p, t) in enumerate(zip(parts, item_types)))
    if _is_config_type(tp):
        raise ConfigError(path, text, f"is a group of settings; set its fields, e.g. "
                                      f"'{path}.{keys(tp)[0]}=...'")
    if tp is bool:
        if stripped.lower() in _TRUE_WORDS:
            return True
        if stripped.lower() in _FALSE_WORDS:
            return False
        raise bad
    if tp is int:
        try:
            return int(stripped)
        except ValueError:
            try:
                as_float = float(stripped)  # accept "1e4"
            except ValueError:
                raise bad from None
            if math.isfinite(as_float) and as_float.is_integer():
                return int(as_float)
            raise bad from None
    if tp is float:
        try:
            return float(stripped)
        except ValueError:
            raise bad from None
    if tp is str:
        return text
    raise ConfigError(path, text, f"has type {tp!r}, which cannot be set from the command line")


class OverrideSyntaxError(ConfigError):
    def __init__(self, item: str):
        self.path, self.value, self.allowed = item, item, "key=value"
        ValueError.__init__(self, f"override '{item}' must look like key=value (e.g. optim.lr=3e-4)")


class ConfigFileError(ConfigError):
    def __init__(self, path: str, message: str):
        self.path, self.value, self.allowed = path, None, message
        ValueError.__init__(self, f"{path}: {message}")


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise OverrideSyntaxError(item)
    key, value = item.split("=", 1)
    return key.strip(), value


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """Return ``cfg`` with each ``"a.b=value"`` applied (parsed to the field's type, validated).

    Each value is checked against its field's rules as it is applied; cross-field rules
    (:meth:`Config.validate`) run once all overrides are in, so their order does not matter.
    """
    token = _DEFER_CROSS_FIELD.set(True)
    try:
        for item in overrides:
            key, text = split_override(item)
            cfg = _set(cfg, key.split("."), text, known=keys(cfg), full_key=key)
    finally:
        _DEFER_CROSS_FIELD.reset(token)
    _validate_tree(cfg)
    return cfg


def _validate_tree(cfg: Config) -> None:
    """Run every group's cross-field rules, innermost first; errors carry the full path."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            try:
                _validate_tree(value)
            except ConfigError as err:
                raise err.under(f.name) from None
    cfg.validate()


def _set(cfg: Config, parts: list[str], text: str, *, known: list[str], full_key: str) -> Config:
    names = {f.name: f for f in dataclasses.fields(cfg)}
    head = parts[0]
    if head not in names:
        raise UnknownKeyError(full_key, known)
    hints = typing.get_type_hints(type(cfg))
    current = getattr(cfg, head)
    try:
        if len(parts) == 1:
            new_value = parse_value(text, hints[head], head)
        else:
            if not isinstance(current, Config):
                raise UnknownKeyError(full_key, known)
            new_value = _set(current, parts[1:], text, known=known, full_key=full_key)
        return dataclasses.replace(cfg, **{head: new_value})
    except UnknownKeyError:
        raise
    except ConfigError as err:
        if len(parts) > 1 and not err.path.startswith(head + "."):
            raise err.under(head) from None
        raise


# --- JSON -----------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Rebuild a config from :func:`to_dict` output; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or cls.__name__, data, "must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UnknownKeyError(prefix + key, keys(cls, prefix))
    kwargs = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if _is_config_type(tp) and value is not None:
            value = from_dict(tp, value, f"{prefix}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise (err.under(prefix.rstrip(".")) if prefix else err) from None


def save_json(cfg: Config, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def load_json(cls: type[C], path: str | os.PathLike) -> C:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ConfigFileError(str(path), f"line {err.lineno}: invalid JSON ({err.msg})") from None
    except OSError as err:
        raise ConfigFileError(str(path), f"cannot read ({err.strerror})") from None
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigFileError(str(path), str(err)) from None
