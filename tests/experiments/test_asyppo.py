"""asyppo end to end through the CLI (smoke preset) and its config validation."""

import json

import numpy as np
import pytest

from tests.helpers import run_cli
from trainkit.run import read_metrics

pytest.importorskip("transformers")


@pytest.mark.slow
def test_asyppo_smoke_trains_two_mini_critics_and_reports(tmp_path, subprocess_env):
    run_dir = tmp_path / "asy"
    res = run_cli(["run", "asyppo", "--run-dir", str(run_dir)], subprocess_env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "asyppo-m2/eval_accuracy" in summary["final"]
    rows = read_metrics(run_dir / "configs" / "asyppo-m2-s0" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "value_loss_c0", "value_loss_c1", "sigma_q10", "sigma_q50",
                    "sigma_q90", "value_mse_ensemble", "value_mse_single", "update_seconds"):
            assert np.isfinite(row[key]), key
        assert row["sigma_q50"] > 0  # two differently initialised critics disagree
        # k = h = 20%: exactly floor(0.2 n) of the n response tokens are masked / filtered.
        n = round(row["response_length"] * 2 * 4)
        assert row["adv_masked_frac"] == pytest.approx(int(0.2 * n) / n, abs=1e-5)
        assert row["ent_filtered_frac"] == pytest.approx(int(0.2 * n) / n, abs=1e-5)
    final = json.loads((run_dir / "configs" / "asyppo-m2-s0" / "summary.json").read_text())["final"]
    assert final["critic_params"] > 0 and final["critic_state_bytes"] > 0
    report = (run_dir / "report.md").read_text()
    assert "asyppo-m2" in report and "value MSE" in report
    assert (run_dir / "plots" / "value_mse_ensemble.png").is_file()


def test_asyppo_rejects_groups_smaller_than_the_ensemble(tmp_path, subprocess_env):
    res = run_cli(["run", "asyppo", "--run-dir", str(tmp_path / "x"), "--set", "grid.methods=asyppo-m4",
                   "--set", "rl.group_size=2"], subprocess_env)
    assert res.returncode == 2 and "rl.group_size" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli(["run", "asyppo", "--run-dir", str(tmp_path / "y"), "--set", "grid.methods=ppo-huge"],
                  subprocess_env)
    assert res.returncode == 2 and "grid.methods" in res.stderr
