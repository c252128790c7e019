"""Kill/resume and damaged files for every registered experiment, through the CLI (issue 24).

For each experiment's ``smoke`` preset, in child processes:

1. the uninterrupted reference: the experiment's shared smoke run (``tests.helpers.SMOKE``,
   the same run its own smoke test checks, run once per session);
2. the same run SIGKILLed right after its first checkpoint reaches disk
   (``TRAINKIT_FAULT_KILL_AFTER_SAVES=1``, see trainkit.checkpoint), then ``--resume``: the
   final ``params_sha256`` and metrics must equal the reference's (bitwise: CPU runs are
   deterministic);
3. a copy of the killed run directory whose latest checkpoint is truncated: ``--resume``
   must either finish with the reference's result (falling back to an older checkpoint) or
   exit 2 with one line naming the checkpoint; the files already saved stay as they were;
4. a copy of the reference run with a torn last line in every metrics.jsonl (a kill
   mid-write): ``report`` still works.

The killed and resumed runs load the programs the reference compiled from the session's
persistent compilation cache (tests/conftest.py), so the sweep costs each experiment about one
more run of its steps, not three compilations. Registering an experiment without a ``SMOKE``
entry fails here: every experiment is covered.
"""

import json
import shutil

import pytest

from experiments.registry import REGISTRY
from tests.helpers import SHARED_RUN_TIMEOUT, SMOKE, copy_run, run_cli, shared_smoke_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SHARED_RUN_TIMEOUT)]

NAMES = sorted(REGISTRY)


def _summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["params_sha256"], summary["final"]


def _checkpoint_files(run_dir):
    return {p: p.read_bytes() for p in sorted((run_dir).rglob("checkpoints/**/*")) if p.is_file()}


def _latest_checkpoint(run_dir):
    """The most recently written entry of any ``checkpoints/`` directory of the run: an orbax
    step directory, or a finished stage of a stage store (bias_shift, dlc)."""
    entries = [p for ck in run_dir.rglob("checkpoints") if ck.is_dir() for p in ck.iterdir() if p.is_dir()]
    assert entries, f"no checkpoint under {run_dir}"
    newest = lambda p: max((f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()), default=0)
    return max(entries, key=newest)


def test_every_registered_experiment_has_a_smoke_spec():
    assert sorted(SMOKE) == NAMES, "add the experiment to tests.helpers.SMOKE"


@pytest.mark.parametrize("name", NAMES)
def test_kill_resume_and_damaged_files(name, tmp_path, tmp_path_factory):
    ref_run = shared_smoke_run(name, tmp_path_factory)
    env, smoke = ref_run.spec.env(), list(ref_run.args)
    ref_hash, ref_final = _summary(ref_run.path)

    killed = tmp_path / "killed"
    res = run_cli([*smoke, "--run-dir", str(killed)], dict(env, TRAINKIT_FAULT_KILL_AFTER_SAVES="1"), timeout=900)
    assert res.returncode == -9, (
        f"{name}: the smoke run was not killed after its first checkpoint (exit {res.returncode}): "
        "it saves no checkpoint, so it cannot resume")
    damaged = tmp_path / "damaged"
    shutil.copytree(killed, damaged)

    res = run_cli(["run", name, "--run-dir", str(killed), "--resume"], env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got_hash, got_final = _summary(killed)
    assert got_hash == ref_hash, f"{name}: resumed params differ from the uninterrupted run's"
    assert got_final == ref_final

    latest = _latest_checkpoint(damaged)
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = _checkpoint_files(damaged)
    res = run_cli(["run", name, "--run-dir", str(damaged), "--resume"], env, timeout=900)
    print(f"SWEEP {name}: kill/resume exact; damaged latest checkpoint -> "
          + ("fell back, same result" if res.returncode == 0 else f"exit {res.returncode}: {res.stderr.strip()[:200]}"))
    if res.returncode == 0:
        assert _summary(damaged)[0] == ref_hash, f"{name}: fell back, but to a different result"
    else:
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        assert res.returncode == 2, res.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr[-3000:]
        assert str(latest) in lines[0] or latest.name in lines[0], lines[0]
        assert _checkpoint_files(damaged) == before, "a failed resume must not change saved files"

    ref = copy_run(ref_run, tmp_path / "ref")
    for metrics in sorted(ref.rglob("metrics.jsonl")):  # none in stage stores (dlc, bias_shift)
        with open(metrics, "a") as fh:
            fh.write('{"step": 99999, "loss": 0.')  # torn: the writer died mid-line
    res = run_cli(["report", str(ref)], env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
