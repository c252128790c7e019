"""Every registered experiment declares the pyproject extra it needs, that extra (with the base
dependencies) covers every third-party module its code can import, and an install without
the extra is refused with one line naming the module and the install command.

`make demo DEMO=<name>` installs exactly the base and the declared extra on a fresh machine,
so a module outside them is a `make demo` that fails for a newcomer (as it once did:
kl_estimators on a base-only install died in `import tokenizers`).
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from experiments.registry import REGISTRY, UserError, missing_module_error
from tests.helpers import REPO, child_env

OWN = {"trainkit", "jaxrl_suite", "llm_rl", "generative", "audio", "experiments"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
        for n in names)


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a ``try`` whose handlers catch ImportError and fall back
    instead of raising: optional imports (e.g. pyfluidsynth, else pretty_midi's sine synthesis)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        handlers = [h for h in getattr(node, "handlers", []) if _catches_import_error(h)]
        # a handler that raises again (a clearer message) marks a required import, not a fallback
        if (isinstance(node, ast.Try) and handlers
                and not any(isinstance(n, ast.Raise) for h in handlers for n in ast.walk(h))):
            for stmt in node.body:
                out |= {id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def _third_party_imports(module: str) -> dict[str, str]:
    """{top-level third-party module: the project file that imports it}, over every project
    module reachable by imports from ``module`` (imports inside functions included; imports in a
    ``try`` whose ImportError handler falls back without raising are optional and left out)."""
    seen: set[str] = set()
    found: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = _module_file(name)
        if file is None:
            continue
        tree = ast.parse(file.read_text(), str(file))
        optional = _optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                top = target.split(".")[0]
                if top in OWN:
                    # every package on the way is imported too (its __init__ runs)
                    parts = target.split(".")
                    todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, str(file.relative_to(REPO)))
    return found


def _closure(requirement_lines: list[str], extras: set[str]) -> set[str]:
    """Normalised names of the distributions these requirements install, transitively (markers
    evaluated for this interpreter; our own extras expanded)."""
    env = default_environment()
    names: set[str] = set()
    todo = [(line, frozenset(extras)) for line in requirement_lines]
    while todo:
        line, active = todo.pop()
        req = Requirement(line)
        if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": e}) for e in (active or {""})):
            continue
        name = _norm(req.name)
        if name == "jaxresearch":
            for e in req.extras:
                todo += [(r, frozenset()) for r in EXTRAS[e]]
            continue
        if name in names:
            continue
        names.add(name)
        try:
            sub = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [(r, frozenset(req.extras)) for r in sub]
    return names


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distributions_of(module: str) -> set[str]:
    return {_norm(d) for d in _packages_distributions().get(module, [])}


def test_every_experiment_declares_an_extra_of_the_project():
    for name, entry in REGISTRY.items():
        assert entry.extra is None or entry.extra in EXTRAS, (name, entry.extra, list(EXTRAS))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_declared_extra_covers_every_import(name):
    entry = REGISTRY[name]
    allowed = _closure(PYPROJECT["project"]["dependencies"]
                       + (EXTRAS[entry.extra] if entry.extra else []), set())
    missing = {}
    for module, where in _third_party_imports(entry.module).items():
        dists = _distributions_of(module)
        assert dists, f"{module} (imported in {where}) is not installed in the test environment"
        if not dists & allowed:
            missing[module] = (where, sorted(dists))
    assert not missing, (f"'{name}' declares extra {entry.extra!r}, whose install lacks: "
                         f"{missing}; add them to that extra in pyproject.toml")


def test_the_import_walk_sees_lazy_imports():
    # the walk must see imports inside functions (kl_estimators' tokenizer is one): else the
    # coverage test above could pass while `make demo` fails
    imports = _third_party_imports("experiments.kl_estimators")
    assert "tokenizers" in imports and "jax" in imports, sorted(imports)


def test_missing_third_party_module_is_a_user_error_naming_the_install():
    err = missing_module_error("kl_estimators", ModuleNotFoundError("no", name="tokenizers.models"))
    assert isinstance(err, UserError)
    assert "'tokenizers'" in str(err) and "pip install -e" in str(err) and "[llm]" in str(err)


def test_missing_own_module_stays_a_bug():
    err = ModuleNotFoundError("no", name="llm_rl.nothing")
    assert missing_module_error("kl_estimators", err) is err


@pytest.mark.parametrize("name", ["kl_estimators", "grama"])
def test_an_install_without_the_extra_is_refused_in_one_line(name, tmp_path):
    """Simulates a base-only install: every module of the experiment's extra's own
    distributions is made unimportable (sys.modules[m] = None) in the child interpreter."""
    extra = REGISTRY[name].extra
    blocked = set()
    for line in EXTRAS[extra]:
        blocked |= {m for m, ds in _packages_distributions().items()
                    if _norm(Requirement(line).name) in map(_norm, ds)
                    and m.isidentifier()}
    assert blocked
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in sorted(blocked)))
    env = child_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-m", "experiments", "run", name, "--run-dir",
                           str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"'{extra}' extra" in lines[0] and f"[{extra}]" in lines[0], lines[0]
    assert re.search(r"module '(\w+)'", lines[0]).group(1) in blocked, lines[0]
    assert not (tmp_path / "run").exists()  # refused before creating the run directory


def test_extra_command_prints_what_make_demo_installs():
    proc = subprocess.run([sys.executable, "-m", "experiments", "extra", "flam"], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == REGISTRY["flam"].extra
    proc = subprocess.run([sys.executable, "-m", "experiments", "extra", "nope"], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown experiment")
