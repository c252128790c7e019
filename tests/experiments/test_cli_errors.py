"""Bad user input to `python -m experiments` ends in exit code 2 and ONE line on stderr.

The contract (experiments/__main__.py): a user error is reported as a single line starting
with "error:" that names the offending thing (experiment, key, value, file, directory), with
no traceback. Most cases call ``experiments.__main__.main(argv)`` in-process; two run the
real command in a subprocess, where anything a library prints (orbax logs, tracebacks from
background threads or at interpreter exit) would also show.
"""

import json
import os
import random
import shutil

import jax
import pytest

from experiments.__main__ import main
from experiments.quickstart import smoke
from tests.helpers import REPO, run_cli
from trainkit.config import save_json

# A run with two checkpoints (10 and 20) in a few seconds.
SMALL = ["--set", "train.steps=20", "--set", "train.save_every=10", "--set", "train.chunk_size=10",
         "--set", "train.eval_every=10"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """A run without --run-dir would go to ./runs: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


def cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *names):
    """Exit code 2, exactly one stderr line, starting "error:", naming each of ``names``."""
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# --- mistakes in the command line itself (nothing touches the disk) --------------------------

RUN = ["run", "quickstart"]

COMMAND_LINE_CASES = {
    "unknown experiment": (["run", "quickstrat"], ["'quickstrat'", "did you mean quickstart"]),
    "unknown experiment in show": (["show", "quickstrat"], ["'quickstrat'", "did you mean quickstart"]),
    "unknown config key": (RUN + ["--set", "train.step=5"], ["'train.step'", "did you mean 'train.steps'"]),
    "wrong type": (RUN + ["--set", "train.steps=abc"], ["'train.steps'", "'abc'", "integer"]),
    "out of range": (RUN + ["--set", "optim.lr=-1"], ["'optim.lr'", "-1", "> 0"]),
    "bad choice": (RUN + ["--set", "model.activation=foo"], ["'model.activation'", "'foo'", "'gelu'"]),
    "override without =": (RUN + ["--set", "train.steps"], ["train.steps", "key=value"]),
    "setting a group": (RUN + ["--set", "model=3"], ["'model'", "group of settings"]),
    "unknown preset": (RUN + ["--preset", "huge"], ["'huge'", "smoke, cpu, paper"]),
    "unknown preset in show": (["show", "quickstart", "--preset", "huge"], ["'huge'"]),
    "zero seeds": (RUN + ["--seeds", "0"], ["--seeds", "0"]),
    "seeds not an integer": (RUN + ["--seeds", "two"], ["--seeds", "'two'"]),
    "resume without run dir": (RUN + ["--resume"], ["--resume", "--run-dir"]),
    "unknown option": (RUN + ["--sed", "train.steps=5"], ["--sed"]),
    "unknown command": (["frobnicate"], ["'frobnicate'"]),
    "no command": ([], ["command"]),
}


@pytest.mark.parametrize("argv,names", COMMAND_LINE_CASES.values(), ids=COMMAND_LINE_CASES.keys())
def test_command_line_mistake_is_one_line_exit_2(argv, names, capsys, tmp_path):
    code, _, err = cli(argv, capsys)
    assert_one_line_error(code, err, *names)
    assert not (tmp_path / "runs").exists(), "a rejected command must not create a run directory"


# --- mistakes about directories and files ----------------------------------------------------


def test_resume_with_missing_run_dir(capsys, tmp_path):
    missing = tmp_path / "nope"
    code, _, err = cli(RUN + ["--resume", "--run-dir", missing], capsys)
    assert_one_line_error(code, err, missing, "does not exist")
    assert not missing.exists()


def test_resume_on_dir_without_config_json(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(RUN + ["--resume", "--run-dir", empty], capsys)
    assert_one_line_error(code, err, empty, "config.json")


def test_resume_on_dir_with_config_json_but_no_run_json(capsys, tmp_path):
    """A valid config.json alone is not a run: resuming it used to train from scratch."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_json(smoke(), run_dir / "config.json")
    before = (run_dir / "config.json").read_bytes()
    code, _, err = cli(RUN + ["--resume", "--run-dir", run_dir], capsys)
    assert_one_line_error(code, err, run_dir / "run.json", "missing")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    assert (run_dir / "config.json").read_bytes() == before


def test_resume_with_corrupt_config_json_names_file_and_line(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_json(smoke(), run_dir / "config.json")
    lines = (run_dir / "config.json").read_text().splitlines()
    assert lines[2].strip().startswith('"')  # line 3 is a key of the top-level object
    lines[2] = lines[2].replace('"', "", 1)  # drop a quote: invalid JSON on line 3
    (run_dir / "config.json").write_text("\n".join(lines) + "\n")
    code, _, err = cli(RUN + ["--resume", "--run-dir", run_dir], capsys)
    assert_one_line_error(code, err, run_dir / "config.json", "line 3")


def test_resume_with_config_json_of_wrong_shape_names_the_key(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"train": {"steps": "many"}}\n')
    code, _, err = cli(RUN + ["--resume", "--run-dir", run_dir], capsys)
    assert_one_line_error(code, err, "'train.steps'", "'many'")


def test_unwritable_run_dir(capsys, tmp_path):
    (tmp_path / "file").write_text("a regular file, so nothing can be created under it\n")
    run_dir = tmp_path / "file" / "run"
    code, _, err = cli(RUN + ["--run-dir", run_dir], capsys)
    assert_one_line_error(code, err, run_dir, "cannot write")


def test_report_on_a_directory_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    code, _, err = cli(["report", tmp_path], capsys)
    assert_one_line_error(code, err, tmp_path, "not a run directory")


def test_report_on_a_missing_directory(capsys, tmp_path):
    code, _, err = cli(["report", tmp_path / "nope"], capsys)
    assert_one_line_error(code, err, tmp_path / "nope", "does not exist")


def test_combine_of_an_experiment_that_runs_its_seeds_inside_one_run(capsys, tmp_path):
    runs = []
    for seed in (0, 1):
        path = tmp_path / f"s{seed}"
        path.mkdir()
        save_json(smoke(), path / "config.json")
        (path / "run.json").write_text(json.dumps({"experiment": "quickstart"}))
        runs.append(path)
    code, _, err = cli(["combine", tmp_path / "out", *runs], capsys)
    assert_one_line_error(code, err, "quickstart", "--seeds N")
    (runs[1] / "run.json").write_text(json.dumps({"experiment": "dlc"}))
    code, _, err = cli(["combine", tmp_path / "out", *runs], capsys)
    assert_one_line_error(code, err, "one experiment", "dlc", "quickstart")


def test_mesh_that_does_not_fit_the_devices(capsys, tmp_path):
    if jax.device_count() == 3:
        pytest.skip("3 devices do fit mesh.data=3")
    code, _, err = cli(RUN + ["--run-dir", tmp_path / "run", "--set", "mesh.data=3"], capsys)
    assert_one_line_error(code, err, "mesh", "'data': 3", f"{jax.device_count()} available")


def test_batch_not_divisible_by_the_mesh(capsys, tmp_path):
    n = jax.device_count()
    if n < 2:
        pytest.skip("every batch size divides one device")
    batch = 4 * n + 1
    code, _, err = cli(RUN + ["--run-dir", tmp_path / "run", "--set", f"train.batch_size={batch}"],
                       capsys)
    assert_one_line_error(code, err, f"train.batch_size={batch}", f"{n} data x fsdp devices")


# --- mistakes about a real run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real quickstart run (in-process) with checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(["run", "quickstart", "--run-dir", str(run_dir), *SMALL]) == 0
    assert _checkpoint_steps(run_dir) == [10, 20]
    return run_dir


def _checkpoint_steps(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _corrupt_checkpoint(run_dir, step, how):
    """Damage every file of checkpoint ``step``: ``truncate`` cuts each to half its length
    (the JSON metadata breaks first); ``garble`` overwrites the array data with random bytes
    (the metadata stays readable, so the failure comes from reading the arrays)."""
    step_dir = run_dir / "checkpoints" / str(step)
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    if how == "garble":
        files = [p for p in files if p.parent.name == "d"]  # ocdbt data files: state/**/d/*
    assert files, f"nothing to corrupt under {step_dir}"
    rng = random.Random(0)
    for path in files:
        size = path.stat().st_size
        if how == "truncate":
            os.truncate(path, size // 2)
        else:
            path.write_bytes(rng.randbytes(size))
    return step_dir


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_resume_from_corrupt_checkpoint_falls_back_to_the_one_before(how, trained_run, capsys,
                                                                       tmp_path):
    """The latest checkpoint (20) damaged: ``--resume`` warns in one line, sets it aside,
    resumes from 10 and ends with exactly the parameters of the run that never broke."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    step_dir = _corrupt_checkpoint(run_dir, 20, how)
    code, _, err = cli(RUN + ["--run-dir", run_dir, "--resume", *SMALL], capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint {step_dir} cannot be "
                                                   "restored"), err
    assert "damaged-20" in lines[0] and lines[0].endswith("resuming from step 10")
    assert _checkpoint_steps(run_dir) == [10, 20]
    assert (run_dir / "checkpoints" / "damaged-20").is_dir()
    assert _summary(run_dir)["params_sha256"] == _summary(trained_run)["params_sha256"]


@pytest.mark.slow
def test_resume_with_no_readable_checkpoint_is_one_error_and_changes_nothing(trained_run,
                                                                             capsys, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    _corrupt_checkpoint(run_dir, 10, "truncate")
    step_dir = _corrupt_checkpoint(run_dir, 20, "truncate")
    code, _, err = cli(RUN + ["--run-dir", run_dir, "--resume", "--set", "train.steps=40"], capsys)
    assert_one_line_error(code, err, f"checkpoint {step_dir}", "cannot be restored")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "20"], \
        "a failed resume must not write or move checkpoints"


@pytest.mark.slow
def test_run_dir_that_already_holds_a_run_needs_resume(trained_run, capsys):
    config_before = (trained_run / "config.json").read_bytes()
    code, _, err = cli(RUN + ["--run-dir", trained_run, "--set", "train.steps=40"], capsys)
    assert_one_line_error(code, err, trained_run, "already holds a run", "--resume")
    assert (trained_run / "config.json").read_bytes() == config_before, "the run was touched"


# --- end to end in a subprocess: nothing else reaches stderr ---------------------------------


@pytest.fixture(scope="module")
def cli_env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRAINKIT_NO_PROGRESS"] = "1"
    return env


@pytest.fixture(scope="module")
def trained_run_subprocess(tmp_path_factory, cli_env):
    run_dir = tmp_path_factory.mktemp("trained-subprocess") / "run"
    res = run_cli(["run", "quickstart", "--run-dir", str(run_dir), *SMALL], cli_env, timeout=120)
    assert res.returncode == 0, res.stderr
    return run_dir


def _assert_subprocess_one_line_error(res, *names):
    assert res.returncode == 2, res.stderr
    assert res.stdout == "", res.stdout
    return assert_one_line_error(res.returncode, res.stderr, *names)


@pytest.mark.slow
def test_subprocess_unknown_config_key(cli_env, tmp_path):
    res = run_cli(["run", "quickstart", "--run-dir", str(tmp_path / "run"), "--set", "train.step=5"],
                  cli_env, timeout=120)
    _assert_subprocess_one_line_error(res, "'train.step'", "did you mean 'train.steps'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_subprocess_resume_from_corrupt_checkpoint(how, trained_run_subprocess, cli_env, tmp_path):
    """Nothing but the one line reaches stderr. ``truncate`` damages both checkpoints (the
    error path), ``garble`` only the latest (the fallback path, which must say one warning
    line). Before the fix in experiments/__main__.py, "truncate" also printed orbax's absl
    ERROR line and "garble" a "RuntimeError: Event loop is closed" traceback after the error."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_subprocess, run_dir)
    if how == "truncate":
        _corrupt_checkpoint(run_dir, 10, how)
    step_dir = _corrupt_checkpoint(run_dir, 20, how)
    res = run_cli(["run", "quickstart", "--run-dir", str(run_dir), "--resume",
                   "--set", "train.steps=40"], cli_env, timeout=120)
    if how == "truncate":
        _assert_subprocess_one_line_error(res, f"checkpoint {step_dir}", "cannot be restored")
    else:
        assert res.returncode == 0, res.stderr
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint {step_dir}"), \
            res.stderr


def test_multi_process_run_of_an_experiment_that_cannot_divide_its_work(capsys, tmp_path,
                                                                         monkeypatch):
    """Seen as one of 2 processes, an experiment not marked ``multihost`` in the registry is
    refused before anything is written (each process would compute and write the whole run);
    quickstart, which divides its batch over processes, is not refused by that check."""
    from experiments.registry import REGISTRY, require_multihost

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    # an experiment that cannot (every registered one can today): bias_shift, marked so here
    monkeypatch.setitem(REGISTRY, "bias_shift", REGISTRY["bias_shift"]._replace(multihost=False))
    code, _, err = cli(["run", "bias_shift", "--run-dir", tmp_path / "run"], capsys)
    line = assert_one_line_error(code, err, "'bias_shift'", "2 processes", "quickstart",
                                 "lm_pretrain", "grama")
    assert "bias_shift" not in line.split("run one that does:")[1] and "kl_estimators" in line
    assert not (tmp_path / "run").exists()
    for name, entry in REGISTRY.items():
        if entry.multihost:
            require_multihost(name, 2)  # no error
        require_multihost(name, 1)
