"""least end to end through the CLI (smoke preset, 2 seeds vmapped): every report section and
plot exists, LEAST stops episodes only in the `on` run; the paper preset validates."""

import json

import pytest

from experiments import least
from tests.helpers import run_cli
from trainkit.run import read_metrics

pytestmark = pytest.mark.slow

SECTIONS = ("## Return against environment steps", "## Stopped episodes",
            "## Replay-buffer composition", "## Sample efficiency", "## Verdict")


def test_least_smoke_writes_every_report_section(tmp_path, subprocess_env):
    run_dir = tmp_path / "run"
    res = run_cli(["run", "least", "--preset", "smoke", "--seeds", "2", "--run-dir", str(run_dir)],
                  subprocess_env)
    assert res.returncode == 0, res.stderr
    configs = run_dir / "configs"
    off = read_metrics(configs / "gymnax_Pendulum-v1--sac--least-off" / "metrics.jsonl")
    on = read_metrics(configs / "gymnax_Pendulum-v1--sac--least-on" / "metrics.jsonl")
    assert len(off) == len(on) == 4
    assert len(on[-1]["eval_return"]) == 2 and "least/stopped" not in off[-1]
    assert all(s > 0 for s in on[-1]["least/stopped"])  # both seeds stopped episodes
    summary = json.loads((configs / "gymnax_Pendulum-v1--sac--least-on" / "summary.json")
                         .read_text())
    assert sum(summary["stop_hist"]) == sum(summary["stopped"])
    report = (run_dir / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    assert "| gymnax/Pendulum-v1 | sac | on |" in report
    for plot in ("gymnax_Pendulum-v1-sac-return.png", "gymnax_Pendulum-v1-sac-stops.png",
                 "replay_stopped_share.png"):
        assert (run_dir / "plots" / plot).exists()


def test_paper_preset_validates():
    cfg = least.paper()
    assert cfg.total_steps == 1_000_000 and "brax/hopper" in cfg.tasks
    assert any(t.startswith("dmc/") for t in cfg.tasks)
    from jaxrl_suite.envs import list_envs

    known = {n for names in list_envs().values() for n in names}
    assert set(cfg.tasks) <= known, set(cfg.tasks) - known
    env = least.make_env(cfg, "brax/hopper")  # building every task's agents takes ~40 s
    for agent in cfg.agents:
        assert least.build_agent(cfg, env, agent, "on").early_stop is not None
