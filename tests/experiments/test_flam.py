"""flam experiment: the smoke preset end to end through the CLI (report table with both models
and both test splits, finite metrics in [0, 1], plots, a resumed finished run does not
retrain), plus exact checks of the experiment's own helpers (batch order, captions, dominant
class, prompt-ensembled frame scores against a NumPy oracle, event-F1 thresholds chosen on
the validation split only, objective weights of each arm, config cross-checks)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from audio import metrics as am
from audio import sed
from experiments import flam as F
from tests.helpers import copy_run, run_cli, SHARED_RUN_TIMEOUT, shared_smoke_run
from trainkit.config import ConfigError, apply_overrides


# --- helpers (fast) ------------------------------------------------------------------------------


def test_batch_indices_visit_every_clip_once_per_epoch_and_are_step_addressable():
    n, b = 10, 4
    seq = np.concatenate([F.batch_indices(s, b, n, seed=3) for s in range(10)])  # 40 = 4 epochs
    for e in range(4):
        assert sorted(seq[e * n:(e + 1) * n].tolist()) == list(range(n))
    # epoch e is default_rng([seed, e]).permutation(n): the oracle, and independent of history
    np.testing.assert_array_equal(seq[n:2 * n], np.random.default_rng([3, 1]).permutation(n))
    np.testing.assert_array_equal(F.batch_indices(7, b, n, 3), seq[28:32])
    assert not np.array_equal(seq[:n], np.concatenate(
        [F.batch_indices(s, b, n, seed=4) for s in range(3)])[:n])


def test_clip_captions_join_the_positive_texts_only():
    texts = np.array([["a hiss", "a siren", "a low tone", ""], ["a knock", "", "", ""]])
    classes = np.array([["white_noise", "siren", "low_tone", ""], ["knock", "", "", ""]])
    events = np.array([["low_tone", "white_noise", "low_tone"], ["siren", "", ""]])
    mask = np.array([[True, True, True], [True, False, False]])
    assert F.clip_captions(texts, classes, events, mask) == ["a hiss and a low tone", ""]


def test_dominant_class_is_the_class_with_most_labelled_frames():
    events = np.array([["a", "b", "a"], ["b", "c", ""]])
    labels = np.zeros((2, 3, 6), np.float32)
    labels[0, 0, :2] = 1  # a: frames 0-1
    labels[0, 2, 3:5] = 1  # a again: frames 3-4 -> 4 frames of a
    labels[0, 1, :3] = 1  # b: 3 frames
    labels[1, 1, :] = 1  # c: 6 frames
    labels[1, 0, :5] = 1  # b: 5
    mask = np.array([[True] * 3, [True, True, False]])
    np.testing.assert_array_equal(F.dominant_class(events, labels, mask, ("a", "b", "c")), [0, 2])
    none = F.dominant_class(events, np.zeros_like(labels), mask, ("a", "b", "c"))
    np.testing.assert_array_equal(none, [-1, -1])


@pytest.mark.parametrize("kind", ["unbiased", "sigmoid", "cosine"])
def test_frame_scores_match_a_numpy_oracle(kind):
    rng = np.random.default_rng(0)
    n, l_, d, k = 3, 5, 4, 5
    frames = rng.normal(size=(n, l_, d))
    frames /= np.linalg.norm(frames, axis=-1, keepdims=True)
    text = rng.normal(size=(k, d))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    alpha = rng.uniform(1, 10, size=k)
    beta = rng.uniform(-8, 0, size=k)
    owner = np.array([0, 1, 0, 1, 1])  # captions 0, 2 -> class 0; 1, 3, 4 -> class 1
    got = F.frame_scores(frames.astype(np.float32), text.astype(np.float32),
                         alpha.astype(np.float32), beta.astype(np.float32), owner, 2, kind)
    cos = np.einsum("nld,kd->nlk", frames, text)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    h = alpha * cos + beta
    per = {"cosine": cos, "sigmoid": sig(h), "unbiased": sig(h) / (sig(h) + sig(beta))}[kind]
    want = np.stack([per[..., owner == c].mean(-1) for c in range(2)], axis=-1)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_active_frame_auroc_gives_an_activity_detector_one_half():
    """Hand-computed: class 0 sounds in clip 0 frames 0-4, class 1 in clip 1 frames 5-9 (of n
    frames per clip); the scores are pure activity (1 wherever any event sounds, for every
    class). Frame AUROC of class 0: its 5 positives (score 1) against 2n - 5 negatives, 2n - 10
    silent (0) and 5 where class 1 sounds (1, ties): ((2n - 10) + 0.5 * 5) / (2n - 5); the same
    for class 1. On active frames only, each class's positives tie with its negatives: 0.5."""
    sim = F.smoke().data.sim
    n_frames = len(sed.frame_timestamps(sim.num_samples, sim)) - 1
    labels = np.zeros((2, n_frames, 2), bool)
    labels[0, 0:5, 0] = True
    labels[1, 5:10, 1] = True
    scores = np.repeat(labels.any(-1, keepdims=True), 2, axis=-1).astype(np.float64)
    out = F.sed_metrics(scores, labels, ("a", "b"), sim, 0.5)
    n = n_frames
    assert out["auroc"] == pytest.approx(((2 * n - 10) + 2.5) / (2 * n - 5))
    assert out["auroc_active"] == pytest.approx(0.5)
    # and a detector that also tells the classes apart is perfect on both
    out = F.sed_metrics(labels.astype(np.float64), labels, ("a", "b"), sim, 0.5)
    assert out["auroc"] == pytest.approx(1.0) and out["auroc_active"] == pytest.approx(1.0)


def test_objective_weights_of_each_arm():
    assert F.objective_weights("flam_global", 200.0) == (1.0, 0.0, 0.0, 1.0)  # clip only
    assert F.objective_weights("flam", 200.0) == (1.0, 200.0, 1.0, 1.0)
    # the ablation: no prior loss, beta trained by L_SED (logit adjustment 0)
    assert F.objective_weights("flam_no_la", 200.0) == (1.0, 200.0, 0.0, 0.0)
    assert set(F.cpu().models) == set(F.MODELS) and F.smoke().models == F.DEFAULT_MODELS


def _scored(seed: int, n: int = 5):
    """Synthetic class scores ``[n, L, 2]`` on the smoke grid: events of 3-8 frames, scores =
    0.6 x labels + uniform noise (a detector that is good but not perfect)."""
    sim = F.smoke().data.sim
    n_frames = len(sed.frame_timestamps(sim.num_samples, sim)) - 1
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, n_frames, 2), bool)
    for i in range(n):
        for c in range(2):
            a = int(rng.integers(0, n_frames - 8))
            labels[i, a:a + int(rng.integers(3, 9)), c] = True
    scores = 0.6 * labels + rng.uniform(0, 0.7, labels.shape)
    return scores, labels, ("a", "b"), sim


def test_calibrated_threshold_is_the_best_candidate_by_event_f1():
    """Oracle: ``audio.metrics.event_f1`` evaluated at every candidate (quantiles of the
    scores); the calibrated threshold is the first maximiser and its F1 is event_f1's."""
    scores, labels, classes, sim = _scored(0)
    n = 9
    t, f1 = F.calibrate_threshold(scores, labels, classes, sim, n)
    ts = sed.frame_timestamps(sim.num_samples, sim)
    events = am.events_from_frames(labels, ts, classes)
    cands = np.unique(np.quantile(scores, (np.arange(n) + 0.5) / n))
    oracle = [am.event_f1(scores, ts, events, classes, c).f1_macro for c in cands]
    assert t == pytest.approx(cands[int(np.argmax(oracle))])
    assert f1 == pytest.approx(max(oracle)) and 0 < f1 <= 1
    assert max(oracle) > min(oracle)  # the choice matters on these scores


def test_threshold_is_chosen_on_validation_data_only():
    """Changing the test splits' labels and scores never moves the threshold (nor the
    validation F1); the test F1 is event_f1 at that threshold; changing the validation
    labels does move it (so this test can fail)."""
    valid, test = _scored(1), _scored(2)
    ecfg = F.EvalConfig(threshold_candidates=21)
    scored = {F.VALID_SPLIT: valid[:3], "test_seen": test[:3]}
    out = F.sed_results(scored, valid[3], ecfg)
    assert F.VALID_SPLIT not in out and set(out) == {"threshold", "valid_event_f1", "test_seen"}
    sim = valid[3]
    ts = sed.frame_timestamps(sim.num_samples, sim)
    want = am.event_f1(test[0], ts, am.events_from_frames(test[1], ts, test[2]), test[2],
                       out["threshold"]).f1_macro
    assert out["test_seen"]["event_f1"] == pytest.approx(want)
    rng = np.random.default_rng(3)
    other_labels = rng.permutation(test[1], axis=1)  # other test labels
    other_scores = test[0][::-1] * 3.0 - 1.0  # and other test scores, on another scale
    changed = F.sed_results({F.VALID_SPLIT: valid[:3],
                             "test_seen": (other_scores, other_labels, test[2])}, sim, ecfg)
    assert changed["threshold"] == out["threshold"]
    assert changed["valid_event_f1"] == out["valid_event_f1"]
    assert changed["test_seen"]["event_f1"] != out["test_seen"]["event_f1"]
    flipped = F.sed_results({F.VALID_SPLIT: (valid[0], ~valid[1], valid[2]),
                             "test_seen": test[:3]}, sim, ecfg)
    assert flipped["threshold"] != out["threshold"]
    fixed = F.sed_results(scored, sim, F.EvalConfig(f1_threshold=0.5))
    assert fixed["threshold"] == 0.5 and math.isnan(fixed["valid_event_f1"])


def test_comparison_sentence_is_computed_from_the_numbers():
    def ev(a, p):
        return {"test_heldout": {"unbiased": {"auroc": a, "psds1": p, "psds2": p, "event_f1": p},
                                 "cosine": {"auroc": a, "psds1": p, "psds2": p, "event_f1": p}}}

    evals = {"flam": ev(0.8, 0.3), "flam_global": ev(0.6, 0.1)}
    evals["flam"]["test_heldout"]["cosine"] = None  # never read
    text = F.comparison_sentence(evals)
    assert " beats " in text and "+0.200 (0.800 vs 0.600)" in text and "PSDS1 0.300 vs" in text
    worse = F.comparison_sentence({"flam": ev(0.55, 0.1), "flam_global": ev(0.6, 0.1)})
    assert "does not beat" in worse and "-0.050" in worse


def test_ablation_sentence_is_computed_from_the_numbers():
    def ev(score, f1):
        m = {"auroc": 0.7, "auroc_active": 0.55, "event_f1": f1}
        return {split: {score: m} for split in F.TEST_SPLITS}

    assert F.ablation_sentence({"flam": ev("unbiased", 0.3)}) == ""  # no ablation arm trained
    text = F.ablation_sentence({"flam": ev("unbiased", 0.3), "flam_no_la": ev("sigmoid", 0.1)})
    assert "test_heldout: event F1 0.300 vs 0.100 (+0.200)" in text
    assert "frame AUROC 0.700 vs 0.700 (+0.000)" in text


def test_config_cross_checks_name_the_field():
    with pytest.raises(ConfigError, match="data.sim.downsample"):
        apply_overrides(F.smoke(), ["data.sim.downsample=5"])
    with pytest.raises(ConfigError, match="models"):
        apply_overrides(F.smoke(), ["models=flam,flam"])
    cfg = F.paper()
    assert F.flam_config(cfg).text_source == "embeddings"
    assert cfg.model.flam.audio.downsample == cfg.data.sim.downsample
    assert dataclasses.replace(F.cpu().data.sim).num_frames > 0


# --- end to end (slow) ----------------------------------------------------------------------------


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_flam_smoke_end_to_end_and_resume(tmp_path, tmp_path_factory, subprocess_env):
    run_dir = copy_run(shared_smoke_run("flam", tmp_path_factory), tmp_path / "run")
    report = (run_dir / "report.md").read_text()
    models = F.smoke().models
    scorers = {ks: label for ks, label in F.SCORERS.items() if ks[0] in models}
    for label in scorers.values():
        for split in F.TEST_SPLITS:
            assert f"| {label} | {split} |" in report, (label, split)
    assert "On held-out classes" in report and "event F1 (threshold from valid)" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    final = dict(summary["final"])
    thresholds = {k: final.pop(k) for k in list(final) if k.endswith("/threshold")}
    assert len(thresholds) == len(scorers)  # one per model and score, from the valid split
    assert all(math.isfinite(v) for v in thresholds.values()), thresholds
    values = {k: v for k, v in final.items() if k != "num_params"}
    for split in F.TEST_SPLITS:
        for (kind, score) in scorers:
            for key in F.SED_METRICS:
                assert f"{split}/{kind}/{score}/{key}" in values
        for kind in models:
            for key in F.MODEL_METRICS:
                assert f"{split}/{kind}/{key}" in values
    for key, v in values.items():
        assert math.isfinite(v) and 0.0 <= v <= 1.0, (key, v)
    plots = run_dir / "plots"
    assert (plots / "train_loss.png").stat().st_size > 0
    assert (plots / "train_sed.png").exists()
    assert len(list(plots.glob("heatmap_test_heldout_*.png"))) == F.smoke().eval.num_heatmaps
    assert len(list(plots.glob("heatmap_test_seen_*.png"))) == F.smoke().eval.num_heatmaps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, F.smoke().train.steps + 1))
    assert all(len(r["loss"]) == 2 for r in rows)  # one value per model
    assert all(r["skipped"] == [0, 0] for r in rows)
    # training moves: FLAM's frame-wise loss falls (275 -> 103 when this was written). The
    # clip-level loss of FLAM-Global sits at chance over 6 smoke steps (log 4 = 1.39 with batch
    # 4: 1.42 -> 1.41), too short to ask more of it than to stay near chance.
    flam_loss = [r["loss"][models.index("flam")] for r in rows]
    assert flam_loss[-1] < 0.7 * flam_loss[0], flam_loss
    global_loss = [r["loss"][models.index("flam_global")] for r in rows]
    assert all(abs(v - math.log(4)) < 0.5 for v in global_loss), global_loss

    metrics_before = (run_dir / "metrics.jsonl").read_text()
    eval_before = (run_dir / "eval.json").read_text()
    ckpts_before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    res = run_cli(["run", "flam", "--run-dir", str(run_dir), "--resume"], subprocess_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # no step was re-run
    assert (run_dir / "eval.json").read_text() == eval_before  # nor re-evaluated
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ckpts_before
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["params_sha256"] == summary["params_sha256"]
    assert again["final"] == summary["final"]


def _fake_eval(auroc_flam: float, auroc_global: float) -> dict:
    """An eval.json with every metric 0.5 except the held-out frame AUROC of FLAM's unbiased
    score and FLAM-Global's cosine score."""
    sed_m = {m: 0.5 for m in F.SED_METRICS}
    model_m = {m: 0.5 for m in F.MODEL_METRICS}
    out = {}
    for kind in ("flam", "flam_global"):
        scores = {"flam": ("unbiased", "sigmoid"), "flam_global": ("cosine",)}[kind]
        out[kind] = {split: {"model": dict(model_m), **{s: dict(sed_m) for s in scores}}
                     for split in F.TEST_SPLITS}
    out["flam"]["test_heldout"]["unbiased"]["auroc"] = auroc_flam
    out["flam_global"]["test_heldout"]["cosine"]["auroc"] = auroc_global
    return out


def test_seed_report_intervals_and_paired_differences(tmp_path):
    """The seed report's numbers against a hand computation: mean +- t_{0.975, 2} s / sqrt(3)
    over 3 seeds (t = 4.302653), and FLAM - FLAM-Global taken within each seed before the
    interval (paired: the models of a run share initialisation and batches)."""
    from trainkit.config import save_json

    dirs = []
    for seed, (a, b) in enumerate([(0.70, 0.50), (0.82, 0.60), (0.91, 0.74)]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        save_json(dataclasses.replace(F.smoke(), seed=seed), d / "config.json")
        (d / "eval.json").write_text(json.dumps(_fake_eval(a, b)))
        dirs.append(d)
    text = F.seed_report(dirs)
    t = 4.302653
    half_flam = t * np.std([0.70, 0.82, 0.91], ddof=1) / np.sqrt(3)
    assert f"| FLAM (unbiased score) | test_heldout | {0.81:.3f} ± {half_flam:.3f} |" in text
    diffs = [0.20, 0.22, 0.17]
    half_d = t * np.std(diffs, ddof=1) / np.sqrt(3)  # 0.063: the paired interval excludes 0
    assert (f"| FLAM - FLAM-Global | test_heldout | auroc | +0.200, +0.220, +0.170 | "
            f"**+{np.mean(diffs):.3f} ± {half_d:.3f}** |") in text
    # equal metrics in every seed: a zero difference, not called a difference
    assert "| FLAM - FLAM-Global | test_seen | auroc | +0.000, +0.000, +0.000 | +0.000 ± 0.000 |" in text
    save_json(dataclasses.replace(F.smoke(), seed=0), dirs[1] / "config.json")
    with pytest.raises(F.UserError, match="repeat a seed"):
        F.seed_report(dirs)
