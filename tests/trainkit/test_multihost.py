"""Two JAX processes on 127.0.0.1 (jax.distributed, gloo collectives on CPU) give the same
training result as one process."""

import dataclasses
import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import SHARED_RUN_TIMEOUT, SMOKE, run_cli, shared_smoke_run, start_cli
from trainkit.checkpoint import load_numpy

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_params(run_dir, step):
    restored_step, state = load_numpy(run_dir / "checkpoints", step)
    assert restored_step == step
    return state["params"]


def test_two_processes_match_one(tmp_path, subprocess_env):
    args = ["run", "quickstart", "--set", "train.steps=100", "--set", "train.save_every=50"]
    single = tmp_path / "single"
    res = run_cli([*args, "--run-dir", str(single)], subprocess_env)
    assert res.returncode == 0, res.stderr

    multi = tmp_path / "multi"
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(subprocess_env, TRAINKIT_COORDINATOR=f"127.0.0.1:{port}",
                   TRAINKIT_NUM_PROCESSES="2", TRAINKIT_PROCESS_ID=str(pid))
        procs.append(start_cli([*args, "--run-dir", str(multi)], env))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    info = json.loads((multi / "run.json").read_text())
    assert info["versions"]["processes"] == "2" and info["versions"]["devices"] == "2"

    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    pa, pb = _final_params(single, 100), _final_params(multi, 100)
    leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


FROM_MAIN = """
import json, jax
from trainkit.sharding import from_main, initialize_distributed, mirror_from_main
initialize_distributed()
pid = jax.process_index()
mine = {"rows": [1.5, "é", None], "from": pid} if pid == 0 else ["what process 1 holds"]
values = [from_main(mine), from_main(pid == 0), from_main(None), from_main("")]
mirror_from_main("model")  # a relative path: each process's own working directory
print(json.dumps(values))
"""


def test_from_main_and_mirror_give_every_process_what_process_0_has(tmp_path, subprocess_env):
    """A decision or a cached result resting on process 0's files reaches every process, and
    so does a directory process 0 wrote: each process runs in its own working directory (its
    own disk, as on a pod), and process 1's missing and outdated files are replaced by process
    0's, byte for byte; its other files are left alone."""
    rng = np.random.default_rng(0)
    files = {"config.json": b'{"a": 1}', "sub/weights.bin": rng.bytes(10_003), "empty": b""}
    for rel, data in files.items():
        (tmp_path / "p0" / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "p0" / "model" / rel).write_bytes(data)
    (tmp_path / "p1" / "model").mkdir(parents=True)
    (tmp_path / "p1" / "model" / "config.json").write_bytes(b'{"a": 0}')  # outdated
    (tmp_path / "p1" / "model" / "notes.txt").write_bytes(b"mine")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FROM_MAIN], env=_env(subprocess_env, 1, pid, port),
                              cwd=tmp_path / f"p{pid}", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.splitlines()[-1]) == [{"rows": [1.5, "é", None], "from": 0}, True, None, ""]
    for rel, data in files.items():
        assert (tmp_path / "p1" / "model" / rel).read_bytes() == data, rel
    assert (tmp_path / "p1" / "model" / "notes.txt").read_bytes() == b"mine"
    assert not (tmp_path / "p0" / "model" / "notes.txt").exists()


# --- 2 processes x 2 simulated devices each vs one process with 4 -----------------------------



def _env(base, devices, pid=None, port=None, **extra):
    env = dict(base, XLA_FLAGS=f"{base.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={devices}".strip(), **extra)
    if pid is not None:
        env.update(TRAINKIT_COORDINATOR=f"127.0.0.1:{port}", TRAINKIT_NUM_PROCESSES="2",
                   TRAINKIT_PROCESS_ID=str(pid))
    return env


def _start_pair(args, base, **extra):
    port = _free_port()
    return [start_cli(args, _env(base, 2, pid, port, **extra)) for pid in range(2)]


def _wait_all(procs, timeout=400):
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        errors.append(err)
    return errors


def _latest_step(run_dir):
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


# A 1-layer Qwen3 on 64 arithmetic problems, fsdp over all devices. Warm-up 50 steps: every
# step below runs in the warm-up, where the LR does not depend on train.steps, so a run
# started with steps=1000 and resumed with steps=K trains exactly what a steps=K run does.
LM = ["run", "lm_pretrain", "--set", "model.hidden_size=32", "--set", "model.intermediate_size=64",
      "--set", "model.num_hidden_layers=1", "--set", "model.num_attention_heads=2",
      "--set", "model.num_key_value_heads=1", "--set", "data.num_train=64",
      "--set", "data.num_eval=2", "--set", "data.seq_len=24", "--set", "train.max_new_tokens=2",
      "--set", "train.chunk_size=2", "--set", "train.save_every=2", "--set", "train.batch_size=8",
      "--set", "train.warmup_steps=50", "--set", "train.eval_every=1000", "--set", "mesh.fsdp=-1"]


def test_lm_pretrain_fsdp_killed_and_resumed_on_two_processes_matches_one(tmp_path,
                                                                          subprocess_env):
    """Two processes train lm_pretrain with fsdp over their 2 + 2 devices, each feeding its
    half of every batch. SIGKILL of process 1 stops process 0 within a bounded time (JAX's
    coordination service, heartbeat timeout 5 s here), with JAX's message; ``--resume`` on
    both continues from the last checkpoint to the parameters a single process with 4
    devices reaches."""
    multi = tmp_path / "multi"
    procs = _start_pair([*LM, "--set", "train.steps=1000", "--run-dir", str(multi)],
                        subprocess_env, TRAINKIT_HEARTBEAT_TIMEOUT="5")
    deadline = time.time() + 400
    while not (multi / "checkpoints").is_dir() or _latest_step(multi) is None:
        assert time.time() < deadline and procs[0].poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=120)
    stopped_after = time.time() - killed_at
    procs[1].communicate()
    assert procs[0].returncode != 0
    assert stopped_after < 60, stopped_after
    assert ("another task died" in err or "Connection reset by peer" in err
            or "Connection closed by peer" in err), err[-2000:]

    steps = _latest_step(multi) + 2
    assert steps <= 50  # still in the warm-up (see LM)
    final = ["--set", f"train.steps={steps}"]
    single = tmp_path / "single"
    reference = start_cli([*LM, *final, "--run-dir", str(single)], _env(subprocess_env, 4))
    procs = _start_pair([*LM, *final, "--run-dir", str(multi), "--resume"], subprocess_env)
    errors = _wait_all([reference, *procs])
    for proc, err in zip([reference, *procs], errors):
        assert proc.returncode == 0, err[-3000:]
    info = json.loads((multi / "run.json").read_text())
    assert info["versions"]["processes"] == "2" and info["versions"]["devices"] == "4"
    assert len(info["resumed"]) == 1
    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    pa, pb = _final_params(single, steps), _final_params(multi, steps)
    leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    # the log reads as if the run had never stopped: one row per step
    rows = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))


def _single_and_pair(args, tmp_path, env):
    """Run ``args`` as one process with 4 devices and as 2 processes x 2 devices; returns the
    two run directories (single, multi) after both finished cleanly."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = [start_cli([*args, "--run-dir", str(single)], _env(env, 4)),
             *_start_pair([*args, "--run-dir", str(multi)], env)]
    for proc, err in zip(procs, _wait_all(procs)):
        assert proc.returncode == 0, err[-3000:]
    return single, multi


def _pair_vs_shared(name, tmp_path, tmp_path_factory):
    """The session's shared one-process smoke run of ``name`` (``tests.helpers.SMOKE``: the
    experiments keep one device when they run as one process) and the same command as 2
    processes x 2 devices; returns the two run directories (single, multi)."""
    shared = shared_smoke_run(name, tmp_path_factory)
    multi = tmp_path / "multi"
    procs = _start_pair([*shared.args, "--run-dir", str(multi)], SMOKE[name].env())
    for proc, err in zip(procs, _wait_all(procs)):
        assert proc.returncode == 0, err[-3000:]
    return shared.path, multi


def _assert_seed_critics_match(single_checkpoints, multi_checkpoints, seeds):
    """The critics of the two layouts' last checkpoints agree to float tolerance, one row per
    seed, and the seeds are different agents (per-seed keys), not one agent copied."""
    _, sa = load_numpy(single_checkpoints)
    _, sb = load_numpy(multi_checkpoints)
    leaves_a, leaves_b = jax.tree.leaves(sa["critic"]), jax.tree.leaves(sb["critic"])
    assert len(leaves_a) == len(leaves_b) > 0 and leaves_a[0].shape[0] == seeds
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    biggest = max(leaves_a, key=np.size)
    assert not np.allclose(biggest[0], biggest[1])


# What is under test is where each seed's state lives, not the reset rule: no resets and one
# health report per chunk keep the three processes' compilation (most of the test's time) small.
GRAMA = ["run", "grama", "--seeds", "4", "--set", "critics=mlp", "--set", "resets=none",
         "--set", "total_steps=128", "--set", "chunk_steps=64", "--set", "learning_starts=32",
         "--set", "batch_size=16", "--set", "width=16", "--set", "health_every=64"]


def test_grama_seeds_sharded_over_two_processes_match_one(tmp_path, subprocess_env):
    """SAC, 4 seeds sharded over 2 processes x 2 devices: each process
    steps the environments, buffers and agents of its 2 seeds (keys split from the run's
    seed, whichever process holds them); the result equals one process with 4 devices."""
    single, multi = _single_and_pair(GRAMA, tmp_path, subprocess_env)
    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert a.keys() == b.keys() and any("eval_return" in k for k in a)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, nan_ok=True), key
    sub = "configs/gymnax_Pendulum-v1--mlp--none/checkpoints"
    _assert_seed_critics_match(single / sub, multi / sub, seeds=4)


# LEAST on (its hook's memories and counters are part of each seed's state), the smallest
# budget that still trains: one 64-step chunk of random warm-up, one of updates, evaluated
# after each; LEAST may stop episodes from step 64 on.
LEAST = ["run", "least", "--preset", "smoke", "--seeds", "4", "--set", "variants=on",
         "--set", "total_steps=128", "--set", "chunk_steps=64", "--set", "learning_starts=32",
         "--set", "batch_size=16", "--set", "warmup_steps=64", "--set", "k_every=32"]


def test_least_seeds_sharded_over_two_processes_match_one(tmp_path, subprocess_env):
    """SAC + LEAST, 4 seeds sharded over 2 processes x 2 devices: each process trains its 2
    seeds; the evaluation returns (gathered to process 0, which alone writes), LEAST's
    per-seed counters and the critics equal one process with 4 devices, to float tolerance
    (the same per-seed programs, but bit-equality across process layouts is not promised)."""
    single, multi = _single_and_pair(LEAST, tmp_path, subprocess_env)
    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert list(a) == list(b) == ["gymnax_Pendulum-v1--sac--least-on/eval_return"]
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    sub = "configs/gymnax_Pendulum-v1--sac--least-on"
    sa = json.loads((single / sub / "summary.json").read_text())
    sb = json.loads((multi / sub / "summary.json").read_text())
    assert len(sb["episodes"]) == 4 and sb["episodes"] == sa["episodes"]  # one count per seed
    assert sb["stopped"] == sa["stopped"] and sb["stop_hist"] == sa["stop_hist"]
    rows_a = [json.loads(x) for x in (single / sub / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (multi / sub / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2]  # one row per chunk: process 0 alone writes
    np.testing.assert_allclose(rows_b[-1]["eval_return"], rows_a[-1]["eval_return"], rtol=1e-5)
    _assert_seed_critics_match(single / sub / "checkpoints", multi / sub / "checkpoints", seeds=4)


def test_stable_gradients_seeds_sharded_over_devices_match_unsharded(tmp_path, monkeypatch):
    """In-process (8 simulated devices): with 8 seeds the PQN sub-run and the control are
    sharded one seed per device (what each process of a multi-process run does with its
    share), and train exactly what the same run with every seed on one device trains."""
    from experiments import stable_gradients as sg
    from experiments.registry import RunContext
    from trainkit.config import save_json
    from trainkit.run import RunDir, read_metrics

    if jax.device_count() != 8:
        pytest.skip("needs 8 (simulated) devices")
    # no Hessian probes or churn batch: they only add compile time to the two runs
    cfg = dataclasses.replace(sg.smoke(), variants=("mlp",), hessian_samples=0, churn_samples=0)

    def run(path):
        run_dir = RunDir(path)
        save_json(cfg, run_dir.config_path)
        return sg.run(cfg, RunContext(run_dir, seeds=8))

    sharded = run(tmp_path / "sharded")
    monkeypatch.setattr(sg, "seed_sharding", lambda seeds: None)
    plain = run(tmp_path / "plain")
    name = "rl--pqn--mlp--w8-b1"
    for result, devices in ((sharded, 8), (plain, 1)):
        leaf = max(jax.tree.leaves(result.params[name]), key=np.size)
        assert leaf.shape[0] == 8 and len(leaf.sharding.device_set) == devices
    for x, y in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    assert sharded.metrics.keys() == plain.metrics.keys()
    for key in plain.metrics:
        assert sharded.metrics[key] == pytest.approx(plain.metrics[key], rel=1e-5), key
    log = f"configs/{name}/metrics.jsonl"  # per update and seed: return, grad norms, health
    rows_a, rows_b = read_metrics(tmp_path / "plain" / log), read_metrics(tmp_path / "sharded" / log)
    assert len(rows_a) == len(rows_b) == 2 and rows_a[-1].keys() == rows_b[-1].keys()
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            np.testing.assert_allclose(np.asarray(rb[key], np.float64),
                                       np.asarray(ra[key], np.float64), rtol=1e-5, atol=1e-6,
                                       err_msg=key)
    pa = json.loads((tmp_path / "plain/configs/control--mlp/phases.json").read_text())
    pb = json.loads((tmp_path / "sharded/configs/control--mlp/phases.json").read_text())
    assert np.asarray(pb["accuracy"]).shape == (8, 2)  # [seeds, phases]
    for key in pa:
        np.testing.assert_allclose(pb[key], pa[key], rtol=1e-5, atol=1e-6, err_msg=key)


# The smoke preset without the paraphraser (its stage is one more train_sft, the same code),
# with a teacher of 26 steps, not 105: the two layouts sum gradients in different orders, and
# Adam at lr 1e-2 grows that rounding to 0.02 in the teacher's weights after 105 steps and to
# 1.1e-5 after 26 (measured), the first enough to change sampled traces. 26 steps are enough
# for the teacher to write well-formed wrong traces (W: 38 of 96 samples; in-domain accuracy 0).
COT_SFT = ["run", "cot_sft", "--preset", "smoke", "--set", "trace_sets=H,W",
           "--set", "teacher.token_budget=15000"]


def test_cot_sft_sft_steps_split_over_two_processes_match_one(tmp_path, subprocess_env):
    """CoT-trace SFT over 2 processes x 2 devices: every SFT batch (base, teacher, students) is
    split over the 4 devices, each process uploading its rows; generation, grading and the
    perplexities run on every process from its copy of the parameters; process 0 alone writes.
    The traces, accuracies, perplexities and student parameters equal one process with 4
    devices, to float tolerance."""
    single, multi = _single_and_pair(COT_SFT, tmp_path, subprocess_env)
    a = json.loads((single / "results.json").read_text())
    b = json.loads((multi / "results.json").read_text())
    assert a["sets"] == b["sets"]  # the same teacher traces, graded the same
    assert a["runs"].keys() == b["runs"].keys() == {"small-H-s0", "small-W-s0"}
    for tag, row in a["runs"].items():
        for key in ("in", "ood", "steps", "completion_tokens"):
            assert b["runs"][tag][key] == pytest.approx(row[key], rel=1e-5), (tag, key)
    for name, nll in a["nll"]["small"].items():
        assert b["nll"]["small"][name] == pytest.approx(nll, rel=1e-5), name
    # (stage, atol): the 3-step students stay within 1e-6; the 26-step teacher within 1e-4
    for sub, atol in [("teacher", 1e-4)] + [(f"runs/{tag}", 1e-6) for tag in a["runs"]]:
        _, sa = load_numpy(single / sub / "checkpoints")
        _, sb = load_numpy(multi / sub / "checkpoints")
        for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"]), strict=True):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=atol, err_msg=sub)
    rows = [json.loads(x) for x in (multi / "runs/small-H-s0/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one writer: no duplicates


# Two configurations of the smoke grid; the base model is pretrained data-parallel over the 4
# devices of the two processes (what a multi-process run does to a one-device pretrain mesh).
KL = ["run", "kl_estimators", "--preset", "smoke", "--set", "grid.configs=none,k3-loss",
      "--set", "base.pretrain.mesh.data=-1"]


def _rows(run_dir, name):
    return [json.loads(x) for x in (run_dir / "configs" / name / "metrics.jsonl").read_text().splitlines()]


def test_kl_estimators_updates_split_over_two_processes_match_one(tmp_path, subprocess_env):
    """LLM RL over 2 processes x 2 devices: the base model is pretrained data-parallel, process 0
    writes it and the other reads its copy; every RL update's batch is split over the 4
    devices, and each process samples and grades only its rows (each row from its own random
    stream, so the two processes draw the tokens one process does) from its copy of the policy
    and uploads them; process 0 alone writes. The one-process run (4 devices) starts from the
    pair's base model (its ``base/`` copied in, so the evaluation split is the same), so the
    two differ only by how the RL updates are laid out.

    Measured, and why the tolerances are what they are: from the same base, the ``none`` runs
    sample the same rewards and lengths at every step and their KL, gradient norms and
    per-token log-likelihoods agree to 2.2e-6 relative (1e-5 asked). (From two base models
    each pretrained in its own layout they differed by up to 1.2e-3: rounding in the
    pretraining, amplified by Adam.) Adam (eps 1e-8) turns rounding-sized gradients into full
    steps: with the KL in the loss the first update's gradient is zero analytically (the
    policy is the reference): exactly 0 on one device, 2.5e-8 on the 4-device mesh, which Adam
    makes a step, so the two k3-loss runs part after their first update; and a few weights
    whose gradient is rounding-sized get Adam steps in one layout and not the other."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = _start_pair([*KL, "--run-dir", str(multi)], subprocess_env)
    for proc, err in zip(procs, _wait_all(procs)):
        assert proc.returncode == 0, err[-3000:]
    assert json.loads((multi / "base" / "config.json").read_text())["mesh"]["data"] == -1
    shutil.copytree(multi / "base", single / "base")
    proc = start_cli([*KL, "--run-dir", str(single)], _env(subprocess_env, 4))
    err = _wait_all([proc])[0]
    assert proc.returncode == 0, err[-3000:]
    rows_a, rows_b = _rows(single, "none-s0"), _rows(multi, "none-s0")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == list(range(1, 7))
    for ra, rb in zip(rows_a, rows_b):
        assert rb["reward"] == ra["reward"] and rb["response_length"] == ra["response_length"]
        for key in ("kl_k3", "grad_norm", "loss", "neg_logp_per_token"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (rb["step"], key)
    for key in ("eval_accuracy", "ood_accuracy", "eval_formatted"):
        assert rows_b[-1][key] == rows_a[-1][key]
    _, sa = load_numpy(single / "configs/none-s0/checkpoints")
    _, sb = load_numpy(multi / "configs/none-s0/checkpoints")
    for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"]), strict=True):
        # Adam at lr 1e-4 moves a weight by about lr per update; weights move in the last 4 updates
        # (gradients at steps 3 and 6, momentum between). A weight stepped in one layout only
        # differs by a few lr; a wrong batch split would move them all.
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=3e-4)
        assert np.mean(np.abs(np.asarray(y) - np.asarray(x)) > 1e-5) < 1e-3
    # k3-loss: at the first update the policy is the reference, so the KL term adds nothing
    # (its gradient is 0 analytically, rounding-sized on the mesh) and the update is the
    # policy gradient alone, the same in both layouts; after it Adam makes the rounding a step
    first_a, first_b = _rows(single, "k3-loss-s0")[0], _rows(multi, "k3-loss-s0")[0]
    assert first_b["reward"] == first_a["reward"] and first_b["kl_k3"] < 1e-9
    assert first_b["grad_norm"] == pytest.approx(first_a["grad_norm"], rel=1e-5, abs=1e-6)
    assert len(_rows(multi, "k3-loss-s0")) == 6


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_asyppo_updates_split_over_two_processes_match_one(tmp_path, tmp_path_factory):
    """AsyPPO with 2 mini-critics (the smoke preset) over 2 processes x 2 devices: the randomly
    initialised base is written by process 0 and copied to the other; every update's batch (the
    policy's and the critics' minibatches) is split over the 4 devices; each process samples
    and grades its rows of the batch from its copy of the policy. The two layouts train the same policy and critics
    (to about 1e-7 measured; gradient norms 1.43 and 1.51: critic values give advantages even
    when every reward is 0). GRPO's split update is tested with kl_estimators."""
    single, multi = _pair_vs_shared("asyppo", tmp_path, tmp_path_factory)
    for name in ("asyppo-m2-s0",):
        rows_a, rows_b = _rows(single, name), _rows(multi, name)
        assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [1, 2]
        for ra, rb in zip(rows_a, rows_b):
            assert rb["reward"] == ra["reward"] and rb["response_length"] == ra["response_length"]
            for key in ("loss", "grad_norm", "value_loss", "sigma_mean", "adv_masked_frac"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-6), (name, rb["step"], key)
        _, sa = load_numpy(single / "configs" / name / "checkpoints")
        _, sb = load_numpy(multi / "configs" / name / "checkpoints")
        assert sa.keys() == sb.keys()
        for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
            np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(x, np.float64),
                                       rtol=1e-3, atol=1e-5, err_msg=name)
    assert (json.loads((multi / "sizes.json").read_text())
            == json.loads((single / "sizes.json").read_text()))


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_flam_batches_split_over_two_processes_match_one(tmp_path, tmp_path_factory):
    """FLAM and FLAM-Global (the smoke preset's models) over 2 processes x 2 devices: process 0
    builds the simulated data set and the other finds it; every training batch (clips and their
    frame-level texts) is split over the 4 devices; every process evaluates alone; process 0
    writes. The evaluation and both models' parameters equal one process's."""
    single, multi = _pair_vs_shared("flam", tmp_path, tmp_path_factory)
    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert a.keys() == b.keys() and any(k.startswith("test_heldout/flam/") for k in a)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5, nan_ok=True), key
    _, sa = load_numpy(single / "checkpoints")
    _, sb = load_numpy(multi / "checkpoints")
    leaves_a, leaves_b = jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"])
    assert len(leaves_a) == len(leaves_b) > 0 and leaves_a[0].shape[0] == 2  # [models, ...]
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
    rows = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_realchords_batches_and_rollouts_split_over_two_processes_match_one(tmp_path,
                                                                            tmp_path_factory):
    """ReaLchords over 2 processes x 2 devices: in every supervised stage and RL step the batch
    drawn inside the jitted step (the same crops in both layouts: a partitionable PRNG) is
    split over the 4 devices, so each device computes its share of the rollouts, rewards,
    losses and gradients; every process evaluates alone; process 0 writes. The stages' losses,
    the RL metrics, the evaluation table and the policy equal one process's."""
    single, multi = _pair_vs_shared("realchords", tmp_path, tmp_path_factory)
    for stage in ("online", "teacher", "contrastive", "discriminative", "rl-kd", "rl-c+d",
                  "rl-realchords"):
        rows_a = [json.loads(x) for x in (single / "seed0" / stage / "metrics.jsonl").read_text().splitlines()]
        rows_b = [json.loads(x) for x in (multi / "seed0" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] and rows_a
        # RL: the policy loss and the mean advantage are small differences of terms of size ~36
        # (returns, values), where rounding leaves ~1e-4 absolute (measured 7e-5)
        tol = 1e-3 if stage.startswith("rl-") else 1e-6
        for ra, rb in zip(rows_a, rows_b):
            for key in ra:
                if isinstance(ra[key], float):
                    assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=tol), (stage, ra["step"], key)
    ea = json.loads((single / "seed0" / "eval.json").read_text())
    eb = json.loads((multi / "seed0" / "eval.json").read_text())
    assert ea["table"].keys() == eb["table"].keys()
    for method, metrics in ea["table"].items():
        for key, value in metrics.items():
            assert eb["table"][method][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (method, key)
    _, sa = load_numpy(single / "seed0" / "rl-realchords" / "checkpoints")
    _, sb = load_numpy(multi / "seed0" / "rl-realchords" / "checkpoints")
    for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
    assert (multi / "examples" / "examples.json").is_file()


def _assert_summaries_and_stages_match(single, multi, stages, atol, loose, loose_atol):
    """The two runs' final metrics agree, and every weight of each stage's ``params.pkl``
    agrees to ``atol``, except those ``loose(name)`` picks (weights with a zero gradient in
    theory, see the callers), which get ``loose_atol``."""
    import pickle

    a = json.loads((single / "summary.json").read_text())["final"]
    b = json.loads((multi / "summary.json").read_text())["final"]
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4, nan_ok=True), key
    for stage in stages:
        pa = pickle.loads((single / "checkpoints" / stage / "params.pkl").read_bytes())
        pb = pickle.loads((multi / "checkpoints" / stage / "params.pkl").read_bytes())
        leaves_b = jax.tree.leaves(pb)
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(pa)[0], leaves_b, strict=True):
            name = jax.tree_util.keystr(path)
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4,
                                       atol=loose_atol if loose(name) else atol,
                                       err_msg=f"{stage} {name}")


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_dlc_stages_split_over_two_processes_match_one(tmp_path, tmp_path_factory):
    """The DLC pipeline over 2 processes x 2 devices: the classifier, SEM encoder, DiT pair and
    code models split every batch (drawn inside the jitted step) over the 4 devices; rendering,
    sampling and evaluation run on every process alone; process 0 writes the stages. The
    trained parameters and the evaluation equal one process's."""
    single, multi = _pair_vs_shared("dlc", tmp_path, tmp_path_factory)
    # The attention key bias of the code models has a gradient of exactly zero in theory (it
    # adds the same q.b to every key's logit: softmax ignores it) and of rounding size in
    # practice, which AdamW turns into steps of about lr with a sign that depends on the layout
    # (measured: up to 2.1e-4 apart after the smoke's 4 steps). Every other weight agrees to
    # 3.5e-7 (measured).
    _assert_summaries_and_stages_match(single, multi, ("classifier", "sem", "dit", "codes"), 1e-5,
                                       lambda name: "['key']['bias']" in name, 1e-3)


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
def test_bias_shift_stages_split_over_two_processes_match_one(tmp_path, tmp_path_factory):
    """bias_shift over 2 processes x 2 devices: the readers (classifiers, regressor) and the
    generators (two DiTs, a VAE) split every batch over the 4 devices; rendering, sampling and
    evaluation run on every process alone; process 0 writes the stages. The readers' and
    generators' parameters and the evaluation equal one process's."""
    single, multi = _pair_vs_shared("bias_shift", tmp_path, tmp_path_factory)
    # A conv bias followed by a GroupNorm with one channel per group (the 8-wide smoke layers)
    # is removed by the normalisation: its gradient is zero in theory and rounding-sized in
    # practice, which AdamW turns into steps of about lr (2e-3) whose sign depends on the
    # layout (measured: up to 4.4e-3 apart; the regressor's head, which sees the rounding of
    # that cancellation, 2.2e-5). Every other weight agrees to 1.5e-6 (measured).
    _assert_summaries_and_stages_match(
        single, multi, ("readers", "generators"), 5e-5,
        lambda name: "['convs']" in name and name.endswith("['bias']"), 2e-2)
