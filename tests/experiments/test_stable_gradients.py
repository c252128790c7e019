"""stable_gradients end to end through the CLI (smoke preset, 2 seeds vmapped): every sub-run
logs per-seed returns and per-layer gradient norms/cosines, the health report carries the
Hessian diagnostics, the control part writes its phases, and the report has its two plots.
A fast config-validation test runs without the slow mark."""

import json

import numpy as np
import pytest

from tests.helpers import run_cli
from trainkit.run import read_metrics


@pytest.mark.slow
def test_stable_gradients_smoke(tmp_path, subprocess_env):
    run_dir = tmp_path / "run"
    res = run_cli(["run", "stable_gradients", "--preset", "smoke", "--seeds", "2",
                   "--run-dir", str(run_dir)], subprocess_env)
    assert res.returncode == 0, res.stderr
    configs = run_dir / "configs"
    for variant, first in (("mlp", "hidden/0/dense"), ("multiskip_kron", "encoder/dense")):
        rows = read_metrics(configs / f"rl--{variant}--w16-b1" / "metrics.jsonl")
        assert len(rows) == 4  # 4 updates, one row each
        assert all(len(r[f"grad/norm/{first}"]) == 2 for r in rows)  # per seed
        assert all(np.all(np.asarray(r[f"grad/norm/{first}"]) > 0) for r in rows)
        cos = np.asarray([r[f"grad/cos/{first}"] for r in rows])
        assert np.all(np.abs(cos[np.isfinite(cos)]) <= 1 + 1e-5)
        assert np.isfinite(rows[-1]["health/q/hessian_trace"]).all()
        phases = json.loads((configs / f"control--{variant}" / "phases.json").read_text())
        assert np.asarray(phases["accuracy"]).shape == (2, 2)  # [seeds, phases]
    report = (run_dir / "report.md").read_text()
    assert "| multiskip_kron | 16 x 1 |" in report
    assert (run_dir / "plots" / "return_vs_size.png").exists()
    assert (run_dir / "plots" / "grad_norm_by_layer.png").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "rl--mlp--w16-b1/episode_return" in summary["final"]


def test_config_validation():
    from experiments.stable_gradients import StableGradientsConfig, cpu, paper, smoke
    from trainkit.config import ConfigError

    for preset in (smoke, cpu, paper):
        preset()
    with pytest.raises(ConfigError, match="variants"):
        StableGradientsConfig(variants=("mlp", "bigmlp"))
    with pytest.raises(ConfigError, match="blocks"):
        StableGradientsConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ConfigError, match="num_minibatches"):
        StableGradientsConfig(num_envs=3, num_steps=3, num_minibatches=2)
