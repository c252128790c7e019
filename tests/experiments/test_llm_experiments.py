"""lm_pretrain and kl_estimators end to end through the CLI (smoke presets)."""

import json

import numpy as np
import pytest

from tests.helpers import child_env, run_cli, SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.run import read_metrics

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_lm_pretrain_learns_the_answer_format_and_saves_an_hf_model(tmp_path_factory):
    run_dir = shared_smoke_run("lm_pretrain", tmp_path_factory).path
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert summary["final"]["eval_formatted"] >= 0.9  # answers end in "#### <number>"
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "report.md",
                 "plots/accuracy.png", "samples.md"):
        assert (run_dir / name).is_file(), name
    import torch  # noqa: F401  (transformers loads the checkpoint we wrote)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert hf.config.model_type == "qwen3"


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_kl_estimators_runs_every_configuration_from_a_base_model(tmp_path_factory):
    # from lm_pretrain's smoke model, configs none, k1-reward, k3-both (tests.helpers.SMOKE)
    run_dir = shared_smoke_run("kl_estimators", tmp_path_factory).path
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("none", "k1-reward", "k3-both"):
        rows = read_metrics(run_dir / "configs" / f"{name}-s0" / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert all(np.isfinite(r["loss"]) for r in rows)
        assert f"{name}/eval_accuracy" in summary["final"]
    # No KL term: the KL loss is exactly zero; with k3 in both it is not.
    assert read_metrics(run_dir / "configs" / "none-s0" / "metrics.jsonl")[-1]["kl_loss"] == 0.0
    assert read_metrics(run_dir / "configs" / "k3-both-s0" / "metrics.jsonl")[-1]["kl_loss"] != 0.0
    report = (run_dir / "report.md").read_text()
    assert "k3-both" in report and (run_dir / "plots" / "kl_k3.png").is_file()


def test_kl_estimators_rejects_both_with_stale_rollouts(tmp_path):
    # refused while the config is validated, before any model is loaded or trained
    res = run_cli(["run", "kl_estimators", "--run-dir", str(tmp_path / "x"), "--set", "rl.staleness=2",
                   "--set", "grid.configs=k3-both"], child_env())
    assert res.returncode == 2 and "count the KL score term twice" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
