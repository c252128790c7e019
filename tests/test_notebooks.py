"""Every notebooks/*.ipynb runs top to bottom in a fresh kernel of this Python.

The kernel is started from a kernelspec written for ``sys.executable`` (the venv's python),
not looked up by name: a ``python3`` kernelspec in ~/.local/share/jupyter or on
JUPYTER_PATH would otherwise win, and it may belong to another Python without the project.
"""

import os
import sys
from pathlib import Path

import nbformat
import pytest

from tests.helpers import FAST_COMPILE

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
# Most notebooks are mostly compilation (many small programs, a few steps each) and run faster
# with the suite's FAST_COMPILE flags: the ten other than dlc took 285 s at XLA's defaults and 208 s
# fast (stable_gradients 82 -> 41 s; each alone, fresh compilation cache, one core). A notebook
# that trains for hundreds of steps runs faster at XLA's default optimisation and keeps it
# (dlc: 125 s default, 151 s fast): it is marked ``xla_default`` (tests/conftest.py), which runs
# it in a child pytest whose FAST_COMPILE is empty. `make demo` runs XLA's defaults.
XLA_DEFAULT_NOTEBOOKS = {"dlc.ipynb"}


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {REPO / 'notebooks'}"


# Registered experiments that are not methods (lm_pretrain trains the LLM methods' base model;
# quickstart has its own notebook), and methods whose notebook is still owed (visible debt:
# remove a name when its notebook lands).
NOT_METHODS = {"lm_pretrain"}
NOTEBOOK_OWED: set[str] = set()


def test_every_method_has_a_notebook_of_its_name():
    from experiments.registry import REGISTRY

    names = {p.stem for p in NOTEBOOKS}
    missing = sorted(set(REGISTRY) - NOT_METHODS - NOTEBOOK_OWED - names)
    assert not missing, f"registered experiments without notebooks/<name>.ipynb: {missing}"
    assert not (NOTEBOOK_OWED & names), "a notebook landed: drop its name from NOTEBOOK_OWED"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name} cell {i} holds outputs; clear them before committing"


def _kernel_manager(tmp_path):
    """A kernel manager whose only ``python3`` kernelspec runs ``sys.executable``."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    write_kernel_spec(str(kernels / "python3"))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    return km


@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=[pytest.mark.xla_default]
                                               if p.name in XLA_DEFAULT_NOTEBOOKS else [])
                                  for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop
    if FAST_COMPILE:
        env["XLA_FLAGS"] = FAST_COMPILE
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLCONFIGDIR"] = str(tmp_path / "mpl")
    env["TRAINKIT_NO_PROGRESS"] = "1"
    env["TMPDIR"] = str(tmp_path)  # run directories made with tempfile land here
    env["IPYTHONDIR"] = str(tmp_path / "ipython")  # no user profile, no history file
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                            kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    # raises CellExecutionError naming the cell and its traceback. cleanup_kc: shut the kernel
    # down afterwards (nbclient leaves a kernel it did not create running, holding its memory
    # until the pytest worker exits)
    client.execute(env=env, cleanup_kc=True)
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
