"""Bias and bias shift of unconditional generators, measured with attribute classifiers.

"Bias Analysis in Unconditional Image Generative Models" (arXiv 2506.09106) defines, for a
binary attribute ``a`` and a distribution of images ``D``::

    P_D(a)          = Pr_{x ~ D}[ a(x) = 1 ]                   (attribute rate)
    bias_D(a)       = P_D(a) - P_ideal(a)                      (bias against an ideal reference)
    shift(a)        = P_gen(a) - P_data(a)                     (bias shift from data to samples)
    ABS(a)          = | P_gen(a) - P_val(a) |                  (absolute bias shift, estimated
                                                                on a held-out validation set)

where ``a(x)`` is read by one attribute classifier for both sets. With ``n`` generated and
``m`` validation images labelled ``y^gen``, ``y^val`` (0/1 or probabilities), the estimates are
the plug-in means ``p_gen = (1/n) sum y^gen``, ``p_val = (1/m) sum y^val``.

This module holds the pure functions of the method (arrays in, arrays out):

* :func:`attribute_rate`, :func:`bias`, :func:`shift`, :func:`absolute_shift`;
* bootstrap confidence intervals of the shift and of ABS (:func:`bootstrap_shift` by index
  resampling, :func:`bootstrap_shift_counts` by binomial resampling of 0/1 counts; the two
  have the same distribution for 0/1 labels; :func:`bootstrap_discrepancy`, paired, for
  measured minus true shift on the same images): the two sets are resampled independently with
  replacement ``B`` times, ``d*_b = p*_gen,b - p*_val,b``, and the percentile interval
  ``[q_{alpha/2}(d*), q_{1-alpha/2}(d*)]`` (Efron & Tibshirani 1993, ch. 13) is reported with
  the bootstrap standard error ``sd(d*)``;
* boundary-density diagnostics: the fraction of a set within ``margin`` of a decision
  threshold (:func:`boundary_mass`; on classifier logits or on a true continuous attribute,
  with circular distances for hue, :func:`distance_to_boundaries`) and the histogram of logits
  in a window around the threshold (:func:`logit_histogram`);
* classifier-sensitivity sweeps: the measured shift as the decision threshold moves
  (:func:`threshold_sweep`) and across classifiers (seeds, architectures;
  :func:`shifts_by_classifier`, :func:`sensitivity`);
* agreement of a measured shift with the true one: :func:`discrepancy`, :func:`shift_verdict`
  (does the classifier invent or hide a shift?), :func:`pearson`, :func:`spearman`.

Binary attributes of the rendered shapes (:data:`SHAPE_ATTRIBUTES`), from the renderer's recorded
parameters or, for brightness, from the pixels: :func:`attribute_values`,
:func:`attribute_labels`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

# --- rates, bias, shift --------------------------------------------------------------------------


def attribute_rate(labels: jax.Array) -> jax.Array:
    """``P(a) = (1/N) sum_i y_i`` of labels ``y [N]`` (0/1, or probabilities in [0, 1])."""
    chex.assert_rank(labels, 1)
    return jnp.mean(jnp.asarray(labels, jnp.float32))


def bias(p: jax.Array, p_ideal: jax.Array) -> jax.Array:
    """``bias(a) = P(a) - P_ideal(a)``: the attribute rate against an ideal reference rate."""
    return jnp.asarray(p) - jnp.asarray(p_ideal)


def shift(p_gen: jax.Array, p_data: jax.Array) -> jax.Array:
    """``shift(a) = P_gen(a) - P_data(a)``: signed bias shift from training data to samples
    (positive: the generator over-produces the attribute)."""
    return jnp.asarray(p_gen) - jnp.asarray(p_data)


def absolute_shift(p_gen: jax.Array, p_val: jax.Array) -> jax.Array:
    """``ABS(a) = |P_gen(a) - P_val(a)|``, the paper's absolute bias shift."""
    return jnp.abs(shift(p_gen, p_val))


# --- bootstrap -------------------------------------------------------------------------------------


class ShiftCI(NamedTuple):
    """A shift estimate with its percentile-bootstrap interval (all scalars, or ``[...]``)."""

    shift: jax.Array      # p_gen - p_ref on the data
    low: jax.Array        # q_{alpha/2} of the bootstrap shifts
    high: jax.Array       # q_{1 - alpha/2}
    se: jax.Array         # bootstrap standard error sd(d*)
    abs_shift: jax.Array  # |p_gen - p_ref|
    abs_low: jax.Array    # percentile interval of |d*|
    abs_high: jax.Array


def percentile_interval(samples: jax.Array, confidence: float = 0.95
                        ) -> tuple[jax.Array, jax.Array]:
    """``(q_{alpha/2}, q_{1-alpha/2})`` of ``samples [B]`` with ``alpha = 1 - confidence``
    (linear interpolation between order statistics)."""
    chex.assert_rank(samples, 1)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}; must be in (0, 1)")
    alpha = 1.0 - confidence
    q = jnp.quantile(samples, jnp.asarray([alpha / 2, 1.0 - alpha / 2]))
    return q[0], q[1]


def _ci_from_draws(point: jax.Array, draws: jax.Array, confidence: float) -> ShiftCI:
    low, high = percentile_interval(draws, confidence)
    abs_low, abs_high = percentile_interval(jnp.abs(draws), confidence)
    return ShiftCI(point, low, high, jnp.std(draws, ddof=1), jnp.abs(point), abs_low, abs_high)


def bootstrap_rates(key: jax.Array, labels: jax.Array, num_resamples: int) -> jax.Array:
    """``[B]`` rates of ``B`` resamples (with replacement, size ``N``) of labels ``y [N]``:
    ``p*_b = (1/N) sum_i y_{I_bi}``, ``I_bi ~ U{0..N-1}``."""
    chex.assert_rank(labels, 1)
    n = labels.shape[0]
    idx = jax.random.randint(key, (num_resamples, n), 0, n)
    return jnp.mean(jnp.asarray(labels, jnp.float32)[idx], axis=-1)


def bootstrap_shift(key: jax.Array, labels_gen: jax.Array, labels_ref: jax.Array, *,
                    num_resamples: int = 1000, confidence: float = 0.95) -> ShiftCI:
    """Shift ``p_gen - p_ref`` of two label sets (``[N]`` and ``[M]``, 0/1 or probabilities)
    with a percentile-bootstrap interval: each set is resampled independently with replacement
    ``B = num_resamples`` times, ``d*_b = p*_gen,b - p*_ref,b``. Also the interval of
    ``ABS = |d|`` (percentiles of ``|d*|``)."""
    chex.assert_rank([labels_gen, labels_ref], 1)
    if num_resamples < 2:
        raise ValueError(f"num_resamples={num_resamples}; must be >= 2")
    k_gen, k_ref = jax.random.split(key)
    draws = (bootstrap_rates(k_gen, labels_gen, num_resamples)
             - bootstrap_rates(k_ref, labels_ref, num_resamples))
    point = shift(attribute_rate(labels_gen), attribute_rate(labels_ref))
    return _ci_from_draws(point, draws, confidence)


def bootstrap_shift_counts(key: jax.Array, k_gen: jax.Array, n_gen: int, k_ref: jax.Array,
                           n_ref: int, *, num_resamples: int = 1000,
                           confidence: float = 0.95) -> ShiftCI:
    """:func:`bootstrap_shift` of 0/1 labels given only their counts (``k`` ones among ``n``):
    a resample of ``n`` 0/1 labels with ``k`` ones has ``K* ~ Binomial(n, k/n)`` ones, so
    ``d* = K*_gen / n_gen - K*_ref / n_ref`` has exactly the distribution of index resampling,
    at ``O(B)`` instead of ``O(B (n + m))`` cost (``vmap``-able over many synthetic data sets)."""
    if num_resamples < 2:
        raise ValueError(f"num_resamples={num_resamples}; must be >= 2")
    if n_gen < 1 or n_ref < 1:
        raise ValueError(f"n_gen={n_gen}, n_ref={n_ref}; both must be >= 1")
    k_gen = jnp.asarray(k_gen, jnp.float32)
    k_ref = jnp.asarray(k_ref, jnp.float32)
    chex.assert_rank([k_gen, k_ref], 0)
    p_gen, p_ref = k_gen / n_gen, k_ref / n_ref
    kg, kr = jax.random.split(key)
    draws = (jax.random.binomial(kg, n_gen, p_gen, (num_resamples,)) / n_gen
             - jax.random.binomial(kr, n_ref, p_ref, (num_resamples,)) / n_ref)
    return _ci_from_draws(shift(p_gen, p_ref), draws, confidence)


def bootstrap_discrepancy(key: jax.Array, measured_gen: jax.Array, true_gen: jax.Array,
                          measured_ref: jax.Array, true_ref: jax.Array, *,
                          num_resamples: int = 1000, confidence: float = 0.95) -> ShiftCI:
    """Paired bootstrap of the discrepancy between a measured and the true shift on the same
    images: ``(m_gen - m_ref) - (t_gen - t_ref) = mean(m - t)_gen - mean(m - t)_ref`` with
    per-image label differences ``m - t`` in {-1, 0, 1} (``[N]`` and ``[M]``). Resampling an
    image resamples its measured and its true label together, so the sampling noise the two
    shifts share cancels; the interval is that of :func:`bootstrap_shift` on the differences
    (``abs_*`` fields: of ``|discrepancy|``)."""
    chex.assert_equal_shape([measured_gen, true_gen])
    chex.assert_equal_shape([measured_ref, true_ref])
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return bootstrap_shift(key, f(measured_gen) - f(true_gen), f(measured_ref) - f(true_ref),
                           num_resamples=num_resamples, confidence=confidence)


def covers(ci: ShiftCI, value: jax.Array) -> jax.Array:
    """bool: ``low <= value <= high``."""
    return (ci.low <= value) & (value <= ci.high)


# --- boundary density ------------------------------------------------------------------------------


def binary_logit(logits: jax.Array) -> jax.Array:
    """``[..., 2]`` two-class logits -> ``[...]`` log-odds of class 1: ``l_1 - l_0``."""
    chex.assert_axis_dimension(logits, -1, 2)
    return logits[..., 1] - logits[..., 0]


def distance_to_boundaries(values: jax.Array, boundaries: jax.Array,
                           period: float | None = None) -> jax.Array:
    """``[N]`` distance of each value to the nearest of ``boundaries [K]``; with ``period``
    (hue: 1) distances wrap: ``min(|v - b| mod T, T - |v - b| mod T)``."""
    chex.assert_rank([values, boundaries], 1)
    d = jnp.abs(values[:, None] - boundaries[None, :])
    if period is not None:
        d = jnp.mod(d, period)
        d = jnp.minimum(d, period - d)
    return jnp.min(d, axis=1)


def boundary_mass(scores: jax.Array, threshold: float | jax.Array, margin: float | jax.Array
                  ) -> jax.Array:
    """Fraction of a set within ``margin`` of the decision threshold:
    ``(1/N) sum_i 1[|s_i - t| < margin]``. On classifier logits (``t = 0``) it is the mass the
    classifier is unsure about; on a true continuous attribute it is the density of the data at
    the attribute's boundary (times ``2 margin``)."""
    chex.assert_rank(scores, 1)
    return jnp.mean((jnp.abs(scores - threshold) < margin).astype(jnp.float32))


def logit_histogram(logits: jax.Array, threshold: float = 0.0, window: float = 4.0,
                    bins: int = 16) -> tuple[jax.Array, jax.Array]:
    """Histogram of ``logits [N]`` in ``[t - window, t + window]``: ``(density [bins], edges
    [bins + 1])``, density normalised by ``N * bin width`` (mass outside the window is left
    out, so two sets' curves compare the mass near the boundary directly)."""
    chex.assert_rank(logits, 1)
    edges = jnp.linspace(threshold - window, threshold + window, bins + 1)
    idx = jnp.searchsorted(edges, logits, side="right") - 1
    inside = (logits >= edges[0]) & (logits < edges[-1])
    counts = jnp.zeros(bins).at[jnp.clip(idx, 0, bins - 1)].add(inside.astype(jnp.float32))
    width = 2.0 * window / bins
    return counts / (logits.shape[0] * width), edges


# --- classifier sensitivity ------------------------------------------------------------------------


def threshold_sweep(logits_gen: jax.Array, logits_ref: jax.Array, thresholds: jax.Array
                    ) -> jax.Array:
    """``[T]`` measured shift for each decision threshold ``t_k`` on the log-odds:
    ``(1/N) sum 1[l^gen_i > t_k] - (1/M) sum 1[l^ref_j > t_k]`` (``t = 0``: the argmax rule;
    ``t = logit(q)``: the rule ``P(a | x) > q``)."""
    chex.assert_rank([logits_gen, logits_ref, thresholds], 1)
    rate = lambda l: jnp.mean((l[None, :] > thresholds[:, None]).astype(jnp.float32), -1)  # noqa
    return rate(logits_gen) - rate(logits_ref)


def shifts_by_classifier(logits_gen: jax.Array, logits_ref: jax.Array,
                         threshold: float = 0.0) -> jax.Array:
    """``[C]`` shift measured by each of ``C`` classifiers: ``logits_gen [C, N]``,
    ``logits_ref [C, M]`` (log-odds of the attribute), label ``1[l > threshold]``."""
    chex.assert_rank([logits_gen, logits_ref], 2)
    chex.assert_equal_shape_prefix([logits_gen, logits_ref], 1)
    lab = lambda l: jnp.mean((l > threshold).astype(jnp.float32), axis=-1)  # noqa: E731
    return lab(logits_gen) - lab(logits_ref)


def sensitivity(shifts: jax.Array) -> dict[str, jax.Array]:
    """Spread of one attribute's shift over classifiers ``[C]``: mean, standard deviation
    (``ddof=1``; 0 for one classifier), range ``max - min``, and whether the classifiers
    disagree on the sign (``min < 0 < max``)."""
    chex.assert_rank(shifts, 1)
    c = shifts.shape[0]
    std = jnp.std(shifts, ddof=1) if c > 1 else jnp.zeros(())
    return {"mean": jnp.mean(shifts), "std": std, "range": jnp.max(shifts) - jnp.min(shifts),
            "sign_disagreement": (jnp.min(shifts) < 0) & (jnp.max(shifts) > 0)}


# --- measured against true -------------------------------------------------------------------------


def discrepancy(measured: jax.Array, true: jax.Array) -> jax.Array:
    """``measured - true`` shift: what the classifier adds (positive where it reports more
    over-production than there is)."""
    return jnp.asarray(measured) - jnp.asarray(true)


VERDICTS = ("agrees", "invents", "hides", "flips", "exaggerates", "understates")


def shift_verdict(true_low: float, true_high: float, meas_low: float, meas_high: float,
                  true_shift: float, measured_shift: float) -> str:
    """Compare a measured shift with the true one through their confidence intervals:

    * ``invents``: the true interval contains 0, the measured one does not;
    * ``hides``: the true interval excludes 0, the measured one contains it;
    * ``flips``: both exclude 0 with opposite signs;
    * ``exaggerates`` / ``understates``: both exclude 0 with one sign, and the intervals are
      disjoint with ``|measured| > |true|`` / ``<``;
    * ``agrees``: anything else (overlapping intervals, or both containing 0)."""
    t0 = true_low <= 0.0 <= true_high
    m0 = meas_low <= 0.0 <= meas_high
    if t0 and not m0:
        return "invents"
    if not t0 and m0:
        return "hides"
    if not t0 and not m0:
        if np.sign(true_shift) != np.sign(measured_shift):
            return "flips"
        if meas_low > true_high or meas_high < true_low:
            return "exaggerates" if abs(measured_shift) > abs(true_shift) else "understates"
    return "agrees"


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two ``[K]`` vectors (NaN when either is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two [K] vectors with K >= 2; got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / den) if den > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: :func:`pearson` of the average ranks."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two [K] vectors; got {x.shape} and {y.shape}")
    return pearson(_ranks(x), _ranks(y))


# --- attributes of the rendered shapes ------------------------------------------------------------

LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709 luminance weights


@dataclasses.dataclass(frozen=True)
class ShapeAttribute:
    """A binary attribute ``a(x) = 1[low <= v(x) < high]`` of a continuous or discrete value
    ``v`` (a renderer parameter, or ``brightness`` from the pixels). ``spectrum``: ``v`` varies
    continuously across the boundary (dense there); otherwise the attribute is binary in
    nature (no image lies between the classes). ``period`` makes the interval circular
    (hue)."""

    name: str
    value: str           # "kind", "background", "hue", "size" or "brightness"
    low: float
    high: float
    spectrum: bool
    period: float | None = None
    words: str = ""

    def boundaries(self) -> np.ndarray:
        """The finite interval ends (decision boundaries in ``value`` units)."""
        b = [x for x in (self.low, self.high) if math.isfinite(x)]
        if self.period is not None:
            b = sorted({x % self.period for x in b})
        return np.asarray(b, np.float64)

    def label(self, values: Any) -> np.ndarray:
        v = np.asarray(values, np.float64)
        if self.period is not None:
            v = np.mod(v, self.period)
        return ((v >= self.low) & (v < self.high)).astype(np.int32)


def shape_attributes(kind: str = "circle", background: str = "stripes",
                     size_threshold: float = 0.21, hue_band: tuple[float, float] = (0.0, 0.5),
                     brightness_threshold: float = 0.33) -> dict[str, ShapeAttribute]:
    """The five attributes of the bias-shift experiment on :mod:`generative.datasets` shapes:
    binary ``circle`` (kind), ``striped`` (background texture); spectrum ``large`` (size >=
    threshold), ``warm`` (hue in a band; hue wraps at 1), ``bright`` (mean Rec. 709 luminance
    of the image >= threshold)."""
    from generative import datasets

    k = datasets.SHAPE_KINDS.index(kind)
    b = datasets.BACKGROUND_KINDS.index(background)
    return {
        kind: ShapeAttribute(kind, "kind", k, k + 1, False, words=f"shape is a {kind}"),
        "striped": ShapeAttribute("striped", "background", b, b + 1, False,
                                  words=f"background is {background}"),
        "large": ShapeAttribute("large", "size", size_threshold, math.inf, True,
                                words=f"size >= {size_threshold:g}"),
        "warm": ShapeAttribute("warm", "hue", hue_band[0], hue_band[1], True, period=1.0,
                               words=f"hue in [{hue_band[0]:g}, {hue_band[1]:g})"),
        "bright": ShapeAttribute("bright", "brightness", brightness_threshold, math.inf, True,
                                 words=f"mean luminance >= {brightness_threshold:g}"),
    }


def brightness(images: Any) -> np.ndarray:
    """``[N]`` mean Rec. 709 luminance in [0, 1] of images (uint8, or floats in [-1, 1])."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else (np.clip(x, -1, 1) + 1) / 2
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3]; got {x.shape}")
    return (x @ np.asarray(LUMA)).mean(axis=(1, 2))


def attribute_values(raw: Mapping[str, Any], images: Any) -> dict[str, np.ndarray]:
    """The values attributes are thresholds of: the recorded (or regressed) ``kind``,
    ``background``, ``hue``, ``size`` plus ``brightness`` from the pixels."""
    out = {k: np.asarray(raw[k], np.float64) for k in ("kind", "background", "hue", "size")}
    out["brightness"] = brightness(images)
    return out


def attribute_labels(attrs: Mapping[str, ShapeAttribute], values: Mapping[str, Any]
                     ) -> dict[str, np.ndarray]:
    """int32 ``[N]`` 0/1 label of each attribute from :func:`attribute_values`."""
    return {name: a.label(values[a.value]) for name, a in attrs.items()}
