"""Non-finite guards: a bad batch never reaches the parameters.

Inside a jitted step, :func:`guarded_update` applies an optax update only when the loss and
every gradient leaf are finite; otherwise parameters and optimizer state are kept as they
were, and the skip is counted in a :class:`GuardState` carried with the train state::

    params, opt_state, guard, gm = guarded_update(optimizer, grads, opt_state, params, loss, guard)

On the host, :func:`check_streak` stops the run with :class:`NonFiniteError` once
``max_consecutive`` steps in a row were skipped (the last good checkpoint is kept; nothing
is saved after the error).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class NonFiniteError(RuntimeError):
    """Training produced non-finite loss or gradients too many steps in a row."""


class GuardState(NamedTuple):
    streak: jax.Array  # consecutive skipped steps, int32
    total: jax.Array  # skipped steps since the start, int32


def init_guard() -> GuardState:
    return GuardState(streak=jnp.zeros((), jnp.int32), total=jnp.zeros((), jnp.int32))


def all_finite(tree: Any) -> jax.Array:
    """True iff every element of every floating leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guarded_update(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any,
                   params: Any, loss: jax.Array, guard: GuardState
                   ) -> tuple[Any, Any, GuardState, dict[str, jax.Array]]:
    """Apply ``optimizer`` if ``loss`` and ``grads`` are finite, else keep everything as is.

    Returns ``(params, opt_state, guard, metrics)``; metrics hold ``skipped`` (0/1),
    ``nonfinite_streak`` and ``nonfinite_total``."""
    ok = jnp.logical_and(jnp.all(jnp.isfinite(loss)), all_finite(grads))
    # Zeroed grads keep the optimizer's arithmetic finite on the discarded branch.
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = optimizer.update(safe_grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params = keep(new_params, params)
    opt_state = keep(new_opt_state, opt_state)
    bad = jnp.logical_not(ok).astype(jnp.int32)
    guard = GuardState(streak=(guard.streak + 1) * bad, total=guard.total + bad)
    metrics = {"skipped": bad, "nonfinite_streak": guard.streak, "nonfinite_total": guard.total}
    return params, opt_state, guard, metrics


def check_streak(metrics: Mapping[str, Any], max_consecutive: int, *, step: int,
                 last_good_checkpoint: int | None = None) -> None:
    """Raise :class:`NonFiniteError` if any logged ``nonfinite_streak`` reached the limit."""
    if "nonfinite_streak" not in metrics:
        return
    worst = int(np.max(np.asarray(metrics["nonfinite_streak"])))
    if worst >= max_consecutive:
        where = (f"last good checkpoint: step {last_good_checkpoint}"
                 if last_good_checkpoint is not None else "no checkpoint was saved")
        raise NonFiniteError(f"stopped at step {step}: {worst} consecutive steps had non-finite "
                             f"loss or gradients (limit {max_consecutive}); {where}")
