"""python -m experiments list | show NAME | run NAME ... | report RUN_DIR | combine OUT RUN_DIR... | extra NAME

Exit codes: 0 success, 1 training failure (non-finite streak), 2 user error (one line on
stderr, no traceback), 128+signal when stopped by SIGTERM/SIGINT after checkpointing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse prints usage too)
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list experiments and what each reproduces")
    show = sub.add_parser("show", help="print an experiment's config keys, values and help")
    show.add_argument("name")
    show.add_argument("--preset", default="smoke")
    run = sub.add_parser("run", help="run an experiment")
    run.add_argument("name")
    run.add_argument("--preset", default=None, help="smoke | cpu | paper (default: smoke)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    run.add_argument("--run-dir", default=None, help="default: runs/NAME/PRESET-TIMESTAMP")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (default 1)")
    report = sub.add_parser("report", help="regenerate report.md and plots of a run")
    report.add_argument("run_dir")
    combine = sub.add_parser("combine", help="seed-level report of runs that differ only in "
                                             "their seed (experiments that run one seed per run)")
    combine.add_argument("out_dir", help="directory for report.md, metrics.json and plots/")
    combine.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    extra = sub.add_parser("extra", help="print the pyproject extra an experiment needs "
                                         "(empty: the base install is enough)")
    extra.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from experiments.registry import UserError  # light import, no JAX yet

    try:
        if args.command == "list":
            return _list()
        if args.command == "extra":
            return _extra(args)
        _quiet_orbax()
        # Multi-host: must start before anything touches the JAX backend.
        from trainkit.sharding import initialize_distributed

        try:
            initialize_distributed()
        except ValueError as err:
            raise UserError(str(err)) from None
        if args.command == "show":
            return _show(args)
        if args.command == "run":
            return _run(args)
        if args.command == "combine":
            return _combine(args)
        return _report(args)
    except UserError as err:
        return _fail(str(err))
    except Exception as err:  # user-facing errors of trainkit: one line, exit 2
        from trainkit.checkpoint import CheckpointError
        from trainkit.config import ConfigError
        from trainkit.run import RunDirError

        if isinstance(err, (ConfigError, RunDirError, CheckpointError)):
            return _fail(str(err))
        raise


def _quiet_orbax() -> None:
    """Keep orbax's own output off stderr, so a bad checkpoint reads as one line.

    Orbax logs what it finds wrong (a corrupt ``_CHECKPOINT_METADATA``, say) as absl ERROR
    records before raising; the CLI reports the failure itself (CheckpointError, exit 2).
    And when a restore fails mid-read, tensorstore reads still in flight complete into
    orbax's already closed event loop, which prints "RuntimeError: Event loop is closed"
    tracebacks as unraisable exceptions, after the error line. This drops every log record
    that comes from the orbax package, tensorflow_datasets' records below ERROR (its "Using
    custom data configuration" warning on every builder of a generated dataset), and exactly
    that unraisable RuntimeError; other absl/logging output is untouched. Idempotent, so in-process callers may call ``main`` again."""
    import logging

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxRecords) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxRecords())
    if not getattr(sys.unraisablehook, "_drops_closed_loop", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            exc = unraisable.exc_value
            if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
                return
            previous(unraisable)

        hook._drops_closed_loop = True
        sys.unraisablehook = hook


class _DropOrbaxRecords:
    """logging filter: drop records logged from inside the orbax package, and those below
    ERROR from inside tensorflow_datasets."""

    def filter(self, record) -> bool:
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        return not (f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname
                    and record.levelno < logging.ERROR)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def _list() -> int:
    from experiments.registry import REGISTRY

    width = max(len(n) for n in REGISTRY)
    for name, entry in REGISTRY.items():
        print(f"{name:<{width}}  {entry.what}")
    return 0


def _extra(args) -> int:
    """Print the experiment's extra (what ``make demo`` installs), without importing it."""
    from experiments.registry import entry

    print(entry(args.name).extra or "")
    return 0


def _show(args) -> int:
    from experiments.registry import get
    from trainkit.config import describe

    exp = get(args.name)
    cfg = exp.preset(args.preset)
    print(f"{exp.name} (preset {args.preset}): {exp.description}")
    for key, value, help_text in describe(cfg):
        print(f"  {key} = {value!r}" + (f"    # {help_text}" if help_text else ""))
    return 0


def _run(args) -> int:
    from experiments.registry import (
        UserError,
        execute,
        get,
        missing_module_error,
        require_multihost,
    )
    from trainkit import config as tc
    from trainkit.run import RunDir, is_main_process, read_json

    exp = get(args.name)
    import jax  # initialised for this process by main() (initialize_distributed)

    require_multihost(exp.name, jax.process_count())
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.resume:
        if not args.run_dir:
            raise UserError("--resume needs --run-dir (the directory of the run to continue)")
        run_dir = RunDir(args.run_dir, must_exist=True)
        info = read_json(run_dir.run_info_path) if run_dir.run_info_path.exists() else {}
        if info.get("experiment", exp.name) != exp.name:
            raise UserError(f"{run_dir.path} holds a run of '{info['experiment']}', not '{exp.name}'")
        cfg = tc.apply_overrides(tc.load_json(exp.config_cls, run_dir.config_path), args.overrides)
        if not run_dir.run_info_path.exists():  # execute writes config.json, then run.json
            raise UserError(f"{run_dir.run_info_path} is missing, so {run_dir.path} is not a run "
                            "this command started; start a new run in another --run-dir")
        preset = info.get("preset", args.preset)
        seeds = info.get("seeds", 1) if args.seeds is None else args.seeds
        if seeds != info.get("seeds", seeds):
            raise UserError(f"--seeds {seeds} differs from the run's {info['seeds']}; "
                            "a resumed run keeps its seeds")
        info.setdefault("resumed", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                               "overrides": args.overrides})
    else:
        preset = args.preset or "smoke"
        cfg = tc.apply_overrides(exp.preset(preset), args.overrides)
        seeds = args.seeds or 1
        path = args.run_dir or os.path.join("runs", exp.name,
                                            f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if Path(path, "checkpoints").is_dir() and any(Path(path, "checkpoints").iterdir()):
            raise UserError(f"{path} already holds a run; pass --resume to continue it or "
                            "choose another --run-dir")
        run_dir = RunDir(path)
        info = {"experiment": exp.name, "preset": preset, "overrides": args.overrides,
                "seeds": seeds}
    from trainkit.guards import NonFiniteError
    from trainkit.loop import Interrupted

    try:
        summary = execute(exp, cfg, run_dir, seeds=seeds, resume=args.resume, info=info)
    except ModuleNotFoundError as err:  # a lazily imported package of a missing extra
        error = missing_module_error(exp.name, err)
        if isinstance(error, UserError):
            raise error from None
        raise
    except Interrupted as err:
        sys.stderr.write(f"{err}; continue with: python -m experiments run {exp.name} "
                         f"--run-dir {run_dir.path} --resume\n")
        return 128 + err.signum
    except NonFiniteError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    if is_main_process():
        print(f"run directory: {run_dir.path}\nreport: {summary['report']}")
    return 0


def _report(args) -> int:
    from experiments.registry import UserError, get
    from trainkit.run import RunDir, read_json

    run_dir = RunDir(args.run_dir, must_exist=True)
    info = read_json(run_dir.run_info_path)
    if "experiment" not in info:
        raise UserError(f"{run_dir.run_info_path} does not name its experiment")
    print(get(info["experiment"]).report(run_dir))
    return 0


def _combine(args) -> int:
    from experiments.registry import UserError, get
    from trainkit.run import RunDir, read_json

    run_dirs = [RunDir(p, must_exist=True) for p in args.run_dirs]
    names = {read_json(r.run_info_path).get("experiment") if r.run_info_path.is_file() else None
             for r in run_dirs}
    if len(names) != 1 or None in names:
        raise UserError(f"the run directories must be runs of one experiment; found {sorted(map(str, names))}")
    exp = get(names.pop())
    if exp.combine is None:
        raise UserError(f"'{exp.name}' runs its seeds inside one run (--seeds N) and reports "
                        "them there; combine is for experiments that run one seed per run")
    print(exp.combine(run_dirs, Path(args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
