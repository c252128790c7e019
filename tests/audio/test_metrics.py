"""audio.metrics: AUROC against sklearn and hand values, PSDS and event F1 on hand-made
detections (sed_scores_eval), recall@k and zero-shot accuracy on matrices computed by hand,
and PSDS of perfect scores on simulated mixtures."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import roc_auc_score

from audio import metrics as M
from audio import sed

pytestmark = pytest.mark.filterwarnings("ignore:espeak-ng is not installed")

# --- AUROC -----------------------------------------------------------------------------------


def test_auroc_hand_cases():
    y = np.array([0, 0, 1, 1])
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) lose, (0.8, .) win twice -> 3/4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], y) == 0.75
    assert M.auroc([0.1, 0.2, 0.7, 0.9], y) == 1.0       # perfect
    assert M.auroc([0.9, 0.7, 0.2, 0.1], y) == 0.0       # reversed
    assert M.auroc([0.5, 0.5, 0.5, 0.5], y) == 0.5       # ties count one half
    assert M.auroc([0.1, 0.5, 0.5, 0.9], y) == 0.875     # one tie among four pairs
    assert np.isnan(M.auroc([0.1, 0.2], [1, 1]))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(0, 2 ** 31 - 1), st.booleans())
def test_auroc_equals_sklearn(n, seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_frame_auroc_per_class_macro_and_mask():
    rng = np.random.default_rng(0)
    n, l_, c = 3, 20, 4
    labels = rng.random((n, l_, c)) < 0.3
    labels[..., 3] = False  # a class with no positive frame: undefined
    scores = rng.normal(size=(n, l_, c)) + 1.5 * labels
    mask = np.ones((n, l_), bool)
    mask[1, 10:] = False
    res = M.frame_auroc(scores, labels, mask)
    for k in range(3):
        m = mask.reshape(-1)
        ref = roc_auc_score(labels[..., k].reshape(-1)[m], scores[..., k].reshape(-1)[m])
        assert res.per_class[k] == pytest.approx(ref, abs=1e-12)
    assert np.isnan(res.per_class[3])
    assert res.macro == pytest.approx(np.mean(res.per_class[:3]))
    perfect = M.frame_auroc(labels[..., :3].astype(float), labels[..., :3])
    np.testing.assert_array_equal(perfect.per_class, 1.0)
    assert M.frame_auroc(-labels[..., :3].astype(float), labels[..., :3]).macro == 0.0
    with pytest.raises(ValueError, match="same shape"):
        M.frame_auroc(scores, labels[..., :2])


# --- retrieval and zero-shot -----------------------------------------------------------------


def test_recall_at_k_hand_matrix():
    # rows: audios, columns: texts (text j describes audio j)
    sim = np.array([[0.9, 0.1, 0.3],
                    [0.8, 0.2, 0.7],
                    [0.1, 0.6, 0.5]])
    r = M.recall_at_k(sim, ks=(1, 2, 3))
    # t2a, column j ranks the audios: text0 -> audio0 first (0.9) yes; text1 -> audio1 scores
    # 0.2, below audio2 0.6: rank 2; text2 -> audio2 0.5 below audio1 0.7: rank 2.
    assert r["t2a_R@1"] == pytest.approx(1 / 3)
    assert r["t2a_R@2"] == 1.0 and r["t2a_R@3"] == 1.0
    # a2t, row i ranks the texts: audio0 -> text0 first; audio1 -> text1 last (rank 3);
    # audio2 -> text2 second.
    assert r["a2t_R@1"] == pytest.approx(1 / 3)
    assert r["a2t_R@2"] == pytest.approx(2 / 3)
    assert r["a2t_R@3"] == 1.0
    assert M.recall_at_k(np.eye(4), ks=(1,)) == {"t2a_R@1": 1.0, "a2t_R@1": 1.0}
    # constant similarities: ties count against the true item
    assert M.recall_at_k(np.ones((3, 3)), ks=(1, 3)) == {"t2a_R@1": 0.0, "a2t_R@1": 0.0,
                                                        "t2a_R@3": 1.0, "a2t_R@3": 1.0}


def test_recall_with_several_captions_per_clip():
    # 2 audios, 4 texts: texts 0, 1 describe audio 0; texts 2, 3 audio 1
    sim = np.array([[0.2, 0.9, 0.8, 0.1],
                    [0.3, 0.4, 0.5, 0.6]])
    r = M.recall_at_k(sim, ks=(1,), text_to_audio=[0, 0, 1, 1])
    # t2a: text0 prefers audio1 (0.3 > 0.2): miss; text1 hit (0.9 > 0.4); text2 prefers
    # audio0 (0.8 > 0.5): miss; text3 hit (0.6 > 0.1)
    assert r["t2a_R@1"] == 0.5
    # a2t: audio0's best text is text1 (its own) hit; audio1's best is text3 (its own) hit
    assert r["a2t_R@1"] == 1.0
    with pytest.raises(ValueError, match="text_to_audio"):
        M.recall_at_k(sim)


def test_zero_shot_accuracy_hand_case():
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    audio = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2], [1.0, 1.2]])
    labels = np.array([0, 1, 2, 0])
    # cosine argmax: 0, 1, 2, 1 -> 3 of 4 right; top-2 of the last: classes 1, 0 -> right
    assert M.zero_shot_accuracy(audio, classes, labels) == 0.75
    assert M.zero_shot_accuracy(audio, classes, labels, k=2) == 1.0
    with pytest.raises(ValueError, match="labels"):
        M.zero_shot_accuracy(audio, classes, np.array([0, 1, 3, 0]))


# --- event-based metrics (sed_scores_eval) ---------------------------------------------------

TS = np.round(np.arange(101) * 0.1, 6)  # 100 frames of 100 ms: 10 s clips


def _run(on, off, value=1.0):
    x = np.zeros(100)
    x[int(round(on * 10)):int(round(off * 10))] = value
    return x


def test_event_f1_hand_case():
    events = [[(1.0, 3.0, "A"), (5.0, 6.0, "B")]]
    scores = np.zeros((1, 100, 2))
    scores[0, :, 0] = _run(1.1, 2.9) + _run(7.0, 8.0)   # TP (within 0.2 s) + FP
    scores[0, :, 1] = _run(5.5, 6.0)                     # onset 0.5 s late: FP, FN
    r = M.event_f1(scores, TS, events, ["A", "B"], threshold=0.5)
    # A: P = 1/2, R = 1, F = 2/3; B: 0. Macro 1/3; micro TP 1, FP 2, n_ref 2 -> P 1/3, R 1/2
    assert r.per_class["A"]["f1"] == pytest.approx(2 / 3)
    assert r.per_class["B"]["f1"] == 0.0
    assert (r.per_class["A"]["tp"], r.per_class["A"]["fp"]) == (1, 1)
    assert r.f1_macro == pytest.approx(1 / 3)
    assert r.precision_micro == pytest.approx(1 / 3) and r.recall_micro == 0.5
    assert r.f1_micro == pytest.approx(0.4)
    # a stricter collar turns A's match into a miss too
    strict = M.event_f1(scores, TS, events, ["A", "B"], threshold=0.5, onset_collar=0.05,
                        offset_collar=0.05, offset_collar_rate=0.0)
    assert strict.per_class["A"]["tp"] == 0 and strict.f1_macro == 0.0


def test_psds_perfect_and_half_detected():
    events = [[(1.0, 3.0, "A"), (5.0, 6.0, "B")], [(2.0, 4.0, "B")]]
    perfect = np.zeros((2, 100, 3))
    perfect[0, :, 0] = _run(1, 3)
    perfect[0, :, 1] = _run(5, 6)
    perfect[1, :, 1] = _run(2, 4)
    for scenario in (M.PSDS1, M.PSDS2):
        res = M.psds(perfect, TS, events, 10.0, ["A", "B", "C"], scenario)
        assert res.value == pytest.approx(1.0)
        assert res.classes == ["A", "B"] and res.skipped == ["C"]
    # one class, two events, only the first detected, nothing else scored: TPR 1/2 at zero
    # FPR; lowering the threshold to the floor detects the whole 10 s clip as one false event
    # (360 per hour, beyond max_efpr = 100), so PSDS = 1/2.
    half = np.zeros((1, 100, 1))
    half[0, :, 0] = _run(1, 3)
    no_penalty = M.PSDSScenario(0.7, 0.7, None, 0.0, 0.0, 100.0)
    res = M.psds(half, TS, [[(1.0, 3.0, "A"), (5.0, 6.0, "A")]], 10.0, ["A"], no_penalty)
    assert res.value == pytest.approx(0.5)
    # reversed scores detect nothing but false positives
    res = M.psds(1.0 - perfect[..., :2], TS, events, 10.0, ["A", "B"])
    assert res.value == pytest.approx(0.0, abs=1e-9)


def test_ground_truth_merges_overlapping_same_class_events():
    gt = M.ground_truth([[(1.0, 2.0, "A"), (1.5, 3.0, "A"), (3.0, 4.0, "A"), (1.2, 1.4, "B"),
                          (6.0, 7.0, "A")]], clip_ids=["x"])
    assert gt == {"x": [(1.0, 4.0, "A"), (1.2, 1.4, "B"), (6.0, 7.0, "A")]}
    with pytest.raises(ValueError, match="offset"):
        M.ground_truth([[(2.0, 1.0, "A")]])
    with pytest.raises(ValueError, match="not in class_names"):
        M.psds(np.zeros((1, 100, 1)), TS, [[(1.0, 2.0, "Z")]], 10.0, ["A"])


def test_events_from_frames_hand_case():
    labels = np.zeros((2, 6, 2), bool)
    labels[0, 1:3, 0] = True
    labels[0, 4:6, 0] = True
    labels[1, :, 1] = True
    ts = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert M.events_from_frames(labels, ts, ["a", "b"]) == [
        [(0.5, 1.5, "a"), (2.0, 3.0, "a")], [(0.0, 3.0, "b")]]


def test_perfect_scores_on_simulated_mixtures_give_psds_near_one():
    cfg = sed.SimConfig.tiny()
    classes = list(sed.available_classes("seen"))
    mixtures = [sed.example(cfg, 0, "train", i) for i in range(12)]
    scores = np.stack([sed.class_labels(m.events, m.event_labels, classes).T.astype(float)
                       for m in mixtures])
    events = [m.events for m in mixtures]
    ts = sed.frame_timestamps(cfg.num_samples, cfg)
    # PSDS2's 0.1 detection/ground-truth tolerances absorb the gap between the annotated event
    # boundaries and the A-weighted frame labels, so perfect frame scores score exactly 1.
    res = M.psds(scores, ts, events, cfg.duration, classes, M.PSDS2)
    assert res.value == pytest.approx(1.0)
    assert set(res.per_class.values()) == {1.0}
    labels = scores > 0.5
    noisy = scores + np.random.default_rng(0).normal(0, 2.0, scores.shape)
    assert M.psds(noisy, ts, events, cfg.duration, classes, M.PSDS2).value < res.value
    # against ground truth on the frame grid, perfect scores are perfect for PSDS1 too
    grid_events = M.events_from_frames(labels, ts, classes)
    assert M.psds(scores, ts, grid_events, cfg.duration, classes, M.PSDS1).value == (
        pytest.approx(1.0))
    assert M.event_f1(scores, ts, grid_events, classes).f1_macro == pytest.approx(1.0)


def test_sed_scores_eval_import_leaves_no_placeholder_behind():
    """The pkg_resources placeholder (setuptools >= 81) must not outlive the import: other
    libraries (transformers' lazy imports) broke on it when it stayed in sys.modules."""
    import sys

    from audio import metrics

    metrics._sed_scores_eval()
    module = sys.modules.get("pkg_resources")
    assert module is None or "placeholder" not in (module.__doc__ or "")
