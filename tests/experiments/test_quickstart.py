"""End-to-end runs of the quickstart through the CLI: training, resume, signals, guards."""

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import child_env, copy_run, run_cli, SHARED_RUN_TIMEOUT, shared_smoke_run, start_cli
from trainkit.run import read_metrics

pytestmark = pytest.mark.slow

# Long enough that a kill after the first checkpoint lands mid-run, short enough for CI.
LONG = ["--set", "train.steps=3000", "--set", "train.chunk_size=50", "--set", "train.save_every=500",
        "--set", "train.eval_every=500"]


def _summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _completed_checkpoints(run_dir):
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _wait_for_checkpoint(proc, run_dir, timeout=120):
    start = time.time()
    while not _completed_checkpoints(run_dir):
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()}"
        assert time.time() - start < timeout, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The LONG run without interruption: the reference of the kill/resume tests."""
    ref = tmp_path_factory.mktemp("quickstart") / "ref"
    res = run_cli(["run", "quickstart", "--run-dir", str(ref), *LONG], child_env())
    assert res.returncode == 0, res.stderr
    return ref


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_smoke_run_trains_and_writes_a_complete_run_dir(tmp_path, tmp_path_factory, subprocess_env):
    run_dir = copy_run(shared_smoke_run("quickstart", tmp_path_factory), tmp_path / "run")  # 2 seeds
    for name in ("config.json", "run.json", "metrics.jsonl", "summary.json", "report.md",
                 "plots/loss.png"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir()) and _completed_checkpoints(run_dir) == [100, 200]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 201))
    first, last = np.asarray(rows[0]["loss"]), np.asarray(rows[-1]["loss"])
    assert first.shape == (2,) and np.all(last < 0.5 * first)  # both seeds learn
    summary = _summary(run_dir)
    assert summary["seeds"] == 2 and len(summary["params_sha256"]) == 64
    assert summary["final"]["eval_loss"] < 0.5 * np.mean(rows[3]["loss"])
    # `report` regenerates report.md from the files alone.
    (run_dir / "report.md").unlink()
    res = run_cli(["report", str(run_dir)], subprocess_env)
    assert res.returncode == 0 and "eval_loss" in (run_dir / "report.md").read_text()


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, subprocess_env, uninterrupted):
    ref = uninterrupted
    killed = tmp_path / "killed"
    proc = start_cli(["run", "quickstart", "--run-dir", str(killed), *LONG], subprocess_env)
    _wait_for_checkpoint(proc, killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "run finished before it could be killed"
    assert _completed_checkpoints(killed)[-1] < 3000
    res = run_cli(["run", "quickstart", "--run-dir", str(killed), "--resume"], subprocess_env)
    assert res.returncode == 0, res.stderr
    assert _summary(killed)["params_sha256"] == _summary(ref)["params_sha256"]
    # The log reads as if the run had never stopped: every step once, same values.
    rows, ref_rows = read_metrics(killed / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 3001))
    assert rows == ref_rows


def test_sigterm_checkpoints_and_exits_then_resumes_exactly(tmp_path, subprocess_env, uninterrupted):
    ref = uninterrupted
    run_dir = tmp_path / "term"
    proc = start_cli(["run", "quickstart", "--run-dir", str(run_dir), *LONG], subprocess_env)
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    steps = _completed_checkpoints(run_dir)
    assert steps[-1] % 50 == 0 and steps[-1] < 3000
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == steps[-1]
    res = run_cli(["run", "quickstart", "--run-dir", str(run_dir), "--resume"], subprocess_env)
    assert res.returncode == 0, res.stderr
    assert _summary(run_dir)["params_sha256"] == _summary(ref)["params_sha256"]


def test_nan_batches_are_skipped_counted_and_params_stay_finite(tmp_path, subprocess_env):
    run_dir = tmp_path / "nan"
    res = run_cli(["run", "quickstart", "--run-dir", str(run_dir),
                   "--set", "train.inject_nan_at=10,11,12,150"], subprocess_env)
    assert res.returncode == 0, res.stderr
    rows = read_metrics(run_dir / "metrics.jsonl")
    skipped = [r["step"] for r in rows if r["skipped"][0]]
    assert skipped == [11, 12, 13, 151]  # row k is the k-th update, i.e. step index k-1
    assert rows[12]["nonfinite_streak"] == [3] and rows[13]["nonfinite_streak"] == [0]
    assert rows[-1]["nonfinite_total"] == [4]
    assert all(np.isfinite(r["eval_loss"][0]) for r in rows if "eval_loss" in r)
    assert _summary(run_dir)["final"]["nonfinite_total"] == 4
    assert np.isfinite(_summary(run_dir)["final"]["eval_loss"])


def test_nonfinite_streak_stops_run_keeping_last_good_checkpoint(tmp_path, subprocess_env):
    run_dir = tmp_path / "streak"
    bad = ",".join(str(s) for s in range(120, 140))
    res = run_cli(["run", "quickstart", "--run-dir", str(run_dir), "--set", f"train.inject_nan_at={bad}",
                   "--set", "train.max_nonfinite=5", "--set", "train.chunk_size=25"], subprocess_env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert "5 consecutive steps" in lines[-1] and "last good checkpoint: step 100" in lines[-1]
    assert "Traceback" not in res.stderr
    assert _completed_checkpoints(run_dir) == [100] and not (run_dir / "summary.json").exists()
