"""Meshes, logical-axis rules and multi-host setup, on JAX's own sharding runtime.

Sharding is described as data. Models annotate each parameter with *logical* axis names
(``nnx.with_partitioning(init, ("embed", "mlp"))``); a rules table maps logical names to
*mesh* axes; :func:`param_shardings` turns a params pytree into ``NamedSharding``s. Steps are
plain ``jax.jit`` with those shardings (no pmap). The same code runs on one CPU, on
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on a pod.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters
sharded over it), ``model`` (tensor parallelism). The batch is split over ``data`` x ``fsdp``.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` from the
environment (``TRAINKIT_COORDINATOR=host:port``, ``TRAINKIT_NUM_PROCESSES``,
``TRAINKIT_PROCESS_ID``, or whatever JAX auto-detects on a cluster). On CPU it selects the
gloo collectives so two processes on 127.0.0.1 behave like two hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainkit.config import Config, field

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or tuple of axes, or None for replicated). First match wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("hidden", "model"),
    ("head_dim", None),
    ("layers", None),
    ("seq", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Config):
    """The ``mesh`` section of an experiment's config: sizes of the mesh axes of
    :func:`make_mesh`. The default, 1 x 1 x 1, is one device; one size may be -1 (the devices
    left over, e.g. ``fsdp=-1``: parameters sharded over every device of every process)."""

    data: int = field(1, ge=-1, help="data-parallel size (-1: all devices left)")
    fsdp: int = field(1, ge=-1, help="fully-sharded data-parallel size (-1: all devices left)")
    model: int = field(1, ge=-1, help="tensor-parallel size")

    def validate(self):
        for name in ("data", "fsdp", "model"):
            if getattr(self, name) == 0:
                raise self.invalid(name, "must be a positive size or -1")
        if [self.data, self.fsdp, self.model].count(-1) > 1:
            raise self.invalid("fsdp", "at most one mesh axis may be -1")


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, model) over ``devices`` (default: all devices of all
    processes). One size may be -1: it takes the devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}")
        sizes[free[0]] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, {len(devices)} available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: shardings are given to jit (in/out shardings and constraints), not carried
    # in array types, which is what the logical-rules approach (MaxText, Tunix) expects.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_mesh(logical: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """Map a tuple of logical axis names to a mesh ``PartitionSpec`` through ``rules``.
    Unknown names are replicated; a mesh axis is used at most once per spec."""
    if not logical:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from dims they do not divide (replicate that dim instead)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of an ``nnx.State`` from its logical-axis metadata
    (``out_sharding``); leaves without metadata are replicated."""
    from flax import nnx

    def one(variable):
        if isinstance(variable, nnx.Variable):
            logical = variable.get_metadata().get("out_sharding")
            value = variable.get_value()
            spec = _fit_spec(logical_to_mesh(logical, rules), np.shape(value), mesh)
            return variable.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data x fsdp; other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch on the mesh, split along its leading dim.

    With one process, ``batch`` is the global batch. With several, each process passes its
    own slice (its ``process_index``-th share) and the result is the global array."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        batch)


def seed_sharding(seeds: int) -> NamedSharding | None:
    """``NamedSharding`` of a leading (vmapped seed) axis of size ``seeds`` over all devices of
    all processes, or None (one device, or a seed count the devices do not divide: the seeds
    stay on one device). Every experiment that vmaps its seeds places them with this, so that
    with several processes each one trains its own seeds (``docs/scaling.md``).

    Raises ``ValueError`` (the CLI reports it as a one-line error) when several processes
    share the run and ``seeds`` is not a multiple of the device count: every process would
    otherwise compute every seed."""
    devices = jax.device_count()
    if devices == 1 or seeds % devices:
        if jax.process_count() > 1:
            raise ValueError(f"--seeds {seeds}: a run over {jax.process_count()} processes "
                             f"shards the seeds over its {devices} devices, so --seeds must be "
                             f"a multiple of {devices}")
        return None
    return NamedSharding(make_mesh(data=-1), P("data"))


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of an array, also when it spans several processes (gathered)."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Start JAX's multi-controller runtime if the environment asks for it.

    Reads ``TRAINKIT_COORDINATOR`` (host:port), ``TRAINKIT_NUM_PROCESSES`` and
    ``TRAINKIT_PROCESS_ID``; with ``TRAINKIT_DISTRIBUTED=auto`` lets JAX detect a cluster
    (SLURM, TPU pod, ...). Returns True if the runtime was initialised. Must run before any
    other JAX call touches the backend.

    ``TRAINKIT_HEARTBEAT_TIMEOUT`` (seconds, JAX's default 100) bounds how long the other
    processes run on after one dies outside a collective: the coordination service then
    stops them all. Afterwards the processes meet at a barrier (:func:`sync_processes`)."""
    env = os.environ if env is None else env
    coordinator = env.get("TRAINKIT_COORDINATOR")
    kwargs = {}
    if env.get("TRAINKIT_HEARTBEAT_TIMEOUT"):
        try:
            kwargs["heartbeat_timeout_seconds"] = int(env["TRAINKIT_HEARTBEAT_TIMEOUT"])
        except ValueError:
            raise ValueError("TRAINKIT_HEARTBEAT_TIMEOUT must be an integer number of seconds, "
                             f"got {env['TRAINKIT_HEARTBEAT_TIMEOUT']!r}") from None
    if env.get("TRAINKIT_DISTRIBUTED") == "auto":
        jax.distributed.initialize(**kwargs)
        sync_processes("trainkit-initialize")
        return True
    if not coordinator:
        return False
    try:
        num = int(env["TRAINKIT_NUM_PROCESSES"])
        pid = int(env["TRAINKIT_PROCESS_ID"])
    except (KeyError, ValueError):
        raise ValueError("TRAINKIT_COORDINATOR needs integer TRAINKIT_NUM_PROCESSES and "
                         "TRAINKIT_PROCESS_ID") from None
    if not 0 <= pid < num:
        raise ValueError(f"TRAINKIT_PROCESS_ID={pid} must be in [0, {num})")
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS") == "cpu":
        # Cross-process collectives on CPU need an explicit implementation.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                               **kwargs)
    sync_processes("trainkit-initialize")
    return True


def sync_processes(name: str, timeout_s: int = 900) -> None:
    """Wait until every process gets here (coordination-service barrier, ``timeout_s``), then
    run one collective over all devices.

    Why the collective: on CPU, gloo sets up its connections at the first collective over a
    set of devices and gives up after 30 s if a peer is not there yet; processes that reach
    their first training step compile-times apart (one compiles for a minute on a loaded
    machine) then fail with ``Gloo context initialization failed``. Setting the context up
    here, in step, avoids that; later collectives reuse it."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed
    from jax.experimental import multihost_utils

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
    # gloo keys its contexts by device set: all devices (a step over the whole mesh) and one
    # device per process (process_allgather, as used by to_host)
    everything = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P("all"))
    ones = np.ones((jax.local_device_count(),), np.int32)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(everything.mesh, P()))(
        jax.make_array_from_process_local_data(everything, ones))
    multihost_utils.process_allgather(np.asarray(total))


def global_norm_spec_check(tree: Any) -> dict[str, str]:
    """Human-readable shardings of a pytree (for logs and debugging)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): str(getattr(x, "sharding", None)) for p, x in leaves}


def all_gather_equal(x: jnp.ndarray) -> bool:
    """True if ``x`` (a host scalar/array) is identical on every process."""
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(x))
    return bool(np.all(gathered == gathered[0]))


def _broadcast_bytes(payload: bytes) -> bytes:
    """Process 0's ``payload`` on every process (the others pass anything, e.g. ``b""``)."""
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(payload), np.int32)))
    words = np.zeros(-(-size // 4), np.int32)  # whole bytes summed as int32 words: exact
    if jax.process_index() == 0:
        words.view(np.uint8)[:size] = np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(words), np.int32).tobytes()[:size]


def from_main(obj: Any) -> Any:
    """Process 0's ``obj`` (anything JSON carries) on every process. For a decision or a cached
    result that rests on process 0's files: on a pod the other workers' disks do not have them,
    and processes that decide differently would wait for each other forever. With one process,
    ``obj`` itself; otherwise it goes through JSON on every process alike."""
    if jax.process_count() == 1:
        return obj
    payload = json.dumps(obj).encode() if jax.process_index() == 0 else b""
    return json.loads(_broadcast_bytes(payload))


def mirror_from_main(directory: str | os.PathLike) -> Path:
    """Make process 0's ``directory`` (files process 0 alone wrote, e.g. an HF model directory
    trained in the run) readable on this process at the same path, and return the path.

    Process 0 sends the list of its files with their SHA-256; a process whose copy differs
    (its own disk, on a pod) receives those files from process 0 and writes them. On one
    process, or on a disk every process shares, nothing is copied. Meant for small
    directories: the bytes go through a collective of the whole device set."""
    import hashlib

    root = Path(directory)
    if jax.process_count() == 1:
        return root
    from jax.experimental import multihost_utils

    digest = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()  # noqa: E731
    manifest = from_main({str(f.relative_to(root)): digest(f) for f in sorted(root.rglob("*"))
                          if f.is_file()} if jax.process_index() == 0 else None)
    stale = [rel for rel, sha in manifest.items()
             if not (root / rel).is_file() or digest(root / rel) != sha]
    wanted = multihost_utils.process_allgather(np.asarray([len(stale) > 0], np.int32))
    for rel in manifest if np.any(wanted) else ():
        data = _broadcast_bytes((root / rel).read_bytes() if jax.process_index() == 0 else b"")
        if rel in stale:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = root / (rel + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, root / rel)
    return root


def spread_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Inside a jitted step: the arrays of ``tree`` (a batch drawn in the step) split along
    their leading axis over the batch axes (``data`` x ``fsdp``) of ``mesh``, so every device
    computes its share of the step and the gradient is reduced over all of them (the state
    replicated with :func:`replicate`). ``mesh=None``: ``tree`` unchanged. ``ValueError`` when
    a leading axis does not divide over the batch axes."""
    if mesh is None:
        return tree
    parts = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    for x in jax.tree.leaves(tree):
        if x.shape[0] % parts:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split over {parts} "
                             "data-parallel devices; use a multiple")
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """``tree`` (the same values on every process: host arrays, this process's arrays, typed
    PRNG keys) as arrays replicated over every device of ``mesh``, without a collective
    (``mesh=None``: ``tree`` unchanged). ``jax.device_put`` refuses a multi-process sharding
    for arrays a process already holds on its devices, and for typed keys."""
    if mesh is None:
        return tree
    sharding = replicated(mesh)

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = jax.make_array_from_process_local_data(sharding, to_host(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=impl)
        return jax.make_array_from_process_local_data(sharding, to_host(x))

    return jax.tree.map(one, tree)


def local_replica(tree: Any) -> Any:
    """This process's own full copy of every array of ``tree``, for work each process does
    alone on the whole batch (sampling, grading, evaluation) with no collective per step: the
    array itself when this process holds all of it, its local shard on one device when it is
    replicated over processes, else the array gathered from every process (numpy)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        return to_host(x)

    return jax.tree.map(one, tree)


def process_batch_slice(sharding: NamedSharding, global_shape: Sequence[int],
                        axis: int = 0) -> slice:
    """The rows of a global batch (along ``axis``) that this process holds under ``sharding``.

    A multi-host data pipeline reads only these rows and hands them to
    :func:`make_global_batch`. With one process it is the whole batch. The rows of one process
    are contiguous for the meshes :func:`make_mesh` builds (devices are ordered process by
    process); any other layout raises ``ValueError``."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    ranges = sorted({(idx[axis].start or 0,
                      global_shape[axis] if idx[axis].stop is None else idx[axis].stop)
                     for idx in index_map.values()})
    start, stop = ranges[0][0], ranges[-1][1]
    covered = set()
    for lo, hi in ranges:
        covered.update(range(lo, hi))
    if covered != set(range(start, stop)):
        raise ValueError(f"process {jax.process_index()} holds rows {ranges} of axis {axis}: "
                         "not one contiguous block, so it cannot read a slice of the batch")
    return slice(start, stop)


def make_global_batch(local: Any, sharding: NamedSharding, global_shape_of: Any) -> Any:
    """The global array of each leaf from this process's rows (:func:`process_batch_slice`).

    ``local`` and ``global_shape_of`` are matching pytrees: local numpy arrays and the global
    shapes they are slices of. One process: ``local`` is the whole batch (a plain
    ``device_put``)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.tree.map(
        lambda x, shape: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                                tuple(shape)),
        local, global_shape_of)

