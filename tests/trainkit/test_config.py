import dataclasses
from typing import Literal, Optional

import pytest
from hypothesis import given, settings, strategies as st

from trainkit.config import (Config, ConfigError, UnknownKeyError, apply_overrides, describe, field,
                             from_dict, keys, load_json, parse_value, save_json, to_dict)


@dataclasses.dataclass(frozen=True)
class Optim(Config):
    lr: float = field(1e-3, gt=0, le=1, help="peak learning rate")
    schedule: str = field("cosine", choices=("cosine", "constant"))
    clip: Optional[float] = field(None, gt=0)


@dataclasses.dataclass(frozen=True)
class Model(Config):
    widths: tuple[int, ...] = field((64, 64))
    norm: Literal["layer", "rms"] = "layer"
    use_bias: bool = True


@dataclasses.dataclass(frozen=True)
class Top(Config):
    steps: int = field(100, ge=1)
    name: str = "run"
    optim: Optim = field(factory=Optim)
    model: Model = field(factory=Model)

    def validate(self):
        if self.name == "forbidden":
            raise self.invalid("name", "must not be 'forbidden'")


def test_defaults_and_keys():
    cfg = Top()
    assert keys(cfg) == ["steps", "name", "optim.lr", "optim.schedule", "optim.clip",
                         "model.widths", "model.norm", "model.use_bias"]
    assert ("optim.lr", 1e-3, "peak learning rate") in describe(cfg)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Top().steps = 3


@pytest.mark.parametrize("override,expected", [
    ("steps=5", ("steps", 5)),
    ("steps=1e3", ("steps", 1000)),
    ("optim.lr=3e-4", ("optim.lr", 3e-4)),
    ("optim.lr=1", ("optim.lr", 1.0)),
    ("optim.clip=none", ("optim.clip", None)),
    ("optim.clip=0.5", ("optim.clip", 0.5)),
    ("model.widths=32,16,8", ("model.widths", (32, 16, 8))),
    ("model.widths=[4]", ("model.widths", (4,))),
    ("model.norm=rms", ("model.norm", "rms")),
    ("model.use_bias=false", ("model.use_bias", False)),
    ("model.use_bias=Yes", ("model.use_bias", True)),
    ("name=a=b", ("name", "a=b")),
])
def test_overrides_parse_to_field_type(override, expected):
    cfg = apply_overrides(Top(), [override])
    value = cfg
    for part in expected[0].split("."):
        value = getattr(value, part)
    assert value == expected[1] and type(value) is type(expected[1])


@pytest.mark.parametrize("override,path,fragment", [
    ("steps=0", "steps", ">= 1"),
    ("steps=abc", "steps", "an integer"),
    ("steps=1.5", "steps", "an integer"),
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("optim.lr=2", "optim.lr", "<= 1"),
    ("optim.lr=nan", "optim.lr", "finite"),
    ("optim.schedule=linear", "optim.schedule", "'cosine', 'constant'"),
    ("model.norm=batch", "model.norm", "'layer', 'rms'"),
    ("model.use_bias=maybe", "model.use_bias", "boolean"),
    ("model.widths=a,b", "model.widths[0]", "an integer"),
    ("name=forbidden", "name", "forbidden"),
    ("optim=3", "optim", "group"),
])
def test_bad_values_name_field_value_and_rule(override, path, fragment):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Top(), [override])
    assert info.value.path == path
    message = str(info.value)
    assert path in message and fragment in message and "\n" not in message


def test_unknown_key_suggests_close_matches():
    with pytest.raises(UnknownKeyError) as info:
        apply_overrides(Top(), ["optim.lrr=1"])
    assert "optim.lr" in str(info.value) and "did you mean" in str(info.value)
    with pytest.raises(UnknownKeyError):
        apply_overrides(Top(), ["steps.inner=1"])


def test_missing_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Top(), ["steps"])


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="'lr'"):
        Optim(lr=0.0)
    with pytest.raises(ConfigError, match="'steps'"):
        Top(steps="3")  # no silent string coercion outside the CLI parser


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 10**9), lr=st.floats(1e-9, 1.0), clip=st.none() | st.floats(1e-6, 1e6),
       widths=st.lists(st.integers(1, 4096), max_size=5), norm=st.sampled_from(["layer", "rms"]),
       use_bias=st.booleans(), name=st.text(max_size=20).filter(lambda s: s != "forbidden"))
def test_json_round_trip(tmp_path_factory, steps, lr, clip, widths, norm, use_bias, name):
    cfg = Top(steps=steps, name=name, optim=Optim(lr=lr, clip=clip),
              model=Model(widths=tuple(widths), norm=norm, use_bias=use_bias))
    assert from_dict(Top, to_dict(cfg)) == cfg
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    save_json(cfg, path)
    assert load_json(Top, path) == cfg


@settings(max_examples=60, deadline=None)
@given(value=st.integers(-10**6, 10**6))
def test_override_round_trip_through_string(value):
    # Whatever an int prints as, parsing gives it back (or a ConfigError naming the field).
    try:
        cfg = apply_overrides(Top(), [f"steps={value}"])
    except ConfigError as err:
        assert value < 1 and err.path == "steps"
    else:
        assert cfg.steps == value


def test_from_dict_rejects_unknown_and_bad_nested():
    with pytest.raises(UnknownKeyError, match="optim.lrr"):
        from_dict(Top, {"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="optim.lr"):
        from_dict(Top, {"optim": {"lr": -1.0}})


def test_load_json_names_line_of_bad_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "steps": 3,\n  oops\n}\n')
    with pytest.raises(ConfigError, match="line 3"):
        load_json(Top, path)


def test_parse_value_optional_tuple():
    assert parse_value("none", Optional[tuple[int, ...]]) is None
    assert parse_value("1,2", Optional[tuple[int, ...]]) == (1, 2)
    assert parse_value("1, 2.5", tuple[int, float]) == (1, 2.5)
    with pytest.raises(ConfigError):
        parse_value("1", tuple[int, float])


@dataclasses.dataclass(frozen=True)
class Schedule(Config):
    """Cross-field rule: warmup must fit in the run."""
    steps: int = field(100, ge=1)
    warmup: int = field(10, ge=0)

    def validate(self):
        if self.warmup > self.steps:
            raise self.invalid("warmup", f"must be <= steps ({self.steps})")


@dataclasses.dataclass(frozen=True)
class Outer(Config):
    schedule: Schedule = field(factory=Schedule)


@pytest.mark.parametrize("order", [["schedule.steps=1000", "schedule.warmup=500"],
                                   ["schedule.warmup=500", "schedule.steps=1000"]])
def test_cross_field_rules_do_not_depend_on_override_order(order):
    cfg = apply_overrides(Outer(), order)
    assert (cfg.schedule.steps, cfg.schedule.warmup) == (1000, 500)


def test_cross_field_rule_still_fails_after_all_overrides():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Outer(), ["schedule.warmup=500", "schedule.steps=200"])
    assert err.value.path == "schedule.warmup" and "must be <= steps (200)" in str(err.value)
    with pytest.raises(ConfigError):  # direct construction is still validated at once
        Schedule(steps=5, warmup=6)
