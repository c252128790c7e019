"""Atomic checkpoints of any pytree (orbax), with resume and preemption handling.

A checkpoint holds everything needed to continue exactly: the train state pytree (params,
optimizer state, step, PRNG keys, environment or replay state: any arrays) and a JSON
``extra`` dict (data-iterator state, counters). Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact. A checkpoint damaged later (by the disk or object store) is set aside
and ``restore`` falls back to the one before it (:meth:`Checkpointer.restore`).

Typed PRNG keys (``jax.random.key``) are stored as their raw key data and rebuilt on
restore from the template's key type; zero-size arrays (which orbax cannot store) are
rebuilt from the template.

:class:`StopSignal` turns SIGTERM/SIGINT into a flag the training loop checks between
chunks: it then saves and exits cleanly (a second signal aborts at once).

Fault injection: with ``TRAINKIT_FAULT_KILL_AFTER_SAVES=N`` in the environment the process
sends itself SIGKILL right after its N-th save is on disk (:func:`fault_point`; stage stores
of experiments call it too; the reliability sweep,
tests/experiments/test_kill_resume_sweep.py, kills every experiment this way at a
deterministic point).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from trainkit.run import checkpoint_path, is_url  # noqa: F401  (is_url: re-exported)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run's state."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_empty(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape)


def _to_savable(tree: Any) -> Any:
    # Orbax refuses zero-size arrays (MJX's Data.act of a model without actuator activations
    # is one): they are saved as None and rebuilt from the template on restore.
    return jax.tree.map(lambda x: None if _is_empty(x) else
                        jax.random.key_data(x) if _is_key(x) else x, tree)


def _uncommitted(x: Any) -> bool:
    """A single-process array jit may place freely (made without ``device_put`` to a device).
    It is restored uncommitted too: a committed argument changes the lowered program, so a
    resumed run would miss every persistent-cache entry its first run wrote and compile again."""
    return isinstance(x, jax.Array) and not x.committed


def _abstract(tree: Any) -> Any:
    def one(x):
        if _is_empty(x):
            return None
        uncommitted = _uncommitted(x)
        if _is_key(x):
            x = jax.random.key_data(x)
        if uncommitted:  # a host placeholder: orbax restores a numpy array (no memory held)
            return np.broadcast_to(np.zeros((), x.dtype), x.shape)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(one, tree)


def _from_savable(restored: Any, template: Any) -> Any:
    def one(tmpl, value):
        if _is_empty(tmpl):
            empty = np.zeros(tmpl.shape, tmpl.dtype)
            return jax.device_put(empty, tmpl.sharding) if isinstance(tmpl, jax.Array) else empty
        if _uncommitted(tmpl):
            value = jax.device_put(value)  # from host, so uncommitted like the template
        if _is_key(tmpl):
            return jax.random.wrap_key_data(value, impl=jax.random.key_impl(tmpl))
        return value

    # the template leads: where it holds a zero-size array, `restored` holds None
    return jax.tree.map(one, template, restored)


class Checkpointer:
    """Saves every ``save_every`` steps (and when forced), keeps the last ``max_to_keep``."""

    def __init__(self, directory: str | Path, *, save_every: int, max_to_keep: int = 2,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = checkpoint_path(directory)
        self.save_every = save_every
        self._last_saved: int | None = None
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "extra"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """True if a save is due at ``step``: a multiple of ``save_every`` was crossed since the
        last save."""
        last = self._last_saved if self._last_saved is not None else 0
        return step // self.save_every > last // self.save_every

    def save(self, step: int, state: Any, *, extra: dict | None = None, force: bool = False) -> bool:
        """Save ``state`` at ``step`` if due (or ``force``). Returns True if saved."""
        if not (force or self.due(step)) or step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_savable(state)),
                                  extra=ocp.args.JsonSave(dict(extra or {})))
        self._manager.save(step, args=args, force=True)
        self._last_saved = step
        if os.environ.get(FAULT_ENV):
            self._manager.wait_until_finished()  # the checkpoint is on disk, then maybe die
            fault_point()
        return True

    def restore(self, template: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restore into the structure, dtypes and shardings of ``template``.
        Returns ``(step, state, extra)``.

        With ``step=None``, the latest checkpoint that can be read: saves are atomic, so a kill
        never leaves a torn one, but a disk or object store can still damage one later. A
        damaged latest checkpoint is then moved aside to ``damaged-<step>`` (kept for
        inspection, never deleted; the next save of that step writes a fresh one), one
        ``warning:`` line on stderr says so, and the one before it is restored. Files are only
        moved when an earlier checkpoint did restore: if none can be read, the
        :class:`CheckpointError` names the latest and nothing changes."""
        if step is not None:
            return self._restore(template, step)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in steps:
            try:
                result = self._restore(template, candidate)
            except CheckpointError as err:
                errors.append(err)
                continue
            if errors:
                self._set_aside(steps[:len(errors)], errors, candidate)
            return result
        raise errors[0]

    def _restore(self, template: Any, step: int) -> tuple[int, Any, dict]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)),
                                  extra=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax raises many types for unreadable data
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored: "
                                  f"{first[:300]}") from None
        state = _from_savable(restored["state"], template)
        self._last_saved = step
        return step, state, dict(restored["extra"] or {})

    def _set_aside(self, damaged: list[int], errors: list[CheckpointError], restored: int) -> None:
        """Rename each damaged step directory to ``damaged-<step>`` (process 0; the others wait
        for it) so that orbax no longer lists it and a later save of the step succeeds."""
        if jax.process_index() == 0:
            for step, err in zip(damaged, errors):
                target = self.directory / f"damaged-{step}"
                n = 1
                while target.exists():  # damaged twice at the same step: keep both
                    target, n = self.directory / f"damaged-{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                print(f"warning: {err}; moved to {target}, resuming from step {restored}",
                      file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("trainkit-checkpoint-set-aside")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


FAULT_ENV = "TRAINKIT_FAULT_KILL_AFTER_SAVES"
_saves_in_process = 0


def fault_point() -> None:
    """Call after any completed save (a :class:`Checkpointer` step, an experiment's finished
    stage): with ``TRAINKIT_FAULT_KILL_AFTER_SAVES=N`` set, the N-th call of the process
    sends it SIGKILL. A no-op otherwise."""
    global _saves_in_process
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    _saves_in_process += 1
    if _saves_in_process >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def read_stage(directory: str | Path) -> tuple[dict, Any, dict]:
    """The files of one finished stage of an experiment's stage store (``arrays.npz``,
    ``params.pkl``, ``info.json``; the dlc and bias_shift experiments): ``(arrays, params,
    info)``, absent files giving ``{}`` / None. A damaged file raises :class:`CheckpointError`
    naming it and what to do, never the reader's own error."""
    import json
    import pickle
    import zipfile

    d = Path(directory)
    current = d
    try:
        arrays: dict = {}
        if (d / "arrays.npz").exists():
            current = d / "arrays.npz"
            with np.load(current, allow_pickle=False) as npz:
                arrays = dict(npz)
        params = None
        if (d / "params.pkl").exists():
            current = d / "params.pkl"
            with open(current, "rb") as fh:
                params = pickle.load(fh)
        current = d / "info.json"
        info = json.loads(current.read_text())
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{current}: cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}); the stage is "
                              f"damaged: delete {d} to recompute it with --resume") from None
    return arrays, params, info


class StageStore:
    """The stage store of a multi-stage experiment (dlc, bias_shift): each stage's outputs under
    ``<root>/<stage>/`` as ``arrays.npz`` (numpy arrays), ``params.pkl`` (pure dicts of numpy
    arrays), ``info.json`` and, written last, ``done.json`` (``{"stage", "seconds"}``).

    :meth:`run` loads a finished stage when resuming and computes it otherwise. Several
    processes: every process computes a stage, process 0 alone writes it, and whether it is
    done is decided by what process 0 sees (the directory is on storage every process
    reaches, docs/scaling.md). ``log`` holds ``"ran"`` / ``"skipped"`` per stage, ``seconds``
    the seconds each took (as recorded when it ran)."""

    def __init__(self, root: str | Path, resume: bool, label: str):
        self.root, self.resume, self.label = Path(root), resume, label
        self.log: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> bool:
        from trainkit.sharding import from_main

        return from_main(bool(self.resume and (self.root / name / "done.json").exists()))

    def load(self, name: str) -> tuple[dict, Any, dict]:
        return read_stage(self.root / name)

    def save(self, name: str, arrays: dict | None, params: Any, info: dict | None,
             seconds: float) -> None:
        """Write the stage (process 0; every process computed the same outputs)."""
        import pickle

        from trainkit.run import is_main_process, write_json

        if not is_main_process():
            return
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        if arrays:
            np.savez_compressed(d / "arrays.npz", **arrays)
        if params is not None:
            with open(d / "params.pkl.tmp", "wb") as fh:
                pickle.dump(params, fh)
            (d / "params.pkl.tmp").replace(d / "params.pkl")
        write_json(d / "info.json", info or {})
        write_json(d / "done.json", {"stage": name, "seconds": seconds})
        fault_point()  # the reliability sweep's kill point (a no-op unless asked)

    def run(self, name: str, fn) -> tuple[dict, Any, dict]:
        """``(arrays, params, info)`` of stage ``name``: loaded if it is done (``--resume``),
        else ``fn()`` computed and saved."""
        import time

        from trainkit.run import read_json

        if self.done(name):
            print(f"{self.label}: stage {name}: done, loaded (skipped)", flush=True)
            self.log[name] = "skipped"
            self.seconds[name] = read_json(self.root / name / "done.json")["seconds"]
            return self.load(name)
        print(f"{self.label}: stage {name} ...", flush=True)
        t0 = time.time()
        arrays, params, info = fn()
        seconds = round(time.time() - t0, 1)
        self.save(name, arrays, params, info, seconds)
        print(f"{self.label}: stage {name}: {seconds} s", flush=True)
        self.log[name], self.seconds[name] = "ran", seconds
        return arrays or {}, params, info or {}


def load_numpy(run_checkpoints_dir: str | Path, step: int | None = None) -> tuple[int, Any]:
    """Read a saved train state as nested dicts of numpy arrays, on any topology (a state
    saved by 2 hosts or 8 devices reads on one CPU). For inspection, export and tests; to
    continue training use :meth:`Checkpointer.restore`, which rebuilds shardings and keys."""
    directory = checkpoint_path(run_checkpoints_dir)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.is_dir() else []
    if not steps or (step is not None and step not in steps):
        raise CheckpointError(f"no checkpoint {'' if step is None else step} in {directory}")
    step = steps[-1] if step is None else step
    path = directory / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return step, checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {str(err)[:300]}") from None


class StopSignal:
    """Context manager: SIGTERM/SIGINT set ``requested`` instead of killing the process, so
    the loop can checkpoint and exit. A second signal raises KeyboardInterrupt at once."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> "StopSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
