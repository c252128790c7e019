"""Helpers shared by tests."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """Environment for running `python -m experiments` in a child process (1 CPU device)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, env, timeout=300, **kw):
    """Run `python -m experiments ARGS` from the repo root; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def start_cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "experiments", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
