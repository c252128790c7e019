"""Launch ``python -m experiments run ...`` on every host of a TPU VM pod or a SLURM job.

Nothing here is cluster code: each launcher starts the same command once per host (TPU: once
per worker VM; SLURM: once per node or per GPU), and :func:`trainkit.sharding.
initialize_distributed` hands the rest to ``jax.distributed.initialize()``, which reads its
settings from the environment. ``--dry-run`` prints the exact commands (or the batch script)
instead of running them::

    python -m trainkit.launch tpu --name my-v4-32 --zone us-central2-b --dry-run -- \\
        run lm_pretrain --preset paper --run-dir runs/lm --set mesh.fsdp=-1
    python -m trainkit.launch slurm --nodes 2 --gpus-per-node 8 --dry-run -- \\
        run lm_pretrain --preset paper --run-dir runs/lm

Every host must write into the same run directory, so when the experiment arguments name no
``--run-dir`` the launcher picks one (``runs/NAME/PRESET-TIMESTAMP``, the CLI's default,
timestamped once here rather than once per host). ``--checkpoint-root gs://bucket/prefix``
puts the run's orbax checkpoints in an object store (``TRAINKIT_CHECKPOINT_ROOT``, see
:class:`trainkit.run.RunDir`): on a pod, workers' local disks are not shared, so resuming
after the VMs are recreated needs a remote checkpoint directory.

How each launcher gets JAX's settings:

* TPU VM: ``TRAINKIT_DISTRIBUTED=auto``; JAX asks the TPU metadata server for the workers,
  the coordinator (worker 0) and this worker's id.
* SLURM, one task per GPU (``--tasks per-gpu``): ``TRAINKIT_DISTRIBUTED=auto``; JAX's SLURM
  detection reads ``SLURM_NTASKS``/``SLURM_PROCID``, takes the first host of
  ``SLURM_STEP_NODELIST`` as coordinator and binds each task to GPU ``SLURM_LOCALID``.
* SLURM, one task per node (``--tasks per-node``): the explicit settings, because JAX's SLURM
  detection would bind the single task of a node to its first GPU only: the script takes the
  coordinator from the node list (``scontrol show hostnames``, first host, ``--port``), and
  each task sets ``TRAINKIT_PROCESS_ID=$SLURM_PROCID`` and ``TRAINKIT_NUM_PROCESSES=$SLURM_NTASKS``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SLURM_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # TPU VM names (GCE resource names)


class LaunchError(ValueError):
    """A bad launcher argument; the message names the option and what is allowed."""


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{"K": "V"}``; a malformed pair names itself."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise LaunchError(f"--env {pair!r}: expected NAME=VALUE with NAME a shell variable "
                              "name (letters, digits, _)")
        env[name] = value
    return env


def experiment_args(args: Sequence[str], *, timestamp: str | None = None) -> list[str]:
    """Check the ``python -m experiments`` arguments and give them a ``--run-dir`` shared by
    every host when they name none."""
    args = list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    if len(args) < 2 or args[0] != "run" or args[1].startswith("-"):
        raise LaunchError("after '--' give the experiment command, e.g. "
                          "'-- run lm_pretrain --preset smoke' (got: "
                          f"{shlex.join(args) or 'nothing'})")
    if not any(a == "--run-dir" or a.startswith("--run-dir=") for a in args):
        if "--resume" in args:
            raise LaunchError("--resume needs the --run-dir of the run to continue")
        preset = "smoke"
        for i, a in enumerate(args):
            if a == "--preset" and i + 1 < len(args):
                preset = args[i + 1]
            elif a.startswith("--preset="):
                preset = a.split("=", 1)[1]
        stamp = timestamp or time.strftime("%Y%m%d-%H%M%S")
        args += ["--run-dir", f"runs/{args[1]}/{preset}-{stamp}"]
    return args


@dataclass
class Common:
    """What both launchers share: the experiment arguments and the run's environment."""

    args: list[str]
    workdir: str = "."
    python: str = "python"
    env: dict[str, str] = field(default_factory=dict)
    checkpoint_root: str | None = None

    def run_env(self, distributed: dict[str, str]) -> dict[str, str]:
        env = dict(distributed)
        if self.checkpoint_root:
            env["TRAINKIT_CHECKPOINT_ROOT"] = self.checkpoint_root
        env.setdefault("TRAINKIT_NO_PROGRESS", "1")  # a bar per host would interleave in one log
        env.update(self.env)
        return env

    def experiment_command(self) -> str:
        return shlex.join([self.python, "-m", "experiments", *self.args])


def tpu_command(common: Common, *, name: str, zone: str, project: str | None = None,
                worker: str = "all") -> list[str]:
    """The ``gcloud`` argv that runs the experiment on every worker of TPU VM ``name``."""
    if not _NAME.fullmatch(name):
        raise LaunchError(f"--name {name!r}: a TPU name is lowercase letters, digits and '-', "
                          "starting with a letter")
    if not zone:
        raise LaunchError("--zone is required (e.g. us-central2-b)")
    if worker != "all" and not re.fullmatch(r"\d+(,\d+)*", worker):
        raise LaunchError(f"--worker {worker!r}: 'all' or comma-separated worker numbers")
    env = common.run_env({"TRAINKIT_DISTRIBUTED": "auto"})
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    remote = f"cd {shlex.quote(common.workdir)} && {exports} {common.experiment_command()}"
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--zone", zone]
    if project:
        argv += ["--project", project]
    return argv + [f"--worker={worker}", "--command", remote]


def slurm_script(common: Common, *, nodes: int, gpus_per_node: int = 0, tasks: str = "per-gpu",
                 job_name: str = "trainkit", partition: str | None = None,
                 time_limit: str | None = None, cpus_per_task: int | None = None,
                 port: int = 61234, output: str | None = None) -> str:
    """An ``sbatch`` script that starts the experiment once per GPU or once per node."""
    if nodes < 1:
        raise LaunchError(f"--nodes {nodes}: must be >= 1")
    if gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {gpus_per_node}: must be >= 0")
    if tasks not in ("per-gpu", "per-node"):
        raise LaunchError(f"--tasks {tasks!r}: choose per-gpu or per-node")
    if tasks == "per-gpu" and gpus_per_node < 1:
        raise LaunchError("--tasks per-gpu needs --gpus-per-node >= 1 (CPU-only nodes: "
                          "--tasks per-node)")
    if not 1024 <= port <= 65535:
        raise LaunchError(f"--port {port}: must be in [1024, 65535]")
    if time_limit is not None and not _SLURM_TIME.fullmatch(time_limit):
        raise LaunchError(f"--time {time_limit!r}: SLURM time, e.g. 30, 4:00:00 or 1-12:00:00")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", job_name):
        raise LaunchError(f"--job-name {job_name!r}: letters, digits, '_', '.', '-'")
    per_node = gpus_per_node if tasks == "per-gpu" else 1
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={per_node}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    lines.append(f"#SBATCH --output={output or job_name + '-%j.out'}")
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(common.workdir)}"]
    if tasks == "per-gpu":
        # jax.distributed.initialize() reads SLURM_* itself (coordinator: first host of
        # SLURM_STEP_NODELIST) and binds task SLURM_LOCALID to that GPU.
        env = common.run_env({"TRAINKIT_DISTRIBUTED": "auto"})
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines += ["", f"srun --kill-on-bad-exit=1 {common.experiment_command()}"]
    else:
        env = common.run_env({})
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines += ["# coordinator: process 0 runs on the first host of the node list",
                  # sed, not head: head would exit early and SIGPIPE fails the pipe (pipefail)
                  'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
                  f'export TRAINKIT_COORDINATOR="$head_node:{port}"',
                  'echo "coordinator $TRAINKIT_COORDINATOR, $SLURM_NTASKS processes"', "",
                  # single quotes: SLURM_PROCID is set by srun in each task, not here
                  "srun --kill-on-bad-exit=1 bash -c 'TRAINKIT_NUM_PROCESSES=$SLURM_NTASKS "
                  "TRAINKIT_PROCESS_ID=$SLURM_PROCID exec \"$@\"' _ "
                  + common.experiment_command()]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainkit.launch",
                description="run `python -m experiments run ...` on every host of a TPU VM pod "
                            "or a SLURM job (arguments after `--`)")
    sub = p.add_subparsers(dest="launcher", required=True, parser_class=_Parser)
    tpu = sub.add_parser("tpu", help="gcloud compute tpus tpu-vm ssh --worker=all")
    tpu.add_argument("--name", required=True, help="TPU VM name")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", default=None)
    tpu.add_argument("--worker", default="all", help="'all' (default) or e.g. 0,1")
    slurm = sub.add_parser("slurm", help="write (and with --submit, sbatch) a batch script")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=0)
    slurm.add_argument("--tasks", default="per-gpu", choices=("per-gpu", "per-node"),
                       help="one process per GPU (default) or per node")
    slurm.add_argument("--job-name", default="trainkit")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", dest="time_limit", default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--port", type=int, default=61234, help="coordinator port (per-node)")
    slurm.add_argument("--output", default=None, help="SLURM log file (default JOB-%%j.out)")
    slurm.add_argument("--script", default=None, help="also write the script to this file")
    slurm.add_argument("--submit", action="store_true", help="pipe the script to sbatch")
    for sp in (tpu, slurm):
        sp.add_argument("--workdir", default=".", help="project directory on every host")
        sp.add_argument("--python", default="python", help="interpreter on every host")
        sp.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the run (repeatable)")
        sp.add_argument("--checkpoint-root", default=None,
                        help="e.g. gs://bucket/ckpts: checkpoints go to ROOT/RUN_DIR/checkpoints")
        sp.add_argument("--dry-run", action="store_true", help="print, do not run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
    try:
        opts = _parser().parse_args(ours)
        common = Common(experiment_args(rest), workdir=opts.workdir, python=opts.python,
                        env=parse_env(opts.env), checkpoint_root=opts.checkpoint_root)
        if opts.launcher == "tpu":
            argv_out = tpu_command(common, name=opts.name, zone=opts.zone, project=opts.project,
                                   worker=opts.worker)
            if opts.dry_run:
                print(shlex.join(argv_out))
                return 0
            return subprocess.call(argv_out)
        script = slurm_script(common, nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
                              tasks=opts.tasks, job_name=opts.job_name, partition=opts.partition,
                              time_limit=opts.time_limit, cpus_per_task=opts.cpus_per_task,
                              port=opts.port, output=opts.output)
    except LaunchError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if opts.script:
        with open(opts.script, "w") as fh:
            fh.write(script)
    if opts.dry_run or not opts.submit:
        sys.stdout.write(script)
        return 0
    return subprocess.run(["sbatch"], input=script, text=True, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
