"""Test-wide setup: 8 simulated CPU devices (set before JAX initialises), caches in tmp."""

import atexit
import os
import re
import shutil
import tempfile

from tests.helpers import FAST_COMPILE  # imports no JAX: XLA_FLAGS below still take effect

# 8 simulated devices, whatever XLA_FLAGS the caller set: a pre-set XLA_FLAGS without the
# device count used to turn every 8-device sharding test into a quiet skip.
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
# Unoptimised XLA for the in-process tests: most of them are compilation-bound (a few steps of
# many small programs), and optimisation level 0 ran a sample of the slowest files (vit_dino,
# dit, ppo, pqn, stable_networks, asyppo; 125 tests, 2 workers) in 330 s instead of 426 s. It
# changes how XLA fuses, not what a program computes: every comparison in a test is within one
# process and one set of flags, or to a tolerance. `make demo` runs XLA's defaults (the
# notebooks too where that is faster: tests/test_notebooks.py); TRAINKIT_TEST_XLA_DEFAULT=1
# runs the tests with them too.
if "--xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} {FAST_COMPILE}"
os.environ["XLA_FLAGS"] = f"{_flags.strip()} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "mpl-tests"))
os.environ.setdefault("TRAINKIT_NO_PROGRESS", "1")
# A persistent compilation cache for this test session, inherited by the `python -m experiments`
# child processes: a resumed run (SIGTERM/SIGKILL tests, --resume smoke runs) loads the programs
# its first run compiled instead of compiling them again. Fresh per session, so no stale entries,
# and removed when the process that made it exits (the xdist workers and children inherit it).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-tests-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from tests.helpers import child_env  # noqa: E402


@pytest.fixture
def subprocess_env():
    return child_env()



# In CI (CI=true, set by .ci/run) a sharding test skipped for want of devices fails the run.
_DEVICE_SKIP = "(simulated) devices"
_device_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and _DEVICE_SKIP in str(report.longrepr):
        _device_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and _device_skips:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"error: {len(_device_skips)} sharding tests were skipped for want of simulated "
            f"devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}): {_device_skips[:5]}", red=True)
        session.exitstatus = 1


# A test marked ``xla_default`` runs in a child pytest with XLA's default optimisation: for the
# few in-process tests bound by run time rather than compilation (hundreds of training steps),
# where optimisation level 0 costs more than it saves. Measured on 2 cores, same load, level 0
# vs default: attribute classifier 99 vs 61 s, PQN CartPole 85 vs 55 s; the DiT, the code
# denoiser and the DINO encoder tests gained nothing (37 vs 39, 42 vs 38, 62 vs 74 s).
# ``--runxfail``: the parent applies the test's xfail marker to the child's outcome.
@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("xla_default") is None or not FAST_COMPILE:
        return None
    import subprocess
    import sys

    from tests.helpers import REPO

    env = dict(os.environ, TRAINKIT_TEST_XLA_DEFAULT="1")
    env.pop("XLA_FLAGS", None)  # this conftest sets the device count again in the child
    res = subprocess.run([sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-n0", "-q", "-s",
                          "--runxfail", "-p", "no:cacheprovider"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    sys.stdout.write(res.stdout[-20000:])
    if res.returncode != 0:
        pytest.fail(f"failed in a child pytest with XLA's default flags (exit {res.returncode}):\n"
                    f"{res.stdout[-6000:]}\n{res.stderr[-3000:]}", pytrace=False)
    return True
