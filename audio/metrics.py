"""Evaluation of sound event detection and language-audio retrieval (FLAM, arXiv 2505.05335,
Sec. 5: frame-level AUROC and PSDS for open-vocabulary SED, retrieval recall@k, zero-shot
classification).

* :func:`auroc` / :func:`frame_auroc`: area under the ROC curve of frame scores, per class and
  macro-averaged, from the rank (Mann-Whitney) formula with mid-ranks for ties, which is what
  ``sklearn.metrics.roc_auc_score`` computes.
* :func:`psds`: Polyphonic Sound Detection Score (Bilen et al., ICASSP 2020) computed exactly
  by ``sed_scores_eval`` (Ebbers et al., ICASSP 2022) from frame scores; presets
  :data:`PSDS1` / :data:`PSDS2` are the DCASE 2021-2023 task 4 scenarios.
* :func:`event_f1`: collar-based event F1 (Mesaros et al. 2016; ``sed_eval``'s definition)
  at a fixed threshold, via ``sed_scores_eval.collar_based.fscore``.
* :func:`recall_at_k`: text-to-audio and audio-to-text retrieval recall@k from a similarity
  matrix (several captions per clip allowed).
* :func:`zero_shot_accuracy`: clip classification by the nearest class-text embedding.
* :func:`ground_truth`, :func:`events_from_frames`, :func:`score_dataframes`: conversions to
  ``sed_scores_eval``'s ground-truth and score formats.

Frame scores are arrays ``[N, L, C]`` (clips, frames, classes or texts) on a frame grid given
by ``timestamps`` ``[L + 1]`` seconds (frame ``l`` spans ``[t_l, t_{l+1})``;
:func:`audio.sed.frame_timestamps`); ground-truth events per clip are ``(onset, offset,
label)`` tuples or objects with ``onset``, ``offset`` and ``label`` attributes
(:class:`audio.sed.Event`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

# --- sed_scores_eval import -----------------------------------------------------------------


def _sed_scores_eval():
    """Import ``sed_scores_eval``. It imports ``sed_eval``, which imports ``dcase_util``, which
    imports ``pkg_resources`` at module level (only to look up its own resources and
    requirements, never on our code path). setuptools >= 81 no longer ships
    ``pkg_resources``; when it is missing, a placeholder module of that name is registered
    *only while* ``sed_scores_eval`` is imported and removed right after, so that no other
    library (transformers, torch...) ever sees it (calling into it raises a clear error)."""
    import importlib
    import sys
    import types

    if "sed_scores_eval" in sys.modules:
        return sys.modules["sed_scores_eval"]
    try:
        importlib.import_module("pkg_resources")
        return importlib.import_module("sed_scores_eval")
    except ImportError:
        pass
    stub = types.ModuleType("pkg_resources")
    stub.__doc__ = "placeholder registered by audio.metrics (setuptools >= 81 lacks it)"

    def _missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def fail(*args, **kwargs):
            raise ImportError(f"pkg_resources.{name} is unavailable (setuptools >= 81); "
                              f"audio.metrics registered a placeholder module")
        return fail

    stub.__getattr__ = _missing  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stub
    try:
        return importlib.import_module("sed_scores_eval")
    finally:
        if sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


# --- AUROC -----------------------------------------------------------------------------------


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # boundaries of runs of equal values
    new_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.concatenate([run_start[1:], [x.shape[0]]])
    mean_rank = (run_start + run_end + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.shape[0], np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve of binary ``labels`` ranked by ``scores`` (1-D).

    Mann-Whitney form: ``AUC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)`` with ``R_+`` the sum of
    the (mid-)ranks of the positives among all scores, i.e. the probability that a random
    positive scores above a random negative, ties counting one half. Equal to
    ``sklearn.metrics.roc_auc_score``. NaN when only one class is present."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same size, got {s.shape} and {y.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    y = y.astype(bool) if y.dtype != bool else y
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r_pos = _midranks(s)[y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class FrameAUROC(NamedTuple):
    """Per-class AUROC ``[C]`` (NaN for a class with only positive or only negative frames)
    and their mean over the defined classes (``macro``; NaN if none is)."""
    per_class: np.ndarray
    macro: float


def frame_auroc(scores, labels, mask=None) -> FrameAUROC:
    """Frame-level AUROC per class and macro-averaged (FLAM's SED metric).

    Args:
      scores: ``[..., C]`` frame scores, e.g. ``[N, L, C]`` (any monotone score: logits,
        probabilities).
      labels: same shape, {0, 1} / bool: frame ``l`` of clip ``n`` holds class ``c``.
      mask: optional bool broadcastable to ``scores.shape[:-1]`` (e.g. ``[N, L]``), False at
        padded frames; or to ``scores.shape`` to mask (clip, text) pairs too.
    Returns:
      :class:`FrameAUROC`: for class ``c`` the AUROC (:func:`auroc`) of all valid frames of all
      clips pooled; ``macro`` the mean over classes where it is defined.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    if s.ndim < 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same shape [..., C], got "
                         f"{s.shape} and {y.shape}")
    if mask is None:
        m = np.ones(s.shape, bool)
    else:
        m = np.asarray(mask, bool)
        if m.ndim == s.ndim - 1:
            m = m[..., None]
        try:
            m = np.broadcast_to(m, s.shape)
        except ValueError:
            raise ValueError(f"mask of shape {np.shape(mask)} does not broadcast to scores "
                             f"{s.shape[:-1]} (or {s.shape})") from None
    n_classes = s.shape[-1]
    s2, y2, m2 = s.reshape(-1, n_classes), y.reshape(-1, n_classes), m.reshape(-1, n_classes)
    per_class = np.array([auroc(s2[m2[:, c], c], y2[m2[:, c], c]) for c in range(n_classes)])
    defined = per_class[~np.isnan(per_class)]
    return FrameAUROC(per_class, float(defined.mean()) if defined.size else float("nan"))


# --- events and sed_scores_eval inputs ------------------------------------------------------


def _event_tuple(e: Any) -> tuple[float, float, str]:
    if hasattr(e, "onset") and hasattr(e, "offset") and hasattr(e, "label"):
        return float(e.onset), float(e.offset), str(e.label)
    if isinstance(e, (tuple, list)) and len(e) == 3:
        return float(e[0]), float(e[1]), str(e[2])
    raise ValueError(f"an event must be (onset, offset, label) or have onset/offset/label "
                     f"attributes, got {e!r}")


def _clip_ids(n: int, clip_ids: Sequence[str] | None) -> list[str]:
    if clip_ids is None:
        return [f"clip{i:06d}" for i in range(n)]
    ids = [str(c) for c in clip_ids]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"clip_ids must be {n} distinct names, got {len(ids)} "
                         f"({len(set(ids))} distinct)")
    return ids


def ground_truth(events: Sequence[Sequence[Any]], clip_ids: Sequence[str] | None = None,
                 ) -> dict[str, list[tuple[float, float, str]]]:
    """``sed_scores_eval`` ground truth ``{clip_id: [(onset, offset, label), ...]}`` from the
    events of each clip. Overlapping or touching events of the same class are merged into one
    (the library requires disjoint events per class; a sound and its overlapping repetition
    are one detection target). Events with ``offset <= onset`` are refused."""
    ids = _clip_ids(len(events), clip_ids)
    out: dict[str, list[tuple[float, float, str]]] = {}
    for cid, clip_events in zip(ids, events):
        by_class: dict[str, list[tuple[float, float]]] = {}
        for e in clip_events:
            on, off, label = _event_tuple(e)
            if not off > on:
                raise ValueError(f"clip {cid}: event {label!r} has offset {off} <= onset {on}")
            by_class.setdefault(label, []).append((on, off))
        merged = []
        for label, spans in by_class.items():
            spans.sort()
            cur_on, cur_off = spans[0]
            for on, off in spans[1:]:
                if on <= cur_off:
                    cur_off = max(cur_off, off)
                else:
                    merged.append((cur_on, cur_off, label))
                    cur_on, cur_off = on, off
            merged.append((cur_on, cur_off, label))
        out[cid] = sorted(merged)
    return out


def events_from_frames(labels, timestamps, class_names: Sequence[str],
                       ) -> list[list[tuple[float, float, str]]]:
    """Events on the frame grid: every run of active frames ``l0..l1`` of class ``c`` in clip
    ``n`` becomes ``(t_{l0}, t_{l1 + 1}, class_names[c])``.

    ``labels``: bool ``[N, L, C]``; ``timestamps``: ``[L + 1]`` or ``[N, L + 1]`` seconds.
    Use it for ground truth that lives on the model's frame grid (e.g. the simulator's frame
    labels): perfect frame scores then give PSDS 1 under any scenario, whereas against the
    sample-exact event list a frame-quantised detector loses up to a frame at each end
    (which PSDS1's 0.7 detection tolerance penalises for events of a few frames)."""
    y = np.asarray(labels).astype(bool)
    if y.ndim != 3 or y.shape[-1] != len(class_names):
        raise ValueError(f"labels must be [N, L, C] with C = len(class_names) = "
                         f"{len(class_names)}, got shape {y.shape}")
    t = _timestamps(timestamps, y.shape[0], y.shape[1])
    out = []
    for n in range(y.shape[0]):
        clip = []
        for c, name in enumerate(class_names):
            padded = np.concatenate([[False], y[n, :, c], [False]]).astype(np.int8)
            edges = np.diff(padded)
            for on, off in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
                clip.append((float(t[n, on]), float(t[n, off]), str(name)))
        out.append(sorted(clip))
    return out


def _timestamps(timestamps, n_clips: int, n_frames: int) -> np.ndarray:
    t = np.asarray(timestamps, np.float64)
    if t.ndim == 1:
        t = np.tile(t, (n_clips, 1))  # a writable copy (sed_scores_eval's Cython needs one)
    if t.shape != (n_clips, n_frames + 1):
        raise ValueError(f"timestamps must be [L + 1] = [{n_frames + 1}] or [N, L + 1] "
                         f"seconds, got shape {np.shape(timestamps)}")
    if not np.all(np.diff(t, axis=-1) > 0):
        raise ValueError("timestamps must be strictly increasing")
    return t


def score_dataframes(scores, timestamps, class_names: Sequence[str],
                     clip_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """``{clip_id: DataFrame}`` in ``sed_scores_eval``'s format (columns ``onset``, ``offset``,
    one per class) from frame scores ``[N, L, C]`` and frame edges ``[L + 1]`` (or ``[N, L +
    1]``) in seconds (:func:`sed_scores_eval.base_modules.scores.create_score_dataframe`)."""
    _sed_scores_eval()
    from sed_scores_eval.base_modules.scores import create_score_dataframe

    frame_cls = _writable_frame_class()

    s = np.asarray(scores, np.float64)
    if s.ndim != 3 or s.shape[-1] != len(class_names):
        raise ValueError(f"scores must be [N, L, C] with C = len(class_names) = "
                         f"{len(class_names)}, got shape {s.shape}")
    t = _timestamps(timestamps, s.shape[0], s.shape[1])
    ids = _clip_ids(s.shape[0], clip_ids)
    return {cid: frame_cls(create_score_dataframe(s[i], t[i], list(map(str, class_names))))
            for i, cid in enumerate(ids)}


_FRAME_CLASS: list[Any] = []


def _writable_frame_class():
    """A ``pandas.DataFrame`` subclass whose ``to_numpy`` returns writable arrays.

    With pandas >= 3 (copy-on-write always on) ``DataFrame.to_numpy()`` may return a
    read-only view, which ``sed_scores_eval``'s Cython detection code (typed memoryviews)
    refuses ("buffer source array is read-only"); copying read-only results restores the
    pandas 2 behaviour the library was written for."""
    if _FRAME_CLASS:
        return _FRAME_CLASS[0]
    import pandas as pd

    class WritableFrame(pd.DataFrame):
        @property
        def _constructor(self):
            return WritableFrame

        def to_numpy(self, *args, **kwargs):
            out = super().to_numpy(*args, **kwargs)
            return out if out.flags.writeable else out.copy()

    _FRAME_CLASS.append(WritableFrame)
    return WritableFrame


def _prepare(scores, timestamps, events, class_names, clip_ids):
    """Score frames and ground truth restricted to the classes that have ground-truth events
    (sed_scores_eval refuses classes without any)."""
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names}")
    s = np.asarray(scores, np.float64)
    gt = ground_truth(events, clip_ids)
    if s.ndim != 3 or s.shape[0] != len(gt) or s.shape[-1] != len(names):
        raise ValueError(f"scores must be [N, L, C] = [{len(gt)}, L, {len(names)}] "
                         f"(clips, frames, classes), got shape {s.shape}")
    unknown = {lab for evs in gt.values() for _, _, lab in evs} - set(names)
    if unknown:
        raise ValueError(f"events name classes not in class_names: {sorted(unknown)}")
    present = [c for c in names if any(lab == c for evs in gt.values() for _, _, lab in evs)]
    if not present:
        raise ValueError("no ground-truth events: PSDS / event F1 are undefined")
    cols = [names.index(c) for c in present]
    frames = score_dataframes(s[..., cols], timestamps, present, list(gt))
    return frames, gt, present, [c for c in names if c not in present]


# --- PSDS ------------------------------------------------------------------------------------


class PSDSScenario(NamedTuple):
    """PSDS operating parameters (Bilen et al. 2020): detection and ground-truth
    intersection criteria, cross-trigger tolerance, cross-trigger and instability weights,
    maximum effective false-positive rate per hour."""
    dtc: float
    gtc: float
    cttc: float | None
    alpha_ct: float
    alpha_st: float
    max_efpr: float


#: DCASE task 4 scenario 1 (temporal precision) and scenario 2 (no cross-triggers).
PSDS1 = PSDSScenario(dtc=0.7, gtc=0.7, cttc=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0)
PSDS2 = PSDSScenario(dtc=0.1, gtc=0.1, cttc=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0)


class PSDSResult(NamedTuple):
    """``value``: PSDS in [0, 1]; ``per_class``: each class's PSDS; ``classes``: the classes
    evaluated; ``skipped``: classes without ground-truth events (left out)."""
    value: float
    per_class: dict[str, float]
    classes: list[str]
    skipped: list[str]


def psds(scores, timestamps, events: Sequence[Sequence[Any]], durations,
         class_names: Sequence[str], scenario: PSDSScenario = PSDS1, *,
         clip_ids: Sequence[str] | None = None) -> PSDSResult:
    """Polyphonic Sound Detection Score of frame scores (exact, threshold-free).

    PSDS is the normalised area under the PSD-ROC curve up to ``max_efpr`` false positives
    per hour: ``PSDS = (1 / e_max) int_0^{e_max} r(e) de`` with ``r = mean_c TPR_c - alpha_st
    std_c TPR_c`` against the effective FPR ``e_c = FPR_c + alpha_ct mean_{k != c} CTR_ck``;
    a detection is true when its overlap with ground truth of its class is at least ``dtc`` of
    its length, a ground-truth event is detected when detections cover at least ``gtc`` of it.
    Computed by ``sed_scores_eval.intersection_based.psds`` over all thresholds.

    Args:
      scores: ``[N, L, C]`` frame scores (higher: more likely active).
      timestamps: frame edges ``[L + 1]`` (or ``[N, L + 1]``) in seconds.
      events: per clip, its ground-truth events.
      durations: clip length(s) in seconds: a number or ``[N]``.
      class_names: the ``C`` names of the score columns.
      scenario: :data:`PSDS1`, :data:`PSDS2` or your own :class:`PSDSScenario`.
      clip_ids: optional names of the clips.
    Returns:
      :class:`PSDSResult`. Classes without any ground-truth event are left out (their TPR is
      undefined) and listed in ``skipped``.
    """
    _sed_scores_eval()
    from sed_scores_eval.intersection_based import psds as _psds

    frames, gt, present, skipped = _prepare(scores, timestamps, events, class_names, clip_ids)
    dur = np.broadcast_to(np.asarray(durations, np.float64), (len(gt),))
    value, per_class, _, _ = _psds(
        scores=frames, ground_truth=gt, audio_durations=dict(zip(gt, map(float, dur))),
        dtc_threshold=scenario.dtc, gtc_threshold=scenario.gtc,
        cttc_threshold=scenario.cttc, alpha_ct=scenario.alpha_ct, alpha_st=scenario.alpha_st,
        unit_of_time="hour", max_efpr=scenario.max_efpr)
    return PSDSResult(float(value), {k: float(v) for k, v in per_class.items()}, present,
                      skipped)


# --- event-based F1 -------------------------------------------------------------------------


class EventF1(NamedTuple):
    """Collar-based event metrics at one threshold: macro F1 (mean of per-class F1), micro F1
    (from the pooled counts), per-class F1/precision/recall, and the evaluated and skipped
    classes."""
    f1_macro: float
    f1_micro: float
    precision_micro: float
    recall_micro: float
    per_class: dict[str, dict[str, float]]
    classes: list[str]
    skipped: list[str]


def event_f1(scores, timestamps, events: Sequence[Sequence[Any]], class_names: Sequence[str],
             threshold: float = 0.5, *, onset_collar: float = 0.2, offset_collar: float = 0.2,
             offset_collar_rate: float = 0.2, clip_ids: Sequence[str] | None = None) -> EventF1:
    """Event-based F1 with onset/offset collars (DCASE's event-based metric).

    Detections are the runs of frames whose score exceeds ``threshold`` (onset: the start of
    the first frame, offset: the end of the last). A detection matches a ground-truth event of
    its class when ``|onset - onset_ref| <= onset_collar`` and ``|offset - offset_ref| <=
    max(offset_collar, offset_collar_rate * length_ref)``, each used at most once (optimal
    matching). ``P = TP / (TP + FP)``, ``R = TP / n_ref``, ``F1 = 2 P R / (P + R)``; macro
    averages the per-class F1, micro pools the counts. Via
    ``sed_scores_eval.collar_based.fscore``; classes without ground-truth events are left
    out (``skipped``).
    """
    _sed_scores_eval()
    from sed_scores_eval.collar_based import fscore

    frames, gt, present, skipped = _prepare(scores, timestamps, events, class_names, clip_ids)
    f, p, r, stats = fscore(scores=frames, ground_truth=gt, threshold=float(threshold),
                            onset_collar=onset_collar, offset_collar=offset_collar,
                            offset_collar_rate=offset_collar_rate)
    per_class = {c: {"f1": float(f[c]), "precision": float(p[c]), "recall": float(r[c]),
                     "tp": int(stats[c]["tps"]), "fp": int(stats[c]["fps"]),
                     "n_ref": int(stats[c]["n_ref"])} for c in present}
    return EventF1(float(f["macro_average"]), float(f["micro_average"]),
                   float(p["micro_average"]), float(r["micro_average"]), per_class, present,
                   skipped)


# --- retrieval and zero-shot classification -------------------------------------------------


def _ranks_of_true(sim_rows: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """For each row, the 0-based rank of its best true item, ties counted against it:
    ``rank = #{j : s_j > s*} + #{j false : s_j == s*}`` with ``s*`` the best true score."""
    best_true = np.max(np.where(true_mask, sim_rows, -np.inf), axis=1, keepdims=True)
    higher = np.sum(sim_rows > best_true, axis=1)
    tied_false = np.sum((sim_rows == best_true) & ~true_mask, axis=1)
    return higher + tied_false


def recall_at_k(similarity, ks: Sequence[int] = (1, 5, 10),
                text_to_audio: Sequence[int] | None = None) -> dict[str, float]:
    """Text-to-audio and audio-to-text recall@k.

    ``similarity[i, j]`` scores audio ``i`` against text ``j``; text ``j`` describes audio
    ``g_j = text_to_audio[j]`` (default ``g_j = j``: one caption per clip). Text-to-audio:
    ``R@k = mean_j 1[rank of audio g_j among all audios for text j < k]``; audio-to-text:
    ``R@k = mean_i 1[some text of audio i ranks < k among all texts for audio i]`` (the
    AudioCaps/Clotho convention with several captions per clip). Ties are counted against
    the true item (a constant similarity gets no credit). Audios without a text are left out
    of audio-to-text.

    Returns: ``{"t2a_R@k": ..., "a2t_R@k": ...}`` for each ``k``.
    """
    s = np.asarray(similarity, np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarity must be [num_audio, num_text], got shape {s.shape}")
    n_audio, n_text = s.shape
    g = np.arange(n_text) if text_to_audio is None else np.asarray(text_to_audio, np.int64)
    if g.shape != (n_text,):
        raise ValueError(f"text_to_audio must have one audio index per text ({n_text}), got "
                         f"shape {g.shape}")
    if text_to_audio is None and n_audio != n_text:
        raise ValueError(f"similarity is {n_audio} x {n_text}: pass text_to_audio when "
                         f"texts and audios are not paired one to one")
    if np.any((g < 0) | (g >= n_audio)):
        raise ValueError(f"text_to_audio must index audios 0..{n_audio - 1}")
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"ks must be >= 1, got {k}")
    match = np.zeros((n_audio, n_text), bool)
    match[g, np.arange(n_text)] = True
    t2a_rank = _ranks_of_true(s.T, match.T)
    has_text = match.any(axis=1)
    a2t_rank = _ranks_of_true(s[has_text], match[has_text])
    out = {}
    for k in ks:
        out[f"t2a_R@{k}"] = float(np.mean(t2a_rank < k))
        out[f"a2t_R@{k}"] = float(np.mean(a2t_rank < k)) if a2t_rank.size else float("nan")
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def zero_shot_accuracy(audio_embeddings, class_embeddings, labels, k: int = 1, *,
                       normalize: bool = True) -> float:
    """Zero-shot clip classification accuracy (top-k).

    Clip ``i`` is assigned the classes whose text embedding has the highest cosine similarity
    ``<a_i / |a_i|, t_c / |t_c|>`` (inner product when ``normalize`` is False); accuracy is the
    fraction of clips whose true class ``labels[i]`` ranks in the top ``k`` (ties counted
    against the true class).

    Args:
      audio_embeddings: ``[N, D]``. class_embeddings: ``[C, D]`` (e.g. the mean embedding of
        a class's prompts). labels: ``[N]`` ints in ``0..C-1``.
    """
    a = np.asarray(audio_embeddings, np.float64)
    t = np.asarray(class_embeddings, np.float64)
    y = np.asarray(labels, np.int64)
    if a.ndim != 2 or t.ndim != 2 or a.shape[1] != t.shape[1]:
        raise ValueError(f"audio_embeddings [N, D] and class_embeddings [C, D] must share D, "
                         f"got {a.shape} and {t.shape}")
    if y.shape != (a.shape[0],):
        raise ValueError(f"labels must be [N] = [{a.shape[0]}], got shape {y.shape}")
    if np.any((y < 0) | (y >= t.shape[0])):
        raise ValueError(f"labels must be in 0..{t.shape[0] - 1}")
    if not 1 <= k <= t.shape[0]:
        raise ValueError(f"k must be in 1..{t.shape[0]}, got {k}")
    if normalize:
        a, t = _normalise(a), _normalise(t)
    sim = a @ t.T
    true = np.zeros(sim.shape, bool)
    true[np.arange(a.shape[0]), y] = True
    return float(np.mean(_ranks_of_true(sim, true) < k))
