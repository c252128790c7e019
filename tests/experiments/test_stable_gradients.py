"""stable_gradients end to end. One CLI smoke run (PQN, 2 seeds vmapped), shared by the tests
of this module: every sub-run logs per-seed returns, per-layer gradient norms/cosines and the
per-update churn, the health report carries the Hessian diagnostics, the control part writes
its phases, and the report has its plots. The PPO arm runs in-process on one variant (its
sub-run name says the agent; gradient flow, policy churn and its report section). A fast
config-validation test runs without the slow mark."""

import dataclasses
import json

import numpy as np
import pytest

from tests.helpers import SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.run import read_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return shared_smoke_run("stable_gradients", tmp_path_factory).path  # 2 seeds


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_smoke_sub_runs_log_gradient_flow_health_and_churn(smoke_run):
    configs = smoke_run / "configs"
    for variant, first in (("mlp", "hidden/0/dense"), ("multiskip_kron", "encoder/dense")):
        rows = read_metrics(configs / f"rl--pqn--{variant}--w8-b1" / "metrics.jsonl")
        assert len(rows) == 2  # 2 updates, one row each
        assert all(len(r[f"grad/norm/{first}"]) == 2 for r in rows)  # per seed
        assert all(np.all(np.asarray(r[f"grad/norm/{first}"]) > 0) for r in rows)
        cos = np.asarray([r[f"grad/cos/{first}"] for r in rows])
        assert np.all(np.abs(cos[np.isfinite(cos)]) <= 1 + 1e-5)
        assert np.isfinite(rows[-1]["health/q/hessian_trace"]).all()
        for key in ("churn/q", "churn/repr_l2", "churn/repr_relative", "churn/greedy_changed"):
            v = np.asarray([r[key] for r in rows])
            assert v.shape == (2, 2) and np.all(np.isfinite(v)) and np.all(v >= 0), key
        assert np.all(np.asarray([r["churn/q"] for r in rows]) > 0)  # every update moved Q
    phases = json.loads((configs / "control--mlp" / "phases.json").read_text())
    assert np.asarray(phases["accuracy"]).shape == (2, 2)  # [seeds, phases]
    assert not (configs / "control--multiskip_kron").exists()  # control_variants: mlp only
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert "rl--pqn--mlp--w8-b1/episode_return" in summary["final"]


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_smoke_report(smoke_run):
    report = (smoke_run / "report.md").read_text()
    assert "## PQN on gymnax/Breakout-MinAtar" in report
    assert "| multiskip_kron | 8 x 1 |" in report and "Q churn" in report
    for name in ("return_vs_size_pqn", "grad_norm_by_layer_pqn", "control_accuracy"):
        assert (smoke_run / "plots" / f"{name}.png").exists(), name
        assert f"plots/{name}.png" in report


@pytest.mark.slow
def test_ppo_arm_in_process(tmp_path):
    from experiments import stable_gradients as sg
    from experiments.registry import RunContext
    from trainkit.config import save_json
    from trainkit.run import RunDir

    # the plain MLP (RAdam): PPO with multi-skip + Kron compiles in test_stable_networks.py
    cfg = dataclasses.replace(sg.smoke(), agents=("ppo",), variants=("mlp",), control=False)
    run_dir = RunDir(tmp_path / "run")
    save_json(cfg, run_dir.config_path)
    result = sg.run(cfg, RunContext(run_dir, seeds=2))
    name = "rl--ppo--mlp--w8-b1"
    assert set(result.metrics) == {f"{name}/episode_return"}
    settings = json.loads((run_dir.path / "configs" / name / "config.json").read_text())
    assert settings["optimizer"] == "radam" and settings["lr"] == cfg.ppo_lr
    kron = sg.ppo_config(cfg, "multiskip_kron", 8, 1)
    assert kron.optimizer == "kron" and kron.lr == pytest.approx(cfg.ppo_lr / 3)
    assert kron.network.kind == "multiskip_paper" and kron.network.kernel_init == "orthogonal"
    rows = read_metrics(run_dir.path / "configs" / name / "metrics.jsonl")
    assert len(rows) == 2
    for key in ("grad/norm/actor/hidden/0/dense", "grad/norm/critic/head", "churn/policy_kl",
                "churn/policy_tv", "churn/value", "churn/repr_relative"):
        assert np.all(np.isfinite(np.asarray(rows[-1][key]))), key
    assert np.isfinite(rows[-1]["health/hessian_top_eig"]).all()
    assert np.isfinite(rows[-1]["health/actor/srank"]).all()
    sg.report(run_dir)
    report = run_dir.report_path.read_text()
    assert "## PPO on gymnax/Breakout-MinAtar" in report and "policy KL churn" in report
    assert "| mlp | 8 x 1 |" in report
    assert (run_dir.plots_dir / "grad_norm_by_layer_ppo.png").exists()


def test_config_validation():
    from experiments.stable_gradients import StableGradientsConfig, cpu, paper, smoke
    from trainkit.config import ConfigError

    for preset in (smoke, cpu, paper):
        preset()
    dataclasses.replace(smoke(), agents=("pqn", "ppo"), encoder="conv")  # PPO settings fit too
    with pytest.raises(ConfigError, match="variants"):
        StableGradientsConfig(variants=("mlp", "bigmlp"))
    with pytest.raises(ConfigError, match="agents"):
        StableGradientsConfig(agents=("pqn", "sac"))
    with pytest.raises(ConfigError, match="blocks"):
        StableGradientsConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ConfigError, match="num_minibatches"):
        StableGradientsConfig(num_envs=3, num_steps=3, num_minibatches=2)
    with pytest.raises(ConfigError, match="ppo_num_minibatches"):
        StableGradientsConfig(ppo_num_envs=3, ppo_num_steps=3, ppo_num_minibatches=2)
