"""The training loop every experiment shares: chunks of jitted steps, then host work.

An experiment writes one pure, jitted function ``chunk(state, num_steps) -> (state, metrics)``
that runs ``num_steps`` steps (usually ``lax.scan`` over its ``step``) and returns the
per-step metrics stacked along axis 0. :func:`fit` then does everything else between
chunks: resume from the latest checkpoint, log every step's metrics, update the progress
bar, stop on a non-finite streak, checkpoint every N steps, at the end and on
SIGTERM/SIGINT.

Chunks are aligned to multiples of ``chunk_size`` from step 0, and checkpoints are taken at
chunk boundaries, so a resumed run executes exactly the same programs on exactly the same
state as a run that never stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from trainkit.checkpoint import Checkpointer, StopSignal
from trainkit.guards import check_streak
from trainkit.run import MetricsLogger, Progress, RunDir
from trainkit.sharding import to_host


class Interrupted(Exception):
    """The run was stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved")


@dataclasses.dataclass
class LoopSettings:
    num_steps: int
    chunk_size: int = 100
    save_every: int = 1000
    log_every: int = 1
    key_metric: str | None = "loss"
    max_nonfinite: int = 10
    desc: str = "train"
    eval_every: int | None = None  # call ``evaluate`` when a multiple of this is crossed


def fit(run_dir: RunDir, state: Any, chunk: Callable[[Any, int], tuple[Any, dict]],
        settings: LoopSettings, *, resume: bool = False,
        extra: Callable[[Any], dict] | None = None,
        evaluate: Callable[[Any], dict] | None = None) -> tuple[Any, MetricsLogger]:
    """Run ``chunk`` until ``settings.num_steps`` steps are done. Returns the final state and
    the (still open) metrics logger, so the caller can log evaluation results.

    ``extra(state)`` may return a JSON dict (a data-iterator position, say) to store with
    each checkpoint. ``evaluate(state)`` returns metrics (arrays) logged with the last step
    of a chunk, every ``settings.eval_every`` steps and at the end."""
    s = settings
    ckpt = Checkpointer(run_dir.checkpoints_dir, save_every=s.save_every)
    step = 0
    if resume and ckpt.latest_step() is not None:
        step, state, _ = ckpt.restore(state)
    logger = MetricsLogger(run_dir, resume_step=step if resume else None)
    progress = Progress(s.num_steps, initial=step, desc=s.desc, key_metric=s.key_metric)
    try:
        with StopSignal() as stop:
            while step < s.num_steps:
                # Align chunks to multiples of chunk_size so resumed runs replay identical work.
                n = min(s.chunk_size - step % s.chunk_size, s.num_steps - step)
                state, metrics = chunk(state, n)
                metrics = jax.tree.map(to_host, metrics)  # also waits for the chunk
                last_extra = None
                if evaluate is not None and s.eval_every and (
                        (step + n) // s.eval_every > step // s.eval_every or step + n == s.num_steps):
                    last_extra = jax.tree.map(to_host, evaluate(state))
                # Rows are numbered by updates completed: the chunk's rows are step+1 .. step+n.
                logger.log_stacked(step + 1, metrics, every=s.log_every, last_extra=last_extra)
                # Rows reach the file before any checkpoint that covers them: a kill right
                # after a save must not lose rows that a resume will never recompute.
                logger.flush()
                step += n
                progress.update(step, {k: v[-1] for k, v in metrics.items()})
                check_streak(metrics, s.max_nonfinite, step=step,
                             last_good_checkpoint=ckpt.latest_step())
                extra_json = extra(state) if extra else None
                if stop.requested is not None:
                    ckpt.save(step, state, extra=extra_json, force=True)
                    ckpt.wait()
                    raise Interrupted(stop.requested, step)
                if step < s.num_steps:
                    ckpt.save(step, state, extra=extra_json)
            ckpt.save(step, state, extra=extra(state) if extra else None, force=True)
    finally:
        progress.close()
        ckpt.close()
    logger.flush()
    return state, logger


def run_steps(step: Callable[[Any, jax.Array], tuple[Any, dict]], state: Any, keys: jax.Array,
              *, desc: str = "train", progress: bool = True, max_nonfinite: int = 10,
              key_metric: str | None = "loss") -> tuple[Any, dict[str, np.ndarray]]:
    """``state, metrics = step(state, keys[i])`` for every key, in memory: the loop of a
    pipeline stage that keeps its own outputs (:func:`fit` is the loop with a run directory,
    checkpoints and logs). The progress bar is updated every 10 steps; a streak of
    ``max_nonfinite`` skipped steps raises :class:`trainkit.guards.NonFiniteError` (checked
    every 50 steps and at the end). Returns the final state and the per-step metrics stacked
    into numpy arrays ``{name: [len(keys)]}``."""
    n = len(keys)
    bar = Progress(n, desc=desc, key_metric=key_metric) if progress else None
    rows = []
    try:
        for i in range(n):
            state, metrics = step(state, keys[i])
            rows.append(metrics)
            if bar is not None and ((i + 1) % 10 == 0 or i + 1 == n):
                bar.update(i + 1, jax.tree.map(to_host, metrics))
            if (i + 1) % 50 == 0 or i + 1 == n:
                check_streak(jax.tree.map(to_host, metrics), max_nonfinite, step=i + 1)
    finally:
        if bar is not None:
            bar.close()
    rows = jax.tree.map(to_host, rows)  # also when replicated over several processes
    return state, {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
