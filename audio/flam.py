"""FLAM losses: frame-wise sigmoid loss with logit adjustment, prior loss, clip InfoNCE.

FLAM (Wu et al., "FLAM: Frame-Wise Language-Audio Modeling", ICML 2025, arXiv 2505.05335)
scores text ``y_k`` against frame ``l`` of clip ``x_b`` with the logit

    h[b, k, l] = alpha(y_k) <e_l(x_b), e(y_k)> + beta(y_k)          (the logit of paper Eq. 4)

where ``e_l`` and ``e`` are L2-normalised frame and text embeddings, ``alpha = exp(MLP_a)``
(init 10) and ``beta = MLP_b`` (init -8) are per-text scale and bias. The losses, as written
in the official code (github.com/adobe-research/openflam, ``module/contrastive_loss.py``,
``module/model.py``, ``hook.py``), which is what we follow where the paper is terse:

* ``L_SED`` (Eq. 4): ``mean over valid (b, k, l) of -log sigmoid(z h)``, ``z = 2 y - 1`` with
  ``y in {0, 1}`` the frame label (the dataloader gives {0, 1}; the loss maps to {-1, +1}).
  The official normaliser is ``sum / (#valid (audio, text) pairs) / L``, i.e. the mean over
  valid triples; with a frame mask (padded frames) we divide by the number of valid triples.
  The global logit scale is fixed to 1 and the global bias to 0 during SED training, so
  ``alpha`` and ``beta`` are the per-text ones only.
* Logit adjustment: ``beta`` enters ``L_SED`` through ``stop_gradient`` (official:
  ``per_text_logit_bias.detach()``); ``alpha`` is trained by ``L_SED``. Without it (the
  training ablation, ``total_loss(..., logit_adjustment=0)``, :func:`sed_bias`) ``beta`` is
  an ordinary learnable bias trained by ``L_SED`` and there is no ``L_prior``: the SigLIP
  sigmoid loss with per-text scale and bias.
* ``L_prior`` (Eq. 10): ``mean over valid texts k of BCE(sigmoid(beta_k), zbar_k)`` with
  ``zbar_k = sum_{b, l valid} y[b, k, l] / #valid (b, l)`` the positive-frame rate of text
  ``k`` in the batch (``binary_cross_entropy_with_logits(beta, zbar)``).
* Unbiased score (``hook.get_unbiased_framewise_act_map``; Eq. 7 in its docstring, Eq. 9 in
  the example script's comment): ``s = sigmoid(h) / (sigmoid(h) + sigmoid(beta))``.
* ``L_clip``: symmetric CLIP InfoNCE on the clip-level embeddings (of a separate "global"
  batch in the official trainer), logits ``<a_i, t_j> * exp(logit_scale)``, ``logit_scale``
  learnable, init ``log(1 / 0.07)``, no clamp. Here: ``temperature = exp(-logit_scale)``.
* Total (official ``FLAM.loss``): ``L = L_clip + 200 * L_SED + L_prior`` (``sed_loss_weight``
  200; the prior loss is not weighted).

The memory-efficient frame loss (:func:`sed_loss_chunked`) never builds the ``[B, K, L]``
logits: a ``lax.scan`` over chunks of texts (or of clips) with a ``custom_vjp`` whose backward
pass scans the chunks again and recomputes each chunk's logits. (The official trainer passes
text chunks between devices in a ring, each device scoring its own clips against every
other device's texts as negatives; chunking over texts is the single-device counterpart, and
:func:`sed_loss_ring` is the ``shard_map`` ring over a mesh axis.)

Shapes: ``frames [B, L, D]``, ``text [K, D]``, ``alpha, beta [K]``, ``labels [B, K, L]``,
``frame_mask [B, L]`` (False at padded frames and for padded clips), ``text_mask [K]``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

SED_WEIGHT = 200.0  # official sed_loss_weight
ALPHA_INIT = 10.0  # per-text scale init (MLP output bias log 10, alpha = exp(.))
BETA_INIT = -8.0  # per-text bias init
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLAP's learnable global logit scale


def _masks(frames: jax.Array, text: jax.Array, frame_mask, text_mask):
    """Float masks ``[B, L]``, ``[K]`` (ones where not given)."""
    b, l_, _ = frames.shape
    k = text.shape[0]
    fm = jnp.ones((b, l_), frames.dtype) if frame_mask is None else frame_mask.astype(frames.dtype)
    tm = jnp.ones((k,), frames.dtype) if text_mask is None else text_mask.astype(frames.dtype)
    chex.assert_shape(fm, (b, l_))
    chex.assert_shape(tm, (k,))
    return fm, tm


def _check_inputs(frames, text, alpha, beta, labels=None):
    chex.assert_rank([frames, text, alpha, beta], [3, 2, 1, 1])
    b, l_, d = frames.shape
    k = text.shape[0]
    chex.assert_shape(text, (k, d))
    chex.assert_shape([alpha, beta], (k,))
    if labels is not None:
        chex.assert_shape(labels, (b, k, l_))


def frame_logits(frames: jax.Array, text: jax.Array, alpha: jax.Array,
                 beta: jax.Array) -> jax.Array:
    """``h[b, k, l] = alpha_k <frames[b, l], text_k> + beta_k``: ``[B, K, L]`` (Eq. 4's logit).

    ``frames`` and ``text`` are expected L2-normalised (so the inner product is a cosine),
    ``alpha > 0`` (``exp`` of the scale MLP). No stop-gradient here: this is the logit used
    at inference; the training loss :func:`frame_loss` stops ``beta``'s gradient itself.
    """
    _check_inputs(frames, text, alpha, beta)
    sim = jnp.einsum("bld,kd->bkl", frames, text)
    return alpha[None, :, None] * sim + beta[None, :, None]


def _valid_count(fm: jax.Array, tm: jax.Array) -> jax.Array:
    """Number of valid (b, k, l) triples: ``(sum_{b,l} fm) (sum_k tm)``."""
    return jnp.sum(fm) * jnp.sum(tm)


def sed_loss(logits: jax.Array, labels: jax.Array, frame_mask: jax.Array | None = None,
             text_mask: jax.Array | None = None) -> jax.Array:
    """Frame-wise sigmoid loss ``L_SED`` (paper Eq. 4) from logits.

    ``L = sum_{b,k,l} m[b,k,l] softplus(-z[b,k,l] h[b,k,l]) / sum m``, ``z = 2 y - 1``,
    ``m[b,k,l] = frame_mask[b,l] text_mask[k]``; ``softplus(-z h) = -log sigmoid(z h)``.

    Args:
      logits: ``[B, K, L]`` (:func:`frame_logits`).
      labels: ``[B, K, L]`` in {0, 1} (bool, int or float): 1 where text k is active in frame l
        of clip b. (Official convention; the loss maps them to z in {-1, +1}.)
      frame_mask: optional ``[B, L]``, 0/False at padded frames (and whole padded clips).
      text_mask: optional ``[K]``, 0/False at padded texts.
    Returns:
      scalar mean over valid triples (0 when none is valid).
    """
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape([logits, labels])
    b, k, l_ = logits.shape
    fm = jnp.ones((b, l_), logits.dtype) if frame_mask is None else frame_mask.astype(logits.dtype)
    tm = jnp.ones((k,), logits.dtype) if text_mask is None else text_mask.astype(logits.dtype)
    chex.assert_shape(fm, (b, l_))
    chex.assert_shape(tm, (k,))
    z = 2.0 * labels.astype(logits.dtype) - 1.0
    per = jax.nn.softplus(-z * logits) * fm[:, None, :] * tm[None, :, None]
    return jnp.sum(per) / jnp.maximum(_valid_count(fm, tm), 1.0)


def frame_loss(frames: jax.Array, text: jax.Array, alpha: jax.Array, beta: jax.Array,
               labels: jax.Array, frame_mask: jax.Array | None = None,
               text_mask: jax.Array | None = None, *, stop_beta_grad: bool = True) -> jax.Array:
    """``L_SED`` from embeddings, materialising the ``[B, K, L]`` logits (the direct form).

    ``sed_loss(frame_logits(frames, text, alpha, sg(beta)), labels, ...)``: with
    ``stop_beta_grad`` (FLAM's logit adjustment) the gradient with respect to ``beta`` is
    exactly 0, ``beta`` being trained by :func:`prior_loss` only. See :func:`sed_loss_chunked`
    for the same value and gradients without the ``[B, K, L]`` tensors.
    """
    _check_inputs(frames, text, alpha, beta, labels)
    if stop_beta_grad:
        beta = jax.lax.stop_gradient(beta)
    return sed_loss(frame_logits(frames, text, alpha, beta), labels, frame_mask, text_mask)


# --- memory-efficient frame loss ------------------------------------------------------------


def _chunk_plan(n_items: int, chunk: int):
    """Starts of ``ceil(N / c)`` chunks of ``c = min(chunk, N)`` items. The last chunk is slid
    back to end at N (``start = min(i c, N - c)``), so slices never run past the end and
    nothing is padded or copied; its first ``i c - start`` items were covered by the previous
    chunk and are masked out (see ``owned`` in :func:`_chunk_terms`)."""
    c = min(int(chunk), n_items)
    n = -(-n_items // c)
    nominal = jnp.arange(n) * c
    start = jnp.minimum(nominal, n_items - c)
    return c, nominal, start


def _chunk_terms(frames, text, alpha, beta, labels, fm, tm, start, nominal, c, axis):
    """One chunk's slices, logits ``h``, signs ``z``, mask ``m`` and cosines ``sim``.

    ``axis == "text"``: texts ``[start, start + c)`` against all clips, ``h [B, c, L]``.
    ``axis == "batch"``: clips ``[start, start + c)`` against all texts, ``h [c, K, L]``.
    Items of the chunk below ``nominal`` belong to the previous chunk: their mask is 0."""
    b, l_, d = frames.shape
    k = text.shape[0]
    owned = ((start + jnp.arange(c)) >= nominal).astype(fm.dtype)
    if axis == "text":
        f_c = frames
        t_c = jax.lax.dynamic_slice(text, (start, 0), (c, d))
        a_c = jax.lax.dynamic_slice(alpha, (start,), (c,))
        be_c = jax.lax.dynamic_slice(beta, (start,), (c,))
        y_c = jax.lax.dynamic_slice(labels, (0, start, 0), (b, c, l_))
        fm_c = fm
        tm_c = jax.lax.dynamic_slice(tm, (start,), (c,)) * owned
    else:
        f_c = jax.lax.dynamic_slice(frames, (start, 0, 0), (c, l_, d))
        t_c, a_c, be_c, tm_c = text, alpha, beta, tm
        y_c = jax.lax.dynamic_slice(labels, (start, 0, 0), (c, k, l_))
        fm_c = jax.lax.dynamic_slice(fm, (start, 0), (c, l_)) * owned[:, None]
    sim = jnp.einsum("bld,kd->bkl", f_c, t_c)
    h = a_c[None, :, None] * sim + be_c[None, :, None]
    z = 2.0 * y_c.astype(h.dtype) - 1.0
    m = fm_c[:, None, :] * tm_c[None, :, None]
    return f_c, t_c, a_c, sim, h, z, m


def _chunked_sum(frames, text, alpha, beta, labels, fm, tm, chunk, axis):
    """``sum_{valid b,k,l} softplus(-z h)`` by a scan over chunks."""
    n_items = text.shape[0] if axis == "text" else frames.shape[0]
    c, nominal, start = _chunk_plan(n_items, chunk)

    def body(total, xs):
        s, nom = xs
        *_, h, z, m = _chunk_terms(frames, text, alpha, beta, labels, fm, tm, s, nom, c, axis)
        return total + jnp.sum(jax.nn.softplus(-z * h) * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), frames.dtype), (start, nominal))
    return total


def _add_slice(acc, update, start, axis0_len):
    """``acc[start:start + len] += update`` along axis 0 (in place inside the loop)."""
    idx = (start,) + (0,) * (acc.ndim - 1)
    cur = jax.lax.dynamic_slice(acc, idx, (axis0_len,) + acc.shape[1:])
    return jax.lax.dynamic_update_slice(acc, cur + update, idx)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunked_loss(frames, text, alpha, beta, labels, fm, tm, chunk, axis):
    total = _chunked_sum(frames, text, alpha, beta, labels, fm, tm, chunk, axis)
    return total / jnp.maximum(_valid_count(fm, tm), 1.0)


def _chunked_fwd(frames, text, alpha, beta, labels, fm, tm, chunk, axis):
    out = _chunked_loss(frames, text, alpha, beta, labels, fm, tm, chunk, axis)
    return out, (frames, text, alpha, beta, labels, fm, tm)


def _chunked_bwd(chunk, axis, res, g):
    """Closed-form backward, chunk by chunk. With ``G = g / sum m`` and per-triple
    ``dL/dh = -z sigmoid(-z h) m G``:
    ``d frames[b,l] = sum_k dh[b,k,l] alpha_k text_k``,
    ``d text_k = alpha_k sum_{b,l} dh[b,k,l] frames[b,l]``,
    ``d alpha_k = sum_{b,l} dh[b,k,l] <frames[b,l], text_k>``, ``d beta_k = sum_{b,l} dh``.
    Text chunks own slices of ``d text, d alpha, d beta`` and add into all of ``d frames``;
    batch chunks own slices of ``d frames`` and add into all of the text gradients.
    Masked items (the repeated head of a slid-back last chunk) have ``dh = 0``, so adding is
    exact. Labels and masks get no cotangent."""
    frames, text, alpha, beta, labels, fm, tm = res
    n_items = text.shape[0] if axis == "text" else frames.shape[0]
    c, nominal, start = _chunk_plan(n_items, chunk)
    scale = g / jnp.maximum(_valid_count(fm, tm), 1.0)

    def body(carry, xs):
        d_frames, d_text, d_alpha, d_beta = carry
        s, nom = xs
        f_c, t_c, a_c, sim, h, z, m = _chunk_terms(frames, text, alpha, beta, labels, fm, tm,
                                                   s, nom, c, axis)
        dh = -z * jax.nn.sigmoid(-z * h) * m * scale  # [B, c, L] or [c, K, L]
        df = jnp.einsum("bkl,kd->bld", dh * a_c[None, :, None], t_c)
        dt = a_c[:, None] * jnp.einsum("bkl,bld->kd", dh, f_c)
        da = jnp.sum(dh * sim, axis=(0, 2))
        db = jnp.sum(dh, axis=(0, 2))
        if axis == "text":
            d_frames = d_frames + df
            d_text = _add_slice(d_text, dt, s, c)
            d_alpha = _add_slice(d_alpha, da, s, c)
            d_beta = _add_slice(d_beta, db, s, c)
        else:
            d_frames = _add_slice(d_frames, df, s, c)
            d_text, d_alpha, d_beta = d_text + dt, d_alpha + da, d_beta + db
        return (d_frames, d_text, d_alpha, d_beta), None

    init = (jnp.zeros_like(frames), jnp.zeros_like(text), jnp.zeros_like(alpha),
            jnp.zeros_like(beta))
    (d_frames, d_text, d_alpha, d_beta), _ = jax.lax.scan(body, init, (start, nominal))
    return d_frames, d_text, d_alpha, d_beta, None, None, None


_chunked_loss.defvjp(_chunked_fwd, _chunked_bwd)

CHUNK_AXES = ("text", "batch")


def sed_loss_chunked(frames: jax.Array, text: jax.Array, alpha: jax.Array, beta: jax.Array,
                     labels: jax.Array, chunk: int, frame_mask: jax.Array | None = None,
                     text_mask: jax.Array | None = None, *, axis: str = "batch",
                     stop_beta_grad: bool = True) -> jax.Array:
    """:func:`frame_loss` (``L_SED``, paper Eq. 4) without materialising ``[B, K, L]``.

    A ``lax.scan`` over chunks accumulates ``sum softplus(-z h)``; the ``custom_vjp``
    backward scans the chunks again, recomputes each chunk's logits and adds its closed-form
    gradient (see ``_chunked_bwd``): no per-chunk residuals are stored, and the largest
    temporaries are one chunk's logits and the gradient buffers.

    * ``axis="batch"`` (default): chunks of ``chunk`` clips against all texts, temporaries
      ``[chunk, K, L]``; each chunk writes its own slice of ``d frames`` and adds a small
      ``[K, D]`` update to ``d text``. Measured (benchmarks/flam_memory.py, CPU, B=64, L=250,
      D=512, K=512): 3.4 MiB of compiled temporaries at chunk 1 against 62.5 MiB for
      :func:`frame_loss`, at 1.3x its step time (the forward recomputation costs ~1/3).
    * ``axis="text"``: chunks of ``chunk`` texts, temporaries ``[B, chunk, L]``, independent
      of K (useful when K, which grows with the global batch in FLAM, dwarfs B), plus a
      ``[B, L, D]`` gradient accumulator to which every chunk adds a dense update: small
      chunks are memory-bound (4x the naive step time at chunk 16 in the same benchmark).

    The chunk count need not divide the axis: the last chunk slides back to end at the axis
    length and masks the items it repeats (no padding copies). ``labels`` may be bool/int8
    (1 byte per triple; they are only ever sliced). Same value and gradients as
    :func:`frame_loss` (tested to 1e-5). First-order only: the ``custom_vjp`` is not
    differentiable twice.

    Args:
      chunk: items per chunk (static int >= 1; clipped to the axis length).
      axis: "text" or "batch", the axis that is chunked.
      stop_beta_grad: FLAM's logit adjustment: d/d beta = 0 exactly (``stop_gradient``).
    """
    _check_inputs(frames, text, alpha, beta, labels)
    if int(chunk) < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    if axis not in CHUNK_AXES:
        raise ValueError(f"axis={axis!r}: must be one of {', '.join(CHUNK_AXES)}")
    fm, tm = _masks(frames, text, frame_mask, text_mask)
    if stop_beta_grad:
        beta = jax.lax.stop_gradient(beta)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        labels = jax.lax.stop_gradient(labels)
    n_items = text.shape[0] if axis == "text" else frames.shape[0]
    return _chunked_loss(frames, text, alpha, beta, labels, jax.lax.stop_gradient(fm),
                         jax.lax.stop_gradient(tm), min(int(chunk), n_items), axis)


def sed_loss_ring(frames: jax.Array, text: jax.Array, alpha: jax.Array, beta: jax.Array,
                  labels: jax.Array, frame_mask: jax.Array | None = None,
                  text_mask: jax.Array | None = None, *, mesh: jax.sharding.Mesh,
                  axis_name: str = "data", stop_beta_grad: bool = True) -> jax.Array:
    """:func:`frame_loss` with clips and texts sharded over a mesh axis, texts passed in a ring.

    Device ``i`` of the ``n`` devices on ``axis_name`` holds clips ``B/n`` (frames, their
    labels against all K texts, frame mask) and texts ``K/n`` (text, alpha, beta, text mask).
    In ``n`` steps (``lax.scan``) it scores its clips against the text shard it holds, then
    passes that shard to device ``i + 1`` (``ppermute``), so after ``n`` steps every clip has
    met every text and no device ever holds more than ``[B/n, K/n, L]`` logits; each step is
    rematerialised (``jax.checkpoint``) in the backward pass, whose ``ppermute`` transposes
    send the text gradients back around the ring to their owners. The per-device sums are
    ``psum``-ed and divided by the global number of valid triples: the value and gradients
    are those of :func:`frame_loss` on the gathered arrays (tested on 8 simulated devices).

    This is the single-label-tensor counterpart of the official trainer's ring exchange
    (``FramewiseContrastiveLoss`` with ``neighbour_exchange``), which labels cross-device
    pairs as all-negative and normalises each exchange step separately.

    Requires B and K divisible by the axis size. Call under ``jax.jit``.
    """
    _check_inputs(frames, text, alpha, beta, labels)
    n = mesh.shape[axis_name]
    b, l_, _ = frames.shape
    k = text.shape[0]
    if b % n or k % n:
        raise ValueError(f"sed_loss_ring: B={b} and K={k} must be divisible by the "
                         f"{n} devices on mesh axis {axis_name!r}")
    fm, tm = _masks(frames, text, frame_mask, text_mask)
    if stop_beta_grad:
        beta = jax.lax.stop_gradient(beta)
    fm, tm = jax.lax.stop_gradient(fm), jax.lax.stop_gradient(tm)
    kc = k // n
    spec = jax.sharding.PartitionSpec(axis_name)
    perm = [(j, (j + 1) % n) for j in range(n)]

    @jax.checkpoint
    def block_sum(f, t, a, be, y, fm_, tm_):
        h = a[None, :, None] * jnp.einsum("bld,kd->bkl", f, t) + be[None, :, None]
        z = 2.0 * y.astype(h.dtype) - 1.0
        return jnp.sum(jax.nn.softplus(-z * h) * fm_[:, None, :] * tm_[None, :, None])

    def local(f, t, a, be, y, fm_, tm_):
        me = jax.lax.axis_index(axis_name)

        def step(carry, s):
            t_s, a_s, b_s, tm_s, total = carry
            src = (me - s) % n  # owner of the text shard held at step s
            y_s = jax.lax.dynamic_slice_in_dim(y, src * kc, kc, axis=1)
            total = total + block_sum(f, t_s, a_s, b_s, y_s, fm_, tm_s)
            t_s, a_s, b_s, tm_s = (jax.lax.ppermute(v, axis_name, perm)
                                   for v in (t_s, a_s, b_s, tm_s))
            return (t_s, a_s, b_s, tm_s, total), None

        zero = jax.lax.pcast(jnp.zeros((), f.dtype), axis_name, to="varying")
        init = (t, a, be, tm_, zero)
        (*_, total), _ = jax.lax.scan(step, init, jnp.arange(n))
        total = jax.lax.psum(total, axis_name)
        count = jax.lax.psum(jnp.sum(fm_), axis_name) * jax.lax.psum(jnp.sum(tm_), axis_name)
        return total / jnp.maximum(count, 1.0)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 7,
                         out_specs=jax.sharding.PartitionSpec())(
        frames, text, alpha, beta, labels, fm, tm)


# --- prior loss, calibrated score -----------------------------------------------------------


def positive_rate(labels: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    """``zbar_k = sum_{b,l} fm[b,l] y[b,k,l] / sum_{b,l} fm[b,l]``: ``[K]`` positive-frame rate
    of each text over the batch's valid frames (official ``PriorLoss`` target)."""
    chex.assert_rank(labels, 3)
    b, k, l_ = labels.shape
    y = labels.astype(jnp.float32) if not jnp.issubdtype(labels.dtype, jnp.floating) else labels
    fm = jnp.ones((b, l_), y.dtype) if frame_mask is None else frame_mask.astype(y.dtype)
    chex.assert_shape(fm, (b, l_))
    pos = jnp.einsum("bkl,bl->k", y, fm)
    return pos / jnp.maximum(jnp.sum(fm), 1.0)


def prior_loss(beta: jax.Array, labels: jax.Array, frame_mask: jax.Array | None = None,
               text_mask: jax.Array | None = None) -> jax.Array:
    """Prior loss (paper Eq. 10): ``beta_k`` learns the log-odds of text k's frame rate.

    ``L_prior = sum_k tm_k BCE(sigmoid(beta_k), zbar_k) / sum_k tm_k`` with
    ``BCE(sigmoid(b), p) = -p log sigmoid(b) - (1 - p) log sigmoid(-b)
    = softplus(b) - p b`` and ``zbar`` = :func:`positive_rate` (no gradient to the labels).
    Minimised at ``beta_k = logit(zbar_k)``.
    """
    chex.assert_rank(beta, 1)
    chex.assert_rank(labels, 3)
    k = beta.shape[0]
    chex.assert_axis_dimension(labels, 1, k)
    zbar = jax.lax.stop_gradient(positive_rate(labels, frame_mask)).astype(beta.dtype)
    tm = jnp.ones((k,), beta.dtype) if text_mask is None else text_mask.astype(beta.dtype)
    chex.assert_shape(tm, (k,))
    per = jax.nn.softplus(beta) - zbar * beta
    return jnp.sum(per * tm) / jnp.maximum(jnp.sum(tm), 1.0)


def unbiased_score(logits: jax.Array, beta: jax.Array) -> jax.Array:
    """Calibrated (logit-adjusted) frame score ``s = sigmoid(h) / (sigmoid(h) + sigmoid(beta))``.

    Official ``get_unbiased_framewise_act_map`` (hook.py; "Eq. 7" there, "Eq. 9" in the SED
    example). Computed as ``s = sigmoid(log sigmoid(h) - log sigmoid(beta))``, which is the
    same quantity (divide numerator and denominator by ``sigmoid(beta)``) and stays finite
    for any logits. Since ``log sigmoid(x) = x - softplus(x)``::

        s = sigmoid((h - beta) - (softplus(h) - softplus(beta)))

    so ``s = 1/2`` exactly when ``h == beta``; ``s in (0, 1)`` (float32 saturates only when
    ``|log sigmoid(h) - log sigmoid(beta)| > ~17``); and for rare events (``beta << 0``) and
    ``h << 0`` the softplus terms vanish: ``s -> sigmoid(h - beta) = sigmoid(alpha <e_l, e>)``,
    the score with the text's prior removed, with
    ``|s - sigmoid(h - beta)| <= |softplus(h) - softplus(beta)| / 4 <= max(e^h, e^beta) / 4``.

    Args:
      logits: ``[B, K, L]`` (or ``[K, L]``, ``[K]``: ``beta`` broadcasts on the text axis, which
        is axis ``-2`` for rank >= 2 and axis 0 for rank 1).
      beta: ``[K]``.
    """
    chex.assert_rank(beta, 1)
    k = beta.shape[0]
    if logits.ndim >= 2:
        chex.assert_axis_dimension(logits, logits.ndim - 2, k)
        b = beta[:, None]
    else:
        chex.assert_shape(logits, (k,))
        b = beta
    return jax.nn.sigmoid(jax.nn.log_sigmoid(logits) - jax.nn.log_sigmoid(b))


# --- clip-level InfoNCE, total ---------------------------------------------------------------


def clip_infonce(audio_emb: jax.Array, text_emb: jax.Array, temperature) -> jax.Array:
    """Symmetric CLIP InfoNCE on clip-level embeddings (``L_clip``).

    ``S = A T^T / temperature``; ``L = (CE(S, I) + CE(S^T, I)) / 2`` with
    ``CE(S, I) = -(1/B) sum_i log softmax(S[i])_i`` (official ``CLIPLoss``: pair i is the
    positive of row i and of column i). Embeddings are expected L2-normalised. The official
    model learns ``logit_scale`` (init ``log(1/0.07)``): pass ``temperature =
    exp(-logit_scale)`` to keep it learnable (the loss is differentiable in it).

    Args:
      audio_emb, text_emb: ``[B, D]``, row i of each forms a positive pair.
      temperature: positive scalar.
    """
    chex.assert_rank([audio_emb, text_emb], 2)
    chex.assert_equal_shape([audio_emb, text_emb])
    temperature = jnp.asarray(temperature, audio_emb.dtype)
    chex.assert_rank(temperature, 0)
    s = audio_emb @ text_emb.T / temperature
    diag = jnp.diagonal(s)
    a2t = jnp.mean(jax.nn.logsumexp(s, axis=1) - diag)
    t2a = jnp.mean(jax.nn.logsumexp(s, axis=0) - diag)
    return 0.5 * (a2t + t2a)


def sed_bias(beta: jax.Array, logit_adjustment) -> jax.Array:
    """``beta`` as ``L_SED`` sees it: the same value, its gradient scaled by
    ``1 - logit_adjustment``, i.e. ``beta - la (beta - stop_gradient(beta))``.

    ``la = 1`` (FLAM): ``stop_gradient(beta)``, ``beta`` trained by ``L_prior`` alone;
    ``la = 0`` (no logit adjustment): ``beta`` trained by ``L_SED``. ``la`` may be a traced
    scalar, so models with and without logit adjustment can share one ``vmap``-ped step."""
    la = jnp.asarray(logit_adjustment, beta.dtype)
    chex.assert_rank(la, 0)
    return beta - la * (beta - jax.lax.stop_gradient(beta))


class FlamLosses(NamedTuple):
    total: jax.Array
    clip: jax.Array
    sed: jax.Array
    prior: jax.Array


def total_loss(frames: jax.Array, text: jax.Array, alpha: jax.Array, beta: jax.Array,
               labels: jax.Array, audio_emb: jax.Array, text_emb: jax.Array, temperature,
               frame_mask: jax.Array | None = None, text_mask: jax.Array | None = None, *,
               sed_weight: float = SED_WEIGHT, chunk: int | None = None,
               chunk_axis: str = "batch", logit_adjustment=True) -> FlamLosses:
    """FLAM objective ``L = L_clip + sed_weight * L_SED + la * L_prior`` (official
    ``FLAM.loss`` with ``la = 1``).

    With logit adjustment (``logit_adjustment`` True or 1, the default) ``L_SED`` stops
    ``beta``'s gradient, so ``d L / d beta = d L_prior / d beta``: the bias is trained only to
    match each text's positive-frame rate. With ``logit_adjustment`` 0 (the ablation) ``beta``
    is trained by ``L_SED`` and ``L_prior`` drops out of the total (still returned, for
    logging). A float or traced scalar in between interpolates both (:func:`sed_bias`).
    ``chunk`` selects :func:`sed_loss_chunked` (memory-efficient, chunked along
    ``chunk_axis``) instead of :func:`frame_loss`.

    Args:
      frames, text, alpha, beta, labels, frame_mask, text_mask: the frame-level (SED) batch.
      audio_emb, text_emb, temperature: the clip-level batch (:func:`clip_infonce`).
    Returns:
      :class:`FlamLosses` (total, clip, sed (unweighted), prior).
    """
    if logit_adjustment is True:  # the official objective, exactly
        la, sed_beta, stop = 1.0, beta, True
    else:
        la, sed_beta, stop = logit_adjustment, sed_bias(beta, logit_adjustment), False
    if chunk is None:
        sed = frame_loss(frames, text, alpha, sed_beta, labels, frame_mask, text_mask,
                         stop_beta_grad=stop)
    else:
        sed = sed_loss_chunked(frames, text, alpha, sed_beta, labels, chunk, frame_mask,
                               text_mask, axis=chunk_axis, stop_beta_grad=stop)
    prior = prior_loss(beta, labels, frame_mask, text_mask)
    clip = clip_infonce(audio_emb, text_emb, temperature)
    return FlamLosses(clip + sed_weight * sed + la * prior, clip, sed, prior)
