"""Run untrusted Python (model-written code) in a sandbox: :func:`run`.

``run(code, timeout_s=..., memory_mb=...)`` executes ``code`` with the isolated interpreter
(``sys.executable -I -S -B``: no site-packages, no user site, ``PYTHON*`` variables ignored,
no bytecode written) and returns a :class:`SandboxResult` with ``status`` in
``ok`` (exit 0), ``error`` (non-zero exit, e.g. a failed assert or a syntax error),
``timeout`` (wall-clock or CPU-time limit), ``memory`` (the address-space limit was hit:
``MemoryError``) or ``killed`` (ended by a signal, or the sandbox's own processes were killed
from inside).

How each process is started (Linux only). ``run`` starts a launcher (this file run as a script,
in a fresh single-threaded interpreter, so no ``preexec_fn`` runs in the caller's threaded
process) in a new session and process group. Two isolation levels exist; :func:`isolation`
says which this machine gives.

``"namespaces"`` (used where the kernel lets the user create user namespaces; it does on the
development machine, ``unshare -rn`` works):

- the launcher forks a child that enters fresh user, mount, network, PID, IPC and UTS
  namespaces (``unshare(2)``); the launcher writes its uid/gid maps (the caller's own uid as
  uid 0 inside);
- network: the new network namespace has only a loopback device, down: no connection to the
  host (not even 127.0.0.1) or the internet is possible. In addition a seccomp filter denies
  ``socket(2)`` for every address family and ``io_uring_setup(2)`` (defence in depth; it also
  shuts path-based Unix sockets of host daemons, which a network namespace does not);
- files: all mounts are made private and then read-only recursively (``mount_setattr(2)``);
  the scratch directory is a fresh size-limited tmpfs (``disk_mb``), the only writable place;
  ``/proc`` is a new proc mount that shows only the sandbox's processes;
- privileges: before ``exec`` the program enters one more, nested user namespace, so it holds no
  capability over the mount, network or PID namespaces and cannot undo the read-only mounts
  (their read-only flag is locked for a less privileged namespace);
- processes: the program runs under a PID-namespace init; when the init ends (the program
  exited, or the timeout killed the launcher's process group) the kernel kills every process in
  the namespace, including ones that called ``setsid`` and double-forked. A process inside
  cannot signal anything outside the namespace by PID; signals to the namespace init are
  ignored.

``"seccomp"`` (fallback where user namespaces are refused, e.g. hardened distributions): a
seccomp filter denies ``socket(2)`` for every family, ``io_uring_setup(2)`` and the
chmod/chown/utime/xattr calls (file metadata, which Landlock does not cover); a Landlock
ruleset (kernel >= 5.13) denies every filesystem write outside the scratch directory and
``/dev/null`` and any access to ``/proc`` (other processes' environments) and, with Landlock
ABI >= 6, signals to processes outside the sandbox; leftover
processes are found by a per-run token in their environment (``/proc/*/environ``) and killed,
besides the process group. Without Landlock, ``run`` refuses with :class:`SandboxUnavailable`
rather than run code that could write the caller's files. Likewise without seccomp.

Limits in both levels (``setrlimit`` in the program's process, inherited by its children):
``RLIMIT_CPU`` (``ceil(timeout_s) + 1`` s), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_NPROC``
(``max_procs``; the kernel does not apply it to uid 0, so when the caller is root a pids
cgroup (v1 ``/sys/fs/cgroup/pids``) with ``pids.max`` is used where writable),
``RLIMIT_FSIZE`` (``disk_mb``), ``RLIMIT_NOFILE`` (64), ``RLIMIT_CORE`` (0). The environment is
scrubbed to ``PATH``, ``LANG``, ``HOME``/``TMPDIR`` (= scratch) and ``PYTHON*`` safety
variables; the working directory is the scratch directory, removed afterwards. Output beyond
``max_output_bytes`` per stream is dropped and the result says so.

What it does NOT stop (be honest about it):

- reading: the program can read every file the caller can read (the source tree, ``/etc``,
  for a root caller ``/root``); only writes are blocked. Do not keep secrets in readable files
  on a machine that grades untrusted code;
- kernel exploits: this is namespaces + rlimits + seccomp, not a VM; a kernel bug escapes it;
- CPU and memory of the whole machine: limits are per process (``RLIMIT_AS`` x ``max_procs``
  bounds the total only roughly); tmpfs scratch counts against RAM up to ``disk_mb``;
- timing side channels, and in the ``seccomp`` level: disk use exactly (a 20 ms watchdog
  kills the run once scratch passes ``disk_mb`` or 4096 files; the overshoot is what the
  program writes in one poll), detached processes that scrub their environment before the
  token scan (unless the caller is root: the pids cgroup finds them), and with Landlock
  ABI < 6 signals to the caller's processes of the same uid.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

STATUSES = ("ok", "error", "timeout", "memory", "killed")
_TOKEN_VAR = "LLM_RL_SANDBOX_TOKEN"
_CGROUP_V1_PIDS = "/sys/fs/cgroup/pids"


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate code as :mod:`llm_rl.sandbox` requires (raised, never ignored)."""


class SandboxResult(NamedTuple):
    status: str  # one of STATUSES
    returncode: int | None  # exit code, or -signal if killed by a signal, None if never ran
    stdout: str
    stderr: str
    wall_s: float
    truncated: bool = False  # output beyond max_output_bytes was dropped
    isolation: str = ""  # "namespaces" or "seccomp"
    run_id: str = ""  # the per-run token (also in the program's environment as LLM_RL_SANDBOX_TOKEN)


# --- Linux constants and syscalls (shared by the caller and the launcher) -------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x8000, 0x1, 0x2
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
_ARCH = {  # machine -> (AUDIT_ARCH, __NR_socket); io_uring_setup, mount_setattr, landlock agree
    "x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
# File-metadata syscalls Landlock does not cover (chmod/chown/utime/xattr), denied at the
# seccomp level: without a read-only mount they could change the caller's files.
_METADATA_SYSCALLS = {
    "x86_64": (90, 91, 92, 93, 94, 132, 188, 189, 190, 197, 198, 199, 235, 260, 261, 268, 280,
               452, 463, 466),
    "aarch64": (5, 6, 7, 14, 15, 16, 52, 53, 54, 55, 88, 452, 463, 466)}
NR_IO_URING_SETUP, NR_MOUNT_SETATTR = 425, 442
NR_LANDLOCK_CREATE, NR_LANDLOCK_ADD_RULE, NR_LANDLOCK_RESTRICT = 444, 445, 446


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def seccomp_filter_program(machine: str | None = None, *, deny_metadata: bool = False) -> bytes:
    """Classic-BPF seccomp program: kill on a foreign architecture (x86 i386/x32 syscall ABIs
    would bypass the number checks), ``EACCES`` for ``socket`` and ``io_uring_setup`` (and with
    ``deny_metadata`` the chmod/chown/utime/xattr family), else allow.
    Layout of ``struct seccomp_data``: ``nr`` at byte 0, ``arch`` at byte 4."""
    machine = machine or platform.machine()
    if machine not in _ARCH:
        raise SandboxUnavailable(f"seccomp filter: unsupported architecture {machine!r}")
    audit_arch, nr_socket = _ARCH[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE|K, BPF_RET|K
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 13, 0x80000000  # ALLOW, ERRNO(EACCES), KILL_PROCESS
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]  # x32 ABI numbers
    denied = [nr_socket, NR_IO_URING_SETUP] + list(_METADATA_SYSCALLS[machine] if deny_metadata else ())
    # each check jumps over the remaining checks and the ALLOW to the DENY at the end
    prog += [(jeq, len(denied) - i, 0, nr) for i, nr in enumerate(denied)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def _install_seccomp(libc, *, deny_metadata: bool = False) -> None:
    program = seccomp_filter_program(deny_metadata=deny_metadata)
    buf = ctypes.create_string_buffer(program)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
           "prctl(SECCOMP)")


def _landlock_abi(libc) -> int:
    """Landlock ABI version, 0 if unavailable."""
    ret = libc.syscall(NR_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(ret), 0)


def _install_landlock(libc, writable_dir: str) -> None:
    """Deny filesystem writes outside ``writable_dir`` (and /dev/null), and any access to
    ``/proc`` (other processes' environments); with ABI >= 6 also signals to processes outside
    this sandbox. Needs NO_NEW_PRIVS (set by the seccomp step)."""
    abi = _landlock_abi(libc)
    if abi < 1:
        raise SandboxUnavailable("Landlock is unavailable: cannot keep the program from writing "
                                 "the caller's files")
    write_file, truncate = 1 << 1, 1 << 14
    handled = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write/remove/make_*
    handled |= (1 << 13 if abi >= 2 else 0) | (truncate if abi >= 3 else 0)  # REFER, TRUNCATE
    read = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR: allowed beneath every top-level dir but /proc
    handled |= read
    attr = struct.pack("QQQ", handled, 0, 2 if abi >= 6 else 0)  # scoped: SCOPE_SIGNAL
    size = 24 if abi >= 6 else 8
    buf = ctypes.create_string_buffer(attr[:size])
    ruleset = _check(libc.syscall(NR_LANDLOCK_CREATE, buf, ctypes.c_size_t(size),
                                  ctypes.c_uint32(0)), "landlock_create_ruleset")
    rules = [(writable_dir, handled), ("/dev/null", write_file | (truncate if abi >= 3 else 0))]
    rules += [(os.path.join("/", d), read) for d in sorted(os.listdir("/"))
              if d != "proc" and os.path.isdir(os.path.join("/", d))]
    for path, access in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd))
        _check(libc.syscall(NR_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
        os.close(fd)
    _check(libc.syscall(NR_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


def _set_limits(cfg: dict) -> None:
    import resource

    cpu = cfg["cpu_s"]
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1),
              resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
              resource.RLIMIT_NPROC: (cfg["max_procs"],) * 2,
              resource.RLIMIT_FSIZE: (cfg["disk_bytes"],) * 2,
              resource.RLIMIT_NOFILE: (64, 64),
              resource.RLIMIT_CORE: (0, 0)}
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _exec_program(cfg: dict) -> None:
    """chdir to scratch, set the limits and become the program (nothing of the launcher stays)."""
    os.chdir(cfg["scratch"])
    _set_limits(cfg)
    py = cfg["python"]
    os.execve(py, [py, "-I", "-S", "-B", "main.py"], cfg["env"])


# --- the launcher (runs as `python -I -S sandbox.py CONFIG_JSON`, a fresh single-threaded process)


def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    except OSError:
        pass


def _wait_status(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _namespace_init(cfg: dict, libc, status_fd: int) -> None:
    """PID 1 of the new PID namespace: set up mounts, start the program, reap, report."""
    scratch = cfg["scratch"]
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    opts = f"size={cfg['disk_bytes']},nr_inodes=4096,mode=0700".encode()
    _check(libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
           "mount tmpfs scratch")
    with open(os.path.join(scratch, "main.py"), "w") as f:
        f.write(cfg["code"])
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) < 0:
        # Some containers forbid a new proc mount; hide the host's instead.
        _check(libc.mount(b"tmpfs", b"/proc", b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k"), "hide /proc")
    ro = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0))
    _check(libc.syscall(NR_MOUNT_SETATTR, -100, b"/", AT_RECURSIVE, ro, 32), "read-only mounts")
    rw = ctypes.create_string_buffer(struct.pack("QQQQ", 0, MOUNT_ATTR_RDONLY, 0, 0))
    _check(libc.syscall(NR_MOUNT_SETATTR, -100, scratch.encode(), 0, rw, 32), "writable scratch")
    pid = os.fork()
    if pid == 0:
        try:
            # A nested user namespace: no capability over the mount/net/pid namespaces above.
            _check(libc.unshare(CLONE_NEWUSER), "unshare(nested user namespace)")
            if cfg["block_sockets"]:
                _install_seccomp(libc)
            _exec_program(cfg)
        except BaseException as err:  # noqa: BLE001 - report any setup failure, never run unsandboxed
            _report(status_fd, f"setup-error {err!r}")
        os._exit(127)
    while True:  # reap orphans re-parented to us until the program itself ends
        try:
            child, status = os.wait()
        except ChildProcessError:
            break
        if child == pid:
            _report(status_fd, f"status {status}")
            break
    os._exit(0)  # the kernel now kills every process left in the namespace


def _launch_namespaces(cfg: dict, libc, status_fd: int) -> int:
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(go_w)
            os.close(ready_r)
            _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
                                | CLONE_NEWIPC | CLONE_NEWUTS), "unshare(namespaces)")
            os.write(ready_w, b"1")
            if os.read(go_r, 1) != b"1":
                raise SandboxUnavailable("uid/gid map not written")
            init = os.fork()  # PID 1 of the new PID namespace
            if init == 0:
                try:
                    _namespace_init(cfg, libc, status_fd)
                except BaseException as err:  # noqa: BLE001
                    _report(status_fd, f"setup-error {err!r}")
                os._exit(127)
            os._exit(os.waitstatus_to_exitcode(_wait_status(init)) & 0xFF)
        except BaseException as err:  # noqa: BLE001
            _report(status_fd, f"setup-error {err!r}")
            os._exit(127)
    os.close(go_r)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) == b"1":
            uid, gid = os.geteuid(), os.getegid()
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/{child}/{name}", "w") as f:
                    f.write(text)
            os.write(go_w, b"1")
    except OSError as err:
        _report(status_fd, f"setup-error uid/gid map: {err!r}")
    os.close(go_w)
    return _wait_status(child)


def _launch_seccomp(cfg: dict, libc, status_fd: int) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            _install_seccomp(libc, deny_metadata=True)
            _install_landlock(libc, cfg["scratch"])
            _exec_program(cfg)
        except BaseException as err:  # noqa: BLE001
            _report(status_fd, f"setup-error {err!r}")
        os._exit(127)
    status = _wait_status(pid)
    _report(status_fd, f"status {status}")
    return status


def _launcher_main(cfg: dict) -> None:
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the program must not see it after exec
    libc = _libc()
    if cfg.get("cgroup"):
        try:
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as err:
            _report(status_fd, f"setup-error joining pids cgroup: {err!r}")
            os._exit(127)
    launch = _launch_namespaces if cfg["isolation"] == "namespaces" else _launch_seccomp
    launch(cfg, libc, status_fd)
    os._exit(0)


# --- the caller's side --------------------------------------------------------------------------


_LEVELS: list[str] | None = None


def _probe_namespaces() -> bool:
    """Can this process's user create the namespaces the ``namespaces`` level needs?"""
    probe = ("import ctypes,os,sys;libc=ctypes.CDLL(None,use_errno=True);"
             f"sys.exit(0 if libc.unshare({CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID})==0 else 1)")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, timeout=30, check=False)
    return done.returncode == 0 and sys.platform == "linux"


def _probe_seccomp() -> bool:
    probe = ("import sys;sys.path.insert(0,sys.argv[1]);import sandbox as s;"
             "s._install_seccomp(s._libc());s._install_landlock(s._libc(),sys.argv[2])")
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", probe, os.path.dirname(__file__),
                               scratch], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def available_levels() -> list[str]:
    """The isolation levels this machine gives, strongest first (probed once, cached)."""
    global _LEVELS
    if _LEVELS is None:
        _LEVELS = [] if sys.platform != "linux" else (
            (["namespaces"] if _probe_namespaces() else []) + (["seccomp"] if _probe_seccomp() else []))
    return list(_LEVELS)


def isolation() -> str:
    """``"namespaces"`` or ``"seccomp"``: the strongest level this machine gives.
    Raises :class:`SandboxUnavailable` when neither works."""
    levels = available_levels()
    if not levels:
        raise SandboxUnavailable(
            f"neither user namespaces (unshare CLONE_NEWUSER|NEWNET|NEWNS|NEWPID) nor seccomp + "
            f"Landlock are available (platform {sys.platform}): refusing to run untrusted code")
    return levels[0]


def _pids_cgroup(max_procs: int, token: str) -> str | None:
    """A fresh v1 pids cgroup with ``pids.max`` when the caller is root (RLIMIT_NPROC does not
    bind uid 0), else None."""
    if os.geteuid() != 0 or not os.access(_CGROUP_V1_PIDS, os.W_OK):
        return None
    path = os.path.join(_CGROUP_V1_PIDS, f"llm_rl_sandbox_{token}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_procs + 4))  # + the launcher's own processes
    except OSError:
        return None
    return path


def _kill_cgroup(path: str) -> None:
    for _ in range(100):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _kill_by_token(token: str) -> int:
    """SIGKILL every process whose environment carries ``token`` (the ``seccomp`` level's way to
    find detached children); repeat until none is left. Returns how many were killed."""
    needle, killed = f"{_TOKEN_VAR}={token}".encode(), 0
    for _ in range(100):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if needle in f.read():
                            found.append(int(entry))
                except OSError:
                    continue
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return killed


class _Reader(threading.Thread):
    """Drain a pipe, keeping the first ``limit`` bytes (never blocks the writer)."""

    def __init__(self, stream, limit: int):
        super().__init__(daemon=True)
        self.stream, self.limit, self.data, self.total = stream, limit, bytearray(), 0
        self.start()

    def run(self):
        while chunk := self.stream.read1(1 << 16):
            self.total += len(chunk)
            room = self.limit - len(self.data)
            if room > 0:
                self.data += chunk[:room]

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def run(code: str, *, timeout_s: float, memory_mb: int, disk_mb: int = 16, max_procs: int = 32,
        max_output_bytes: int = 1 << 20, level: str | None = None,
        block_sockets: bool = True) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox (see the module docstring).

    ``timeout_s``: wall-clock limit for the whole run (start-up included, about 50 ms);
    ``memory_mb``: address-space limit per process; ``disk_mb``: scratch size and per-file
    limit; ``max_procs``: processes/threads; ``level``: force ``"namespaces"`` or ``"seccomp"``
    (default: :func:`isolation`); ``block_sockets``: the seccomp filter on ``socket(2)`` in the
    ``namespaces`` level (always on in ``seccomp``; off leaves the network namespace alone
    between the program and the network). Never raises for anything the program does; raises
    :class:`SandboxUnavailable` if the machine cannot sandbox."""
    if timeout_s <= 0 or memory_mb <= 0 or disk_mb <= 0 or max_procs <= 0:
        raise ValueError(f"timeout_s={timeout_s}, memory_mb={memory_mb}, disk_mb={disk_mb}, "
                         f"max_procs={max_procs}: all must be > 0")
    level = level or isolation()
    if level not in ("namespaces", "seccomp"):
        raise ValueError(f"level={level!r} is invalid: must be 'namespaces' or 'seccomp'")
    token = secrets.token_hex(8)
    scratch = tempfile.mkdtemp(prefix="llm_rl_sandbox_")
    cgroup = _pids_cgroup(max_procs, token)
    if level == "seccomp":
        with open(os.path.join(scratch, "main.py"), "w") as f:
            f.write(code)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch,
           "TMPDIR": scratch, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
           "PYTHONIOENCODING": "utf-8", _TOKEN_VAR: token}
    status_r, status_w = os.pipe()
    cfg = {"isolation": level, "scratch": scratch, "code": code, "python": sys.executable,
           "env": env, "status_fd": status_w, "cgroup": cgroup, "block_sockets": block_sockets, "cpu_s": math.ceil(timeout_s) + 1,
           "memory_bytes": memory_mb << 20, "disk_bytes": disk_mb << 20, "max_procs": max_procs}
    start = time.monotonic()
    timed_out = disk_exceeded = False
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(status_w,), env=env,
                                cwd=scratch, start_new_session=True)
        os.close(status_w)
        out, err = _Reader(proc.stdout, max_output_bytes), _Reader(proc.stderr, max_output_bytes)
        status_reader = _Reader(os.fdopen(status_r, "rb"), 1 << 16)
        if level == "namespaces":  # scratch is a size-limited tmpfs: the kernel bounds it
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        else:
            timed_out, disk_exceeded = _watch_scratch(proc, scratch, start + timeout_s,
                                                      disk_mb << 20)
        _kill_group(proc.pid)
        proc.wait()
        if level == "seccomp":
            _kill_by_token(token)
        if cgroup:
            _kill_cgroup(cgroup)
        for reader in (out, err, status_reader):
            reader.join(timeout=5.0)
        wall = time.monotonic() - start
    finally:
        if cgroup:
            _kill_cgroup(cgroup)
        shutil.rmtree(scratch, ignore_errors=True)
    reports = status_reader.text.splitlines()
    setup_errors = [r for r in reports if r.startswith("setup-error")]
    if setup_errors and not timed_out:
        raise SandboxUnavailable(f"sandbox setup failed ({level}): {setup_errors[0][12:]}")
    wait_statuses = [int(r.split()[1]) for r in reports if r.startswith("status ")]
    returncode = os.waitstatus_to_exitcode(wait_statuses[0]) if wait_statuses else None
    stderr = err.text
    if disk_exceeded:  # the seccomp level's watchdog stopped it (tmpfs gives ENOSPC instead)
        status = "error"
        stderr += f"\n[llm_rl.sandbox: scratch exceeded disk_mb={disk_mb} or {_MAX_FILES} files: killed]"
    elif timed_out or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode is None or returncode < 0:
        status = "killed"  # by a signal, or the launcher was killed before the status came back
    elif returncode == 0:
        status = "ok"
    elif _last_line(stderr).startswith("MemoryError"):
        status = "memory"
    else:
        status = "error"
    truncated = out.total > len(out.data) or err.total > len(err.data)
    if truncated:
        stderr += f"\n[llm_rl.sandbox: output truncated to {max_output_bytes} bytes per stream]"
    return SandboxResult(status, returncode, out.text, stderr, wall, truncated, level, token)


_MAX_FILES = 4096  # files in scratch (the namespaces level's tmpfs nr_inodes)


def _scratch_usage(path: str) -> tuple[int, int]:
    """(bytes, entries) under ``path``, stopping early past ``_MAX_FILES`` entries."""
    total, count, stack = 0, 0, [path]
    while stack and count <= _MAX_FILES:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    count += 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue
    return total, count


def _watch_scratch(proc, scratch: str, deadline: float, limit: int) -> tuple[bool, bool]:
    """The ``seccomp`` level's disk bound (no tmpfs there): poll the scratch size every 20 ms
    and stop the run once it passes ``limit`` bytes or ``_MAX_FILES`` files. Returns
    (timed_out, disk_exceeded). The overshoot is what the program writes in one poll."""
    while True:
        try:
            proc.wait(timeout=min(0.02, max(deadline - time.monotonic(), 0.0)))
            return False, False
        except subprocess.TimeoutExpired:
            pass
        used, files = _scratch_usage(scratch)
        if used > limit or files > _MAX_FILES:
            return False, True
        if time.monotonic() >= deadline:
            return True, False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


if __name__ == "__main__":
    _launcher_main(json.loads(sys.argv[1]))
