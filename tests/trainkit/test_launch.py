"""trainkit.launch: the TPU pod command and the SLURM batch script (dry runs, no network), and
the SLURM script executed by bash against stand-in ``srun``/``scontrol``."""

import os
import shlex
import stat
import subprocess
import sys

import pytest

from tests.helpers import REPO
from trainkit import launch


def _dry(argv):
    return subprocess.run([sys.executable, "-m", "trainkit.launch", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_tpu_dry_run_prints_the_exact_gcloud_command():
    res = _dry(["tpu", "--name", "pod-v4-32", "--zone", "us-central2-b", "--project", "p1",
                "--workdir", "/home/me/jaxresearch", "--env", "XLA_FLAGS=--a --b",
                "--checkpoint-root", "gs://bkt/ck", "--dry-run", "--",
                "run", "lm_pretrain", "--preset", "cpu", "--run-dir", "runs/lm", "--set",
                "mesh.fsdp=-1"])
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4-32", "--zone",
                        "us-central2-b"]
    assert argv[8:10] == ["--project", "p1"] and argv[10] == "--worker=all"
    assert argv[11] == "--command"
    # the remote command, as the worker's shell will split it
    remote = shlex.split(argv[12])
    assert remote[:3] == ["cd", "/home/me/jaxresearch", "&&"]
    env = dict(w.split("=", 1) for w in remote[3:7])
    assert env == {"TRAINKIT_DISTRIBUTED": "auto", "TRAINKIT_CHECKPOINT_ROOT": "gs://bkt/ck",
                   "TRAINKIT_NO_PROGRESS": "1", "XLA_FLAGS": "--a --b"}
    assert remote[7:] == ["python", "-m", "experiments", "run", "lm_pretrain", "--preset", "cpu",
                          "--run-dir", "runs/lm", "--set", "mesh.fsdp=-1"]


def test_every_host_gets_the_same_run_dir():
    args = launch.experiment_args(["--", "run", "quickstart", "--preset", "cpu"],
                                  timestamp="20260101-000000")
    assert args[-2:] == ["--run-dir", "runs/quickstart/cpu-20260101-000000"]
    kept = launch.experiment_args(["run", "quickstart", "--run-dir=runs/x"])
    assert kept == ["run", "quickstart", "--run-dir=runs/x"]


@pytest.mark.parametrize("argv, message", [
    (["tpu", "--name", "Bad_Name", "--zone", "z", "--", "run", "quickstart"], "--name 'Bad_Name'"),
    (["tpu", "--name", "ok", "--zone", "z", "--env", "1X=2", "--", "run", "quickstart"],
     "--env '1X=2'"),
    (["tpu", "--name", "ok", "--zone", "z", "--", "list"], "after '--' give the experiment"),
    (["tpu", "--name", "ok", "--zone", "z", "--", "run", "quickstart", "--resume"],
     "--resume needs the --run-dir"),
    (["tpu", "--name", "ok", "--", "run", "quickstart"], "--zone"),
    (["slurm", "--nodes", "0", "--gpus-per-node", "8", "--", "run", "quickstart"], "--nodes 0"),
    (["slurm", "--nodes", "2", "--", "run", "quickstart"], "--tasks per-gpu needs --gpus-per-node"),
    (["slurm", "--nodes", "2", "--tasks", "per-node", "--time", "soon", "--", "run", "q"],
     "--time 'soon'"),
    (["slurm", "--nodes", "2", "--tasks", "per-node", "--port", "80", "--", "run", "q"],
     "--port 80"),
])
def test_bad_input_is_one_clear_line(argv, message):
    with pytest.raises(launch.LaunchError, match=message.replace("(", r"\(")):
        opts = launch._parser().parse_args(argv[:argv.index("--")])
        common = launch.Common(launch.experiment_args(argv[argv.index("--"):]),
                               env=launch.parse_env(opts.env))
        if opts.launcher == "tpu":
            launch.tpu_command(common, name=opts.name, zone=opts.zone)
        else:
            launch.slurm_script(common, nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
                                tasks=opts.tasks, time_limit=opts.time_limit, port=opts.port)


def test_cli_bad_input_exits_2_with_one_line():
    res = _dry(["slurm", "--nodes", "2", "--dry-run", "--", "run", "quickstart"])
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: --tasks per-gpu")


def test_slurm_per_gpu_script_lets_jax_detect_slurm():
    common = launch.Common(["run", "lm_pretrain", "--run-dir", "runs/lm"], workdir="/w",
                           env={"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"})
    script = launch.slurm_script(common, nodes=4, gpus_per_node=8, partition="gpu",
                                 time_limit="4:00:00", job_name="lm")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4:00:00", "cd /w",
                 "export TRAINKIT_DISTRIBUTED=auto", "export XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
                 "srun --kill-on-bad-exit=1 python -m experiments run lm_pretrain --run-dir runs/lm"):
        assert line in lines, line
    assert "TRAINKIT_COORDINATOR" not in script  # JAX reads SLURM_STEP_NODELIST itself


def _fake_tool(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_per_node_script_runs_one_process_per_node_with_the_head_node_as_coordinator(
        tmp_path):
    """bash executes the generated script; stand-ins for scontrol and srun (2 tasks) record
    what each task would start with: the coordinator from the node list, its own process id."""
    common = launch.Common(["run", "quickstart", "--run-dir", "runs/q"], workdir=str(tmp_path),
                           python="printenv-and-args")
    script = launch.slurm_script(common, nodes=2, tasks="per-node", port=5555)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "scontrol", 'echo "gpu-node017"; echo "gpu-node018"\n')
    # srun: start the command once per task, as SLURM would, with SLURM_PROCID set
    _fake_tool(bin_dir, "srun", 'shift\nfor i in 0 1; do SLURM_PROCID=$i "$@"; done\n')
    _fake_tool(bin_dir, "printenv-and-args",
               'echo "$TRAINKIT_COORDINATOR $TRAINKIT_NUM_PROCESSES $TRAINKIT_PROCESS_ID $*"\n')
    (tmp_path / "job.sh").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_NODELIST="gpu-node[017-018]", SLURM_NTASKS="2")
    res = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "coordinator gpu-node017:5555, 2 processes",
        "gpu-node017:5555 2 0 -m experiments run quickstart --run-dir runs/q",
        "gpu-node017:5555 2 1 -m experiments run quickstart --run-dir runs/q"]
