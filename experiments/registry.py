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
    "lm_pretrain": ("experiments.lm_pretrain",
                    "small Qwen3/Qwen2/Llama decoder trained from scratch on arithmetic and "
                    "Countdown, saved in HF format (the base model of the LLM RL methods)"),
    "kl_estimators": ("experiments.kl_estimators",
                      "KL estimators k1/k2/k3 in reward/loss/both for LLM RL, on-policy or "
                      "asynchronous (Comedy of Estimators, arXiv 2512.21852)"),
    "grama": ("experiments.grama",
              "GraMa vs ReDo: gradient- vs activation-based neuron inactivity and resets in SAC "
              "critics (plain, LayerNorm, residual)"),
    "flam": ("experiments.flam",
             "FLAM vs FLAM-Global: frame-wise vs clip-level language-audio training on simulated "
             "sound events, open-vocabulary SED on held-out classes (arXiv 2505.05335)"),
    "dlc": ("experiments.dlc",
            "Discrete Latent Codes: SEM tokens from a self-distilled ViT condition a pixel DiT; "
            "MDLM code prior, composition and text-to-code (arXiv 2507.12318)"),
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


def execute(exp: Experiment, cfg: Config, run_dir: RunDir, *, seeds: int = 1, resume: bool = False,
            info: dict | None = None) -> dict:
    """Run ``exp`` into ``run_dir`` the way the CLI does: write ``config.json`` and
    ``run.json``, train, then write ``summary.json`` (final metrics, ``params_sha256``, wall
    time) and the report. Returns the summary. Usable from notebooks."""
    import time

    from trainkit.config import save_json
    from trainkit.run import is_main_process, params_sha256, write_json

    info = dict(info or {"experiment": exp.name, "seeds": seeds})
    if is_main_process():
        save_json(cfg, run_dir.config_path)
    run_dir.write_run_info(info)
    start = time.time()
    result = exp.run(cfg, RunContext(run_dir=run_dir, seeds=seeds, resume=resume))
    summary = {"experiment": exp.name, "preset": info.get("preset"), "seeds": seeds,
               "steps": result.steps, "final": result.metrics,
               "params_sha256": params_sha256(result.params),
               "wall_seconds": round(time.time() - start, 2)}
    if is_main_process():
        write_json(run_dir.summary_path, summary)
        summary["report"] = exp.report(run_dir)
    return summary


def get(name: str) -> Experiment:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(REGISTRY)}"
        raise UserError(f"unknown experiment '{name}': {hint}")
    module = importlib.import_module(REGISTRY[name][0])
    return module.EXPERIMENT
