"""dlc experiment: exact checks of its helpers (held-out pairs, chance levels, parent pairs,
composition against a NumPy oracle, the code models' training sequences, config cross-checks,
stage storage) and the smoke preset end to end through the CLI with a stage-level resume."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dlc as D
from experiments.registry import UserError
from generative import dlc, evaluation as ev
from tests.helpers import copy_run, run_cli, SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.config import ConfigError, apply_overrides


# --- helpers (fast) ------------------------------------------------------------------------------


def test_parse_pairs_and_heldout_mask():
    pairs = D.parse_pairs(["circle:blue", "cross:orange"])
    assert pairs == [(0, ev.COLOUR_NAMES.index("blue")), (4, ev.COLOUR_NAMES.index("orange"))]
    blue, orange, red = (ev.COLOUR_NAMES.index(c) for c in ("blue", "orange", "red"))
    kind = np.array([0, 0, 4, 4, 1])
    colour = np.array([blue, red, orange, blue, blue])
    np.testing.assert_array_equal(D.heldout_mask(kind, colour, pairs),
                                  [True, False, True, False, False])
    with pytest.raises(ValueError, match="'circle:teal'"):
        D.parse_pairs(["circle:teal"])


def test_chance_levels_are_training_marginals():
    train = np.array([0, 0, 0, 1, 2, 2, 2, 2])  # p = (3/8, 1/8, 4/8)
    assert D.marginal_chance(train, np.array([0, 2, 2, 1]), 3) == pytest.approx(
        (3 / 8 + 4 / 8 + 4 / 8 + 1 / 8) / 4)
    lab = {"kind": np.array([0, 0, 1, 1]), "colour": np.array([2, 3, 3, 3])}
    req = {"kind": np.array([0, 1]), "colour": np.array([3, 2])}
    # p(kind) = (1/2, 1/2), p(colour=2) = 1/4, p(colour=3) = 3/4
    assert D.pair_chance(lab, req) == pytest.approx((0.5 * 0.75 + 0.5 * 0.25) / 2)
    # either parent: p(a) + p(b) when they differ, p(a) when equal
    np.testing.assert_allclose(D._either_chance(train, np.array([0, 1]), np.array([2, 1]), 3),
                               [7 / 8, 1 / 8])


def test_composition_pairs_differ_in_kind_and_colour_and_are_seeded():
    rng = np.random.default_rng(0)
    lab = {"kind": rng.integers(0, 5, 50), "colour": rng.integers(0, 8, 50)}
    cand = np.arange(10, 50)
    p = D.composition_pairs(lab, cand, 30, seed=3)
    assert p.shape == (30, 2) and np.isin(p, cand).all()
    assert (lab["kind"][p[:, 0]] != lab["kind"][p[:, 1]]).all()
    assert (lab["colour"][p[:, 0]] != lab["colour"][p[:, 1]]).all()
    np.testing.assert_array_equal(p, D.composition_pairs(lab, cand, 30, seed=3))
    same = {"kind": np.zeros(50, int), "colour": np.zeros(50, int)}
    with pytest.raises(ValueError, match="raise data.num_test"):
        D.composition_pairs(same, cand, 3, seed=0)


def test_compose_and_sample_matches_numpy_oracle():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 2, 5, 7)) * 3
    dists = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # near-zero temperature: the argmax of the averaged distribution
    codes = np.asarray(D.compose_and_sample(jax.random.key(0), jnp.asarray(dists, jnp.float32),
                                            1e-4))
    np.testing.assert_array_equal(codes, dists.mean(axis=1).argmax(-1))
    # temperature 1: empirical frequencies approach the average (one pair repeated)
    many = np.repeat(dists[:1], 4000, axis=0)
    codes = np.asarray(D.compose_and_sample(jax.random.key(1), jnp.asarray(many, jnp.float32),
                                            1.0))
    freq = np.stack([np.bincount(codes[:, i], minlength=7) / 4000 for i in range(5)])
    np.testing.assert_allclose(freq, dists[0].mean(axis=0), atol=0.03)


def test_code_sequences_prior_prefix_is_constant_and_text_prefix_decodes():
    captions = ["a small red circle on plain blue", "a large green cross on red dots"]
    data = {"train_captions": np.asarray(captions)}
    cfg = D.smoke()
    V = cfg.sem.dino.sem.group_size
    codes = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], np.int32)
    seqs, vocab, plen = D.code_sequences(cfg, data, codes)
    assert plen == 7 and seqs.shape == (2, 2, 7 + 4)
    np.testing.assert_array_equal(seqs[:, :, plen:], np.stack([codes, codes]))
    assert (seqs[0, :, :plen] == V + 1).all()  # <pad> id: the prior sees no caption
    assert dlc.decode_captions(seqs[1, :, :plen], vocab, offset=V + 1) == captions
    mcfg = D.code_model_config(cfg, plen, len(vocab))
    assert mcfg.length == plen + 4 and mcfg.extra_tokens == len(vocab)
    assert seqs.max() < mcfg.vocab_size + 1 + mcfg.extra_tokens  # every id has an embedding


def test_rows_in_finds_memorised_codes():
    table = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(D._rows_in(np.array([[3, 4], [4, 3], [1, 2]]), table),
                                  [True, False, True])


def test_config_cross_checks_name_the_field():
    with pytest.raises(ConfigError, match="dit.model.code_length"):
        apply_overrides(D.smoke(), ["dit.model.code_length=5"])
    with pytest.raises(ConfigError, match="heldout_pairs"):
        apply_overrides(D.smoke(), ["data.heldout_pairs=circle:grey"])
    with pytest.raises(ConfigError, match="unconditional"):
        apply_overrides(D.smoke(), ["dit.model.unconditional=true"])
    for preset in (D.smoke, D.cpu, D.control, D.paper):
        cfg = preset()
        assert cfg.dit.model.code_length == cfg.sem.dino.sem.num_groups
    # the control differs from cpu in the encoder stage only (so the two runs are paired)
    ctrl, cpu = D.control(), D.cpu()
    assert ctrl.sem.encoder == "attributes" and cpu.sem.encoder == "dino"
    assert dataclasses.replace(ctrl, sem=cpu.sem) == cpu
    with pytest.raises(ConfigError, match="sem.encoder"):
        apply_overrides(D.smoke(), ["sem.encoder=labels"])
    p = D.paper().sem.dino.sem
    assert (p.num_groups, p.group_size) == (512, 256)  # the official release's DLC shape
    assert D.paper().dit.model.depth == 28 and D.paper().dit.model.dim == 1152


def test_supervised_control_encoder_stage():
    """sem.encoder=attributes: codes of the right shape from the supervised ViT + SEM, its
    training accuracies recorded per attribute, and the report calls it a control."""
    cfg = apply_overrides(D.smoke(), ["sem.encoder=attributes"])
    data, _, _ = D.stage_data(cfg)
    arrays, params, info = D.stage_sem(cfg, data)
    L = cfg.sem.dino.sem.num_groups
    assert arrays["train_codes"].shape == (len(data["train_images"]), L)
    assert arrays["test_codes"].shape == (len(data["test_images"]), L)
    assert arrays["hist_loss"].shape == (cfg.sem.steps,)
    assert info["encoder"] == "attributes" and set(info["train_accuracy"]) == set(D.HEADS)
    assert "teacher" in params
    text = D.knn_sentence(info)
    assert "Supervised control" in text and "DINO loss" not in text


def test_stages_save_load_and_resume_only_when_asked(tmp_path):
    from trainkit.run import RunDir

    rd = RunDir(tmp_path / "run")
    calls = []

    def fn():
        calls.append(1)
        return {"x": np.arange(3)}, {"w": {"k": np.ones(2)}}, {"a": 1}

    arrays, params, info = D.Stages(rd, resume=False).run("s", fn)
    assert info["a"] == 1 and (rd.checkpoints_dir / "s" / "done.json").exists()
    st = D.Stages(rd, resume=True)
    arrays, params, info = st.run("s", fn)
    assert len(calls) == 1 and st.log == {"s": "skipped"}
    np.testing.assert_array_equal(arrays["x"], np.arange(3))
    np.testing.assert_array_equal(params["w"]["k"], np.ones(2))
    D.Stages(rd, resume=False).run("s", fn)  # not resuming: recomputed
    assert len(calls) == 2


# --- end to end (slow) ----------------------------------------------------------------------------


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_dlc_smoke_end_to_end_and_stage_resume(tmp_path, tmp_path_factory):
    shared = shared_smoke_run("dlc", tmp_path_factory)
    run_dir, env = copy_run(shared, tmp_path / "run"), shared.spec.env()
    for stage in D.STAGES:
        assert f"dlc: stage {stage}: " in shared.stdout and "skipped" not in shared.stdout
    report = (run_dir / "report.md").read_text()
    for title in D.SET_TITLES.values():
        if "(d)" not in title and "(e)" not in title:
            assert f"| {title} |" in report, title
    assert D.FD_NAME in report
    assert "Samples from codes drawn from the MDLM prior (the paper's claim) are **" in report
    assert "| A - B | FD difference | 95% interval | A is |" in report
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    for pair in ("prior-uncond", "recon-uncond", "recon-prior"):
        d, low, high = (final[f"fd_difference/{pair}/{k}"] for k in ("diff", "low", "high"))
        assert low <= d <= high, (pair, d, low, high)
    assert "Text-to-image on held-out" in report and "kNN" in report
    for name in ("real", *D.SAMPLE_SETS):
        assert (run_dir / "plots" / f"grid_{name}.png").stat().st_size > 0
    assert (run_dir / "plots" / "compose_triples.png").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics == summary["final"]
    for key in ("real/fd", "uncond/fd", "prior/fd", "recon/fd", "text/acc/kind",
                "text/chance/colour", "compose/kind/either", "sem_knn/trained/codes/kind"):
        assert key in metrics, key
    for key, v in metrics.items():
        assert math.isfinite(v), (key, v)
        if not key.endswith("/fd") and not key.startswith("fd_difference/"):
            assert 0.0 <= v <= 1.0, (key, v)
    stage_files = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}

    res = run_cli(["run", "dlc", "--run-dir", str(run_dir), "--resume"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in D.STAGES:
        assert f"dlc: stage {stage}: done, loaded (skipped)" in res.stdout, stage
    after = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    assert after == stage_files  # nothing recomputed or rewritten
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["final"] == summary["final"]
    assert again["params_sha256"] == summary["params_sha256"]


# --- report verdicts ----------------------------------------------------------------------------


def _dist(uncond, prior, recon=250.0, real=10.0):
    one = lambda fd: {"fd": fd, "precision": 0.5, "recall": 0.4}
    return {"uncond": one(uncond), "prior": one(prior), "recon": one(recon), "real": one(real)}


def test_distance_sentence_verdict_follows_the_interval_not_the_point():
    dist = _dist(uncond=300.0, prior=240.0)
    diff = lambda d, lo, hi: {"prior-uncond": {"diff": d, "low": lo, "high": hi}}  # noqa: E731
    lower = D.distance_sentence(dist, diff(-60.0, -80.0, -40.0))
    assert "are **lower** in FD (attribute-CNN features) than the" in lower and "240.00 vs 300.00, difference -60.00 [-80.00, -40.00]" in lower
    # the same point estimates with an interval across 0 decide nothing
    unsure = D.distance_sentence(dist, diff(-60.0, -130.0, 10.0))
    assert "**not distinguishable** in FD (attribute-CNN features) from the" in unsure
    assert "**higher**" in D.distance_sentence(_dist(300.0, 330.0), diff(30.0, 5.0, 55.0))
    # a run without intervals states the numbers and no verdict
    old = D.distance_sentence(dist)
    assert "predates the intervals" in old and "**" not in old
    # the caveat appears only when every generated set is far from the real floor
    assert "farther from" in lower
    assert "farther from" not in D.distance_sentence(_dist(40.0, 30.0, recon=35.0, real=10.0))


def _attrs(kind_acc, colour_acc):
    c = {"either": 0.6, "chance_either": 0.4, "parent_a": 0.3, "parent_b": 0.3}
    return {"text": {"accuracy": {"kind": kind_acc, "colour": colour_acc},
                     "chance": {"kind": 0.2, "colour": 0.125}, "kind+colour": 0.1,
                     "kind+colour_chance": 0.025},
            "compose": {"kind": c, "colour": c}}


def test_attribute_sentence_verdicts_follow_the_numbers():
    text = D.attribute_sentence(_attrs(kind_acc=0.5, colour_acc=0.1))
    assert "kind 0.50 (chance 0.20, above)" in text
    assert "colour 0.10 (chance 0.12, not above)" in text
    flipped = D.attribute_sentence(_attrs(kind_acc=0.1, colour_acc=0.9))
    assert "kind 0.10 (chance 0.20, not above)" in flipped and "colour 0.90 (chance 0.12, above)" in flipped


# --- seeds combined -----------------------------------------------------------------------------


def _fake_run(root, seed, prior_minus_uncond, *, cfg=None):
    """A finished dlc run directory with the files combine reads (config, run.json, summary)."""
    from trainkit.config import save_json

    path = root / f"s{seed}"
    path.mkdir(parents=True)
    save_json(dataclasses.replace(cfg or D.smoke(), seed=seed), path / "config.json")
    (path / "run.json").write_text(json.dumps({"experiment": "dlc"}))
    final = {}
    for i, name in enumerate(("real", "uncond", "prior", "recon")):
        fd = 10.0 if name == "real" else 300.0 + 5 * seed + i
        final.update({f"{name}/fd": fd, f"{name}/precision": 0.5, f"{name}/recall": 0.4})
    final["prior/fd"] = final["uncond/fd"] + prior_minus_uncond
    for a, b in D.FD_COMPARISONS:
        d = final[f"{a}/fd"] - final[f"{b}/fd"]
        final.update({f"fd_difference/{a}-{b}/{k}": v
                      for k, v in (("diff", d), ("low", d - 5), ("high", d + 5))})
    for name in ("recon", "text"):
        for h in ("kind", "colour", "background_colour"):
            final.update({f"{name}/acc/{h}": 0.3, f"{name}/chance/{h}": 0.2})
    for h in ("kind", "colour", "background_colour"):
        final.update({f"compose/{h}/either": 0.5, f"compose/{h}/chance_either": 0.4})
    (path / "summary.json").write_text(json.dumps({"final": final}))
    return path


def test_combine_reads_the_verdict_from_the_seed_interval(tmp_path):
    from trainkit.run import RunDir

    # per-seed differences -20, -25, -30: mean -25, t interval (4.30 * 2.89) below 0
    runs = [RunDir(_fake_run(tmp_path, s, d), must_exist=True)
            for s, d in ((0, -20.0), (1, -25.0), (2, -30.0))]
    report = Path(D.combine_seeds(runs, tmp_path / "out")).read_text()
    out = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert out["seeds"] == [0, 1, 2] and out["verdicts"]["prior-uncond"] == "lower"
    m = out["metrics"]
    assert m["fd_difference/prior-uncond/diff/mean"] == pytest.approx(-25.0)
    assert m["fd_difference/prior-uncond/diff/ci_half"] == pytest.approx(
        4.302653 * 5.0 / np.sqrt(3), rel=1e-5)
    assert "prior-code samples are **lower**" in report
    assert "| seed 0 | seed 1 | seed 2 |" in report
    assert (tmp_path / "out" / "plots" / "fd_by_set.png").stat().st_size > 0
    # one seed the other way: the interval spans 0 and there is no verdict
    mixed = [RunDir(_fake_run(tmp_path / "mixed", s, d), must_exist=True)
             for s, d in ((0, -20.0), (1, -25.0), (2, 15.0))]
    D.combine_seeds(mixed, tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "metrics.json").read_text())["verdicts"][
        "prior-uncond"] == "not distinguishable"


def test_combine_refuses_runs_that_differ_in_more_than_the_seed(tmp_path):
    from trainkit.run import RunDir

    other = dataclasses.replace(D.smoke(), eval=dataclasses.replace(D.smoke().eval, guidance=3.0))
    runs = [RunDir(_fake_run(tmp_path, 0, -1.0), must_exist=True),
            RunDir(_fake_run(tmp_path, 1, -1.0, cfg=other), must_exist=True)]
    with pytest.raises(UserError, match="in more than the seed: eval.guidance"):
        D.combine_seeds(runs, tmp_path / "out")
    same_seed = [runs[0], RunDir(_fake_run(tmp_path / "again", 0, -1.0), must_exist=True)]
    with pytest.raises(UserError, match="distinct seeds"):
        D.combine_seeds(same_seed, tmp_path / "out")
