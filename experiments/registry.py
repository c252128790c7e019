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
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from trainkit.config import Config
from trainkit.run import RunDir

PRESETS = ("smoke", "cpu", "paper")

class Entry(NamedTuple):
    """One registered experiment: where it lives, the extra it needs, what it reproduces."""

    module: str
    extra: str | None  # the pyproject extra whose packages the experiment imports (None: base only)
    what: str  # one line: what it reproduces
    # True where the experiment divides its work over jax.distributed processes (docs/scaling.md);
    # the others would have every process compute the whole run, so the CLI refuses that.
    multihost: bool = False


REGISTRY: dict[str, Entry] = {
    "quickstart": Entry("experiments.quickstart", None,
                        "teacher-student MLP regression exercising the whole stack (sharding, "
                        "checkpoints, guards, logging, plots)", multihost=True),
    "lm_pretrain": Entry("experiments.lm_pretrain", "llm",
                         "small Qwen3/Qwen2/Llama decoder trained from scratch on arithmetic and "
                         "Countdown, saved in HF format (the base model of the LLM RL methods)",
                         multihost=True),
    "kl_estimators": Entry("experiments.kl_estimators", "llm",
                           "KL estimators k1/k2/k3 in reward/loss/both for LLM RL, on-policy or "
                           "asynchronous (Comedy of Estimators, arXiv 2512.21852)", multihost=True),
    "grama": Entry("experiments.grama", "rl",
                   "GraMa vs ReDo: gradient- vs activation-based neuron inactivity and resets in "
                   "SAC critics (plain, LayerNorm, residual)", multihost=True),
    "flam": Entry("experiments.flam", "audio",
                  "FLAM vs FLAM-Global: frame-wise vs clip-level language-audio training on "
                  "simulated sound events, open-vocabulary SED on held-out classes "
                  "(arXiv 2505.05335)", multihost=True),
    "dlc": Entry("experiments.dlc", "generative",
                 "Discrete Latent Codes: SEM tokens from a self-distilled ViT condition a pixel "
                 "DiT; MDLM code prior, composition and text-to-code (arXiv 2507.12318)",
                 multihost=True),
    "bias_shift": Entry("experiments.bias_shift", "generative",
                        "bias shift of unconditional generators (DiT x2, VAE): classifier-"
                        "measured vs true attribute shift, boundary density (arXiv 2506.09106)",
                        multihost=True),
    "asyppo": Entry("experiments.asyppo", "llm",
                    "AsyPPO: mini-critic ensembles that mask advantages and filter entropy by "
                    "their disagreement, vs PPO and GRPO (arXiv 2510.01656)", multihost=True),
    "stable_gradients": Entry("experiments.stable_gradients", "rl",
                              "stable gradients at scale: multi-skip residual MLP + LayerNorm + "
                              "Kron (PSGD) vs plain MLP, PQN return vs network size on MinAtar "
                              "and a non-stationary supervised control (arXiv 2506.15544)",
                              multihost=True),
    "least": Entry("experiments.least", "rl",
                   "LEAST: SAC and TD3 with and without learned early stopping of unproductive "
                   "episodes on MuJoCo (brax) and DMC tasks (arXiv 2506.13672)", multihost=True),
    "cot_sft": Entry("experiments.cot_sft", "llm",
                     "CoT-trace SFT: human, teacher-correct/wrong, paraphrased and graded-flaw "
                     "traces at equal token budgets (Shape of Thought, arXiv 2512.22255)", multihost=True),
    "realchords": Entry("experiments.realchords", "audio",
                        "ReaLchords: online chord accompaniment by RL with contrastive and "
                        "discriminative rewards and offline-teacher distillation, Bach chorales "
                        "(ICML 2024)", multihost=True),
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
    # seed-level report of several runs of one configuration that ran one seed each:
    # combine(run_dirs, out_dir) -> path of the report it wrote (None: seeds run inside a run)
    combine: Callable[[list[RunDir], Path], str] | None = None

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


# Top-level packages of this project: a ModuleNotFoundError naming one of them is a bug, not a
# missing extra.
_OWN_PACKAGES = frozenset({"trainkit", "jaxrl_suite", "llm_rl", "generative", "audio",
                           "experiments"})


def install_command(extra: str) -> str:
    """The exact command that installs ``extra`` into the running interpreter."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists():  # a source checkout: editable install of it
        return f"{sys.executable} -m pip install -e '{root}[{extra}]'"
    return f"{sys.executable} -m pip install 'jaxresearch[{extra}]'"


def _extra_requirements(extra: str) -> list[str]:
    """Distribution names the installed project lists under ``extra`` (extras that name other
    extras, like ``all``, expanded); empty when the project is not installed (a bare source
    tree on PYTHONPATH has no metadata to check against)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("jaxresearch") or []
    except metadata.PackageNotFoundError:
        return []
    names: list[str] = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": extra}):
            continue
        if req.name == "jaxresearch":
            for inner in sorted(req.extras):
                names += _extra_requirements(inner)
        else:
            names.append(req.name)
    return names


def missing_for_extra(extra: str) -> str | None:
    """The first package of ``extra`` that cannot be imported here, as
    ``"module 'm' (package p)"``, or None when all of them can.

    A package counts as missing when its distribution is not installed, or when one of the
    top-level modules it provides cannot be found (``importlib.util.find_spec``)."""
    import importlib.util
    from importlib import metadata

    for dist in _extra_requirements(extra):
        try:
            installed = metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            return f"package '{dist}'"
        for module in _top_level_modules(installed):
            if module.startswith("_") or "-" in module:
                continue
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"module '{module}' (package {dist})"
    return None


def _top_level_modules(dist) -> list[str]:
    """The top-level modules an installed distribution provides: its ``top_level.txt``, else
    the first part of each path in its RECORD (what ``metadata.packages_distributions`` reads,
    for this one distribution instead of all ~300 installed: 0.3 s per run on CI)."""
    declared = (dist.read_text("top_level.txt") or "").split()
    if declared:
        return declared
    import inspect

    tops = set()
    for file in dist.files or []:  # a directory, or a module file (x.py, x.cpython-311-....so)
        top = file.parts[0] if len(file.parts) > 1 else inspect.getmodulename(str(file)) or str(file)
        if "." not in top:  # not importable: x.dist-info, x.libs, ...
            tops.add(top)
    return sorted(tops)


def require_extra(name: str) -> None:
    """Raise :class:`UserError` (one line: what is missing and the install command) when the
    extra that experiment ``name`` declares is not installed."""
    extra = REGISTRY[name].extra
    if extra is None:
        return
    missing = missing_for_extra(extra)
    if missing is not None:
        raise UserError(f"experiment '{name}' needs the '{extra}' extra, but {missing} is not "
                        f"installed; install it with: {install_command(extra)}")


def missing_module_error(name: str, err: ModuleNotFoundError) -> Exception:
    """The one-line :class:`UserError` for a third-party module missing while experiment
    ``name`` imports or runs; a missing module of this project itself stays the bug it is."""
    top = (err.name or "").split(".")[0]
    if not top or top in _OWN_PACKAGES:
        return err
    extra = REGISTRY[name].extra
    if extra is None:
        return UserError(f"experiment '{name}' imports module '{top}', which is not installed "
                         "and which no extra of this project declares (a bug: please report it)")
    return UserError(f"experiment '{name}' needs module '{top}', which is not installed; install "
                     f"the project with its '{extra}' extra: {install_command(extra)}")


def entry(name: str) -> Entry:
    """The registry entry of ``name``; :class:`UserError` with close matches when unknown."""
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(REGISTRY)}"
        raise UserError(f"unknown experiment '{name}': {hint}")
    return REGISTRY[name]


def require_multihost(name: str, processes: int) -> None:
    """Raise :class:`UserError` when a run over ``processes`` > 1 processes asks for an
    experiment that does not divide its work over them (every process would compute, and
    write, the whole run)."""
    if processes > 1 and not entry(name).multihost:
        able = ", ".join(n for n, e in REGISTRY.items() if e.multihost)
        raise UserError(f"experiment '{name}' does not divide its work over processes yet, so each "
                        f"of these {processes} processes would compute the whole run; run it as "
                        f"one process, or run one that does: {able} (docs/scaling.md)")


def get(name: str) -> Experiment:
    """Import experiment ``name``, after checking that its extra is installed."""
    module_name = entry(name).module
    require_extra(name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        error = missing_module_error(name, err)
        if isinstance(error, UserError):
            raise error from None
        raise
    return module.EXPERIMENT
