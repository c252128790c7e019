"""Damaged run directories, for every registered experiment (no per-experiment test code: an
experiment added to the registry is covered by registering it).

Each case calls the CLI in-process, before any training: a ``--resume`` into a run directory
that belongs to another experiment, and into one whose config.json holds a value of the
wrong type. Both must end in exit code 2 and one ``error:`` line naming what is wrong, and
must leave the directory's files as they were. (Kill/resume exactness and damaged
checkpoints are proven on quickstart in test_quickstart.py / test_cli_errors.py and per
trainer in their own tests; docs/reliability.md lists which.)
"""

import dataclasses
import json

import pytest

from experiments.registry import REGISTRY, get
from tests.experiments.test_cli_errors import assert_one_line_error, cli
from trainkit.config import Config, save_json
from trainkit.run import write_json

NAMES = sorted(REGISTRY)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _snapshot(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def _first_int_field(cfg: Config, prefix: str = "") -> str:
    """The dotted key of the first integer field of ``cfg`` (nested configs included)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            try:
                return _first_int_field(value, f"{prefix}{f.name}.")
            except LookupError:
                continue
        if isinstance(value, int) and not isinstance(value, bool):
            return prefix + f.name
    raise LookupError("no integer field")


@pytest.mark.parametrize("name", NAMES)
def test_resume_into_another_experiments_run_dir_is_refused(name, tmp_path, capsys):
    other = next(n for n in NAMES if n != name)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_json(get(name).preset("smoke"), run_dir / "config.json")
    write_json(run_dir / "run.json", {"experiment": other, "preset": "smoke", "seeds": 1})
    before = _snapshot(run_dir)
    code, _, err = cli(["run", name, "--resume", "--run-dir", run_dir], capsys)
    assert_one_line_error(code, err, run_dir, f"'{other}'", f"'{name}'")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("name", NAMES)
def test_resume_with_a_config_value_of_the_wrong_type_names_the_key(name, tmp_path, capsys):
    cfg = get(name).preset("smoke")
    key = _first_int_field(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_json(cfg, run_dir / "config.json")
    data = json.loads((run_dir / "config.json").read_text())
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = "not-a-number"
    (run_dir / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    write_json(run_dir / "run.json", {"experiment": name, "preset": "smoke", "seeds": 1})
    before = _snapshot(run_dir)
    code, _, err = cli(["run", name, "--resume", "--run-dir", run_dir], capsys)
    assert_one_line_error(code, err, f"'{key}'", "'not-a-number'")
    assert _snapshot(run_dir) == before
