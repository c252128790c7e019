"""The run directory, metrics logging and progress display.

A run directory explains itself::

    run.json          what was run: experiment, preset, overrides, seeds, command, versions
    config.json       the resolved config (loadable with ``trainkit.config.load_json``)
    metrics.jsonl     one JSON object per logged step: {"step": s, "loss": ..., ...}
    tb/               TensorBoard events (tensorboardX)
    checkpoints/      orbax checkpoints (see ``trainkit.checkpoint``)
    plots/*.png       figures written by the experiment's report
    report.md         the table and plots a reader wants
    summary.json      final metrics and ``params_sha256``

Checkpoints may live elsewhere: with ``TRAINKIT_CHECKPOINT_ROOT=gs://bucket/prefix`` (or
``RunDir(path, checkpoints_dir=...)``) a run in ``runs/x`` keeps its orbax checkpoints in
``gs://bucket/prefix/runs/x/checkpoints`` (recorded in ``run.json``), while the small files
above stay in the local run directory of process 0. Only process 0 writes those files; every
process writes its shards of each checkpoint.

Metrics from inside jitted loops are logged as *chunked scan outputs*: a chunk of K steps
runs under ``lax.scan`` and returns its per-step metrics stacked along axis 0; the host then
calls :meth:`MetricsLogger.log_stacked`. This keeps the device loop free of host callbacks
(so it stays fast and deterministic) while every step's metrics still reach the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch. ``tensorboardX.writer`` runs
    ``import torch`` at import time, only to accept torch tensors, which this library never
    logs. Where torch is installed (the test extras install it) that costs every run ~1.6 s
    on the 2-core CI machine. So unless torch is already loaded, ``import torch`` is made to
    fail (``sys.modules["torch"] = None``) for the length of this one import."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class RunDirError(OSError):
    """The run directory cannot be used (missing, unwritable, not a run)."""


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` paths (``gs://``, ``s3://``): not local file names."""
    return "://" in str(path)


def checkpoint_path(directory: Any):
    """A local path made absolute (orbax needs absolute paths), or an ``epath.Path`` for a
    URL. ``pathlib.Path("gs://b/x")`` would turn the URL into the local ``gs:/b/x``."""
    if is_url(directory):
        from etils import epath

        return epath.Path(str(directory))
    return Path(directory).absolute()


def is_main_process() -> bool:
    return jax.process_index() == 0


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise RunDirError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


class RunDir:
    """Paths of one run and the files every run writes."""

    def __init__(self, path: str | os.PathLike, *, must_exist: bool = False,
                 checkpoints_dir: str | os.PathLike | None = None):
        if is_url(path):
            raise RunDirError(f"run directory {path}: must be a local directory (metrics are "
                              "appended to a file); put the checkpoints in the object store "
                              "with TRAINKIT_CHECKPOINT_ROOT=" + str(path).rsplit("/", 1)[0])
        self.path = Path(path)
        self.checkpoints_dir = _checkpoints_dir(self.path, checkpoints_dir)
        if must_exist:
            if not self.path.is_dir():
                raise RunDirError(f"run directory {self.path} does not exist")
            if not self.config_path.is_file():
                raise RunDirError(f"{self.path} is not a run directory (no config.json)")
            self._check_checkpoint_location()
        elif is_main_process():
            try:
                local = () if is_url(self.checkpoints_dir) else (self.checkpoints_dir,)
                for sub in (self.path, *local, self.plots_dir):
                    sub.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise RunDirError(f"cannot write to run directory {self.path}: "
                                  f"{err.strerror or err}") from None

    config_path = property(lambda self: self.path / "config.json")
    run_info_path = property(lambda self: self.path / "run.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    report_path = property(lambda self: self.path / "report.md")
    plots_dir = property(lambda self: self.path / "plots")
    tb_dir = property(lambda self: self.path / "tb")

    def _check_checkpoint_location(self) -> None:
        """A run whose checkpoints went to an object store must be resumed from there: without
        this check a resume that forgot TRAINKIT_CHECKPOINT_ROOT would restart from step 0."""
        if not self.run_info_path.is_file():
            return
        try:
            recorded = json.loads(self.run_info_path.read_text()).get("checkpoints")
        except (OSError, json.JSONDecodeError, AttributeError):
            return
        if recorded and str(recorded) != str(self.checkpoints_dir):
            raise RunDirError(f"{self.run_info_path} records checkpoints in {recorded}, but this "
                              f"process would use {self.checkpoints_dir}; set "
                              "TRAINKIT_CHECKPOINT_ROOT as when the run started")

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        info = dict(info)
        if is_url(self.checkpoints_dir):
            info["checkpoints"] = str(self.checkpoints_dir)
        info.setdefault("command", " ".join([Path(sys.executable).name, *sys.argv]))
        info.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        info.setdefault("versions", environment_versions())
        if is_main_process():
            write_json(self.run_info_path, info)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)


def _checkpoints_dir(run_path: Path, explicit: str | os.PathLike | None):
    """``explicit``, else ``$TRAINKIT_CHECKPOINT_ROOT/<run path>/checkpoints`` (the run path
    without a leading ``/``), else ``<run path>/checkpoints``. URLs stay URLs."""
    if explicit is not None:
        return checkpoint_path(explicit) if is_url(explicit) else Path(explicit)
    root = os.environ.get("TRAINKIT_CHECKPOINT_ROOT")
    if not root:
        return run_path / "checkpoints"
    relative = run_path.as_posix().lstrip("/")
    if is_url(root):
        return checkpoint_path(root.rstrip("/") + "/" + relative + "/checkpoints")
    return Path(root) / relative / "checkpoints"


def environment_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform(),
           "jax_backend": jax.default_backend(), "devices": str(jax.device_count()),
           "processes": str(jax.process_count())}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl``; a corrupt line is reported with the file and line number.
    A torn last line (the run was killed mid-write) is ignored."""
    rows = []
    try:
        with open(path) as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return rows
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) and not line.endswith("\n"):
                break
            raise RunDirError(f"{path}: line {i}: invalid JSON ({err.msg})") from None
    return rows


def seed_series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], np.ndarray]:
    """``(steps [N], values [seeds, N])`` of ``key`` over the metrics rows that log it; a row's
    value is one number or a list with one per vmapped seed (a number is one seed)."""
    rows = [r for r in rows if key in r]
    steps = [r["step"] for r in rows]
    values = np.asarray([np.atleast_1d(np.asarray(r[key], np.float64)) for r in rows])  # [N, seeds]
    return steps, values.T


def _scalar_or_list(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl`` and TensorBoard (only on process 0).

    Vector metrics (one value per seed when seeds are vmapped) are written as lists in the
    JSONL and as their mean plus per-seed curves in TensorBoard.

    Rows carry ``step`` = the number of updates completed. On resume, pass ``resume_step``:
    rows logged after that step (by the killed run, after its
    last checkpoint) are dropped, so the log reads as if the run had never stopped.
    """

    def __init__(self, run_dir: RunDir, *, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = run_dir
        self.active = is_main_process()
        self._tb = None
        if not self.active:
            return
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir.metrics_path) if r.get("step", 0) <= resume_step]
            tmp = run_dir.metrics_path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as fh:
                for row in kept:
                    fh.write(json.dumps(row) + "\n")
            os.replace(tmp, run_dir.metrics_path)
        self._fh = open(run_dir.metrics_path, "a")
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            # NaN is a legitimate value here ("not measured in this chunk": no episode ended,
            # no health report); tensorboardX would warn on every such scalar.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

            self._tb = SummaryWriter(str(run_dir.tb_dir), purge_step=resume_step + 1
                                     if resume_step is not None else None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        for key, value in metrics.items():
            row[key] = _scalar_or_list(value)
        self._fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key == "step":
                    continue
                arr = np.asarray(value, dtype=np.float64)
                self._tb.add_scalar(key, float(arr.mean()), step)
                if arr.ndim == 1 and arr.size > 1:
                    for i, v in enumerate(arr):
                        self._tb.add_scalar(f"{key}/seed{i}", float(v), step)

    def log_stacked(self, first_step: int, metrics: Mapping[str, Any], every: int = 1,
                    last_extra: Mapping[str, Any] | None = None) -> None:
        """Log a chunk's stacked metrics: ``metrics[k][i]`` belongs to step ``first_step + i``.
        With ``every > 1`` only steps that are multiples of ``every`` and the chunk's last step
        are written; ``last_extra`` (evaluation results, say) is merged into the last row."""
        if not self.active or not metrics:
            return
        host = {k: np.asarray(v) for k, v in metrics.items()}
        n = len(next(iter(host.values())))
        for i in range(n):
            step = first_step + i
            if step % every == 0 or i == n - 1:
                row = {k: v[i] for k, v in host.items()}
                if i == n - 1 and last_extra:
                    row.update(last_extra)
                self.log(step, row)

    def flush(self) -> None:
        if self.active:
            self._fh.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


class Progress:
    """A tqdm progress bar over training steps with ETA and the key metric."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
                 key_metric: str | tuple[str, ...] | None = None):
        from tqdm import tqdm  # the text bar: works in terminals, logs and notebooks alike

        self.key_metric = key_metric
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not is_main_process() or os.environ.get("TRAINKIT_NO_PROGRESS") == "1",
                         mininterval=0.5)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        self._bar.update(step - self._bar.n)
        # key_metric: one name, or a tuple of names shown side by side
        names = (self.key_metric,) if isinstance(self.key_metric, str) else tuple(self.key_metric or ())
        shown_metrics = {}
        for name in names:
            if metrics and name in metrics:
                value = np.asarray(metrics[name], dtype=np.float64)
                # all NaN (e.g. no episode finished yet in this chunk): show nan, without numpy's
                # "Mean of empty slice" warning
                shown = float(np.nanmean(value)) if np.any(~np.isnan(value)) else float("nan")
                shown_metrics[name] = f"{shown:.4g}"
        if shown_metrics:
            self._bar.set_postfix(shown_metrics, refresh=False)

    def close(self) -> None:
        self._bar.close()


def params_sha256(tree: Any) -> str:
    """A hash of a pytree's leaves (paths, dtypes, shapes and bytes), to compare two runs.
    Typed PRNG keys are hashed through their key data."""
    from trainkit.sharding import to_host

    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.ascontiguousarray(to_host(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(arr.dtype).encode())
        digest.update(str(arr.shape).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def final_metrics(rows: Iterable[Mapping[str, Any]], window: int = 1) -> dict[str, Any]:
    """The last logged value of every metric (mean over the last ``window`` rows it appears in)."""
    seen: dict[str, list[Any]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                seen.setdefault(key, []).append(value)
    out = {}
    for key, values in seen.items():
        tail = np.asarray(values[-window:], dtype=np.float64)
        out[key] = float(np.mean(tail))
    return out
