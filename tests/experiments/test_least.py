"""least: the sample-efficiency threshold rule by hand; end to end through the CLI (smoke
preset, 2 seeds vmapped): every report section and plot exists, LEAST stops episodes only in
the `on` run; the paper preset validates."""

import json

import numpy as np
import pytest

from experiments import least
from tests.helpers import SHARED_RUN_TIMEOUT, shared_smoke_run
from tests.jaxrl_suite.walk_env import walk_env
from trainkit.run import read_metrics

SECTIONS = ("## Return against environment steps", "## Stopped episodes",
            "## Replay-buffer composition", "## Sample efficiency", "## Verdict")


def test_threshold_from_the_off_arm_and_steps_after_warmup_by_hand():
    # final return R of the off arm: mean over seeds of the last 2 evaluations = 100
    off = np.asarray([[900.0, 20.0, 60.0, 90.0, 110.0], [900.0, 10.0, 50.0, 100.0, 100.0]])
    assert least.return_threshold(off, 0.8, 2) == 80.0
    assert least.return_threshold(-off, 0.8, 2) == -120.0  # R - 0.2 |R| for a negative R
    steps = np.asarray([1000.0, 2000.0, 3000.0, 4000.0, 5000.0])
    on = np.asarray([[900.0, 85.0, 10.0, 10.0, 10.0], [900.0, 10.0, 10.0, 10.0, 10.0]])
    # the standing-still first evaluation (900) is before the warm-up and does not count
    np.testing.assert_array_equal(least.steps_to_threshold(steps, off, 80.0, after=1000),
                                  [4000.0, 4000.0])
    np.testing.assert_array_equal(least.steps_to_threshold(steps, on, 80.0, after=1000),
                                  [2000.0, np.nan])
    np.testing.assert_array_equal(least.steps_to_threshold(steps, on, 80.0), [1000.0, 1000.0])


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_least_smoke_writes_every_report_section(tmp_path_factory):
    run_dir = shared_smoke_run("least", tmp_path_factory).path  # 2 seeds
    configs = run_dir / "configs"
    off = read_metrics(configs / "gymnax_Pendulum-v1--sac--least-off" / "metrics.jsonl")
    on = read_metrics(configs / "gymnax_Pendulum-v1--sac--least-on" / "metrics.jsonl")
    assert len(off) == len(on) == 3
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

    known = {n for b in {t.partition("/")[0] for t in cfg.tasks} for n in list_envs(b)[b]}
    assert set(cfg.tasks) <= known, set(cfg.tasks) - known
    env = walk_env(1000)  # a continuous env of the tasks' time limit (brax hopper takes ~20 s)
    for agent in cfg.agents:
        assert least.build_agent(cfg, env, agent, "on").early_stop.config.k_init == 250
