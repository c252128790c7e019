"""asyppo end to end through the CLI (smoke preset) and its config validation."""

import json

import numpy as np
import pytest

from tests.helpers import run_cli, SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.run import read_metrics

pytest.importorskip("transformers")


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_asyppo_smoke_trains_two_mini_critics_and_reports(tmp_path_factory):
    run_dir = shared_smoke_run("asyppo", tmp_path_factory).path
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


def test_sweep_cells_are_named_parsed_and_validated():
    from experiments import asyppo as exp
    from trainkit.config import ConfigError

    grid = exp.GridConfig(methods=("grpo",), sweep_k=(0.0, 0.5), sweep_h=(0.2,))
    assert grid.all_methods() == ("grpo", "asyppo-m2-k0-h20", "asyppo-m2-k50-h20")
    assert exp.method_spec("asyppo-m4-k50-h0") == ("ppo", 4, "mini", 0.5, 0.0)
    assert exp.method_spec("asyppo-m2-nomask", 0.3, 0.1) == ("ppo", 2, "mini", 0.0, 0.1)
    cfg = exp.AsyPPOConfig(grid=grid)
    s = exp._settings(cfg, "asyppo-m2-k50-h20", seed=1)
    assert (s.num_critics, s.adv_mask_frac, s.ent_filter_frac) == (2, 0.5, 0.2)
    for bad in ({"sweep_k": (0.2,)}, {"sweep_k": (0.255,), "sweep_h": (0.2,)},
                {"methods": ("asyppo-m1-k20-h20",)}, {"methods": ("asyppo-m2-k100-h0",)},
                {"methods": ()}):
        with pytest.raises(ConfigError):
            exp.GridConfig(**{"methods": ("grpo",), **bad})


def test_sweep_table_is_the_mean_and_95ci_over_seeds(tmp_path):
    """Cells read from the sub-runs' summaries; the interval is Student's t (2 dof: 4.303)."""
    from experiments import asyppo as exp
    from trainkit.run import RunDir

    accs = {(0.0, 0.2): [0.2, 0.3, 0.4], (0.5, 0.2): [0.5, 0.5]}
    for (k, h), values in accs.items():
        for seed, acc in enumerate(values):
            sub = tmp_path / "configs" / f"{exp.sweep_name(k, h)}-s{seed}"
            sub.mkdir(parents=True)
            (sub / "summary.json").write_text(json.dumps({"final": {"eval_accuracy": acc,
                                                                    "reward": 2 * acc}}))
            (sub / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_accuracy": acc}) + "\n")
    run_dir = RunDir(tmp_path)
    table = exp.sweep_table(run_dir, (0.0, 0.5), (0.2,))
    mean, ci, n = table["eval_accuracy"][(0.0, 0.2)]
    assert n == 3 and mean == pytest.approx(0.3) and ci == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert table["eval_accuracy"][(0.5, 0.2)] == pytest.approx((0.5, 0.0, 2))
    assert table["reward"][(0.0, 0.2)][0] == pytest.approx(0.6)
    assert "ood_accuracy" in table and not table["ood_accuracy"]  # no seed logged it
    cfg = exp.AsyPPOConfig(grid=exp.GridConfig(methods=(), sweep_k=(0.0, 0.5), sweep_h=(0.2,)))
    text = exp._sweep_section(run_dir, cfg)
    assert "| k = 0% | 0.300 +- 0.248 |" in text and "| k = 50% | 0.500 +- 0.000 |" in text
    assert "Best in-domain cell: k = 50%, h = 20%" in text and "do not overlap" not in text
    assert (tmp_path / "plots" / "sweep_eval_accuracy.png").is_file()


def test_comparisons_read_welchs_interval_over_seeds(tmp_path):
    """The method table is mean +- 95% t interval, and a comparison gives a direction only when
    Welch's interval of the difference excludes 0 (not a 2-SE rule on population sds)."""
    from scipy import stats as sst

    from experiments import asyppo as exp
    from trainkit.run import RunDir

    accs = {"asyppo-m2": [0.30, 0.32, 0.34], "ppo-mini": [0.20, 0.21, 0.22],
            "grpo": [0.25, 0.35, 0.45]}
    for name, values in accs.items():
        for seed, acc in enumerate(values):
            sub = tmp_path / "configs" / f"{name}-s{seed}"
            sub.mkdir(parents=True)
            (sub / "summary.json").write_text(json.dumps({"final": {"eval_accuracy": acc}}))
            (sub / "metrics.jsonl").write_text("")
    run_dir = RunDir(tmp_path)
    mean, half, n = exp._stat(exp._finals(run_dir, "asyppo-m2"), "eval_accuracy")
    assert (mean, n) == (pytest.approx(0.32), 3)
    assert half == pytest.approx(sst.t.ppf(0.975, 2) * 0.02 / 3 ** 0.5)
    better = exp._compare(run_dir, "asyppo-m2", "ppo-mini", "eval_accuracy", "acc")
    ref = sst.ttest_ind(accs["asyppo-m2"], accs["ppo-mini"], equal_var=False).confidence_interval()
    assert f"(+0.110 [{ref.low:+.3f}, {ref.high:+.3f}], Welch 95%): asyppo-m2 is better." in better
    unsure = exp._compare(run_dir, "asyppo-m2", "grpo", "eval_accuracy", "acc")
    assert "the interval contains 0: no clear difference" in unsure
    assert exp._compare(run_dir, "asyppo-m2", "missing", "eval_accuracy", "acc") is None


def test_a_given_model_dir_is_used_as_is_or_refused_by_its_key(tmp_path):
    """lm_pretrain.pretrained_model_dir, the first stage asyppo and kl_estimators share."""
    from experiments import lm_pretrain
    from experiments.registry import RunContext, UserError
    from trainkit.run import RunDir

    ctx = RunContext(RunDir(tmp_path / "run"), 1, False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert lm_pretrain.pretrained_model_dir(str(model), lm_pretrain.smoke(), ctx) == model
    with pytest.raises(UserError, match=r"^critic\.model_dir=.*no config\.json"):
        lm_pretrain.pretrained_model_dir(str(tmp_path), lm_pretrain.smoke(), ctx,
                                         key="critic.model_dir", subdir="critic_base")
    # Nothing pretrained when a directory is given.
    assert not (tmp_path / "run" / "base").exists() and not (tmp_path / "run" / "critic_base").exists()


def test_a_hub_id_is_fetched_into_the_hub_cache_or_refused_in_one_line(tmp_path, monkeypatch):
    """``base.model_dir=org/name`` (no such local path) goes through huggingface_hub's
    snapshot_download; when that fails (offline here) the error names the key and the id.
    kl_estimators' paper preset starts from the paper's Qwen2.5-7B this way."""
    import huggingface_hub

    from experiments import kl_estimators, lm_pretrain
    from experiments.registry import RunContext, UserError
    from trainkit.run import RunDir

    ctx = RunContext(RunDir(tmp_path / "run"), 1, False)
    monkeypatch.chdir(tmp_path)  # "Qwen/Qwen2.5-7B" is not a local path here
    cache = tmp_path / "hub" / "snapshot"
    cache.mkdir(parents=True)
    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs["allow_patterns"]))
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert kl_estimators.paper().base.model_dir == "Qwen/Qwen2.5-7B"
    got = lm_pretrain.pretrained_model_dir("Qwen/Qwen2.5-7B", lm_pretrain.smoke(), ctx)
    assert got == cache and asked[0][0] == "Qwen/Qwen2.5-7B" and "*.safetensors" in asked[0][1]

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"^base\.model_dir=Qwen/Qwen2\.5-7B: not a local directory, "
                                        r"and fetching it .*couldn't connect") as err:
        lm_pretrain.pretrained_model_dir("Qwen/Qwen2.5-7B", lm_pretrain.smoke(), ctx)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "base").exists()  # nothing pretrained
