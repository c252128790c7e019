"""Test-wide setup: 8 simulated CPU devices (set before JAX initialises), caches in tmp."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "mpl-tests"))
os.environ.setdefault("TRAINKIT_NO_PROGRESS", "1")
# A persistent compilation cache for this test session, inherited by the `python -m experiments`
# child processes: a resumed run (SIGTERM/SIGKILL tests, --resume smoke runs) loads the programs
# its first run compiled instead of compiling them again. Fresh per session, so no stale entries.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-tests-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from tests.helpers import child_env  # noqa: E402


@pytest.fixture
def subprocess_env():
    return child_env()

