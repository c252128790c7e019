"""Neuron-health diagnostics: tau-dormant (ReDo) and GraMa scores, norms, effective rank.

Pure functions on arrays and pytrees; every one is jittable and returns arrays only (no Python
branching on values), so :func:`health_report` can run inside a jitted training step and its
dict goes straight to the metrics logger.

References
----------
* ReDo: Sokar, Agarwal, Castro, Evci (2023), "The Dormant Neuron Phenomenon in Deep
  Reinforcement Learning", arXiv 2302.12902, Definition 3.1.
* GraMa / ReGraMa: Liu, Wu, Obando-Ceron, Castro, Courville, Pan (2025), "Measure gradients, not
  activations! Enhancing neuronal activity in deep reinforcement learning", arXiv 2505.24061.
* Gradient flow (per-layer gradient norms, cosine of consecutive gradients) and curvature
  (Hutchinson trace, power-iteration top eigenvalue of the loss Hessian): Castanyer, Obando-Ceron,
  Li, Bacon, Berseth, Courville, Castro (2025), "Stable Gradients for Stable Learning at Scale
  in Deep Reinforcement Learning", arXiv 2506.15544; Hutchinson (1990), "A stochastic estimator
  of the trace of the influence matrix for Laplacian smoothing splines".
* srank: Kumar, Agarwal, Ghosh, Levine (2021), "Implicit Under-Parameterization Inhibits
  Data-Efficient Deep Reinforcement Learning", arXiv 2010.14498 (the srank definition).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl_suite.networks import NeuronLayer, Path, leaf_paths, path_name, tree_get


def _normalise(per_neuron: jax.Array, eps: float = 0.0) -> jax.Array:
    """``v_i / (mean_k v_k + eps)``; a zero denominator (every ``v`` is 0) gives scores 0."""
    denom = jnp.mean(per_neuron) + eps
    return per_neuron / jnp.where(denom > 0, denom, 1.0)


def tau_dormant_scores(activations: jax.Array) -> jax.Array:
    """ReDo's per-neuron activity score (Sokar et al. 2023, Definition 3.1).

    For a layer with ``N`` neurons and post-activation outputs ``h_i(x)``::

        s_i = E_x |h_i(x)| / ( (1/N) sum_k E_x |h_k(x)| )

    ``E_x`` is the mean over the batch, and also over the spatial axes for convolutional
    features (``[batch, H, W, C]``: neurons are channels). Scores average to 1 over the layer
    and are invariant to rescaling all activations; a neuron that is always 0 scores exactly 0.
    A layer whose outputs are all 0 scores 0 everywhere (the 0/0 limit: every neuron dead).

    Args:
      activations: ``[batch, neurons]``, ``[batch, T, neurons]`` or ``[batch, H, W, neurons]``.
    Returns:
      ``[neurons]`` scores.
    """
    chex.assert_rank(activations, {2, 3, 4})
    per_neuron = jnp.mean(jnp.abs(activations), axis=tuple(range(activations.ndim - 1)))
    return _normalise(per_neuron)


def grama_scores(grad: jax.Array, eps: float = 0.0) -> jax.Array:
    """GraMa: the gradient-magnitude activity score of each neuron (Liu et al. 2025).

    For a Dense kernel ``W`` of shape ``[in, out]`` (neuron ``j`` = output ``j``; a conv kernel
    ``[kh, kw, in, out]`` is reduced over all axes but the last)::

        g_j     = mean_i |dL/dW_ij|
        score_j = g_j / ( (1/N) sum_k g_k + eps )

    For a per-neuron vector (a LayerNorm scale ``gamma`` of shape ``[out]``),
    ``g_j = |dL/dgamma_j|``. *Decisions*: the paper normalises a neuron's gradient magnitude by
    its layer's mean, as ReDo does with activations; we measure that magnitude on the parameter
    gradients of the neuron's incoming weights (as public JAX re-implementations of ReGraMa do).
    ``eps`` defaults to 0 (a re-implementation we read adds 1e-8) so that scores are exactly
    scale-invariant even for tiny gradients; a layer whose gradients are all 0 scores 0
    everywhere (no neuron can learn).

    Args:
      grad: ``[out]``, ``[in, out]`` or ``[kh, kw, in, out]`` gradient.
    Returns:
      ``[out]`` scores.
    """
    chex.assert_rank(grad, {1, 2, 3, 4})
    per_neuron = jnp.abs(grad)
    if grad.ndim > 1:
        per_neuron = jnp.mean(per_neuron, axis=tuple(range(grad.ndim - 1)))
    return _normalise(per_neuron, eps)


def dormant_mask(scores: jax.Array, tau: float | jax.Array) -> jax.Array:
    """``scores <= tau``: the tau-dormant (or GraMa-inactive) neurons, as booleans."""
    chex.assert_rank(scores, 1)
    return scores <= tau


def inactive_fraction(scores: jax.Array, tau: float | jax.Array) -> jax.Array:
    """Fraction of neurons with ``score <= tau`` (ReDo's dormant ratio for tau-dormant scores)."""
    return jnp.mean(dormant_mask(scores, tau).astype(jnp.float32))


def srank(features: jax.Array, delta: float = 0.01) -> jax.Array:
    """Effective rank of a feature matrix (Kumar et al. 2021)::

        srank_delta(Phi) = min { k : sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta }

    with ``sigma_1 >= sigma_2 >= ...`` the singular values of ``Phi`` (``[batch, d]``). A zero
    matrix has srank 0. Returns an int32 scalar."""
    chex.assert_rank(features, 2)
    sigma = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)
    cum = jnp.cumsum(sigma)
    total = cum[-1]
    k = jnp.argmax(cum >= (1.0 - delta) * total) + 1
    return jnp.where(total > 0, k, 0).astype(jnp.int32)


def layer_norms(tree: Any) -> dict[str, jax.Array]:
    """L2 norm of each layer's parameters (or gradients): leaves are grouped by their path
    without the last key, so ``hidden/0/dense`` holds the kernel and the bias of that Dense."""
    groups: dict[str, list[jax.Array]] = {}
    for path, leaf in leaf_paths(tree).items():
        groups.setdefault(path_name(path[:-1]), []).append(leaf)
    return {name: optax.global_norm(leaves) for name, leaves in groups.items()}


def redo_scores(activations: Mapping[str, jax.Array],
                layers: Sequence[NeuronLayer]) -> dict[str, jax.Array]:
    """tau-dormant scores of every layer ReDo can reset (those with known outgoing weights)."""
    return {l.name: tau_dormant_scores(activations[l.name]) for l in layers if l.isolable}


def _grama_path(layer: NeuronLayer, source: str) -> Path:
    if source not in ("auto", "kernel", "norm_scale"):
        raise ValueError(f"source={source!r}: must be 'auto', 'kernel' or 'norm_scale'")
    if source == "kernel" or layer.norm_scale is None:
        return layer.kernel
    return layer.norm_scale


def grama_layer_scores(grads: Any, layers: Sequence[NeuronLayer],
                       source: str = "auto") -> dict[str, jax.Array]:
    """GraMa scores of every neuron layer from the gradient pytree.

    ``source="kernel"`` scores neurons by the gradient of their incoming Dense kernel,
    ``"norm_scale"`` by the gradient of the LayerNorm scale ``gamma`` on their outputs, and
    ``"auto"`` (default) uses ``gamma`` where the layer has a LayerNorm and the kernel otherwise.

    *Why auto*: with a LayerNorm between the Dense and the activation, the kernel gradient of a
    neuron whose activation is always 0 is *not* 0, because the LayerNorm Jacobian mixes every
    neuron's output gradient into every neuron's pre-normalisation gradient; ``dL/dgamma_j =
    sum_x dL/dy_j(x) * xhat_j(x)`` only sees neuron ``j``'s own output gradient, so it is exactly 0
    for a dead neuron (tests/jaxrl_suite/test_health.py shows both)."""
    return {l.name: grama_scores(tree_get(grads, _grama_path(l, source))) for l in layers}


def layer_health(layers: Sequence[NeuronLayer], activations: Mapping[str, jax.Array], grads: Any,
                 *, tau_dormant: float = 0.1, tau_grama: float = 0.1) -> dict[str, jax.Array]:
    """Per-layer dormant and GraMa-inactive fractions, and their neuron-weighted totals.

    Keys: ``dormant/<layer>`` (tau-dormant, ``score <= tau_dormant``), ``dead/<layer>`` (tau-dormant
    score exactly 0), ``grama/<layer>`` (GraMa ``<= tau_grama``, ``source="auto"`` of
    :func:`grama_layer_scores`), ``grama_kernel/<layer>`` (GraMa from the kernel gradient, only for
    layers with a LayerNorm, where it differs), and ``dormant/all``, ``dead/all``, ``grama/all``,
    ``grama_kernel/all`` (every layer scored by its kernel gradient: the score public ReGraMa
    re-implementations use; equal to ``grama/all`` in a network without LayerNorm)."""
    out: dict[str, jax.Array] = {}
    totals = {"dormant": 0.0, "grama": 0.0, "dead": 0.0, "grama_kernel": 0.0}
    n_all = 0
    for l in layers:
        s_act = tau_dormant_scores(activations[l.name])
        s_grad = grama_scores(tree_get(grads, _grama_path(l, "auto")))
        fracs = {"dormant": inactive_fraction(s_act, tau_dormant),
                 "grama": inactive_fraction(s_grad, tau_grama),
                 "dead": inactive_fraction(s_act, 0.0)}
        for key, value in fracs.items():
            out[f"{key}/{l.name}"] = value
            totals[key] = totals[key] + value * l.width
        kernel_frac = fracs["grama"]
        if l.norm_scale is not None:
            kernel_frac = inactive_fraction(grama_scores(tree_get(grads, l.kernel)), tau_grama)
            out[f"grama_kernel/{l.name}"] = kernel_frac
        totals["grama_kernel"] = totals["grama_kernel"] + kernel_frac * l.width
        n_all += l.width
    for key, value in totals.items():
        out[f"{key}/all"] = jnp.asarray(value / max(n_all, 1), jnp.float32)
    return out


def health_report(graphdef: nnx.GraphDef, params: Any, x: jax.Array, grads: Any, *,
                  tau_dormant: float = 0.1, tau_grama: float = 0.1,
                  srank_delta: float = 0.01) -> dict[str, jax.Array]:
    """Every health metric of a network (from :mod:`jaxrl_suite.networks`) on one batch.

    Runs ``nnx.merge(graphdef, params)(x, return_activations=True)`` and returns a flat dict of
    scalar arrays, safe to compute inside ``jax.jit``/``lax.scan`` and to log:

    * ``dormant/<layer>``, ``dead/<layer>``, ``grama/<layer>``, ``grama_kernel/<layer>`` and the
      ``/all`` totals (see :func:`layer_health`);
    * ``srank``: effective rank of the head's input features on ``x``;
    * ``grad_norm/<module>``, ``weight_norm/<module>`` (:func:`layer_norms`) and their
      ``/global`` norms over the whole tree.

    ``grads`` is the gradient pytree of the loss with respect to ``params`` (same structure).
    """
    model = nnx.merge(graphdef, params)
    _, acts = model(x, return_activations=True)
    out = layer_health(model.neuron_layers(), acts, grads, tau_dormant=tau_dormant,
                       tau_grama=tau_grama)
    out["srank"] = srank(acts["features"].reshape(-1, acts["features"].shape[-1]), srank_delta)
    for prefix, tree in (("grad_norm", grads), ("weight_norm", params)):
        for name, value in layer_norms(tree).items():
            out[f"{prefix}/{name}"] = value
        out[f"{prefix}/global"] = optax.global_norm(tree)
    return out


# --- gradient-flow and curvature diagnostics (Castanyer et al. 2025) ------------------------


def _groups(tree: Any) -> dict[str, list[jax.Array]]:
    groups: dict[str, list[jax.Array]] = {}
    for path, leaf in leaf_paths(tree).items():
        groups.setdefault(path_name(path[:-1]), []).append(leaf)
    return groups


def layer_cosines(a: Any, b: Any) -> dict[str, jax.Array]:
    """Per-layer cosine between two gradient pytrees of one structure (consecutive updates'
    gradients in Castanyer et al. 2025, Sec. 3, "gradient direction" analysis)::

        cos_l = <a_l, b_l> / (||a_l|| ||b_l||)

    where ``a_l`` concatenates the leaves of module ``l`` (grouped like :func:`layer_norms`:
    kernel and bias of one Dense). 0 when either is 0. Values near 1: the layer keeps being
    pushed the same way; near 0 or negative: its updates are noise or oscillate."""
    ga, gb = _groups(a), _groups(b)
    chex.assert_equal(sorted(ga), sorted(gb))
    out = {}
    for name in ga:
        dot = sum(jnp.vdot(x, y) for x, y in zip(ga[name], gb[name]))
        na, nb = optax.global_norm(ga[name]), optax.global_norm(gb[name])
        denom = na * nb
        out[name] = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out


def hvp(loss_fn: Any, params: Any, v: Any) -> Any:
    """Hessian-vector product ``H v`` of ``loss_fn`` at ``params`` (forward-over-reverse)."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _tree_vdot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def hutchinson_trace(loss_fn: Any, params: Any, key: jax.Array, num_samples: int = 8) -> jax.Array:
    """Hutchinson's estimator of ``tr(H)`` (Hutchinson 1990; as used for the TD/PPO loss in
    Castanyer et al. 2025)::

        tr(H) ~= (1/S) sum_s v_s^T H v_s,    v_s with i.i.d. Rademacher (+-1) entries

    Unbiased, since ``E[v v^T] = I``; exact for every sample when ``H`` is diagonal."""
    leaves, treedef = jax.tree.flatten(params)

    def one(k):
        ks = jax.random.split(k, len(leaves))
        v = treedef.unflatten([jax.random.rademacher(kk, x.shape, x.dtype)
                               for kk, x in zip(ks, leaves)])
        return _tree_vdot(v, hvp(loss_fn, params, v))

    return jnp.mean(jax.lax.map(one, jax.random.split(key, num_samples)))


def hessian_top_eigenvalue(loss_fn: Any, params: Any, key: jax.Array,
                           num_iters: int = 20) -> jax.Array:
    """Largest-magnitude eigenvalue of the loss Hessian by power iteration (as PyHessian)::

        v_0 ~ N(0, I) / ||.||,   v_{k+1} = H v_k / ||H v_k||,   lambda = v_K^T H v_K

    Converges to the eigenvalue of largest ``|lambda|`` (sign kept) at rate ``|l2/l1|``."""
    leaves, treedef = jax.tree.flatten(params)
    ks = jax.random.split(key, len(leaves))
    v = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(ks, leaves)])

    def normalise(t):
        n = optax.global_norm(t)
        return jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1.0), t)

    def body(v, _):
        return normalise(hvp(loss_fn, params, v)), None

    v, _ = jax.lax.scan(body, normalise(v), None, length=num_iters)
    return _tree_vdot(v, hvp(loss_fn, params, v))


def gradient_flow(grads: Any, prev_grads: Any | None = None) -> dict[str, jax.Array]:
    """``grad/norm/<layer>`` (:func:`layer_norms`) and, given the previous update's gradients,
    ``grad/cos/<layer>`` (:func:`layer_cosines`): the per-layer gradient diagnostics of
    Castanyer et al. (2025), as a flat dict of scalars for in-jit logging."""
    out = {f"grad/norm/{k}": v for k, v in layer_norms(grads).items()}
    if prev_grads is not None:
        out.update({f"grad/cos/{k}": v for k, v in layer_cosines(prev_grads, grads).items()})
    return out


def minibatch_gradient_flow(grads: Any, prev: tuple[Any, jax.Array]) -> dict[str, jax.Array]:
    """:func:`gradient_flow` inside a scan over an update's minibatches: ``prev`` is
    ``(previous minibatch's gradients, whether there is one)``; the cosines are NaN for the
    first minibatch of an update, which :func:`mean_over_minibatches` leaves out."""
    prev_grads, have_prev = prev
    out = gradient_flow(grads, prev_grads)
    return {k: (jnp.where(have_prev, v, jnp.nan) if k.startswith("grad/cos/") else v)
            for k, v in out.items()}


def mean_over_minibatches(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means of stacked per-minibatch metrics; ``grad/cos/*`` skips its NaN first entry."""
    return {k: (jnp.nanmean(v) if k.startswith("grad/cos/") else jnp.mean(v))
            for k, v in aux.items()}


# --- churn across one update (Castanyer et al. 2025; their src/utils/compute_churn.py) -------


def representation_churn(before: jax.Array, after: jax.Array) -> dict[str, jax.Array]:
    """How far one update moved the penultimate features on a fixed reference batch.

    With ``f_0(x_i)`` and ``f_1(x_i)`` the head's input features before and after the update on
    the reference observations ``x_1 .. x_n``::

        l2       = (1/n) sum_i ||f_1(x_i) - f_0(x_i)||_2
        relative = l2 / ((1/n) sum_i ||f_0(x_i)||_2)          (0 when every f_0 is 0)
        cosine   = (1/n) sum_i (1 - cos(f_0(x_i), f_1(x_i)))  (a zero vector has cosine 0)

    ``l2`` is the representation churn of the paper's ``compute_churn.py`` (per-sample L2
    distance of old and new representations, averaged); ``relative`` and ``cosine`` are
    scale-free, so networks whose features differ in size (a ReLU MLP against a sum of
    LayerNorm outputs) can be compared.

    Args:
      before, after: ``[n, d]`` features of the same observations.
    Returns:
      ``{"l2", "relative", "cosine"}`` float32 scalars.
    """
    chex.assert_rank(before, 2)
    chex.assert_equal_shape([before, after])
    f0, f1 = before.astype(jnp.float32), after.astype(jnp.float32)
    dist = jnp.linalg.norm(f1 - f0, axis=-1)
    n0, n1 = jnp.linalg.norm(f0, axis=-1), jnp.linalg.norm(f1, axis=-1)
    denom = n0 * n1
    cos = jnp.where(denom > 0, jnp.sum(f0 * f1, -1) / jnp.where(denom > 0, denom, 1.0), 0.0)
    scale = jnp.mean(n0)
    l2 = jnp.mean(dist)
    return {"l2": l2, "relative": jnp.where(scale > 0, l2 / jnp.where(scale > 0, scale, 1.0), 0.0),
            "cosine": jnp.mean(1.0 - cos)}


def q_churn(q_before: jax.Array, q_after: jax.Array) -> dict[str, jax.Array]:
    """Q churn of one update on a fixed reference batch (Castanyer et al. 2025; the "churn" of
    Tang & Berseth 2024, "Improving Deep RL by Reducing the Chain Effect of Value and Policy
    Churn", NeurIPS 2024; here as a mean absolute change)::

        q              = (1/(n A)) sum_{i,a} |Q_1(x_i, a) - Q_0(x_i, a)|
        greedy_changed = (1/n) sum_i [argmax_a Q_1(x_i, .) != argmax_a Q_0(x_i, .)]

    Args:
      q_before, q_after: ``[n, A]`` Q-values of the same observations.
    Returns:
      ``{"q", "greedy_changed"}`` float32 scalars.
    """
    chex.assert_rank(q_before, 2)
    chex.assert_equal_shape([q_before, q_after])
    changed = jnp.argmax(q_before, -1) != jnp.argmax(q_after, -1)
    return {"q": jnp.mean(jnp.abs(q_after - q_before).astype(jnp.float32)),
            "greedy_changed": jnp.mean(changed.astype(jnp.float32))}


def policy_churn(logits_before: jax.Array, logits_after: jax.Array) -> dict[str, jax.Array]:
    """Policy churn of one update for categorical policies on a fixed reference batch::

        kl = (1/n) sum_i KL(pi_0(.|x_i) || pi_1(.|x_i)) = (1/n) sum_i sum_a p0 (log p0 - log p1)
        tv = (1/n) sum_i (1/2) sum_a |p1(a|x_i) - p0(a|x_i)|

    with ``p = softmax(logits)``. ``kl`` is the direction PPO's trust region bounds (old policy
    first); ``tv`` lies in ``[0, 1]``.

    Args:
      logits_before, logits_after: ``[n, A]``.
    Returns:
      ``{"kl", "tv"}`` float32 scalars.
    """
    chex.assert_rank(logits_before, 2)
    chex.assert_equal_shape([logits_before, logits_after])
    lp0 = jax.nn.log_softmax(logits_before.astype(jnp.float32))
    lp1 = jax.nn.log_softmax(logits_after.astype(jnp.float32))
    p0, p1 = jnp.exp(lp0), jnp.exp(lp1)
    return {"kl": jnp.mean(jnp.sum(p0 * (lp0 - lp1), -1)),
            "tv": jnp.mean(0.5 * jnp.sum(jnp.abs(p1 - p0), -1))}


def gaussian_policy_churn(mean_before: jax.Array, mean_after: jax.Array,
                          log_std_before: jax.Array, log_std_after: jax.Array
                          ) -> dict[str, jax.Array]:
    """Policy churn of diagonal Gaussian policies (continuous PPO): the closed-form KL::

        kl = (1/n) sum_i sum_j [ log s1_j - log s0_j + (s0_j^2 + (m0_ij - m1_ij)^2) / (2 s1_j^2)
                                 - 1/2 ]

    Args:
      mean_before, mean_after: ``[n, d]``; log_std_before, log_std_after: ``[d]``.
    Returns:
      ``{"kl"}``.
    """
    chex.assert_rank(mean_before, 2)
    chex.assert_equal_shape([mean_before, mean_after])
    s0, s1 = jnp.exp(2.0 * log_std_before), jnp.exp(2.0 * log_std_after)
    kl = (log_std_after - log_std_before
          + (s0 + jnp.square(mean_before - mean_after)) / (2.0 * s1) - 0.5)
    return {"kl": jnp.mean(jnp.sum(kl, -1))}


def churn_reference(reference: jax.Array, candidates: jax.Array, is_first: jax.Array,
                    key: jax.Array) -> jax.Array:
    """The fixed reference batch of the churn metrics: on the first update (``is_first``),
    ``reference.shape[0]`` rows of ``candidates`` drawn without replacement; afterwards
    ``reference`` unchanged (an agent keeps it in its state)."""
    n = reference.shape[0]
    idx = jax.random.choice(key, candidates.shape[0], (n,), replace=False)
    return jnp.where(is_first, candidates[idx].astype(reference.dtype), reference)


__all__ = [
    "representation_churn", "q_churn", "policy_churn", "gaussian_policy_churn",
    "churn_reference",
    "minibatch_gradient_flow", "mean_over_minibatches", "layer_cosines", "hvp", "hutchinson_trace", "hessian_top_eigenvalue", "gradient_flow",
    "tau_dormant_scores", "grama_scores", "dormant_mask", "inactive_fraction", "srank",
    "layer_norms", "redo_scores", "grama_layer_scores", "layer_health", "health_report",
]
