"""Neuron resets: ReDo (Sokar et al. 2023) and ReGraMa (Liu et al. 2025), as pure functions.

Both have the signature ::

    params, opt_state, info = redo_reset(params, opt_state, scores, key, layers=..., tau=...)

``params`` is the params pytree of a :mod:`jaxrl_suite.networks` model (``nnx.split(model,
nnx.Param)[1]`` or its pure-dict form), ``opt_state`` the optax state built from it,
``scores`` a ``{layer name: [width] scores}`` dict (:func:`jaxrl_suite.health.redo_scores` /
:func:`~jaxrl_suite.health.grama_layer_scores`), ``layers`` the model's ``neuron_layers()``.
Layers absent from ``scores`` are left alone. Everything is jittable and returns the same
pytree structures, so a periodic reset is a ``lax.cond`` (see :func:`maybe_reset`).

For the neurons selected in a layer (:func:`select_neurons`):

* **ReDo** (Sokar et al. 2023, Algorithm 1): incoming weights (kernel column, bias entry, and
  the LayerNorm scale/bias entry when the layer has one) are re-drawn from the layer's own
  initializers; outgoing weights (the rows of the next kernel) are set to 0, so the network's
  output right after the reset equals the old network's output with those neurons removed.
  Only layers with isolable outgoing weights can be ReDo-reset (a residual-stream writer
  cannot; asking for one is an error). *Decision*: where a reset neuron's outgoing row meets a
  re-initialised column of the next layer, the entry ends up 0 (outgoing zeroing is applied
  after re-initialisation), so reset neurons have exactly zero outgoing weights.
  With ``layer_norm=True`` the re-drawn neurons enter their layer's LayerNorm statistics, so
  the other neurons' activations (and the output) change: exact function preservation holds
  for networks without LayerNorm, as in the paper.
* **ReGraMa** (Liu et al. 2025): incoming weights re-drawn as above; outgoing weights are kept.

In both, the optimizer's per-parameter statistics of every touched weight are set to 0
(Adam's ``mu`` and ``nu``), untouched entries stay bit-identical, and the output layer is never
re-initialised (it is not a neuron layer; its rows are only zeroed as ReDo's outgoing weights).

How moments are found: every subtree of ``opt_state`` whose pytree structure equals that of
``params`` is treated as a per-parameter statistic (Adam/AdamW ``mu``/``nu``, SGD momentum
traces, ...), wherever it sits in a chain, and is edited with the same masks; leaves whose shape
differs from the parameter's (e.g. Adafactor's factored rows/columns) and scalar leaves such as
Adam's step ``count`` are left unchanged. So this works for ``optax.adam``, ``adamw`` and
``chain(clip_by_global_norm(...), adamw(...))`` without naming the optimizer. Caveats: a
params-shaped subtree that is *not* a statistic (an EMA of the parameters, lookahead's slow
weights) would be zeroed too; full-matrix preconditioners (Shampoo, PSGD Kron) are not edited;
Adam's shared step ``count`` is not reset, so the first update of a reset weight is about
``(1-b1)/sqrt(1-b2)`` (~3.2 for the defaults) times the usual step size.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp

from jaxrl_suite.networks import NeuronLayer, Path, leaf_paths, map_leaves_at
from trainkit.config import Config, field

SELECTION_MODES = ("threshold", "bottom", "capped")
METHODS = ("redo", "regrama")


@dataclasses.dataclass(frozen=True)
class ResetConfig(Config):
    method: str = field("redo", choices=METHODS,
                        help="redo: tau-dormant scores, zero outgoing | regrama: GraMa scores, "
                             "keep outgoing")
    tau: float = field(0.1, ge=0, help="neurons with score <= tau are reset (threshold, capped)")
    mode: str = field("threshold", choices=SELECTION_MODES,
                      help="threshold: score <= tau | bottom: the lowest `fraction` of each "
                           "layer | capped: score <= tau, at most `fraction` of each layer")
    fraction: float | None = field(None, gt=0, le=1,
                                   help="per-layer share of neurons for bottom/capped")
    every: int = field(1000, ge=1, help="reset period in gradient steps")

    def validate(self) -> None:
        if self.mode != "threshold" and self.fraction is None:
            raise self.invalid("fraction", f"must be set when mode is {self.mode!r}")


class ResetInfo(NamedTuple):
    masks: dict[str, jax.Array]  # layer name -> [width] bool, True where a neuron was reset
    counts: dict[str, jax.Array]  # layer name -> int32 number of reset neurons
    total: jax.Array  # int32, over all layers


def selection_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` (with a 1e-9 guard against ``0.29 * 100 = 28.999...``)."""
    return int(math.floor(fraction * n + 1e-9))


def select_neurons(scores: jax.Array, *, tau: float | jax.Array = 0.0, mode: str = "threshold",
                   fraction: float | None = None) -> jax.Array:
    """Which neurons of one layer to reset, as a ``[n]`` boolean mask.

    * ``threshold``: ``score_i <= tau``;
    * ``bottom``: the ``k = floor(fraction * n)`` lowest scores (ties broken by index);
    * ``capped``: ``score_i <= tau``, keeping only the ``k`` lowest if more qualify.

    ``tau`` may be traced; ``fraction`` is static. NaN scores are never selected by
    ``threshold``/``capped`` and sort last for ``bottom``."""
    chex.assert_rank(scores, 1)
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(SELECTION_MODES)}")
    below = scores <= tau
    if mode == "threshold":
        return below
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"mode={mode!r} needs 0 < fraction <= 1, got {fraction!r}")
    k = selection_count(fraction, scores.shape[0])
    ranked = scores if mode == "bottom" else jnp.where(below, scores, jnp.inf)
    order = jnp.argsort(ranked, stable=True)
    rank = jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.shape[0]))
    chosen = rank < k
    return chosen if mode == "bottom" else jnp.logical_and(chosen, below)


# --- the reset itself -----------------------------------------------------------------------


def _where_cols(mask: jax.Array, new: Any) -> Callable[[jax.Array], jax.Array]:
    """Replace entries ``[..., j]`` with ``new`` (array or scalar) where ``mask[j]``."""
    return lambda x: jnp.where(mask, jnp.asarray(new, x.dtype), x)


def _where_rows(mask: jax.Array, new: Any) -> Callable[[jax.Array], jax.Array]:
    """Replace entries ``[..., j, :]`` with ``new`` where ``mask[j]``."""
    return lambda x: jnp.where(mask[:, None], jnp.asarray(new, x.dtype), x)


def _compose(fns: Sequence[Callable]) -> Callable:
    def run(x):
        for fn in fns:
            x = fn(x)
        return x
    return run


def _only_same_shape(shape: tuple[int, ...], fn: Callable) -> Callable:
    return lambda x: fn(x) if getattr(x, "shape", None) == shape else x


def _edit_moments(opt_state: Any, params: Any, fns: Mapping[Path, Callable]) -> Any:
    """Apply ``fns`` to every params-shaped subtree of ``opt_state`` (see the module doc)."""
    params_def = jax.tree.structure(params)
    shapes = {path: jnp.shape(leaf) for path, leaf in leaf_paths(params).items()}
    guarded = {path: _only_same_shape(shapes[path], fn) for path, fn in fns.items()}

    def is_stat(node):
        return jax.tree.structure(node) == params_def

    def visit(node):
        return map_leaves_at(node, guarded) if is_stat(node) else node

    return jax.tree.map(visit, opt_state, is_leaf=is_stat)


def reset_neurons(params: Any, opt_state: Any, scores: Mapping[str, jax.Array], key: jax.Array,
                  *, layers: Sequence[NeuronLayer], zero_outgoing: bool,
                  tau: float | jax.Array = 0.1, mode: str = "threshold",
                  fraction: float | None = None) -> tuple[Any, Any, ResetInfo]:
    """Reset the selected neurons of every layer in ``scores``; the engine of :func:`redo_reset`
    (``zero_outgoing=True``) and :func:`regrama_reset` (``zero_outgoing=False``)."""
    by_name = {l.name: (i, l) for i, l in enumerate(layers)}
    unknown = [name for name in scores if name not in by_name]
    if unknown:
        raise KeyError(f"scores for {unknown}: not neuron layers of this network (the output "
                       f"layer is never reset); neuron layers: {list(by_name)}")
    leaves = leaf_paths(params)
    incoming: dict[Path, list[Callable]] = defaultdict(list)
    outgoing: dict[Path, list[Callable]] = defaultdict(list)
    m_incoming: dict[Path, list[Callable]] = defaultdict(list)
    m_outgoing: dict[Path, list[Callable]] = defaultdict(list)
    masks, counts = {}, {}
    for name, layer_scores in scores.items():
        index, layer = by_name[name]
        if zero_outgoing and not layer.isolable:
            raise ValueError(f"layer {name!r} writes into a residual stream, so its outgoing "
                             f"weights cannot be zeroed: ReDo cannot reset it (ReGraMa can)")
        chex.assert_shape(layer_scores, (layer.width,))
        mask = select_neurons(layer_scores, tau=tau, mode=mode, fraction=fraction)
        masks[name], counts[name] = mask, jnp.sum(mask, dtype=jnp.int32)
        key_layer = jax.random.fold_in(key, index)
        owned = [(layer.kernel, layer.kernel_init), (layer.bias, layer.bias_init),
                 (layer.norm_scale, layer.norm_scale_init), (layer.norm_bias, layer.norm_bias_init)]
        for slot, (path, init) in enumerate(owned):
            if path is None:
                continue
            leaf = leaves.get(path)
            if leaf is None:
                raise KeyError(f"layer {name!r}: no parameter at {path}")
            chex.assert_axis_dimension(leaf, -1, layer.width)
            fresh = init(jax.random.fold_in(key_layer, slot), leaf.shape, leaf.dtype)
            incoming[path].append(_where_cols(mask, fresh))
            m_incoming[path].append(_where_cols(mask, 0))
        if zero_outgoing:
            for path in layer.outgoing:
                leaf = leaves.get(path)
                if leaf is None:
                    raise KeyError(f"layer {name!r}: no outgoing kernel at {path}")
                chex.assert_axis_dimension(leaf, -2, layer.width)
                outgoing[path].append(_where_rows(mask, 0))
                m_outgoing[path].append(_where_rows(mask, 0))

    def merge(first, then):
        return {p: _compose(first.get(p, []) + then.get(p, [])) for p in {*first, *then}}

    params = map_leaves_at(params, merge(incoming, outgoing))
    opt_state = _edit_moments(opt_state, params, merge(m_incoming, m_outgoing))
    total = sum(counts.values(), jnp.zeros((), jnp.int32))
    return params, opt_state, ResetInfo(masks, counts, total)


def redo_reset(params: Any, opt_state: Any, scores: Mapping[str, jax.Array], key: jax.Array, *,
               layers: Sequence[NeuronLayer], tau: float | jax.Array = 0.1,
               mode: str = "threshold", fraction: float | None = None
               ) -> tuple[Any, Any, ResetInfo]:
    """ReDo (Sokar et al. 2023, Algorithm 1) on the neurons :func:`select_neurons` picks from
    tau-dormant ``scores``: re-draw incoming weights, zero outgoing weights and the moments of
    both. See the module docstring for the exact contract."""
    return reset_neurons(params, opt_state, scores, key, layers=layers, zero_outgoing=True,
                         tau=tau, mode=mode, fraction=fraction)


def regrama_reset(params: Any, opt_state: Any, scores: Mapping[str, jax.Array], key: jax.Array,
                  *, layers: Sequence[NeuronLayer], tau: float | jax.Array = 0.1,
                  mode: str = "threshold", fraction: float | None = None
                  ) -> tuple[Any, Any, ResetInfo]:
    """ReGraMa (Liu et al. 2025) on the neurons :func:`select_neurons` picks from GraMa
    ``scores``: re-draw incoming weights and zero their moments; outgoing weights are kept."""
    return reset_neurons(params, opt_state, scores, key, layers=layers, zero_outgoing=False,
                         tau=tau, mode=mode, fraction=fraction)


def no_reset(params: Any, opt_state: Any, scores: Mapping[str, jax.Array], key: jax.Array, *,
             layers: Sequence[NeuronLayer], **_: Any) -> tuple[Any, Any, ResetInfo]:
    """The identity with a reset's signature and output structure (the other ``lax.cond``
    branch): all masks False, all counts 0."""
    del key, layers
    masks = {name: jnp.zeros(jnp.shape(s), bool) for name, s in scores.items()}
    counts = {name: jnp.zeros((), jnp.int32) for name in scores}
    return params, opt_state, ResetInfo(masks, counts, jnp.zeros((), jnp.int32))


def reset_fn(config: ResetConfig) -> Callable[..., tuple[Any, Any, ResetInfo]]:
    """``fn(params, opt_state, scores, key, *, layers)`` for ``config.method``."""
    method = redo_reset if config.method == "redo" else regrama_reset

    def fn(params, opt_state, scores, key, *, layers):
        return method(params, opt_state, scores, key, layers=layers, tau=config.tau,
                      mode=config.mode, fraction=config.fraction)
    return fn


def maybe_reset(pred: jax.Array, config: ResetConfig, params: Any, opt_state: Any,
                scores: Mapping[str, jax.Array], key: jax.Array, *,
                layers: Sequence[NeuronLayer]) -> tuple[Any, Any, ResetInfo]:
    """``lax.cond(pred, reset, identity)`` with the reset ``config`` describes; the caller picks
    ``pred``, typically ``(step > 0) & (step % config.every == 0)``."""
    fn = reset_fn(config)
    return jax.lax.cond(pred, lambda *a: fn(*a, layers=layers),
                        lambda *a: no_reset(*a, layers=layers),
                        params, opt_state, scores, key)
