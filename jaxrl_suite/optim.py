"""PSGD Kron: a Kronecker-factored preconditioner fitted by PSGD, as an optax transformation.

References
----------
* X.-L. Li (2018), "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 29(5), arXiv
  1512.04202: the preconditioner-fitting criterion and the Kronecker-product preconditioner.
* X.-L. Li (2022), "Black Box Lie Group Preconditioners for SGD", arXiv 2211.04422: fitting
  ``Q`` on the group of (upper-)triangular matrices with multiplicative updates, normalised
  step sizes, and the "whitening" pairing of a gradient with a random probe.
* Written after reading lixilinx/psgd_torch (``psgd.py``, Kron) and
  evanatyourservice/psgd_jax (``kron.py``; Apache-2.0), whose choices we follow where the
  papers are silent: momentum fed to the preconditioner fit, the ``sqrt(eps_f32) mean|g|``
  damping, the cheap spectral-norm lower bound, the deterministic "update every ``1/p``
  steps" counter, the RMS cap of 1.1 on the preconditioned update, the update-probability
  schedule and occasional balancing of factor scales. The code here is our own.

The method (whitening form)
---------------------------
For a parameter tensor ``W`` of shape ``(d_1, ..., d_k)`` the preconditioner is
``P = Q^T Q`` with ``Q = Q_1 (x) Q_2 (x) ... (x) Q_k`` (Kronecker product), each ``Q_i`` either
``d_i x d_i`` upper triangular or diagonal (a vector). Writing ``X x_i M`` for "apply matrix
``M`` along axis ``i`` of ``X``", PSGD fits ``P`` to minimise (Li 2018, the criterion of
Sec. II; Li 2022, Sec. 3)::

    c(P) = E[ h^T P h + v^T P^{-1} v ],     h = g + eps * mean|g| * v,  v ~ N(0, I)

whose minimiser is ``P = (E[h h^T])^{-1/2}`` (the gradient "whitening" preconditioner; with
a Hessian-vector pair ``h = H v`` instead it is ``|H|^{-1}``). One fitting step, given ``G = h``
and ``V = v`` reshaped like ``W``::

    A   = G x_1 Q_1 x_2 Q_2 ... x_k Q_k                  (A = Q h)
    B   = V x_1 Q_1^{-T} ... x_k Q_k^{-T}                (B = Q^{-T} v)
    T1_i = A_(i) A_(i)^T,   T2_i = B_(i) B_(i)^T          (mode-i Gram matrices)
    triangular:  Q_i <- Q_i - lr_P * triu(T1_i - T2_i) / ||T1_i + T2_i||_2 * Q_i
    diagonal:    q_i <- q_i - lr_P * (t1_i - t2_i) * q_i / max|t1_i + t2_i|

(``A_(i)`` is the mode-``i`` unfolding; for diagonal factors only the diagonals ``t`` of the
Grams are kept.) This is a relative (Lie-group) gradient step on ``c`` with a normalised step
size, so ``Q_i`` stays triangular and invertible; ``||.||_2`` is replaced by a cheap lower bound
(:func:`norm_lower_bound`; within a factor sqrt(2) of the spectral norm in practice).
The descent direction is ``P m = m x_1 Q_1^T Q_1 ... x_k Q_k^T Q_k`` with ``m`` the
bias-corrected momentum ``m_t = b1 m_{t-1} + (1 - b1) g_t``.

State and scale
---------------
:class:`KronState` is a pytree of arrays only (``count``, ``update_counter``, momentum ``mu``
with the params' structure, and ``Qs``: for each parameter leaf a tuple of factors), so
checkpoints through ``trainkit.checkpoint`` restore it exactly, and the V draws come from
``fold_in(key(seed), count)`` (no key in the state, resume is exact). A factor belongs to one
axis of one parameter: :func:`factor_partition_specs` gives each factor the mesh axis of its
parameter's axis (diagonal factors shard exactly with the parameter; triangular ones shard their
rows), so preconditioners shard with the parameters they precondition;
:func:`kron_state_shardings` gives the whole optimizer state's shardings from the params' (for
``jit(..., out_shardings=...)``). Memory savers:
a dimension gets a *diagonal* factor when it is 1, larger than ``max_size_triangular``, when
``size^2 > max_skew_triangular * numel`` (a very skewed shape), when the tensor has fewer than
``min_ndim_triangular`` axes, or by ``memory_save_mode`` ("one_diag": the largest axis,
"all_diag": every axis).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainkit.config import Config, field

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


# --- schedules ------------------------------------------------------------------------------


def precond_update_prob_schedule(max_prob: float = 1.0, min_prob: float = 0.03,
                                 decay: float = 0.001, flat_start: int = 500
                                 ) -> Callable[[jax.Array], jax.Array]:
    """Probability of refitting the preconditioner at step ``n`` (psgd_jax's default)::

        p(n) = clip(max_prob * exp(-decay * (n - flat_start)), min_prob, max_prob)

    1 for the first ``flat_start`` steps, then an exponential anneal to ``min_prob``: the
    preconditioner needs frequent fits early and few once it is learned."""

    def schedule(n):
        n = jnp.asarray(n, jnp.float32)
        return jnp.clip(max_prob * jnp.exp(-decay * (n - flat_start)), min_prob, max_prob)

    return schedule


# --- pure pieces ----------------------------------------------------------------------------


def factor_kinds(shape: Sequence[int], *, max_size_triangular: int = 8192,
                 min_ndim_triangular: int = 2, max_skew_triangular: float = math.inf,
                 memory_save_mode: str | None = None) -> tuple[bool, ...]:
    """For each axis of a parameter of ``shape``: True if its factor ``Q_i`` is diagonal.

    A 0-d parameter is treated as shape ``(1,)`` (one diagonal factor)."""
    shape = tuple(int(s) for s in shape) or (1,)
    numel = int(np.prod(shape))
    if memory_save_mode not in (None, "one_diag", "all_diag"):
        raise ValueError(f"memory_save_mode={memory_save_mode!r}: must be None, 'one_diag' or "
                         "'all_diag'")
    forced = [memory_save_mode == "all_diag"] * len(shape)
    if memory_save_mode == "one_diag":
        forced[int(np.argsort(shape)[::-1][0])] = True
    return tuple(bool(f or s == 1 or s > max_size_triangular or len(shape) < min_ndim_triangular
                      or s * s > max_skew_triangular * numel)
                 for s, f in zip(shape, forced))


def init_factors(shape: Sequence[int], diagonal: Sequence[bool], scale: float = 1.0,
                 dtype: Any = jnp.float32) -> tuple[jax.Array, ...]:
    """``Q_i = scale^(1/k) I`` (matrix or vector of ones), so that ``Q = scale * I``."""
    shape = tuple(shape) or (1,)
    s = scale ** (1.0 / len(shape))
    return tuple(s * jnp.ones((d,), dtype) if diag else s * jnp.eye(d, dtype=dtype)
                 for d, diag in zip(shape, diagonal))


def _along(x: jax.Array, m: jax.Array, axis: int) -> jax.Array:
    """``x x_axis m``: ``y[..., a, ...] = sum_b m[a, b] x[..., b, ...]`` (``m`` a matrix), or
    ``x * m`` broadcast along ``axis`` (``m`` a vector: a diagonal matrix)."""
    if m.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = m.shape[0]
        return x * m.reshape(shape)
    return jnp.moveaxis(jnp.tensordot(m, x, axes=((1,), (axis,))), 0, axis)


def _gram(x: jax.Array, axis: int, diagonal: bool) -> jax.Array:
    """Mode-``axis`` Gram ``X_(i) X_(i)^T`` (its diagonal if ``diagonal``)."""
    others = tuple(a for a in range(x.ndim) if a != axis)
    if diagonal:
        return jnp.sum(jnp.square(x), axis=others)
    return jnp.tensordot(x, x, axes=(others, others))


def norm_lower_bound(a: jax.Array) -> jax.Array:
    """A cheap lower bound of the spectral norm ``||A||_2`` of a square matrix (psgd_torch's
    ``norm_lower_bound``): with ``A' = A / max|A|`` and ``x`` its row (or column) of largest
    norm, ``||A||_2 >= max|A| * || (x A') / ||x A'|| A'^T ||``. Exact for rank-1 ``A``; 0 for 0."""
    chex.assert_rank(a, 2)
    max_abs = jnp.max(jnp.abs(a))
    safe = jnp.where(max_abs > 0, max_abs, 1.0)
    b = a / safe
    col = jnp.sum(b * b, axis=0)
    row = jnp.sum(b * b, axis=1)

    def by_col():
        x = b[:, jnp.argmax(col)] @ b
        return jnp.linalg.norm((x / jnp.linalg.norm(x)) @ b.T)

    def by_row():
        x = b @ b[jnp.argmax(row), :]
        return jnp.linalg.norm(b.T @ (x / jnp.linalg.norm(x)))

    val = jax.lax.cond(jnp.max(col) > jnp.max(row), by_col, by_row)
    return jnp.where(max_abs > 0, max_abs * val, 0.0)


def inv_upper_triangular(u: jax.Array, block: int = 16) -> jax.Array:
    """``U^{-1}`` of an invertible upper-triangular matrix by matmuls only (XLA's CPU
    triangular solve took ~10 ms for a 64 x 64 system here, 150x a 64 x 64 matmul).

    Blocks ``U = [[A, B], [0, D]]`` give ``U^{-1} = [[A^{-1}, -A^{-1} B D^{-1}], [0, D^{-1}]]``
    (recursively); a block of size ``<= block`` is ``U = diag(d) (I + N)`` with ``N`` strictly
    upper triangular, hence nilpotent, and ``(I + N)^{-1} = prod_j (I + (-N)^(2^j))`` exactly
    for ``2^j < size``."""
    n = u.shape[0]
    if n <= block:
        d = jnp.diagonal(u)
        m = -(u / d[:, None] - jnp.eye(n, dtype=u.dtype))  # -N
        inv = jnp.eye(n, dtype=u.dtype)
        k = 1
        while k < n:
            inv = inv + inv @ m
            m = m @ m
            k *= 2
        return inv / d[None, :]
    h = n // 2
    a_inv = inv_upper_triangular(u[:h, :h], block)
    d_inv = inv_upper_triangular(u[h:, h:], block)
    top_right = -a_inv @ u[:h, h:] @ d_inv
    return jnp.block([[a_inv, top_right], [jnp.zeros((n - h, h), u.dtype), d_inv]])


def precondition(factors: Sequence[jax.Array], g: jax.Array) -> jax.Array:
    """``P g = g x_1 (Q_1^T Q_1) ... x_k (Q_k^T Q_k)`` (diagonal factors: ``q_i^2``)."""
    shape = g.shape
    x = g.reshape(shape or (1,))
    chex.assert_equal(len(factors), x.ndim)
    for i, q in enumerate(factors):
        x = _along(x, q * q if q.ndim == 1 else q.T @ q, i)
    return x.reshape(shape)


def precond_fit_step(factors: Sequence[jax.Array], h: jax.Array, v: jax.Array,
                     lr: float | jax.Array = 0.1) -> tuple[jax.Array, ...]:
    """One PSGD fitting step of the Kronecker factors on the pair ``(h, v)`` (module docstring:
    ``A = Q h``, ``B = Q^{-T} v``, then a normalised relative-gradient step per factor; Li 2022,
    Sec. 3, on the criterion ``E[h^T P h + v^T P^{-1} v]`` of Li 2018, Sec. II).

    All factors are updated from the same ``A`` and ``B`` (computed with the old factors).
    ``h`` (the probed gradient, damping already added) and ``v`` (the probe) have the
    parameter's shape; 0-d parameters are handled as shape ``(1,)``."""
    chex.assert_equal_shape([h, v])
    shape = h.shape or (1,)
    h, v = h.reshape(shape), v.reshape(shape)
    chex.assert_equal(len(factors), len(shape))
    a, b = h, v
    for i, q in enumerate(factors):
        a = _along(a, q, i)
        b = _along(b, 1.0 / q if q.ndim == 1 else inv_upper_triangular(q).T, i)
    tiny = jnp.finfo(h.dtype).tiny
    new = []
    for i, q in enumerate(factors):
        diag = q.ndim == 1
        t1, t2 = _gram(a, i, diag), _gram(b, i, diag)
        if diag:
            new.append(q - lr * (t1 - t2) * q / (jnp.max(jnp.abs(t1 + t2)) + tiny))
        else:
            step = jnp.triu(t1 - t2) / (norm_lower_bound(t1 + t2) + tiny)
            new.append(q - lr * step @ q)
    return tuple(new)


def balance_factors(factors: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Rescale the factors to equal max-abs (their geometric mean); ``P`` is unchanged since
    the scales multiply to 1. Keeps factors away from over/underflow."""
    if len(factors) < 2:
        return tuple(factors)
    norms = jnp.stack([jnp.max(jnp.abs(q)) for q in factors])
    gmean = jnp.exp(jnp.mean(jnp.log(norms)))
    return tuple(q * (gmean / n) for q, n in zip(factors, norms))


# --- the transformation ---------------------------------------------------------------------


class KronState(NamedTuple):
    count: jax.Array  # int32: updates done
    update_counter: jax.Array  # int32: steps since the last preconditioner fit
    mu: Any  # momentum, params' structure (None when b1 == 0)
    Qs: Any  # params' structure, each leaf a tuple of factors


def scale_by_kron(b1: float = 0.9,
                  preconditioner_update_probability: ScalarOrSchedule =
                  precond_update_prob_schedule(),
                  max_size_triangular: int = 8192, min_ndim_triangular: int = 2,
                  max_skew_triangular: float = math.inf, memory_save_mode: str | None = None,
                  momentum_into_precond_update: bool = True, preconditioner_lr: float = 0.1,
                  preconditioner_init_scale: float = 1.0, damping: float | None = None,
                  precond_rms_clip: float | None = 1.1, balance_every: int = 100,
                  seed: int = 5318008) -> optax.GradientTransformationExtraArgs:
    """PSGD Kron without the learning rate: ``updates = clip_rms(P m_hat)`` (module docstring).

    Two ways to fit ``P``: by default the *whitening* pair ``(v, h = m_hat + damping)`` (what
    kron_torch/psgd_jax and Castanyer et al. use; ``P -> E[h h^T]^{-1/2}``); or, when the caller
    passes ``update(..., hvp=(v, Hv))`` (pytrees like the params: probe vectors and the loss's
    Hessian-vector products at them, e.g. ``jax.jvp(jax.grad(loss), (params,), (v,))[1]``), PSGD's
    original Newton-type pairs (Li 2018, Sec. II: ``delta g = H delta theta``), for which
    ``P -> |H|^{-1}`` for any probe distribution of full rank.

    ``damping`` (default ``sqrt(eps_float32)``) scales the probe added to the fitted gradient:
    ``h = m_hat + damping * mean|m_hat| * v``. ``precond_rms_clip`` caps the RMS of each
    preconditioned leaf (None: off); ``balance_every``: factor scales are rebalanced
    (:func:`balance_factors`, ``P`` unchanged) at fits on steps that are multiples of it.

    The fit runs under ``lax.cond`` on a step counter, so an unbatched optimizer skips its cost on
    the steps without a fit; under ``jax.vmap`` (seeds) the cond becomes a select and the fit is
    computed every step (results are unchanged)."""
    damp = float(np.sqrt(np.finfo(np.float32).eps)) if damping is None else float(damping)
    kind_kw = dict(max_size_triangular=max_size_triangular,
                   min_ndim_triangular=min_ndim_triangular,
                   max_skew_triangular=max_skew_triangular, memory_save_mode=memory_save_mode)

    def init_fn(params):
        qs = jax.tree.map(lambda p: init_factors(p.shape, factor_kinds(p.shape, **kind_kw),
                                                 preconditioner_init_scale, jnp.float32), params)
        mu = jax.tree.map(jnp.zeros_like, params) if b1 > 0 else None
        zero = jnp.zeros([], jnp.int32)
        return KronState(count=zero, update_counter=zero, mu=mu, Qs=qs)

    def update_fn(updates, state: KronState, params=None, *, hvp=None, **extra):
        del params, extra
        count = optax.safe_int32_increment(state.count)
        if b1 > 0:
            mu = optax.tree_utils.tree_update_moment(updates, state.mu, b1, 1)
            m_hat = optax.tree_utils.tree_bias_correction(mu, b1, count)
        else:
            mu, m_hat = None, updates
        fit_in = m_hat if momentum_into_precond_update else updates
        prob = (preconditioner_update_probability(count)
                if callable(preconditioner_update_probability)
                else preconditioner_update_probability)
        counter = state.update_counter + 1
        do_fit = counter.astype(jnp.float32) >= 1.0 / prob
        counter = jnp.where(do_fit, 0, counter)

        treedef = jax.tree.structure(updates)
        g_leaves = treedef.flatten_up_to(fit_in)
        if hvp is not None:  # Newton-type pairs (v, H v) given by the caller
            v_leaves = treedef.flatten_up_to(hvp[0])
            hv_leaves = treedef.flatten_up_to(hvp[1])
        q_leaves = treedef.flatten_up_to(state.Qs)
        key = jax.random.fold_in(jax.random.key(seed), count)

        def fit(q_leaves):
            keys = jax.random.split(key, len(g_leaves) + 1)
            out = []
            for i, (k, g, qs) in enumerate(zip(keys[1:], g_leaves, q_leaves)):
                if hvp is None:  # whitening: the (damped) gradient against a random probe
                    g = g.astype(jnp.float32)
                    v = jax.random.normal(k, g.shape, jnp.float32)
                    h = g + damp * jnp.mean(jnp.abs(g)) * v
                else:
                    v = v_leaves[i].astype(jnp.float32)
                    h = hv_leaves[i].astype(jnp.float32)
                out.append(precond_fit_step(qs, h, v, preconditioner_lr))
            return out

        q_leaves = jax.lax.cond(do_fit, fit, lambda q: list(q), list(q_leaves))
        if balance_every:
            do_bal = jnp.logical_and(do_fit, count % balance_every == 0)
            q_leaves = jax.lax.cond(do_bal, lambda q: [balance_factors(x) for x in q],
                                    lambda q: list(q), q_leaves)
        m_leaves = treedef.flatten_up_to(m_hat)
        out = []
        for qs, m in zip(q_leaves, m_leaves):
            u = precondition(qs, m.astype(jnp.float32))
            if precond_rms_clip is not None:
                rms = jnp.sqrt(jnp.mean(jnp.square(u)))
                u = u / jnp.maximum(1.0, rms / precond_rms_clip)
            out.append(u.astype(m.dtype))
        new_updates = treedef.unflatten(out)
        qs_tree = treedef.unflatten([tuple(q) for q in q_leaves])
        return new_updates, KronState(count=count, update_counter=counter, mu=mu, Qs=qs_tree)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kron(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, weight_decay: float = 0.0,
         weight_decay_mask: Any = None,
         preconditioner_update_probability: ScalarOrSchedule = precond_update_prob_schedule(),
         max_size_triangular: int = 8192, min_ndim_triangular: int = 2,
         max_skew_triangular: float = math.inf, memory_save_mode: str | None = None,
         momentum_into_precond_update: bool = True, preconditioner_lr: float = 0.1,
         preconditioner_init_scale: float = 1.0, damping: float | None = None,
         precond_rms_clip: float | None = 1.1, balance_every: int = 100,
         seed: int = 5318008) -> optax.GradientTransformation:
    """PSGD Kron (Li 2018; Li 2022) as an optax optimizer::

        params <- params - learning_rate * (clip_rms(P m_hat) + weight_decay * params)

    See :func:`scale_by_kron` and the module docstring for every other argument. The paper
    this suite reproduces (Castanyer et al. 2025) uses Kron with ``lr = base_lr / 3``."""
    parts = [scale_by_kron(b1=b1,
                           preconditioner_update_probability=preconditioner_update_probability,
                           max_size_triangular=max_size_triangular,
                           min_ndim_triangular=min_ndim_triangular,
                           max_skew_triangular=max_skew_triangular,
                           memory_save_mode=memory_save_mode,
                           momentum_into_precond_update=momentum_into_precond_update,
                           preconditioner_lr=preconditioner_lr,
                           preconditioner_init_scale=preconditioner_init_scale, damping=damping,
                           precond_rms_clip=precond_rms_clip, balance_every=balance_every,
                           seed=seed)]
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# --- agent-facing configuration -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KronConfig(Config):
    """Settings of :func:`kron` that agents expose (the learning rate stays the agent's)."""

    b1: float = field(0.9, ge=0, lt=1, help="momentum")
    weight_decay: float = field(0.0, ge=0)
    preconditioner_lr: float = field(0.1, gt=0, help="step size of the preconditioner fit")
    update_prob_max: float = field(1.0, gt=0, le=1, help="preconditioner-fit probability at "
                                                         "the start")
    update_prob_min: float = field(0.03, gt=0, le=1, help="... annealed down to this")
    update_prob_flat_start: int = field(500, ge=0, help="optimizer steps at update_prob_max")
    update_prob_decay: float = field(0.001, ge=0, help="exponential anneal rate after that")
    max_size_triangular: int = field(8192, ge=1, help="larger axes get diagonal factors")
    min_ndim_triangular: int = field(2, ge=1, help="tensors with fewer axes get diagonal factors")
    memory_save_mode: str = field("none", choices=("none", "one_diag", "all_diag"))

    def build(self, learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
        return kron(learning_rate, b1=self.b1, weight_decay=self.weight_decay,
                    preconditioner_update_probability=precond_update_prob_schedule(
                        self.update_prob_max, self.update_prob_min, self.update_prob_decay,
                        self.update_prob_flat_start),
                    max_size_triangular=self.max_size_triangular,
                    min_ndim_triangular=self.min_ndim_triangular,
                    memory_save_mode=None if self.memory_save_mode == "none"
                    else self.memory_save_mode,
                    preconditioner_lr=self.preconditioner_lr)


OPTIMIZERS = ("adam", "radam", "kron")


def make_optimizer(name: str, learning_rate: ScalarOrSchedule, *,
                   kron_config: KronConfig | None = None,
                   adam_eps: float = 1e-8) -> optax.GradientTransformation:
    """``adam`` / ``radam`` (optax, ``eps=adam_eps``) or ``kron`` (:class:`KronConfig`)."""
    if name == "adam":
        return optax.adam(learning_rate, eps=adam_eps)
    if name == "radam":
        return optax.radam(learning_rate, eps=adam_eps)
    if name == "kron":
        return (kron_config or KronConfig()).build(learning_rate)
    raise ValueError(f"optimizer={name!r}: must be one of {', '.join(OPTIMIZERS)}")


def factor_partition_specs(param_spec: Sequence[Any], shape: Sequence[int],
                           diagonal: Sequence[bool]) -> tuple[tuple[Any, ...], ...]:
    """Partition specs (as tuples of mesh-axis names or None) of a parameter's factors, given
    the parameter's spec: factor ``i`` is sharded like axis ``i`` of the parameter (a diagonal
    factor entry-for-entry; a triangular one by rows, columns replicated). Wrap each in
    ``jax.sharding.PartitionSpec(*spec)``."""
    spec = tuple(param_spec) + (None,) * (len(shape) - len(tuple(param_spec)))
    if not shape:
        return ((None,),)
    return tuple((spec[i],) if diag else (spec[i], None) for i, diag in enumerate(diagonal))


def kron_state_shardings(opt_state: Any, param_shardings: Any) -> Any:
    """The sharding of every leaf of an optimizer state that holds :class:`KronState` (e.g.
    ``kron()``'s chain), for ``jax.jit(..., out_shardings=...)`` or ``jax.device_put``.

    ``opt_state`` may be abstract (``jax.eval_shape(tx.init, params)``); ``param_shardings`` is
    a tree like the params of :class:`jax.sharding.NamedSharding`, all on one mesh. In each
    KronState the momentum ``mu`` shards like the params and each factor like its parameter's
    axis (:func:`factor_partition_specs`: a 1-D diagonal factor entry for entry, a 2-D
    triangular one by rows); ``count`` and ``update_counter``, and every leaf of the chain's
    other states (the scalar counts of optax's schedule and decay states), are replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if not shardings or not all(isinstance(x, NamedSharding) for x in shardings):
        raise ValueError("param_shardings must be a tree of NamedSharding (one per parameter)")
    mesh = shardings[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    treedef = jax.tree.structure(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))

    def of_factors(param: NamedSharding, factors: tuple) -> tuple:
        # one factor per parameter axis (a scalar's single factor: the same specs either way)
        specs = factor_partition_specs(param.spec, [q.shape[0] for q in factors],
                                       [q.ndim == 1 for q in factors])
        return tuple(NamedSharding(mesh, PartitionSpec(*spec)) for spec in specs)

    def of_kron(state: KronState) -> KronState:
        qs = [of_factors(p, f) for p, f in zip(shardings, treedef.flatten_up_to(state.Qs))]
        return KronState(count=replicated, update_counter=replicated,
                         mu=None if state.mu is None else param_shardings,
                         Qs=treedef.unflatten(qs))

    return jax.tree.map(lambda x: of_kron(x) if isinstance(x, KronState) else replicated,
                        opt_state, is_leaf=lambda x: isinstance(x, KronState))


__all__ = ["kron", "scale_by_kron", "KronState", "KronConfig", "make_optimizer", "OPTIMIZERS",
           "precond_update_prob_schedule", "factor_kinds", "init_factors", "precondition",
           "precond_fit_step", "norm_lower_bound", "inv_upper_triangular", "balance_factors",
           "factor_partition_specs", "kron_state_shardings"]
