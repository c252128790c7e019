"""grama end to end through the CLI (smoke preset, 2 seeds vmapped, SAC and TD3): the report
and plots exist, the health metrics are logged per seed, ReGraMa resets neurons and `none`
never does.
(Exact resume of SAC, replay buffer included, is tested in tests/jaxrl_suite/test_sac.py.)"""

import json

import numpy as np
import pytest

from tests.helpers import SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.run import read_metrics

pytestmark = pytest.mark.slow


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_grama_smoke_logs_health_and_resets(tmp_path_factory):
    run_dir = shared_smoke_run("grama", tmp_path_factory).path  # 2 seeds, mlp, none/regrama, sac/td3
    configs = run_dir / "configs"
    none = read_metrics(configs / "gymnax_Pendulum-v1--mlp--none" / "metrics.jsonl")
    regrama = read_metrics(configs / "gymnax_Pendulum-v1--mlp--regrama" / "metrics.jsonl")
    td3_none = read_metrics(configs / "gymnax_Pendulum-v1--td3--mlp--none" / "metrics.jsonl")
    td3_regrama = read_metrics(configs / "gymnax_Pendulum-v1--td3--mlp--regrama" / "metrics.jsonl")
    assert len(none) == len(regrama) == len(td3_none) == len(td3_regrama) == 4  # 256 / 64 per chunk
    for rows in (none, regrama, td3_none, td3_regrama):
        fractions = [f for r in rows for f in r["critic/grama/all"]]
        assert len(rows[-1]["critic/grama/all"]) == 2  # one value per seed
        assert all(0.0 <= f <= 1.0 for f in fractions if np.isfinite(f))
        assert np.isfinite(rows[-1]["eval_return"]).all()
    for rows in (none, regrama, td3_none, td3_regrama):  # the critics learn, every seed
        first, last = np.asarray(rows[0]["critic_loss"]), np.asarray(rows[-1]["critic_loss"])
        assert np.all(last < 0.5 * first), (first, last)
    for off, on in ((none, regrama), (td3_none, td3_regrama)):
        assert sum(sum(r["reset_neurons"]) for r in off) == 0
        assert sum(sum(r["reset_neurons"]) for r in on) > 0
    report = (run_dir / "report.md").read_text()
    assert "| gymnax/Pendulum-v1 | sac | mlp | regrama |" in report
    assert "| gymnax/Pendulum-v1 | td3 | mlp | regrama |" in report
    assert list((run_dir / "plots").glob("*grama_all.png"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "gymnax_Pendulum-v1--mlp--regrama/eval_return" in summary["final"]


def test_report_gives_seed_intervals_for_both_grama_scores_and_their_paired_gaps(tmp_path):
    """The report's cells from hand-written logs: per seed, the mean over the last 20% of the
    chunks; across seeds, the t-interval (checked against scipy); the gap GraMa - tau-dormant
    paired within each seed."""
    from scipy import stats as st

    from experiments.grama import GramaConfig, _name, report
    from trainkit.config import save_json
    from trainkit.run import RunDir, write_json

    run_dir = RunDir(tmp_path / "run")  # creates the directory
    cfg = GramaConfig(critics=("mlp-ln",), resets=("none",), total_steps=5000, chunk_steps=1000)
    save_json(cfg, run_dir.config_path)  # 5 chunks: each seed's window is the last 1 row
    sub = run_dir.path / "configs" / _name("gymnax/Pendulum-v1", "mlp-ln", "none")
    sub.mkdir(parents=True)
    dormant = np.array([0.05, 0.10, 0.07])
    gamma = np.array([0.20, 0.31, 0.18])
    kernel = np.array([0.04, 0.12, 0.09])
    rows = [{"step": s, "critic/dormant/all": [0.9] * 3, "critic/grama/all": [0.9] * 3,
             "critic/grama_kernel/all": [0.9] * 3} for s in range(1, 5)]
    rows.append({"step": 5, "critic/dormant/all": dormant.tolist(),
                 "critic/grama/all": gamma.tolist(), "critic/grama_kernel/all": kernel.tolist(),
                 "eval_return": [-150.0, -120.0, -180.0]})
    (sub / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json(sub / "summary.json", {"final": {}})
    text = open(report(run_dir)).read()

    def cell(values, digits=3):
        lo, hi = st.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=st.sem(values))
        return f"{np.mean(values):.{digits}f} ± {(hi - lo) / 2:.{digits}f}"

    row, gaps = [line for line in text.splitlines() if line.startswith("| gymnax/Pendulum-v1 |")]
    assert row.split(" | ")[4:10] == ["-", cell([-150.0, -120.0, -180.0], 0), "-", cell(dormant),
                                     cell(gamma), cell(kernel)]
    assert gaps.split(" | ")[4:] == [cell(gamma - dormant), cell(kernel - dormant) + " |"]


def test_reset_layer_sets_are_reported_where_redo_cannot_reach_residual_writers():
    from experiments.grama import GramaConfig, reset_layers

    cfg = GramaConfig(depth=2, width=8)
    assert reset_layers(cfg, "mlp", "redo") == reset_layers(cfg, "mlp", "regrama") == "2 of 2"
    redo, regrama = reset_layers(cfg, "residual", "redo"), reset_layers(cfg, "residual", "regrama")
    n_redo, n_all = map(int, redo.split(" of "))
    assert regrama == f"{n_all} of {n_all}" and n_redo < n_all
    assert reset_layers(cfg, "residual", "none") == "-"


def test_report_pairs_each_reset_arm_with_the_no_reset_arm_of_its_critic(tmp_path):
    """"Do the resets improve returns?": per seed, the reset arm's eval return minus the
    no-reset arm's (same critic), t-interval over seeds checked against scipy."""
    from scipy import stats as st

    from experiments.grama import GramaConfig, _name, report
    from trainkit.config import save_json
    from trainkit.run import RunDir, write_json

    run_dir = RunDir(tmp_path / "run")
    cfg = GramaConfig(critics=("mlp-ln",), resets=("none", "regrama"), total_steps=1000,
                      chunk_steps=1000)
    save_json(cfg, run_dir.config_path)
    returns = {"none": np.array([-150.0, -120.0, -180.0]), "regrama": np.array([-100.0, -130.0, -90.0])}
    for reset, values in returns.items():
        sub = run_dir.path / "configs" / _name("gymnax/Pendulum-v1", "mlp-ln", reset)
        sub.mkdir(parents=True)
        shift = {"none": -10.0, "regrama": 5.0}[reset]  # training returns: gain + 15
        row = {"step": 1, "eval_return": values.tolist(), "episode_return": (values + shift).tolist(),
               "critic/dormant/all": [0.1] * 3}
        (sub / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        write_json(sub / "summary.json", {"final": {}})
    text = open(report(run_dir)).read()
    section = text.split("## Do the resets improve returns?")[1]
    gain = returns["regrama"] - returns["none"]
    lo, hi = st.t.interval(0.95, 2, loc=gain.mean(), scale=st.sem(gain))
    cell = f"{gain.mean():.0f} ± {(hi - lo) / 2:.0f}"
    train_cell = f"{gain.mean() + 15:.0f} ± {(hi - lo) / 2:.0f}"
    line = next(x for x in section.splitlines() if x.startswith("| gymnax/Pendulum-v1 |"))
    assert line == f"| gymnax/Pendulum-v1 | sac | mlp-ln | regrama | {cell} | {train_cell} |"


def test_brax_tasks_get_the_configured_physics(monkeypatch, tmp_path):
    """``brax_physics`` reaches brax tasks only; the paper and mujoco presets ask for MuJoCo's
    own physics (MJX), not brax's spring approximation."""
    import jaxrl_suite.envs
    from experiments import grama
    from experiments.registry import RunContext, UserError
    from trainkit.run import RunDir

    assert grama.paper().brax_physics == grama.mujoco().brax_physics == "mjx"
    seen, real_make = {}, jaxrl_suite.envs.make

    def fake_make(name, **kwargs):
        seen[name] = kwargs
        if name.startswith("dmc/"):
            raise ValueError("stop here")
        return real_make("gymnax/Pendulum-v1")

    monkeypatch.setattr(jaxrl_suite.envs, "make", fake_make)
    cfg = grama.GramaConfig(tasks=("brax/hopper", "dmc/CartpoleSwingup"), brax_physics="mjx")
    with pytest.raises(UserError, match="stop here"):
        grama.run(cfg, RunContext(run_dir=RunDir(tmp_path / "run")))
    assert seen == {"brax/hopper": {"backend": "mjx"}, "dmc/CartpoleSwingup": {}}
