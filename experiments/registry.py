"""The experiment protocol and the registry of experiments.

Each experiment module defines ``EXPERIMENT = Experiment(...)``: its config class, presets
(``smoke`` in seconds for tests, ``cpu`` in minutes on a laptop showing the paper's effect,
``paper`` with the paper's settings), a ``run`` function and a ``report`` function.
Modules are imported lazily so ``list`` stays fast and one domain's missing extra does not
break the others.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

from trainkit.config import Config
from trainkit.run import RunDir

PRESETS = ("smoke", "cpu", "paper")

# name -> (module, one line: what it reproduces)
REGISTRY: dict[str, tuple[str, str]] = {
    "quickstart": ("experiments.quickstart",
                   "teacher-student MLP regression exercising the whole stack (sharding, "
                   "checkpoints, guards, logging, plots)"),
}


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


@dataclasses.dataclass
class RunContext:
    run_dir: RunDir
    seeds: int = 1
    resume: bool = False


@dataclasses.dataclass
class RunResult:
    params: Any  # final parameters (hashed into summary.json as params_sha256)
    metrics: dict[str, float]  # final metrics for summary.json
    steps: int


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config_cls: type[Config]
    presets: Mapping[str, Callable[[], Config]]
    run: Callable[[Config, RunContext], RunResult]
    report: Callable[[RunDir], str]  # writes report.md and plots/ from the run's files

    def preset(self, name: str) -> Config:
        if name not in self.presets:
            raise UserError(f"experiment '{self.name}' has no preset '{name}'; "
                            f"choose one of: {', '.join(self.presets)}")
        return self.presets[name]()


def get(name: str) -> Experiment:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(REGISTRY)}"
        raise UserError(f"unknown experiment '{name}': {hint}")
    module = importlib.import_module(REGISTRY[name][0])
    return module.EXPERIMENT
