"""The SEM encoder of Discrete Latent Codes: a small ViT trained by DINO self-distillation.

Discrete Latent Codes (Lavoie, Noukhovitch, Courville 2025, arXiv 2507.12318, Sec. 3) take the
image's code from a Simplicial Embedding (SEM) of a self-supervised encoder. Here the encoder is a
Vision Transformer trained with DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised
Vision Transformers", arXiv 2104.14294), the SEM layer sits between the backbone and the DINO
projection head, so the representation that DINO shapes *is* the SEM::

    h = ViT(x)_CLS                                  (backbone feature, [dim])
    z = LayerNorm(W h + b)                          ([L V], generative.sem.SEMHead)
    s = SEM(z) = softmax_group(z / tau)             ([L, V], rows on the simplex: the representation)
    g = DINOHead(flatten(s))                        ([K] logits of the DINO loss)

and the image's Discrete Latent Code is ``T_i = argmax_v z_{iv}`` (:func:`generative.dlc.tokens`).

DINO (Algorithm 1 of the paper, multi-crop form of its reference code): a student ``g_s`` and a
teacher ``g_t`` of the same architecture see different augmented crops of the same images. The
teacher sees the ``n_global`` global crops (``global_size``, large area), the student every crop
(the global ones and ``n_local`` small local crops at ``local_size``). With teacher outputs
centred and sharpened, ``P_t = softmax((g_t - C) / tau_t)``, and ``P_s = softmax(g_s / tau_s)``::

    loss = 1/N_pairs sum_{g in global} sum_{v in crops, v != g} H(P_t(x_g), P_s(x_v)),
    H(a, b) = -sum_k a_k log b_k      (averaged over the batch)

The teacher gets no gradient (``stop_gradient``); after each student update (AdamW)::

    theta_t <- m theta_t + (1 - m) theta_s,          m: cosine schedule from m0 to 1
    C       <- c C + (1 - c) mean_batch(g_t)         (centre EMA over the teacher's raw outputs)

and ``tau_t`` warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp``. Centring
prevents one dimension from dominating, sharpening prevents the uniform collapse.

Two anti-collapse tools of DINOv2 (Oquab et al. 2023, arXiv 2304.07193, Sec. 4) are options:
``centering="sinkhorn"`` replaces ``softmax((g_t - C) / tau_t)`` by a 3-iteration
Sinkhorn-Knopp equipartition of the batch's teacher outputs (:func:`sinkhorn_knopp`), and
``koleo_weight > 0`` adds ``koleo_weight * sum_g KoLeo(CLS_s(x_g))`` (:func:`koleo_loss`), which
spreads the student's backbone features of each global crop over the sphere.

Initialisation: DINO's std-0.02 normal for every Linear (``ViTConfig.kernel_init="dino"``, the
``paper`` preset) is made for widths of 384+. At the widths of the ``tiny``/``cpu`` presets it
leaves the untrained CLS feature almost image-independent (mean cosine 0.998 between digits at
width 32: only the 0.02-scaled attention path carries the image into the CLS token), so the
centred teacher starts near uniform; those presets use a 1/fan-in variance instead
(``kernel_init="fan_in"``). The patch embedding is always PyTorch's Conv2d default, as in DINO.

**Which network gives the codes**: the teacher. DINO evaluates the teacher ("the teacher
performs better than the student throughout training", Sec. 5.2 / Fig. 6 of the paper): it is a
Polyak-Ruppert average of the student, smoother and more stable, and it is what the loss
distils towards. :func:`train_sem_encoder` returns it, and :func:`extract_codes` takes any
:class:`DINOModel` (pass the student to compare).

Layers, in the order of DESIGN.md: pure functions (:func:`dino_loss`, :func:`update_center`,
:func:`ema_update`, the schedules, the augmentations, :func:`knn_accuracy`), NNX models
(:class:`ViT`, :class:`DINOHead`, :class:`DINOModel`), and the jitted step and loop
(:func:`make_train_step`, :func:`train_sem_encoder`, :func:`extract_codes`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from generative import dlc
from generative.sem import SEMConfig, SEMHead
from trainkit.nn.layers import EncoderBlock
from trainkit import guards
from trainkit.config import Config, field

_TRUNC_NORMAL = nnx.initializers.truncated_normal(0.02)  # DINO's _init_weights for Linear layers


def _torch_conv_default_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default ``nn.Conv2d`` initialisation of weight and bias (``kaiming_uniform_``
    with ``a = sqrt(5)``): ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. DINO's patch embedding is a
    Conv2d, which its ``_init_weights`` (Linear and LayerNorm only) leaves at this default."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _kernel_init(name: str) -> Callable[..., jax.Array]:
    if name == "dino":
        return _TRUNC_NORMAL
    if name == "fan_in":
        # truncated normal with variance 1 / fan_in; EncoderBlock's Dense layers call it on the
        # matrix shape (fan-in = dim for q/k/v, heads * head_dim for the output projection)
        return nnx.initializers.lecun_normal()
    raise ValueError(f"kernel_init must be 'dino' or 'fan_in', got {name!r}")


# --- configs -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViTConfig(Config):
    image_size: int = field(32, ge=1, help="side of the training images (the position-embedding "
                                           "grid is image_size / patch_size)")
    patch_size: int = field(4, ge=1, help="side of the square patches")
    in_channels: int = field(3, ge=1, help="image channels")
    dim: int = field(128, ge=8, help="width (token embedding size)")
    depth: int = field(4, ge=1, help="transformer blocks")
    heads: int = field(4, ge=1, help="attention heads (must divide dim)")
    mlp_ratio: int = field(4, ge=1, help="MLP hidden width / dim")
    kernel_init: str = field(
        "fan_in", choices=("fan_in", "dino"),
        help="init of the transformer blocks' and the DINO head's kernels: truncated normal "
             "with variance 1/fan_in, or DINO's fixed std 0.02 (made for widths >= 384; at "
             "width 32 the untrained CLS feature hardly depends on the image, mean cosine "
             "0.998 between digits, and DINO collapses)")

    def validate(self) -> None:
        if self.dim % self.heads:
            raise self.invalid("heads", f"must divide dim={self.dim}")
        if self.image_size % self.patch_size:
            raise self.invalid("patch_size", f"must divide image_size={self.image_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def tiny(cls) -> "ViTConfig":
        """For tests: 4x4 patches of 8 px on 32x32 images, 2 blocks of width 32."""
        return cls(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_ratio=2)

    @classmethod
    def cpu(cls) -> "ViTConfig":
        """32x32 images in 4x4 patches of 8 px, 4 blocks of width 64, MLP ratio 2 (about 0.14M
        params). Patches of 4 px (64 tokens) at width 128 measured 7.7 s/step in the DINO cpu
        preset on 2 shared cores; this size measured 0.38 s/step there."""
        return cls(image_size=32, patch_size=8, dim=64, depth=4, heads=4, mlp_ratio=2)

    @classmethod
    def paper(cls) -> "ViTConfig":
        """DINO's ViT-S/16 (arXiv 2104.14294, Table 1 / Sec. 4): 224x224, 16 px patches, width
        384, 12 blocks, 6 heads."""
        return cls(image_size=224, patch_size=16, dim=384, depth=12, heads=6, mlp_ratio=4,
                   kernel_init="dino")


@dataclasses.dataclass(frozen=True)
class DINOConfig(Config):
    vit: ViTConfig = field(factory=ViTConfig.cpu, help="backbone")
    sem: SEMConfig = field(factory=lambda: SEMConfig(num_groups=32, group_size=64, tau=1.0),
                           help="SEM layer between the backbone and the DINO head")
    # DINO projection head: MLP -> L2-normalise -> weight-normalised linear to out_dim.
    out_dim: int = field(1024, ge=2, help="K: dimension of the DINO head output")
    head_hidden: int = field(512, ge=1, help="hidden width of the head MLP")
    head_bottleneck: int = field(128, ge=1, help="bottleneck width before the last layer")
    head_layers: int = field(3, ge=1, help="linear layers of the head MLP")
    norm_last_layer: bool = field(True, help="fix the weight-norm gain of the last layer to 1")
    # Multi-crop augmentation.
    n_global: int = field(2, ge=1, help="global crops (seen by teacher and student)")
    n_local: int = field(4, ge=0, help="local crops (student only)")
    global_size: int = field(32, ge=1, help="side of global crops (px)")
    local_size: int = field(16, ge=1, help="side of local crops (px)")
    global_scale: tuple[float, float] = field((0.4, 1.0), help="area fraction range of global crops")
    local_scale: tuple[float, float] = field((0.05, 0.4), help="area fraction range of local crops")
    flip_prob: float = field(0.5, ge=0, le=1, help="horizontal flip probability")
    jitter_prob: float = field(0.8, ge=0, le=1, help="probability of applying colour jitter")
    brightness: float = field(0.4, ge=0, lt=1, help="brightness factor in [1-b, 1+b]")
    contrast: float = field(0.4, ge=0, lt=1, help="contrast factor in [1-c, 1+c]")
    saturation: float = field(0.2, ge=0, lt=1, help="saturation factor in [1-s, 1+s]")
    hue: float = field(0.1, ge=0, le=0.5, help="hue shift in [-h, h] turns")
    grayscale_prob: float = field(0.2, ge=0, le=1, help="probability of converting to grey")
    # DINO loss and EMA.
    student_temp: float = field(0.1, gt=0, help="tau_s")
    teacher_temp: float = field(0.04, gt=0, help="tau_t after warmup")
    warmup_teacher_temp: float = field(0.04, gt=0, help="tau_t at step 0")
    teacher_temp_warmup_steps: int = field(0, ge=0, help="steps of the linear tau_t warmup")
    momentum: float = field(0.996, ge=0, le=1, help="m0: teacher EMA momentum at step 0 "
                                                     "(cosine schedule to 1)")
    center_momentum: float = field(0.9, ge=0, le=1, help="EMA momentum of the centre C")
    centering: str = field("center", choices=("center", "sinkhorn"),
                           help="how the teacher's outputs are centred: DINO's running centre "
                                "(update_center) or DINOv2's Sinkhorn-Knopp (sinkhorn_knopp)")
    sinkhorn_iterations: int = field(3, ge=1, help="Sinkhorn-Knopp iterations (DINOv2: 3)")
    koleo_weight: float = field(0.0, ge=0, help="weight of the KoLeo regulariser on the "
                                                 "student's CLS features of the global crops "
                                                 "(DINOv2: 0.1; 0: off)")
    # Optimiser (AdamW, linear warmup + cosine decay, global-norm clipping).
    batch_size: int = field(64, ge=1, help="images per step")
    lr: float = field(5e-4, gt=0, help="peak learning rate")
    min_lr: float = field(1e-6, ge=0, help="learning rate at the end of the cosine decay")
    warmup_steps: int = field(10, ge=0, help="linear learning-rate warmup steps")
    weight_decay: float = field(0.04, ge=0, help="AdamW weight decay (not on biases, norms, "
                                                  "parameters of rank < 2)")
    clip_grad: float = field(3.0, ge=0, help="global gradient-norm clip (0: off)")

    def validate(self) -> None:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise self.invalid(name, "must be (lo, hi) with 0 < lo <= hi <= 1")
        for name in ("global_size", "local_size"):
            if getattr(self, name) % self.vit.patch_size:
                raise self.invalid(name, f"must be a multiple of vit.patch_size="
                                         f"{self.vit.patch_size}")
        if self.min_lr > self.lr:
            raise self.invalid("min_lr", f"must be <= lr={self.lr}")

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    @classmethod
    def tiny(cls) -> "DINOConfig":
        """Seconds on a CPU: the tests' config. DINOv2's Sinkhorn-Knopp teacher, KoLeo 0.1 and
        K=64: with DINO's running centre (and K=128) it collapsed to the uniform solution on
        digits within ~30 steps (kNN below the untrained encoder); with these it keeps ~290
        distinct codes of 300 and ends slightly above the untrained encoder (see the table in
        tests/generative/test_vit_dino.py)."""
        return cls(vit=ViTConfig.tiny(), sem=SEMConfig(num_groups=8, group_size=16, tau=1.0),
                   out_dim=64, head_hidden=64, head_bottleneck=32, n_local=2, batch_size=32,
                   lr=1e-3, warmup_steps=10, centering="sinkhorn", koleo_weight=0.1)

    @classmethod
    def cpu(cls) -> "DINOConfig":
        """Minutes on a 2-core CPU: 16-token codes over 32, the ViT cpu preset, K=1024, head
        256/64, 2 global + 4 local crops, batch 64 (0.46M params). Measured 0.38 s/step on 2
        cores shared with other jobs (load ~6), i.e. about 6 min per 1000 steps, plus ~90 s
        of compilation; the previous default (patch 4, width 128, head 512/128, 2.58M params)
        measured 7.7 s/step."""
        # Sinkhorn + KoLeo as in tiny (the running centre collapsed there); not yet measured at
        # this size.
        return cls(vit=ViTConfig.cpu(), sem=SEMConfig(num_groups=16, group_size=32, tau=1.0),
                   out_dim=1024, head_hidden=256, head_bottleneck=64, centering="sinkhorn",
                   koleo_weight=0.1)

    @classmethod
    def paper(cls) -> "DINOConfig":
        """DINO's ViT-S/16 recipe (arXiv 2104.14294, Sec. 4 and its reference code: K=65536,
        head 2048/256, 2 global crops at 224 and 10 local at 96 (scales 0.4-1 / 0.05-0.4),
        batch 1024, lr 5e-4 * 1024/256, tau_s 0.1, tau_t 0.04 -> 0.07 over 30 epochs, m0 0.996)
        with DLC's SEM (512 tokens over 256, arXiv 2507.12318). Warmups are given in steps at
        1251 steps per ImageNet epoch (batch 1024)."""
        return cls(vit=ViTConfig.paper(), sem=SEMConfig.dlc_512(), out_dim=65536,
                   head_hidden=2048, head_bottleneck=256, n_global=2, n_local=10,
                   global_size=224, local_size=96, batch_size=1024, lr=5e-4 * 1024 / 256,
                   warmup_steps=10 * 1251, teacher_temp=0.07, warmup_teacher_temp=0.04,
                   teacher_temp_warmup_steps=30 * 1251)


# --- pure functions: loss, centre, EMA, schedules ---------------------------------------------


def dino_cross_entropy(student_out: jax.Array, teacher_probs: jax.Array,
                       student_temp: float | jax.Array, n_global: int) -> jax.Array:
    """The multi-crop DINO cross-entropy given the teacher's target distributions::

        log P_s^{(v)} = log_softmax(s_v / tau_s)        v = 1..n_crops  (student)
        loss = 1/N sum_{g} sum_{v != g} mean_b [ -sum_k P_t^{(g)}_{bk} log P_s^{(v)}_{bk} ]

    with ``N = n_global * n_crops - n_global`` pairs (student crop ``v`` and teacher crop ``g``
    are the same view when ``v == g``; those pairs are skipped). :func:`dino_loss` (DINO's
    centred teacher) and DINOv2's Sinkhorn-Knopp teacher (:func:`sinkhorn_knopp`) both end here.

    Args:
      student_out: ``[n_crops * B, K]`` student logits, crop-major (rows ``v*B:(v+1)*B`` are
        crop ``v``; the first ``n_global`` crops are the global ones, in the teacher's order).
      teacher_probs: ``[n_global * B, K]`` teacher target distributions of the global crops,
        crop-major (rows sum to 1; no gradient flows into them).
      student_temp: ``tau_s`` > 0.
      n_global: number of global crops.
    Returns:
      scalar loss.
    """
    chex.assert_rank([student_out, teacher_probs], 2)
    if n_global < 1:
        raise ValueError(f"n_global must be >= 1, got {n_global}")
    k = teacher_probs.shape[-1]
    chex.assert_axis_dimension(student_out, -1, k)
    if teacher_probs.shape[0] % n_global:
        raise ValueError(f"teacher_out has {teacher_probs.shape[0]} rows, not a multiple of "
                         f"n_global={n_global}")
    b = teacher_probs.shape[0] // n_global
    if student_out.shape[0] % b or student_out.shape[0] // b < n_global:
        raise ValueError(f"student_out has {student_out.shape[0]} rows; expected n_crops * "
                         f"{b} with n_crops >= n_global={n_global}")
    n_crops = student_out.shape[0] // b
    p_t = jax.lax.stop_gradient(teacher_probs).reshape(n_global, b, k)
    log_p_s = jax.nn.log_softmax(student_out.reshape(n_crops, b, k) / student_temp, axis=-1)
    # ce[g, v] = mean_b -sum_k P_t[g] log P_s[v]
    ce = -jnp.einsum("gbk,vbk->gv", p_t, log_p_s) / b
    mask = 1.0 - jnp.eye(n_global, n_crops, dtype=ce.dtype)
    return jnp.sum(ce * mask) / (n_global * n_crops - n_global)


def dino_loss(student_out: jax.Array, teacher_out: jax.Array, center: jax.Array,
              student_temp: float | jax.Array, teacher_temp: float | jax.Array,
              n_global: int) -> jax.Array:
    """The DINO cross-entropy (Caron et al. 2021, Algorithm 1, multi-crop form; eq. 2-3)::

        P_t^{(g)} = softmax((t_g - C) / tau_t)          g = 1..n_global (teacher, no gradient)
        log P_s^{(v)} = log_softmax(s_v / tau_s)        v = 1..n_crops  (student)
        loss = 1/N sum_{g} sum_{v != g} mean_b [ -sum_k P_t^{(g)}_{bk} log P_s^{(v)}_{bk} ]

    with ``N = n_global * n_crops - n_global`` pairs (:func:`dino_cross_entropy`). For two crops
    this is Algorithm 1's ``H(t1, s2)/2 + H(t2, s1)/2``.

    Args:
      student_out: ``[n_crops * B, K]`` student logits, crop-major (rows ``v*B:(v+1)*B`` are
        crop ``v``; the first ``n_global`` crops are the global ones, in the teacher's order).
      teacher_out: ``[n_global * B, K]`` teacher logits of the global crops, crop-major.
      center: ``[K]`` (or ``[1, K]``) centre ``C``.
      student_temp, teacher_temp: ``tau_s``, ``tau_t`` > 0.
      n_global: number of global crops.
    Returns:
      scalar loss. The gradient flows into ``student_out`` only.
    """
    chex.assert_rank([student_out, teacher_out], 2)
    if n_global < 1:
        raise ValueError(f"n_global must be >= 1, got {n_global}")
    k = teacher_out.shape[-1]
    center = jnp.reshape(center, (k,))
    t = jax.lax.stop_gradient(teacher_out)
    p_t = jax.nn.softmax((t - jax.lax.stop_gradient(center)) / teacher_temp, axis=-1)
    return dino_cross_entropy(student_out, p_t, student_temp, n_global)


def sinkhorn_knopp(teacher_out: jax.Array, teacher_temp: float | jax.Array,
                   n_iterations: int = 3) -> jax.Array:
    """DINOv2's Sinkhorn-Knopp centring of the teacher (Oquab et al. 2023, arXiv 2304.07193,
    Sec. 4, after SwAV, Caron et al. 2020, eq. 3; ``sinkhorn_knopp_teacher`` of the reference
    code). With ``Q = exp(t / tau_t)^T`` (``[K, N]``, ``N`` rows of ``teacher_out``: all global
    crops of the batch together) normalised to sum 1, each iteration rescales::

        Q <- Q / (K * sum_n Q_{kn})      every prototype k gets total mass 1/K
        Q <- Q / (N * sum_k Q_{kn})      every sample n gets total mass 1/N

    and the targets are ``P_t = N Q^T`` (``[N, K]``, rows sum to 1): an (approximately)
    equipartitioned soft assignment of the batch to the ``K`` prototypes, which replaces
    ``softmax((t - C) / tau_t)`` in the DINO loss. Computed in float32 with a per-array max
    subtracted before ``exp`` (it cancels in the first normalisation). No gradient.

    Args:
      teacher_out: ``[N, K]`` raw teacher logits.
      teacher_temp: ``tau_t`` > 0.
      n_iterations: Sinkhorn iterations (DINOv2: 3), >= 1.
    Returns:
      ``[N, K]`` target distributions.
    """
    chex.assert_rank(teacher_out, 2)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    t = jax.lax.stop_gradient(teacher_out).astype(jnp.float32) / teacher_temp
    q = jnp.exp(t - jnp.max(t)).T  # [K, N]
    k, n = q.shape
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        q = q / jnp.sum(q, axis=1, keepdims=True) / k
        q = q / jnp.sum(q, axis=0, keepdims=True) / n
    return (q * n).T


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """The KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity
    search", eq. 8; DINOv2 arXiv 2304.07193, Sec. 4, ``KoLeoLoss``): with ``x_i`` L2-normalised
    and ``j(i)`` the nearest other row (largest dot product)::

        L_koleo = -1/n sum_i log(||x_i - x_{j(i)} + eps||_2 + eps)

    (the differential entropy estimator of Kozachenko-Leonenko, up to constants). Minimising it
    pushes every feature away from its nearest neighbour, spreading the batch over the sphere.
    The gradient flows through both ``x_i`` and ``x_{j(i)}``; the neighbour choice is discrete.

    Args:
      x: ``[n, d]`` features, ``n >= 2``.
      eps: DINOv2's 1e-8, in the normalisation, in the distance (``nn.PairwiseDistance``
        adds it to the difference) and in the log.
    Returns:
      scalar loss.
    """
    chex.assert_rank(x, 2)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows, got {n}")
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = jax.lax.stop_gradient(x @ x.T)
    dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)  # DINOv2 fills the diagonal with -1
    nn_idx = jnp.argmax(dots, axis=1)
    diff = x - x[nn_idx] + eps
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    return -jnp.mean(jnp.log(dist + eps))


def update_center(center: jax.Array, teacher_out: jax.Array, momentum: float | jax.Array
                  ) -> jax.Array:
    """``C <- c C + (1 - c) mean_rows(teacher_out)`` (DINO eq. 4; the mean is over the batch and
    the global crops of the teacher's raw logits). ``[K], [N, K] -> [K]``."""
    chex.assert_rank(teacher_out, 2)
    center = jnp.reshape(center, teacher_out.shape[-1:])
    teacher_out = jax.lax.stop_gradient(teacher_out)
    return momentum * center + (1.0 - momentum) * jnp.mean(teacher_out, axis=0)


def ema_update(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """``theta_t <- m theta_t + (1 - m) theta_s`` leaf by leaf (DINO Sec. 3.1, Algorithm 1)."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(s),
                        teacher, student)


def momentum_schedule(step: jax.Array | int, total_steps: int, m0: float) -> jax.Array:
    """Cosine teacher momentum ``m(k) = 1 - (1 - m0) (cos(pi k / K) + 1) / 2``: ``m0`` at step 0,
    1 at step ``K = total_steps`` (DINO Sec. 3.1, following BYOL)."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - m0) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def teacher_temp_schedule(step: jax.Array | int, warmup_temp: float, final_temp: float,
                          warmup_steps: int) -> jax.Array:
    """``tau_t``: linear from ``warmup_temp`` to ``final_temp`` over ``warmup_steps``, then
    constant (DINO's teacher-temperature warmup)."""
    if warmup_steps <= 0:
        return jnp.asarray(final_temp, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
    return warmup_temp + (final_temp - warmup_temp) * frac


# --- multi-crop augmentation (jittable, one key per example and crop) -------------------------


_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as torchvision
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ.astype(np.float64)).astype(np.float32)


def _interp_matrix(start: jax.Array, length: jax.Array, n_in: int, n_out: int) -> jax.Array:
    """``[n_out, n_in]`` bilinear weights sampling ``[start, start + length)`` (in input pixels)
    at ``n_out`` pixel centres (``start + (i + 0.5) length / n_out - 0.5``, edges clamped)."""
    src = start + (jnp.arange(n_out) + 0.5) * length / n_out - 0.5
    src = jnp.clip(src, 0.0, n_in - 1.0)
    lo = jnp.floor(src)
    frac = src - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n_in - 1)
    return (jax.nn.one_hot(lo, n_in) * (1.0 - frac)[:, None]
            + jax.nn.one_hot(hi, n_in) * frac[:, None])


def _crop_from_uniforms(u: jax.Array, image: jax.Array, out_size: int,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> jax.Array:
    """:func:`random_resized_crop` given its four uniforms ``u`` in [0, 1) (area, log aspect
    ratio, x and y position)."""
    h, w, _ = image.shape
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    x0 = u[2] * (w - cw)
    y0 = u[3] * (h - ch)
    wy = _interp_matrix(y0, ch, h, out_size)
    wx = _interp_matrix(x0, cw, w, out_size)
    return jnp.einsum("ih,hwc,jw->ijc", wy, image, wx)


def random_resized_crop(key: jax.Array, image: jax.Array, out_size: int,
                        scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> jax.Array:
    """A random crop of area fraction ``s ~ U(scale)`` and aspect ratio ``r`` (``log r`` uniform
    in ``log ratio``), clipped to the image, at a uniform position, resized bilinearly to
    ``out_size x out_size`` (torchvision's RandomResizedCrop with one draw instead of ten tries
    and sub-pixel crop boxes). ``[H, W, C] -> [out_size, out_size, C]``."""
    chex.assert_rank(image, 3)
    return _crop_from_uniforms(jax.random.uniform(key, (4,)), image, out_size, scale, ratio)


def _jitter_from_uniforms(u: jax.Array, image: jax.Array, brightness: float, contrast: float,
                          saturation: float, hue: float) -> jax.Array:
    """:func:`color_jitter` given its four uniforms ``u`` in [0, 1)."""
    factor = lambda v, a: 1.0 - a + 2.0 * a * v  # noqa: E731  U[1 - a, 1 + a]
    x = jnp.clip(image * factor(u[0], brightness), 0.0, 1.0)
    c = factor(u[1], contrast)
    x = jnp.clip(c * x + (1.0 - c) * jnp.mean(x @ _GREY), 0.0, 1.0)
    s = factor(u[2], saturation)
    x = jnp.clip(s * x + (1.0 - s) * (x @ _GREY)[..., None], 0.0, 1.0)
    theta = 2.0 * jnp.pi * hue * (2.0 * u[3] - 1.0)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    yiq = x @ _RGB_TO_YIQ.T
    return jnp.clip(yiq @ rot.T @ _YIQ_TO_RGB.T, 0.0, 1.0)


def color_jitter(key: jax.Array, image: jax.Array, brightness: float, contrast: float,
                 saturation: float, hue: float) -> jax.Array:
    """torchvision's ColorJitter in a fixed order on an image in ``[0, 1]``, clipping after each:
    brightness ``x b``; contrast ``c x + (1 - c) mean(grey(x))``; saturation ``s x + (1 - s)
    grey(x)``; hue: rotate the chroma plane of YIQ by ``2 pi h`` (a linear stand-in for the HSV
    hue shift). Factors ``b, c, s ~ U[1 - a, 1 + a]``, ``h ~ U[-hue, hue]`` turns."""
    chex.assert_rank(image, 3)
    return _jitter_from_uniforms(jax.random.uniform(key, (4,)), image, brightness, contrast,
                                 saturation, hue)


def augment(key: jax.Array, image: jax.Array, out_size: int, scale: tuple[float, float],
            cfg: DINOConfig) -> jax.Array:
    """One view of one image in ``[-1, 1]``: random resized crop, horizontal flip
    (``flip_prob``), colour jitter (with probability ``jitter_prob``), greyscale
    (``grayscale_prob``), back to ``[-1, 1]``. ``[H, W, C] -> [out_size, out_size, C]``.

    All eleven random numbers come from one ``uniform(key, (11,))`` draw (one threefry call
    per view keeps the compiled step small)."""
    chex.assert_rank(image, 3)
    u = jax.random.uniform(key, (11,))
    x = _crop_from_uniforms(u[0:4], (image + 1.0) / 2.0, out_size, scale, (3 / 4, 4 / 3))
    x = jnp.where(u[4] < cfg.flip_prob, x[:, ::-1], x)
    if x.shape[-1] == 3:
        jittered = _jitter_from_uniforms(u[5:9], x, cfg.brightness, cfg.contrast,
                                         cfg.saturation, cfg.hue)
        x = jnp.where(u[9] < cfg.jitter_prob, jittered, x)
        grey = jnp.broadcast_to((x @ _GREY)[..., None], x.shape)
        x = jnp.where(u[10] < cfg.grayscale_prob, grey, x)
    return 2.0 * x - 1.0


def multi_crop(key: jax.Array, images: jax.Array, cfg: DINOConfig
               ) -> tuple[jax.Array, jax.Array | None]:
    """DINO's multi-crop views of a batch ``[B, H, W, C]`` in ``[-1, 1]``, an independent key per
    example and crop. Returns ``(global [n_global, B, G, G, C], local [n_local, B, l, l, C])``
    (``local`` is None when ``n_local == 0``)."""
    chex.assert_rank(images, 4)
    b = images.shape[0]
    k_g, k_l = jax.random.split(key)

    def views(k, n, size, scale):
        keys = jax.random.split(k, (n, b))
        one = lambda kk, img: augment(kk, img, size, scale, cfg)  # noqa: E731
        return jax.vmap(jax.vmap(one, in_axes=(0, 0)), in_axes=(0, None))(keys, images)

    glob = views(k_g, cfg.n_global, cfg.global_size, cfg.global_scale)
    loc = views(k_l, cfg.n_local, cfg.local_size, cfg.local_scale) if cfg.n_local else None
    return glob, loc


# --- models ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: ``jax.image.resize(..., method="bicubic")`` along one axis as a matrix
    (the resize is linear and separable; applying it to the identity gives its weights, with
    the antialiasing that ``jax.image.resize`` uses when downsampling)."""
    with jax.ensure_compile_time_eval():
        eye = jnp.eye(n_in, dtype=jnp.float32)
        return np.asarray(jax.image.resize(eye, (n_out, n_in), method="bicubic"))


class ViT(nnx.Module):
    """Vision Transformer returning the CLS feature: ``[B, H, W, C] -> [B, dim]``.

    Patch embedding (a linear map of each flattened ``p x p`` patch, the same as a stride-``p``
    convolution), a learned CLS token, learned position embeddings for the ``grid x grid``
    patches of an ``image_size`` image (plus one for CLS), ``depth`` pre-LN blocks
    (:class:`~trainkit.nn.layers.EncoderBlock`) and a final LayerNorm. An input of another
    size (DINO's local crops) gets the patch position embeddings resized bicubically to its
    ``(H/p) x (W/p)`` grid (DINO's ``interpolate_pos_encoding``; ``jax.image.resize`` weights,
    precomputed as two small matrices).
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        p = cfg.patch_size
        fan_in = p * p * cfg.in_channels
        # DINO's PatchEmbed is an nn.Conv2d at PyTorch's default init, U(+-1/sqrt(fan_in)) for
        # weight and bias, not the 0.02 normal of its Linear layers: with 0.02 the untrained
        # CLS feature hardly depends on the image (mean cosine 0.998 between digits at width 32).
        conv_init = _torch_conv_default_init(fan_in)
        self.patch = nnx.Linear(fan_in, cfg.dim, kernel_init=conv_init, bias_init=conv_init,
                                rngs=rngs)
        kernel_init = _kernel_init(cfg.kernel_init)
        self.cls = nnx.Param(_TRUNC_NORMAL(rngs.params(), (1, 1, cfg.dim)))
        self.pos = nnx.Param(_TRUNC_NORMAL(rngs.params(), (1, cfg.grid * cfg.grid + 1, cfg.dim)))
        self.blocks = nnx.List([
            EncoderBlock(cfg.dim, cfg.heads, cfg.mlp_ratio * cfg.dim, eps=1e-6,
                         kernel_init=kernel_init, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.dim, epsilon=1e-6, rngs=rngs)

    def position_embedding(self, gh: int, gw: int) -> jax.Array:
        """``[1, gh * gw + 1, dim]``: the CLS embedding and the patch grid resized to ``gh x gw``."""
        cfg = self.config
        pos = self.pos[...]
        if (gh, gw) == (cfg.grid, cfg.grid):
            return pos
        grid = pos[0, 1:].reshape(cfg.grid, cfg.grid, cfg.dim)
        rows = jnp.asarray(_resize_matrix(cfg.grid, gh), pos.dtype)
        cols = jnp.asarray(_resize_matrix(cfg.grid, gw), pos.dtype)
        grid = jnp.einsum("ag,bh,ghd->abd", rows, cols, grid)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, cfg.dim)], axis=1)

    def tokens(self, x: jax.Array) -> jax.Array:
        """All output tokens ``[B, 1 + (H/p)(W/p), dim]`` after the final LayerNorm (CLS first)."""
        cfg = self.config
        chex.assert_rank(x, 4)
        b, h, w, c = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels:
            raise ValueError(f"input has {c} channels; config.in_channels={cfg.in_channels}")
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of patch_size={p}")
        gh, gw = h // p, w // p
        patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        tok = self.patch(patches.reshape(b, gh * gw, p * p * c))
        cls = jnp.broadcast_to(self.cls[...], (b, 1, cfg.dim))
        tok = jnp.concatenate([cls, tok], axis=1) + self.position_embedding(gh, gw)
        for block in self.blocks:
            tok = block(tok)
        return self.norm(tok)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.tokens(x)[:, 0]


class DINOHead(nnx.Module):
    """DINO projection head: ``MLP (GELU) -> L2-normalise -> weight-normalised linear (no bias)``.

    ``[..., in] -> [..., K]``. The last layer is ``W = g v / ||v||`` column-wise with ``g = 1``
    fixed when ``norm_last_layer`` (DINO's default for stability), else a learned ``g``."""

    def __init__(self, in_dim: int, cfg: DINOConfig, *, rngs: nnx.Rngs):
        init = _kernel_init(cfg.vit.kernel_init)
        lin = lambda i, o: nnx.Linear(i, o, kernel_init=init, rngs=rngs)  # noqa: E731
        if cfg.head_layers == 1:
            dims = [in_dim, cfg.head_bottleneck]
        else:
            dims = [in_dim] + [cfg.head_hidden] * (cfg.head_layers - 1) + [cfg.head_bottleneck]
        self.mlp = nnx.List([lin(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.last_v = nnx.Param(_TRUNC_NORMAL(rngs.params(), (cfg.head_bottleneck, cfg.out_dim)))
        self.last_g = None if cfg.norm_last_layer else nnx.Param(jnp.ones((cfg.out_dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        v = self.last_v[...]
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if self.last_g is not None:
            w = w * self.last_g[...]
        return x @ w


class DINOModel(nnx.Module):
    """``ViT -> SEMHead -> DINOHead``: student and teacher share this architecture.

    ``model(x) -> [B, K]`` DINO logits; ``model.embed(x) -> (sem [B, L, V], z [B, L, V])``, the
    SEM representation and its pre-softmax logits (the code is ``argmax z``)."""

    def __init__(self, cfg: DINOConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.backbone = ViT(cfg.vit, rngs=rngs)
        self.sem = SEMHead(cfg.vit.dim, cfg.sem, rngs=rngs)
        self.head = DINOHead(cfg.sem.num_groups * cfg.sem.group_size, cfg, rngs=rngs)

    def embed(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.sem(self.backbone(x), return_logits=True)

    def features(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(logits [B, K], cls [B, dim])``: the DINO logits and the backbone's CLS feature
        (KoLeo's input) from one forward pass."""
        h = self.backbone(x)
        probs = self.sem(h)
        return self.head(probs.reshape(probs.shape[0], -1)), h

    def __call__(self, x: jax.Array) -> jax.Array:
        probs, _ = self.embed(x)
        return self.head(probs.reshape(probs.shape[0], -1))


# --- steps and loop ----------------------------------------------------------------------------


class DINOState(NamedTuple):
    student: Any  # nnx.State of the student's Params
    teacher: Any  # nnx.State of the teacher's Params (EMA of the student)
    opt_state: Any
    center: jax.Array  # [K]
    step: jax.Array  # int32, steps taken
    guard: guards.GuardState


def _decay_mask(params: Any) -> Any:
    """Weight decay on parameters of rank >= 2 only (DINO excludes biases and norm scales)."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: DINOConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with a linear warmup to ``lr`` over ``warmup_steps`` then a cosine decay to
    ``min_lr`` at ``total_steps``, after global-norm clipping at ``clip_grad`` (DINO's
    recipe with a constant weight decay)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, 1),
                                                  end_value=cfg.min_lr)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay,
                        mask=_decay_mask)
    if cfg.clip_grad > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_grad), adamw)
    return adamw


def init_state(model: DINOModel, optimizer: optax.GradientTransformation
               ) -> tuple[nnx.GraphDef, DINOState]:
    """Split ``model`` into its graph and Params; the teacher starts as a copy of the student
    (DINO), the centre at zero."""
    graphdef, params = nnx.split(model, nnx.Param)
    teacher = jax.tree.map(jnp.array, params)
    state = DINOState(student=params, teacher=teacher, opt_state=optimizer.init(params),
                      center=jnp.zeros((model.config.out_dim,), jnp.float32),
                      step=jnp.zeros((), jnp.int32), guard=guards.init_guard())
    return graphdef, state


def teacher_targets(teacher_out: jax.Array, center: jax.Array, teacher_temp: float | jax.Array,
                    centering: str = "center", sinkhorn_iterations: int = 3) -> jax.Array:
    """The teacher's target distributions ``[N, K]`` from its raw logits ``[N, K]``:
    ``softmax((t - C) / tau_t)`` (``centering="center"``, DINO) or
    ``sinkhorn_knopp(t, tau_t, sinkhorn_iterations)`` over all ``N`` rows (``"sinkhorn"``,
    DINOv2; ``center`` is then unused)."""
    if centering == "center":
        k = teacher_out.shape[-1]
        return jax.nn.softmax((teacher_out - jnp.reshape(center, (k,))) / teacher_temp, axis=-1)
    if centering == "sinkhorn":
        return sinkhorn_knopp(teacher_out, teacher_temp, sinkhorn_iterations)
    raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")


def dino_objective(student_params: Any, teacher_params: Any, graphdef: nnx.GraphDef,
                   center: jax.Array, global_crops: jax.Array, local_crops: jax.Array | None,
                   student_temp: float | jax.Array, teacher_temp: float | jax.Array,
                   centering: str = "center", sinkhorn_iterations: int = 3,
                   koleo_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DINO loss of one batch of crops as a function of both parameter sets::

        loss = dino_cross_entropy(student, teacher_targets(teacher)) 
               + koleo_weight * sum_{g in global} koleo_loss(CLS_student(x_g))

    The teacher runs on the ``[n_global, B, ...]`` global crops under ``stop_gradient`` (so
    ``d loss / d teacher_params = 0``), the student on the global and the local crops (one
    forward per crop size). The KoLeo term (DINOv2) is taken per global crop over the batch on
    the student's backbone CLS features, and summed over the global crops. Returns
    ``(loss, aux)`` with ``aux["teacher_out"]`` (raw teacher logits ``[n_global B, K]``, for the
    centre update), the teacher targets' mean entropy, and the DINO and KoLeo terms."""
    n_global = global_crops.shape[0]
    flat = lambda c: c.reshape(-1, *c.shape[2:])  # noqa: E731
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
    teacher_out = jax.lax.stop_gradient(teacher(flat(global_crops)))
    student = nnx.merge(graphdef, student_params)
    s_global, cls = student.features(flat(global_crops))
    student_out = [s_global]
    if local_crops is not None:
        student_out.append(student(flat(local_crops)))
    student_out = jnp.concatenate(student_out, axis=0)
    p_t = jax.lax.stop_gradient(
        teacher_targets(teacher_out, center, teacher_temp, centering, sinkhorn_iterations))
    dino = dino_cross_entropy(student_out, p_t, student_temp, n_global)
    if koleo_weight > 0:
        koleo = sum(koleo_loss(c) for c in cls.reshape(n_global, -1, cls.shape[-1]))
    else:
        koleo = jnp.zeros(())
    loss = dino + koleo_weight * koleo
    entropy = -jnp.mean(jnp.sum(p_t * jnp.log(jnp.maximum(p_t, 1e-30)), axis=-1))
    return loss, {"teacher_out": teacher_out, "teacher_entropy": entropy, "dino_loss": dino,
                  "koleo_loss": koleo}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    cfg: DINOConfig, total_steps: int) -> Callable[..., Any]:
    """``step(state, key, images) -> (state, metrics)``, pure and jitted.

    ``images``: ``[B, H, W, C]`` in ``[-1, 1]``. One step: multi-crop views (``key``), the DINO
    loss (:func:`dino_objective`), an AdamW update of the student (skipped when the loss or a
    gradient is non-finite, :func:`trainkit.guards.guarded_update`), the teacher EMA at
    ``m = momentum_schedule(step)`` and the centre EMA at ``center_momentum``, with ``tau_t`` from
    :func:`teacher_temp_schedule`. Metrics: loss, teacher_entropy, grad_norm, momentum,
    teacher_temp and the guard counters."""

    @jax.jit
    def step(state: DINOState, key: jax.Array, images: jax.Array):
        global_crops, local_crops = multi_crop(key, images, cfg)
        t_temp = teacher_temp_schedule(state.step, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                       cfg.teacher_temp_warmup_steps)
        (loss, aux), grads = jax.value_and_grad(dino_objective, has_aux=True)(
            state.student, state.teacher, graphdef, state.center, global_crops, local_crops,
            cfg.student_temp, t_temp, cfg.centering, cfg.sinkhorn_iterations, cfg.koleo_weight)
        student, opt_state, guard, gm = guards.guarded_update(
            optimizer, grads, state.opt_state, state.student, loss, state.guard)
        m = momentum_schedule(state.step, total_steps, cfg.momentum)
        teacher = ema_update(state.teacher, student, m)
        center = update_center(state.center, aux["teacher_out"], cfg.center_momentum)
        new = DINOState(student=student, teacher=teacher, opt_state=opt_state, center=center,
                        step=state.step + 1, guard=guard)
        metrics = {"loss": loss, "dino_loss": aux["dino_loss"], "koleo_loss": aux["koleo_loss"],
                   "teacher_entropy": aux["teacher_entropy"],
                   "grad_norm": optax.global_norm(grads), "momentum": m, "teacher_temp": t_temp,
                   **gm}
        return new, metrics

    return step


def train_sem_encoder(cfg: DINOConfig, images: np.ndarray | jax.Array, key: jax.Array,
                      steps: int, progress: bool = True, *, max_nonfinite: int = 10, mesh=None
                      ) -> tuple[DINOModel, dict[str, np.ndarray]]:
    """Train a DINO student/teacher pair with a SEM layer on ``images`` for ``steps`` steps.

    Args:
      cfg: the model, augmentation and optimiser settings.
      images: ``[N, H, W, C]`` float images in ``[-1, 1]`` (e.g. ``datasets.load(...)`` batches
        or :func:`generative.datasets.digits_arrays` scaled by ``x / 127.5 - 1``).
      key: PRNG key (initialisation, batch sampling and augmentations).
      steps: optimisation steps; each draws ``batch_size`` images uniformly with replacement.
      progress: show a tqdm bar with ETA and the running loss.
      max_nonfinite: stop with :class:`trainkit.guards.NonFiniteError` after this many
        consecutive skipped (non-finite) steps.
      mesh: several devices or processes: the state and images replicated on it, each step's
        batch split over its batch axes (:func:`trainkit.sharding.spread_batch`); the teacher
        comes back with this process's own copy of the parameters.
    Returns:
      ``(teacher, history)``: the EMA teacher as a :class:`DINOModel` (the network to take
      codes from, see the module docstring) and ``history``, a dict of per-step numpy arrays
      (``loss``, ``teacher_entropy``, ``grad_norm``, ``momentum``, ``teacher_temp``,
      ``skipped``...).
    """
    images = jnp.asarray(images, jnp.float32)
    chex.assert_rank(images, 4)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.shape[1:3] != (cfg.vit.image_size, cfg.vit.image_size):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}; "
                         f"cfg.vit.image_size={cfg.vit.image_size}")
    k_init, k_loop = jax.random.split(key)
    model = DINOModel(cfg, rngs=nnx.Rngs(params=k_init))
    optimizer = make_optimizer(cfg, steps)
    graphdef, state = init_state(model, optimizer)
    step = make_train_step(graphdef, optimizer, cfg, steps)
    n = images.shape[0]
    from trainkit.loop import run_steps
    from trainkit.sharding import local_replica, replicate, spread_batch

    state, images = replicate((state, images), mesh)

    @jax.jit
    def sample_and_step(state, key, images):
        k_idx, k_aug = jax.random.split(key)
        idx = spread_batch(jax.random.randint(k_idx, (cfg.batch_size,), 0, n), mesh)
        return step(state, k_aug, images[idx])

    state, history = run_steps(lambda s, k: sample_and_step(s, k, images), state,
                               replicate(jax.random.split(k_loop, steps), mesh), desc="dino",
                               progress=progress, max_nonfinite=max_nonfinite)
    teacher = nnx.merge(graphdef, local_replica(state.teacher))
    return teacher, history


@jax.jit(static_argnums=0)
def _encode(graphdef: nnx.GraphDef, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs, z = nnx.merge(graphdef, params).embed(x)
    return dlc.tokens(z), probs


def extract_codes(model: DINOModel, images: np.ndarray | jax.Array, batch_size: int = 256
                  ) -> tuple[jax.Array, jax.Array]:
    """Codes and SEM distributions of ``images`` ``[N, H, W, C]`` in ``[-1, 1]`` (no
    augmentation). Returns ``(tokens int32 [N, L], sem_probs [N, L, V])`` with
    ``tokens = generative.dlc.tokens(z)`` of the pre-softmax SEM logits (the same as the
    argmax of ``sem_probs``). Batches of ``batch_size`` (the last one zero-padded, so one
    compilation serves every batch)."""
    chex.assert_rank(images, 4)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    graphdef, params = nnx.split(model, nnx.Param)
    n = images.shape[0]
    batch_size = min(batch_size, n)
    toks, probs = [], []
    for start in range(0, n, batch_size):
        x = jnp.asarray(images[start:start + batch_size], jnp.float32)
        m = x.shape[0]
        if m < batch_size:
            x = jnp.concatenate([x, jnp.zeros((batch_size - m, *x.shape[1:]), x.dtype)])
        t, p = _encode(graphdef, params, x)
        toks.append(t[:m])
        probs.append(p[:m])
    return jnp.concatenate(toks), jnp.concatenate(probs)


# --- evaluation --------------------------------------------------------------------------------


def knn_accuracy(train_feats: jax.Array | np.ndarray, train_labels: jax.Array | np.ndarray,
                 test_feats: jax.Array | np.ndarray, test_labels: jax.Array | np.ndarray,
                 k: int = 20, *, temperature: float | None = 0.07,
                 num_classes: int | None = None, batch_size: int = 1024) -> float:
    """Accuracy of a cosine-similarity k-nearest-neighbour classifier (DINO's kNN protocol,
    Sec. 4.1 and ``eval_knn.py``, after Wu et al. 2018).

    Features are flattened per example and L2-normalised; for a test point, its ``k`` most
    similar training points (cosine ``s_j``) vote for their labels with weight
    ``exp(s_j / temperature)`` (``temperature=None``: one vote each, a plain majority with ties
    to the smallest label). The prediction is the label with the largest total vote.

    Args:
      train_feats, test_feats: ``[N, ...]`` and ``[M, ...]`` features (e.g. SEM ``[N, L, V]``;
        for codes pass ``one_hot(tokens, V)``: cosine is then the fraction of equal tokens).
      train_labels, test_labels: int ``[N]``, ``[M]``.
      k: neighbours, ``1 <= k <= N``.
    Returns:
      the fraction of test points classified correctly.
    """
    train = jnp.asarray(train_feats, jnp.float32).reshape(len(train_feats), -1)
    test = jnp.asarray(test_feats, jnp.float32).reshape(len(test_feats), -1)
    y_train = jnp.asarray(train_labels, jnp.int32)
    y_test = jnp.asarray(test_labels, jnp.int32)
    chex.assert_shape(y_train, (train.shape[0],))
    chex.assert_shape(y_test, (test.shape[0],))
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have {train.shape[1]} entries, test {test.shape[1]}")
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"k must be in [1, {train.shape[0]}] (training points), got {k}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0 or None, got {temperature}")
    if num_classes is None:
        num_classes = int(max(int(jnp.max(y_train)), int(jnp.max(y_test)))) + 1
    normalise = lambda f: f / jnp.maximum(jnp.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # noqa: E731
    train, test = normalise(train), normalise(test)
    correct = 0
    for start in range(0, test.shape[0], batch_size):
        pred = _knn_predict(train, y_train, test[start:start + batch_size], k, temperature,
                            num_classes)
        correct += int(jnp.sum(pred == y_test[start:start + batch_size]))
    return correct / test.shape[0]


@jax.jit(static_argnums=(3, 4, 5))
def _knn_predict(train: jax.Array, y_train: jax.Array, test: jax.Array, k: int,
                 temperature: float | None, num_classes: int) -> jax.Array:
    """Labels voted by the ``k`` most cosine-similar (unit) training rows of each test row."""
    sims, idx = jax.lax.top_k(test @ train.T, k)
    w = jnp.ones_like(sims) if temperature is None else jnp.exp(sims / temperature)
    votes = jnp.sum(jax.nn.one_hot(y_train[idx], num_classes) * w[..., None], axis=1)
    return jnp.argmax(votes, axis=-1)
