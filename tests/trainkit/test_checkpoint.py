import contextlib
import os
import signal
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainkit.checkpoint import CheckpointError, Checkpointer, StopSignal
from trainkit.run import RunDir, RunDirError, checkpoint_path


def _state(seed=0):
    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, (4, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
    opt_state = optax.adam(1e-3).init(params)
    return {"params": params, "opt": opt_state, "key": jax.random.split(key, 3),
            "raw_key": jax.random.PRNGKey(seed), "step": jnp.int32(7), "buffer": jnp.arange(10)}


def test_save_restore_round_trip_with_typed_keys(tmp_path):
    state = _state(0)
    ckpt = Checkpointer(tmp_path / "ck", save_every=5, async_save=False)
    assert ckpt.save(5, state, extra={"data_position": 123})
    ckpt.close()
    restored_step, restored, extra = Checkpointer(tmp_path / "ck", save_every=5).restore(_state(1))
    assert restored_step == 5 and extra == {"data_position": 123}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key)
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The restored typed key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.normal(state["key"][1], (3,)),
                                  jax.random.normal(restored["key"][1], (3,)))


def test_zero_size_arrays_round_trip(tmp_path):
    """Orbax cannot store zero-size arrays (MJX's Data.act is one for a model without actuator
    activations); they come back from the template, shape, dtype and all."""
    state = {"act": jnp.zeros((2, 0), jnp.float32), "ids": np.zeros((0,), np.int32),
             "w": jnp.arange(3.0), "key": jax.random.key(0)}
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    assert ckpt.save(1, state)
    ckpt.close()
    template = {**state, "w": jnp.zeros(3), "key": jax.random.key(1)}
    _, restored, _ = Checkpointer(tmp_path / "ck", save_every=1).restore(template)
    assert restored["act"].shape == (2, 0) and restored["act"].dtype == jnp.float32
    assert restored["ids"].shape == (0,) and restored["ids"].dtype == np.int32
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                  jax.random.key_data(state["key"]))


def test_restored_arrays_keep_the_templates_placement(tmp_path):
    """An uncommitted template array (jit may place it) comes back uncommitted, a committed one
    on its device: a committed argument changes the lowered program, so a resumed run used to
    miss the persistent compilation cache its first run had filled and compile again."""
    other = jax.devices()[-1]
    state = {"free": jnp.arange(3.0), "key": jax.random.key(0),
             "placed": jax.device_put(jnp.ones(2), other)}
    assert not state["free"].committed and not state["key"].committed
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    assert ckpt.save(1, state)
    ckpt.close()
    _, restored, _ = Checkpointer(tmp_path / "ck", save_every=1).restore(state)
    for name in state:
        assert restored[name].committed == state[name].committed, name
    assert restored["placed"].devices() == {other}
    step = jax.jit(lambda s: s["free"] * 2)
    assert step.lower(restored).as_text() == step.lower(state).as_text(), \
        "the restored state lowers to another program (a persistent-cache miss)"


def test_due_and_keep_last(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=10, max_to_keep=2, async_save=False)
    state = _state()
    saved = [s for s in (4, 8, 12, 16, 20, 21, 35) if ckpt.save(s, state)]
    assert saved == [12, 20, 35]  # a save each time a multiple of 10 is crossed
    assert ckpt.save(36, state, force=True)
    ckpt.close()
    assert Checkpointer(tmp_path / "ck", save_every=10).all_steps() == [35, 36]


def test_missing_and_corrupt_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty", save_every=1).restore(_state())
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    ckpt.save(1, _state(), force=True)
    ckpt.close()
    for root, _, files in os.walk(tmp_path / "ck" / "1" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as fh:
                fh.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be restored"):
        Checkpointer(tmp_path / "ck", save_every=1).restore(_state())


def _garble(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as fh:
                fh.write(b"\x00garbage")


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, max_to_keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), extra={"at": step}, force=True)
    ckpt.close()
    _garble(tmp_path / "ck" / "3")
    _garble(tmp_path / "ck" / "2")
    capsys.readouterr()
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, max_to_keep=3, async_save=False)
    step, restored, extra = ckpt.restore(_state(0))
    assert step == 1 and extra == {"at": 1}
    np.testing.assert_array_equal(restored["params"]["w"], _state(1)["params"]["w"])
    # each damaged step is kept aside, named, and said on one line
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "damaged-2", "damaged-3"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: checkpoint ") for line in lines)
    assert "/3 cannot be restored" in lines[0] and "damaged-3" in lines[0]
    assert lines[0].endswith("resuming from step 1")
    # the run goes on: the same steps save again, and the next resume takes the newest
    assert ckpt.save(2, _state(2), force=True) and ckpt.save(3, _state(3), force=True)
    ckpt.close()
    assert Checkpointer(tmp_path / "ck", save_every=1).restore(_state(0))[0] == 3


def test_no_readable_checkpoint_names_the_latest_and_moves_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), force=True)
    ckpt.close()
    _garble(tmp_path / "ck" / "1")
    _garble(tmp_path / "ck" / "2")
    with pytest.raises(CheckpointError, match=r"ck/2 cannot be restored"):
        Checkpointer(tmp_path / "ck", save_every=1).restore(_state(0))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2"]


def test_mismatched_template_is_a_checkpoint_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    ckpt.save(1, {"w": jnp.ones((2, 2))}, force=True)
    ckpt.close()
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path / "ck", save_every=1).restore({"w": jnp.ones((2, 2)),
                                                            "v": jnp.ones(3)})


def test_stop_signal_sets_flag_instead_of_killing():
    previous_term, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
    # the handlers that were there before come back (not merely "some other handler")
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert signal.getsignal(signal.SIGINT) is previous_int


_KILL_CHILD = """
import sys
import jax.numpy as jnp
from trainkit.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], save_every=1)
for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.full((4,), step)}, force=True)
ckpt.close()
"""


def test_fault_injection_kills_right_after_the_nth_save_is_on_disk(tmp_path):
    """TRAINKIT_FAULT_KILL_AFTER_SAVES=2: SIGKILL after the second save completes (the
    kill/resume sweep's deterministic kill point); both checkpoints restore, the third never
    starts."""
    import subprocess
    import sys

    from tests.helpers import REPO, child_env

    env = dict(child_env(), TRAINKIT_FAULT_KILL_AFTER_SAVES="2")
    res = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(tmp_path / "ck")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ckpt = Checkpointer(tmp_path / "ck", save_every=1)
    assert ckpt.all_steps() == [1, 2]
    step, state, _ = ckpt.restore({"w": jnp.zeros((4,), jnp.int32)})
    assert step == 2 and np.array_equal(np.asarray(state["w"]), np.full((4,), 2))


# --- object-store checkpoint paths (gs://) on a fake filesystem -------------------------------

@contextlib.contextmanager
def fake_gcs(root):
    """``gs://BUCKET/PATH`` served from ``root/BUCKET/PATH``, with no network: etils epath's
    mock backend maps every path operation orbax makes, and the TensorStore kvstore orbax
    builds for a GCS path (the array data) becomes a file kvstore. Orbax still takes its GCS
    code paths (commit_success.txt instead of an atomic rename)."""
    from etils.epath import testing as epath_testing
    from orbax.checkpoint._src.path import gcs_utils

    def local(path):
        text = os.fspath(path) if not isinstance(path, str) else path
        return text.replace("gs://", f"{root}/", 1) if text.startswith("gs://") else text

    def wrap(original, path, *args, **kwargs):
        args = tuple(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args)
        return original(local(path), *args, **kwargs)

    ops = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
           "rename", "replace", "rmtree", "stat", "walk")
    kvstores = []

    def kvstore(path):
        kvstores.append(path)
        return {"driver": "file", "path": local(path)}

    with epath_testing.mock_epath(**dict.fromkeys(ops, wrap)), \
            mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
            mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda _: False):
        yield kvstores


def test_url_checkpoint_dirs_stay_urls():
    path = checkpoint_path("gs://bucket/runs/x/checkpoints")
    assert str(path) == "gs://bucket/runs/x/checkpoints"  # pathlib would give gs:/bucket/...
    assert str(path / "3") == "gs://bucket/runs/x/checkpoints/3"
    assert checkpoint_path("rel/ck").is_absolute()


def test_checkpoint_round_trip_through_a_fake_gcs_bucket(tmp_path):
    from trainkit.checkpoint import load_numpy

    state = _state(0)
    with fake_gcs(tmp_path) as kvstores:
        ckpt = Checkpointer("gs://bucket/runs/x/checkpoints", save_every=1, async_save=False)
        assert ckpt.save(3, state, extra={"data_position": 9}, force=True)
        ckpt.close()
        step, restored, extra = Checkpointer("gs://bucket/runs/x/checkpoints",
                                             save_every=1).restore(_state(1))
        numpy_step, tree = load_numpy("gs://bucket/runs/x/checkpoints")
    assert step == numpy_step == 3 and extra == {"data_position": 9}
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(tree["params"]["w"], np.asarray(state["params"]["w"]))
    # the arrays went through TensorStore's GCS kvstore spec, the files into the "bucket"
    assert any(k.startswith("gs://bucket/runs/x/checkpoints/3/state") for k in kvstores)
    assert (tmp_path / "bucket/runs/x/checkpoints/3/state/_METADATA").is_file()
    assert (tmp_path / "bucket/runs/x/checkpoints/3/commit_success.txt").is_file()


def test_run_dir_puts_checkpoints_under_trainkit_checkpoint_root(tmp_path, monkeypatch):
    """A run's small files stay local; its checkpoints go to the object store, the run
    records where, and a resume without the same root is refused (it would restart at 0)."""
    from trainkit.loop import LoopSettings, fit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINKIT_CHECKPOINT_ROOT", "gs://bucket/ck/")
    chunk = jax.jit(lambda s, n: ({"x": s["x"] + n}, {"loss": jnp.full((n,), 1.0) * s["x"]}),
                    static_argnums=1)
    start = {"x": jnp.float32(0)}
    settings = LoopSettings(num_steps=4, chunk_size=2, save_every=2, key_metric=None)
    with fake_gcs(tmp_path / "gcs"):
        run = RunDir("runs/r")
        assert str(run.checkpoints_dir) == "gs://bucket/ck/runs/r/checkpoints"
        run.write_run_info({"experiment": "x"})
        (run.path / "config.json").write_text("{}")
        state, logger = fit(run, start, chunk, LoopSettings(
            num_steps=2, chunk_size=2, save_every=2, key_metric=None))
        logger.close()
        resumed = RunDir("runs/r", must_exist=True)
        state, logger = fit(resumed, start, chunk, settings, resume=True)
        logger.close()
    assert float(state["x"]) == 4.0  # resumed from the remote step-2 checkpoint, not from 0
    assert sorted(os.listdir(tmp_path / "gcs/bucket/ck/runs/r/checkpoints")) == ["2", "4"]
    assert not (tmp_path / "runs/r/checkpoints").exists()
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    monkeypatch.delenv("TRAINKIT_CHECKPOINT_ROOT")
    with pytest.raises(RunDirError, match="set TRAINKIT_CHECKPOINT_ROOT"):
        RunDir("runs/r", must_exist=True)
    with pytest.raises(RunDirError, match="must be a local directory"):
        RunDir("gs://bucket/runs/r")


@pytest.mark.parametrize("damaged", ["arrays.npz", "params.pkl", "info.json"])
def test_read_stage_names_the_damaged_file(tmp_path, damaged):
    """Stage stores (dlc, bias_shift): a truncated file of a finished stage is a CheckpointError
    naming it, not numpy's BadZipFile / pickle's EOFError (found by the kill/resume sweep)."""
    import json
    import pickle

    from trainkit.checkpoint import read_stage

    d = tmp_path / "stage"
    d.mkdir()
    np.savez_compressed(d / "arrays.npz", x=np.arange(1000))
    (d / "params.pkl").write_bytes(pickle.dumps({"w": np.ones(100)}))
    (d / "info.json").write_text(json.dumps({"seconds": 1.0, "note": "x" * 50}))
    arrays, params, info = read_stage(d)
    assert arrays["x"].sum() == 499500 and params["w"].shape == (100,) and info["seconds"] == 1.0
    data = (d / damaged).read_bytes()
    (d / damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{damaged}: cannot be read.*delete .*stage"):
        read_stage(d)
