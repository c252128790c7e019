"""Helpers shared by tests."""

import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# XLA flags for the tests and their child runs, which are almost all compilation (many small
# programs, a few steps each): unoptimised programs compile several times faster. Measured on
# 2 cores: smoke runs asyppo 40 -> 27 s, bias_shift 58 -> 34, grama 55 -> 41, least 36 -> 25.
# Empty with TRAINKIT_TEST_XLA_DEFAULT=1 (XLA's defaults, as `make demo` and the notebooks run).
FAST_COMPILE = ("" if os.environ.get("TRAINKIT_TEST_XLA_DEFAULT") else
                "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def child_env() -> dict[str, str]:
    """Environment for running `python -m experiments` in a child process: 1 CPU device,
    :data:`FAST_COMPILE`."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if FAST_COMPILE:
        env["XLA_FLAGS"] = FAST_COMPILE
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, env, timeout=300, **kw):
    """Run `python -m experiments ARGS` from the repo root; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def start_cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "experiments", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --- the smoke run of each experiment, once per test session ------------------------------------


@dataclasses.dataclass(frozen=True)
class SmokeSpec:
    """How the tests run an experiment's smoke preset. ``args`` follow ``run NAME --preset
    smoke``; ``{name}`` in an arg is the run directory of another experiment's shared smoke run
    (kl_estimators starts from lm_pretrain's model). ``xla_flags`` replaces
    :func:`child_env`'s (:data:`FAST_COMPILE`)."""

    args: tuple[str, ...] = ()
    xla_flags: str | None = None

    def env(self) -> dict[str, str]:
        env = child_env()
        if self.xla_flags:
            env["XLA_FLAGS"] = self.xla_flags
        return env


SMOKE = {
    "asyppo": SmokeSpec(),
    "bias_shift": SmokeSpec(),
    "cot_sft": SmokeSpec(),
    # ~40 programs, the DINO step the largest: level 0 (FAST_COMPILE) runs it in 59 s vs 75 s at
    # level 1, the level it had before (fresh compilation cache, twice each, 2 cores)
    "dlc": SmokeSpec(),
    "flam": SmokeSpec(),
    "grama": SmokeSpec(("--seeds", "2", "--set", "critics=mlp", "--set", "resets=none,regrama",
                        "--set", "agents=sac,td3")),
    "kl_estimators": SmokeSpec(("--set", "base.model_dir={lm_pretrain}/model",
                                "--set", "grid.configs=none,k1-reward,k3-both")),
    "least": SmokeSpec(("--seeds", "2")),
    "lm_pretrain": SmokeSpec(),
    "quickstart": SmokeSpec(("--seeds", "2")),
    "realchords": SmokeSpec(),
    "stable_gradients": SmokeSpec(("--seeds", "2")),
}


# pytest-timeout for a test that asks for a shared smoke run: besides its own work it may wait
# for the run another xdist worker is making (the default 600 s timed out on a loaded machine).
SHARED_RUN_TIMEOUT = 1800


@dataclasses.dataclass(frozen=True)
class SharedRun:
    path: Path  # read-only: a test that changes files works on copy_run(...)
    stdout: str
    spec: SmokeSpec
    args: tuple[str, ...]  # the full CLI args, --run-dir excluded


def shared_smoke_run(name: str, tmp_path_factory, timeout: int = 900) -> SharedRun:
    """``python -m experiments run NAME --preset smoke <SMOKE[name].args>`` run once per test
    session and shared by every test that asks for it (the experiment's own smoke test and the
    kill/resume sweep), across pytest-xdist workers: the first caller runs it under a file
    lock in the session's shared temp dir, the others wait for it and read the result."""
    spec = SMOKE[name]
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # per-worker basetemp; its parent is the session's
    shared = root / "shared-smoke-runs"
    shared.mkdir(exist_ok=True)
    args = ["run", name, "--preset", "smoke"]
    for arg in spec.args:
        if "{" in arg:
            other = arg[arg.index("{") + 1: arg.index("}")]
            arg = arg.replace("{" + other + "}", str(shared_smoke_run(other, tmp_path_factory).path))
        args.append(arg)
    run_dir = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"{name}.json"
        if not done.exists():
            res = run_cli([*args, "--run-dir", str(run_dir)], spec.env(), timeout=timeout)
            done.write_text(json.dumps({"returncode": res.returncode, "stdout": res.stdout,
                                        "stderr": res.stderr[-5000:]}))
        result = json.loads(done.read_text())
    assert result["returncode"] == 0, f"the shared smoke run of {name} failed:\n{result['stderr']}"
    return SharedRun(run_dir, result["stdout"], spec, tuple(args))


def copy_run(run: SharedRun, dest: Path) -> Path:
    """A private copy of a shared run directory, for tests that resume or edit it."""
    shutil.copytree(run.path, dest)
    return dest
