"""Two JAX processes on 127.0.0.1 (jax.distributed, gloo collectives on CPU) give the same
training result as one process."""

import json
import socket

import jax
import numpy as np
import pytest

from tests.helpers import run_cli, start_cli
from trainkit.checkpoint import load_numpy

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_params(run_dir, step):
    restored_step, state = load_numpy(run_dir / "checkpoints", step)
    assert restored_step == step
    return state["params"]


def test_two_processes_match_one(tmp_path, subprocess_env):
    args = ["run", "quickstart", "--set", "train.steps=100", "--set", "train.save_every=50"]
    single = tmp_path / "single"
    res = run_cli([*args, "--run-dir", str(single)], subprocess_env)
    assert res.returncode == 0, res.stderr

    multi = tmp_path / "multi"
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(subprocess_env, TRAINKIT_COORDINATOR=f"127.0.0.1:{port}",
                   TRAINKIT_NUM_PROCESSES="2", TRAINKIT_PROCESS_ID=str(pid))
        procs.append(start_cli([*args, "--run-dir", str(multi)], env))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    info = json.loads((multi / "run.json").read_text())
    assert info["versions"]["processes"] == "2" and info["versions"]["devices"] == "2"

    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    pa, pb = _final_params(single, 100), _final_params(multi, 100)
    leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
