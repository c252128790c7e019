"""bias_shift experiment: rejection sampling reaches its target rates, the renderer+ control
moves sizes and hues as configured, config checks name the field, the evaluation's
correlation and findings helpers, and the smoke preset end to end through the CLI."""

import json

import numpy as np
import pytest

from experiments import bias_shift as X
from generative import bias as B
from generative import datasets
from tests.helpers import copy_run, run_cli, SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.config import ConfigError, apply_overrides


def test_acceptance_reaches_the_target_rates_and_keeps_the_others():
    specs = X.AttributesConfig().specs()
    base = X.base_rates(specs, num=4000)
    assert base["circle"] == pytest.approx(0.2, abs=0.03)
    assert base["large"] == pytest.approx(0.5, abs=0.03)
    targets = {"circle": 0.35, "large": 0.3}
    rng = np.random.default_rng(0)
    kept = []
    for i in range(12000):
        p = datasets.sample_shape_attributes(np.random.default_rng([9, i]))
        if rng.uniform() < X.acceptance(p, specs, targets, base):
            kept.append(p)
    vals = {k: np.array([p[k] for p in kept], float) for k in ("kind", "background", "hue",
                                                               "size")}
    n = len(kept)
    tol = 4 * np.sqrt(0.25 / n) + 0.01  # 4 binomial SEs + the error of the estimated base
    assert specs["circle"].label(vals["kind"]).mean() == pytest.approx(0.35, abs=tol)
    assert specs["large"].label(vals["size"]).mean() == pytest.approx(0.3, abs=tol)
    # untouched attributes keep their rates (independent renderer parameters)
    assert specs["warm"].label(vals["hue"]).mean() == pytest.approx(base["warm"], abs=tol)
    assert specs["striped"].label(vals["background"]).mean() == pytest.approx(
        base["striped"], abs=tol)


def test_render_set_skews_and_perturbs():
    specs = X.AttributesConfig().specs()
    base = X.base_rates(specs, num=2000)
    imgs, raw = X.render_set(0, "val", 6, specs, {}, base)
    imgs2, raw2 = X.render_set(0, "val", 6, specs, {}, base, size_factor=1.1, hue_offset=0.95)
    assert imgs.shape == (6, 32, 32, 3) and imgs.dtype == np.uint8
    np.testing.assert_allclose(raw2["size"], raw["size"] * 1.1, rtol=1e-6)
    np.testing.assert_allclose(raw2["hue"], np.mod(raw["hue"] + 0.95, 1.0), atol=1e-6)
    np.testing.assert_array_equal(raw2["kind"], raw["kind"])
    # the stored parameters render the stored image
    np.testing.assert_array_equal(imgs2[0], datasets.render_shape(
        {k: raw2[k][0] for k in datasets.SHAPE_FIELDS}))


def test_config_checks_name_the_field():
    cfg = X.smoke()
    with pytest.raises(ConfigError, match="data.skew"):
        apply_overrides(cfg, ["data.skew=bright:0.6"])
    with pytest.raises(ConfigError, match="ideal"):
        apply_overrides(cfg, ["attributes.ideal=circle:0.2"])
    with pytest.raises(ConfigError, match="hue_band"):
        apply_overrides(cfg, ["attributes.hue_band=0.6,0.2"])
    with pytest.raises(ConfigError, match="archs"):
        apply_overrides(cfg, ["readers.archs=cnn,vit"])
    with pytest.raises(ConfigError, match="unconditional"):
        apply_overrides(cfg, ["generators.dit_small.unconditional=false"])
    with pytest.raises(ConfigError, match="size_threshold"):
        apply_overrides(cfg, ["attributes.size_threshold=0.5"])


def _fake_results(disc_by_mass):
    """Results with one generator per entry: (boundary mass, |discrepancy|, spectrum)."""
    attrs = {}
    for i, (mass, disc, spectrum) in enumerate(disc_by_mass):
        en = {"discrepancy": {"c0": disc, "c1": -disc}, "boundary": {"c0": mass, "c1": mass},
              "sensitivity": {"std": disc}}
        attrs[f"a{i}"] = {"spectrum": spectrum, "value_density": mass,
                          "boundary": {"val": {"c0": mass, "c1": mass}}, "sets": {"g": en}}
    return {"attributes": attrs}


def test_discrepancy_correlation_reads_the_rows():
    res = _fake_results([(0.1, 0.01, False), (0.3, 0.02, True), (0.5, 0.05, True),
                         (0.2, 0.015, False)])
    rows = X.discrepancy_rows(res, ["c0", "c1"], ["g"])
    assert [r["abs_discrepancy"] for r in rows] == [0.01, 0.02, 0.05, 0.015]
    assert [r["boundary_mass"] for r in rows] == [0.1, 0.3, 0.5, 0.2]
    corr = X.discrepancy_correlations(res, ["c0", "c1"], ["g"])
    x, y = [0.1, 0.3, 0.5, 0.2], [0.01, 0.02, 0.05, 0.015]
    assert corr["boundary_mass"]["pearson_abs_discrepancy"] == pytest.approx(B.pearson(x, y))
    assert corr["boundary_mass"]["spearman_abs_discrepancy"] == pytest.approx(1.0)


# --- end to end (slow) ------------------------------------------------------------------------


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_bias_shift_smoke_end_to_end_and_resume(tmp_path, tmp_path_factory, subprocess_env):
    run_dir = copy_run(shared_smoke_run("bias_shift", tmp_path_factory), tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    for a in ("circle", "striped", "large", "warm", "bright"):
        for g in ("renderer+", "dit_small", "dit_large", "vae"):
            assert np.isfinite(final[f"{a}/{g}/true_shift"])
    assert np.isfinite(final["fd/vae"]) and final["fd/real floor"] >= 0
    ev = json.loads((run_dir / "checkpoints" / "eval" / "info.json").read_text())
    # the renderer+ control's exact shift is the difference of the recorded rates
    ctl = ev["attributes"]["large"]["sets"]["renderer+"]
    assert ctl["exact"]["shift"] == pytest.approx(
        ctl["rate_exact"] - ev["attributes"]["large"]["rate"]["val"], abs=1e-6)
    report = (run_dir / "report.md").read_text()
    assert "Finding 1" in report and "Finding 2" in report
    for png in ("true_vs_measured", "discrepancy_vs_boundary", "logit_histograms",
                "threshold_sweep", "fd_vs_shift"):
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000
    # a resumed run loads every stage and rewrites the same results
    res = run_cli(["run", "bias_shift", "--run-dir", str(run_dir), "--resume"], subprocess_env,
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage readers: done, loaded" in res.stdout
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["final"] == summary["final"]
