"""Sandboxed execution of model-written Python, and a unit-test reward built on it whose
verdicts the code under test cannot forge.

The reward follows the rule-based "run the tests" rewards of code RL (DeepSeek-R1,
arXiv:2501.12948, section 2.2.2: "for LeetCode problems, a compiler can be used to generate
feedback based on predefined test cases"): the completion's code is run against the row's test
cases (asserts on its functions, or stdin/stdout cases) and the reward is the fraction that
pass.

Threat model of the ``code_tests`` reward
    *Assumed*: the completion's code is hostile, and once it runs it owns everything in its
    sandbox: the interpreter it shares with the harness (frames, ``gc``, builtins,
    ``sys.modules``, ``compile``/``exec``, ``AssertionError``, the harness's variables and file
    descriptors) and every process it starts there.

    *Guaranteed*, by construction rather than by a list of known tricks:

    - The verdict is decided in this process (the grader,
      :mod:`trustrl.rewards.code_grader`), which shares no memory with the sandbox and never
      runs model-written code. Expected values are parsed from the tests here and never sent
      to the sandbox: only the tested expression (``f(2, 3)`` of ``assert f(2, 3) == 5``) or a
      program's stdin is.
    - The only thing read from the sandbox is a private result pipe: length-prefixed JSON
      frames, exactly one per requested step, in order, parsed strictly; values are rebuilt
      with exact built-in types (``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
      ``complex``, ``list``, ``tuple``, ``dict``, ``set``, ``frozenset``), so no ``str``
      subclass and no object with its own ``__eq__`` crosses, and they are compared here with
      Python's own operators on those types. stdout and stderr are never believed (with
      asserts the solution's stdout goes to ``/dev/null``): printing "verdicts" does nothing.
    - A missing, malformed, out-of-order or surplus answer is a failure: exiting early
      (``sys.exit``, ``os._exit``, a signal), breaking the harness, timing out or flooding
      the pipe can only lose cases, never pass them. Reading stops when the run is over and
      every process of the sandbox has been killed, so a forked child cannot answer later.
    - The expected values are not on the sandbox's file system either (modes ``root`` and
      ``userns``): its root holds only the system directories and the interpreter, so the
      dataset, the repository and the trainer's files cannot be searched for the answers.
    - Hence, to pass a case the sandbox must send back a plain value that satisfies the check,
      exactly what an honest solution does. Patching builtins, ``compile``/``exec``,
      ``AssertionError`` or ``sys.modules``, reading the harness's frames, ``gc`` or fds,
      writing to its descriptors: none of it changes what the grader compares.

    *Not guaranteed*:

    - A solution that hard-codes the expected outputs of tests it has seen (in the prompt, say)
      passes them; keep the tests that matter hidden.
    - A test whose tested expression itself holds the expected value (``[5].count(f(x)) == 1``,
      or a set-up helper that compares) is judged partly inside the sandbox. The grader
      refuses the visible forms (a comparison, ``and``/``or``, ``not`` or if-else inside the
      tested expression; asserts inside ``for``/``if``/``def``) but cannot see through method
      calls or helpers. ``assert f(x)`` passes on any truthy value: weak tests stay weak.
    - Kernel exploits (there is no seccomp filter); reading ``/usr``, ``/etc`` and the
      interpreter's prefix, the only paths of the machine in the sandbox's root (a dataset
      holding the expected values must not live there; anywhere else it is out of reach); and
      the use of resources up to the limits (per completion: ``timeout_s`` of wall and CPU time,
      ``memory_mb`` per process, 16 processes, 32 MiB of disk, 64 KiB of stderr, 32 MiB of
      results).
    - Mode ``plain`` (below) is weaker: every world-readable file (a dataset included) can be
      read, the network block is bypassable and, when not root, clean-up is by session, which
      ``setsid()`` escapes (such a process may outlive the run; it still cannot answer once
      the run is over).

Isolation, strongest first (probed once, see :func:`sandbox_capabilities`):

``mode="root"`` (we are root with CAP_SYS_ADMIN, the case on the training boxes):
    new network namespace (no interface up: nothing is reachable, not even 127.0.0.1); new
    mount + IPC + pid namespaces with a private root that holds only ``/usr``, ``/etc``,
    ``/dev`` and the interpreter's prefix (the repository, datasets, ``/tmp``, ``/home``,
    ``/root``, ``/mnt``, ... are absent), in which *every* mount is read-only and nosuid;
    procfs shows only the sandbox's processes and the working directory is a private
    size/inode-capped tmpfs that vanishes with the namespace. The program runs as a fresh
    unprivileged uid/gid (random, unused, no supplementary groups, no_new_privs), so
    ``RLIMIT_NPROC`` is enforced (it is not for root) and counts only this sandbox's processes.
    When the program ends, the kernel kills and reaps everything left in its pid namespace
    (``setsid()`` does not escape that); the parent then also kills anything still running
    under the sandbox uid and checks that nothing is left.
``mode="userns"`` (not root, unprivileged user namespaces allowed): the same namespaces and
    mounts, entered through a user namespace that maps only our own uid; no uid change, so
    ``RLIMIT_NPROC`` is shared with our other processes (the cap is set to their count plus
    ``max_processes``).
``mode="plain"``: no namespaces. Network is blocked by a Python prelude replacing the socket
    constructors (bypassable through ``ctypes``); only file permissions stop writes outside the
    temporary directory; clean-up is by session / process group, which ``setsid()`` escapes.
    A uid drop still applies if we are root; if that cannot run the interpreter, the probe
    fails instead of running untrusted code as root.

Common to all modes: a fresh ``python -I -S -B`` interpreter (isolated mode, no site, no
user site, no bytecode files) in a new session, with a scrubbed environment (``PATH``,
``LANG``, ``HOME`` and ``TMPDIR`` only; nothing inherited), rlimits on CPU time, address space,
file size, processes, open files and core dumps (0), a wall-clock watchdog, stdout/stderr read
through a bounded buffer (the process is killed as soon as either stream passes the cap), and
afterwards every process of the sandbox killed and the temporary directory deleted.

What this is *not*: a defence against kernel exploits (there is no seccomp filter), and the
code can still *read* what its root holds (``/usr``, ``/etc``, ``/dev``, the interpreter's
prefix; in mode ``plain``, every world-readable file).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from trustrl.errors import UserError
from trustrl.rewards.code_grader import HARNESS, TestPlan, case_passes, parse_tests, read_frames

__all__ = [
    "SandboxResult",
    "run_in_sandbox",
    "sandbox_capabilities",
    "code_tests_reward",
    "CodeGrade",
    "extract_code",
]

_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_SETUP_FAILED = 121
_SETUP_MARK = b"trustrl-sandbox-setup-error:"
# Fresh uids for sandboxes are drawn from here: far above any real account and above the
# usual /etc/subuid ranges (100000 + 65536*k), below 2**31.
_UID_LOW, _UID_HIGH = 1_800_000_000, 1_900_000_000
_READ_CHUNK = 65536


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one :func:`run_in_sandbox` call.

    ``returncode`` follows :mod:`subprocess` (negative = killed by that signal; 121 = the
    sandbox could not be set up and the code did not run). ``stdout``/``stderr`` are decoded
    as UTF-8 (invalid bytes replaced) and hold at most ``max_output_bytes`` bytes each.
    ``killed_reason`` is ``"wall_time"``, ``"cpu_time"``, ``"memory"`` (the program died of a
    ``MemoryError`` under the address-space cap), ``"output_limit"``, ``"sandbox_error"`` or
    ``None``. ``leftover_processes`` counts sandbox processes still alive after clean-up
    (0 unless something is badly wrong). ``channel``: the bytes the program wrote to its
    private result pipe (fd 3; used by the ``code_tests`` grader, empty otherwise).
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    network_isolation: str
    wall_seconds: float
    cpu_seconds: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    leftover_processes: int = 0
    uid: int | None = None
    channel: bytes = b""


# --------------------------------------------------------------------------------------------
# interpreter and hidden paths


def _interpreter() -> tuple[str, str]:
    """(real path of the base interpreter, real path of its prefix). Not the venv's python:
    with ``-S`` the venv adds nothing, and the base one resolves without ``pyvenv.cfg``."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe), os.path.realpath(sys.base_prefix)


#: What the sandbox's root holds besides the interpreter's prefix (and the old root's top-level
#: symbolic links such as ``/bin -> usr/bin``): everything else of the machine is absent.
_SYSTEM_DIRS = ("/usr", "/etc", "/dev")


def _kept_paths() -> list[str]:
    """Directories bind-mounted into the sandbox's root: the system directories and the
    interpreter's prefix (and the executable's directory if outside it), none below another."""
    exe, prefix = _interpreter()
    wanted = {prefix} if exe.startswith(prefix.rstrip("/") + "/") else {prefix,
                                                                         os.path.dirname(exe)}
    wanted |= set(_SYSTEM_DIRS)
    return sorted(p for p in wanted
                  if not any(q != p and (p.startswith(q.rstrip("/") + "/") or q == "/")
                             for q in wanted))


# --------------------------------------------------------------------------------------------
# process table


def _proc_table() -> list[tuple[int, int, int, int, str]]:
    """``(pid, uid, session, pgrp, state)`` for every process we can read in /proc."""
    rows = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                st = f.read()
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        fields = st[st.rfind(b")") + 2:].split()
        # fields: state ppid pgrp session ...
        rows.append((int(name), uid, int(fields[3]), int(fields[2]), fields[0].decode()))
    return rows


def _sandbox_pids(uid: int | None, sid: int, *, by_session: bool) -> list[int]:
    """Live (non-zombie) processes of a sandbox: those running as its uid (when it has its
    own), plus - if ``by_session`` - those in its session or process group ``sid``.

    Only scan by session while the session leader is still unreaped: until then its pid (the
    session and group id) cannot be recycled by an unrelated process.
    """
    out = []
    for pid, puid, psid, pgrp, state in _proc_table():
        if state in ("Z", "X"):
            continue
        if (uid is not None and puid == uid) or (by_session and sid in (psid, pgrp)):
            out.append(pid)
    return out


def _kill_sandbox(uid: int | None, sid: int, *, by_session: bool, settle_s: float = 2.0) -> int:
    """SIGKILL every process of the sandbox until none is left; returns how many remain.

    Signals go through pidfds, re-checked against /proc after opening, so a recycled pid is
    never hit. The loop converges: killed processes cannot fork, and RLIMIT_NPROC bounds how
    many there are at once.
    """
    if by_session:
        try:
            os.killpg(sid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + settle_s
    while True:
        pids = _sandbox_pids(uid, sid, by_session=by_session)
        if not pids or time.monotonic() > deadline:
            return len(pids)
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if pid in _sandbox_pids(uid, sid, by_session=by_session):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------
# uid pool

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _take_uid() -> int:
    with _uid_lock:
        busy = {row[1] for row in _proc_table()} | _uids_in_use
        while True:
            uid = _UID_LOW + secrets.randbelow(_UID_HIGH - _UID_LOW)
            if uid not in busy:
                _uids_in_use.add(uid)
                return uid


def _give_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


# --------------------------------------------------------------------------------------------
# the prelude used when no network namespace is available

_SOCKET_PRELUDE = '''\
def _trustrl_no_network():
    import socket, _socket
    def _denied(*args, **kwargs):
        raise PermissionError(13, "network access is disabled in the trustrl sandbox")
    class _DeniedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _denied()
    for mod in (socket, _socket):
        for name in ("socket", "SocketType"):
            if hasattr(mod, name):
                setattr(mod, name, _DeniedSocket)
        for name in ("socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(mod, name):
                setattr(mod, name, _denied)
_trustrl_no_network()
del _trustrl_no_network
import sys as _sys
_sys.argv[0] = {main!r}
with open({main!r}, "rb") as _f:
    _code = compile(_f.read(), {main!r}, "exec")
del _f, _sys
exec(_code, {{"__name__": "__main__", "__builtins__": __builtins__, "__file__": {main!r}}})
'''


# --------------------------------------------------------------------------------------------
# one run


def _run(code: str, *, stdin: str, wall_time_s: float, cpu_time_s: float, memory_mb: int,
         max_output_bytes: int, max_processes: int, mode: str, netns: bool, disk_mb: int,
         extra_files: dict[str, str] | None = None, channel_cap: int = 0) -> SandboxResult:
    """One sandboxed run of ``code`` (see :func:`run_in_sandbox`). With ``channel_cap > 0``
    the program also gets a private pipe as fd 3 (the result channel of the code grader);
    at most ``channel_cap`` bytes of it are kept in ``SandboxResult.channel`` (more ends the
    run: ``output_limit``). Reading stops once every process of the sandbox is dead."""
    t0 = time.monotonic()
    net_kind = "netns" if netns else "socket_disabled"
    python, _ = _interpreter()
    root = os.geteuid() == 0
    uid = _take_uid() if root and mode != "userns" else None
    workdir = tempfile.mkdtemp(prefix="trustrl-sbx-")
    proc = None
    out = {1: bytearray(), 2: bytearray(), 3: bytearray()}
    truncated = {1: False, 2: False, 3: False}
    caps = {1: max_output_bytes, 2: max_output_bytes, 3: channel_cap}
    chan_r = chan_w = None
    killed_reason = None
    cpu = 0.0
    leftover = 0
    stdin_file = None
    try:
        files = {"main.py": code, **(extra_files or {})}
        if not netns:
            files["_trustrl_boot.py"] = _SOCKET_PRELUDE.format(main="main.py")
        for name, text in files.items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        if mode == "plain" and uid is not None:
            for p in [workdir] + [os.path.join(workdir, n) for n in files]:
                os.chown(p, uid, uid)
        nproc = max_processes
        if uid is None:  # RLIMIT_NPROC counts all processes of our uid: leave room for them
            me = os.getuid()
            nproc += sum(1 for row in _proc_table() if row[1] == me) + 2  # + waiter, init
        cfg = {
            "mode": mode, "netns": netns, "workdir": workdir, "files": sorted(files),
            "uid": uid, "keep": _kept_paths(), "python": python,
            "parent_pid": os.getpid(), "backstop_s": math.ceil(wall_time_s) + 30,
            "main": "main.py" if netns else "_trustrl_boot.py",
            "disk_bytes": disk_mb << 20, "max_inodes": 4096,
            "rlimits": {"cpu": max(1, math.ceil(cpu_time_s)), "as": memory_mb << 20,
                        "fsize": disk_mb << 20, "nofile": 64, "nproc": nproc},
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "HOME": workdir, "TMPDIR": workdir}
        if channel_cap > 0:
            chan_r, chan_w = os.pipe()
            cfg["channel_fd"] = chan_w
        stdin_file = tempfile.TemporaryFile()  # anonymous: invisible to the sandboxed code
        stdin_file.write(stdin.encode("utf-8"))
        stdin_file.seek(0)
        import subprocess  # local: keeps `import trustrl.rewards.code` light

        proc = subprocess.Popen(
            [python, "-I", "-S", "-B", _HELPER, json.dumps(cfg)],
            stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env=env, start_new_session=True, close_fds=True,
            pass_fds=(chan_w,) if chan_w is not None else (),
        )
        stdin_file.close()
        stdin_file = None
        if chan_w is not None:
            os.close(chan_w)  # only the sandbox holds the write end now
            chan_w = None
        sel = selectors.DefaultSelector()
        streams = [(1, proc.stdout.fileno()), (2, proc.stderr.fileno())]
        if chan_r is not None:
            streams.append((3, chan_r))
        for fd_no, fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, fd_no)
        deadline = t0 + wall_time_s
        drain_until = None
        exited = False
        while True:
            now = time.monotonic()
            if not exited and now >= deadline:
                killed_reason = "wall_time"
                break
            if exited and (not sel.get_map() or now >= drain_until):
                break
            timeout = min(0.02 if not sel.get_map() else 0.05,
                          max(0.0, (drain_until or deadline) - now))
            ready = sel.select(timeout) if sel.get_map() else time.sleep(timeout) or []
            for key, _ in ready:
                try:
                    data = os.read(key.fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf = out[key.data]
                room = caps[key.data] - len(buf)
                buf += data[:room]
                if len(data) > room:
                    truncated[key.data] = True
            if any(truncated.values()):
                killed_reason = "output_limit"
                break
            if not exited and os.waitid(os.P_PID, proc.pid,
                                        os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                # The program is over when its main process is (exited, not yet reaped):
                # stragglers that still hold the pipes are killed, then the pipes drained.
                exited = True
                _kill_sandbox(uid, proc.pid, by_session=True)
                drain_until = time.monotonic() + 0.5
        sel.close()
    finally:
        if stdin_file is not None:
            stdin_file.close()
        if chan_w is not None:
            os.close(chan_w)
        if proc is not None:
            _kill_sandbox(uid, proc.pid, by_session=True)  # leader not reaped yet: sid valid
            _, st, ru = os.wait4(proc.pid, 0)
            cpu = ru.ru_utime + ru.ru_stime
            proc.returncode = os.waitstatus_to_exitcode(st)
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
            if uid is not None:
                leftover = _kill_sandbox(uid, proc.pid, by_session=False, settle_s=0.5)
            else:  # count only: after the reap, the session id may name someone else
                leftover = len(_sandbox_pids(None, proc.pid, by_session=True))
        if chan_r is not None:  # nothing more is read: the sandbox is dead and was drained
            os.close(chan_r)
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None and not leftover:
            _give_uid(uid)  # a uid with survivors stays retired for this process's lifetime
    rc = proc.returncode if proc is not None else None
    if killed_reason is None:
        if rc == _SETUP_FAILED and out[2].startswith(_SETUP_MARK):
            killed_reason = "sandbox_error"
        elif rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and cpu >= cpu_time_s - 0.05):
            killed_reason = "cpu_time"
        elif rc not in (0, None) and b"MemoryError" in out[2]:
            killed_reason = "memory"
    return SandboxResult(
        returncode=rc,
        stdout=out[1].decode("utf-8", errors="replace"),
        stderr=out[2].decode("utf-8", errors="replace"),
        timed_out=killed_reason in ("wall_time", "cpu_time"),
        killed_reason=killed_reason,
        network_isolation=net_kind,
        wall_seconds=time.monotonic() - t0,
        cpu_seconds=cpu,
        stdout_truncated=truncated[1],
        stderr_truncated=truncated[2],
        leftover_processes=leftover,
        uid=uid,
        channel=bytes(out[3]),
    )


# --------------------------------------------------------------------------------------------
# capability probe

_caps_lock = threading.Lock()
_caps: dict[str, Any] | None = None


def _probe(mode: str, netns: bool) -> bool:
    token = secrets.token_hex(8)
    try:
        res = _run(f"print({token!r})", stdin="", wall_time_s=10.0, cpu_time_s=5.0,
                   memory_mb=512, max_output_bytes=4096, max_processes=16, mode=mode,
                   netns=netns, disk_mb=1)
    except OSError:
        return False
    return res.returncode == 0 and res.stdout.strip() == token


class SandboxError(UserError, RuntimeError):
    """No sandbox mode can run code on this machine (the message says why)."""


def sandbox_capabilities() -> dict[str, Any]:
    """What isolation :func:`run_in_sandbox` applies on this machine (probed once, cached).

    Keys: ``mode`` (``"root"``, ``"userns"`` or ``"plain"``, see the module docstring),
    ``network`` (``"netns"`` or ``"socket_disabled"``: what ``network="auto"`` gives),
    ``netns_available``, ``uid_drop`` (runs as a fresh unprivileged uid), ``filesystem``
    (``"readonly_mounts"``: a private root of system directories and the interpreter, every
    mount read-only except the private tmpfs work dir, or
    ``"permissions_only"``), ``pid_hiding`` (other users' processes invisible in /proc) and
    ``process_cleanup`` (``"pid_namespace"``: the kernel kills and reaps everything in the
    sandbox's pid namespace when the program ends; ``"uid"``: the parent kills every process
    of the sandbox uid; both escape-proof; ``"session"``: the session / process group, which
    ``setsid()`` escapes).
    """
    global _caps
    with _caps_lock:
        if _caps is None:
            root = os.geteuid() == 0
            chosen = None
            # Not userns as root: the program would run as uid 0 of a user namespace mapped
            # to the real root, with capabilities to undo its mounts.
            for mode in (["root"] if root else ["userns"]):
                for netns in (True, False):
                    if _probe(mode, netns):
                        chosen = (mode, netns)
                        break
                if chosen:
                    break
            if chosen is None:
                chosen = ("plain", False)
                if not _probe("plain", False):
                    # Never fall back to running untrusted code as root.
                    raise SandboxError(
                        "trustrl.rewards.code.sandbox_capabilities: no sandbox mode works here "
                        "(namespaces unavailable, and the interpreter "
                        f"{_interpreter()[0]} cannot be run"
                        + (" by an unprivileged uid; install Python in a world-readable "
                           "location or allow namespaces)" if root else ")"))
            mode, netns = chosen
            _caps = {
                "mode": mode,
                "network": "netns" if netns else "socket_disabled",
                "netns_available": netns,
                "uid_drop": root and mode != "userns",
                "filesystem": "readonly_mounts" if mode != "plain" else "permissions_only",
                "pid_hiding": mode != "plain",
                "process_cleanup": ("pid_namespace+uid" if mode == "root" else
                                    "pid_namespace" if mode == "userns" else
                                    "uid" if root else "session"),
            }
        return dict(_caps)


def run_in_sandbox(code: str, *, stdin: str = "", wall_time_s: float = 5.0,
                   cpu_time_s: float = 5.0, memory_mb: int = 512,
                   max_output_bytes: int = 65536, max_processes: int = 16,
                   network: str = "auto", disk_mb: int = 32) -> SandboxResult:
    """Run untrusted Python ``code`` as a script in the sandbox and return what happened.

    Never raises because of what the code does. ``network`` is ``"auto"`` (a network
    namespace where possible, else the socket prelude), ``"netns"`` (required; ValueError if
    unavailable) or ``"socket_disabled"`` (the prelude, no namespace). ``disk_mb`` caps the
    private work-dir tmpfs and each written file. ``memory_mb`` caps the address space of each
    process (``RLIMIT_AS``: virtual memory, so keep it >= ~64 MiB for the interpreter).
    """
    if network not in ("auto", "netns", "socket_disabled"):
        raise ValueError(f"run_in_sandbox: network must be 'auto', 'netns' or "
                         f"'socket_disabled', got {network!r}")
    if wall_time_s <= 0 or cpu_time_s <= 0 or memory_mb <= 0 or max_output_bytes < 0 \
            or max_processes < 1 or disk_mb < 1:
        raise ValueError("run_in_sandbox: limits must be positive (wall_time_s, cpu_time_s, "
                         "memory_mb, max_processes, disk_mb) and max_output_bytes >= 0")
    caps = sandbox_capabilities()
    if network == "netns" and not caps["netns_available"]:
        raise ValueError("run_in_sandbox: network='netns' but network namespaces are not "
                         "available here (sandbox_capabilities()['netns_available'] is False)")
    netns = caps["netns_available"] and network != "socket_disabled"
    return _run(code, stdin=stdin, wall_time_s=wall_time_s, cpu_time_s=cpu_time_s,
                memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                max_processes=max_processes, mode=caps["mode"], netns=netns, disk_mb=disk_mb)


# --------------------------------------------------------------------------------------------
# the reward

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "py", "python3"}

def extract_code(completion: Any) -> str:
    """The code in a completion: the last ```python (or ```py / ```python3) fenced block, else
    the last untagged fenced block, else the whole text. Chat-format completions (a list of
    ``{"role", "content"}`` dicts) use the last assistant message."""
    if isinstance(completion, (list, tuple)):
        texts = [m.get("content", "") for m in completion
                 if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        completion = texts[-1] if texts else ""
    if isinstance(completion, dict):
        completion = completion.get("content", "")
    text = completion if isinstance(completion, str) else str(completion)
    blocks = _FENCE.findall(text)
    for wanted in (lambda tag: tag.lower() in _PY_TAGS, lambda tag: tag == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return text


# ``-S`` (no site) leaves out the ``exit``/``quit`` builtins, which programs commonly call.
_EXIT_BUILTINS = """\
def _trustrl_exit_builtins():
    import builtins
    def exit(code=None):
        raise SystemExit(code)
    builtins.exit = builtins.quit = exit
_trustrl_exit_builtins()
del _trustrl_exit_builtins
"""
_RUN_AS_MAIN = """\
import sys as _sys
_sys.argv[0] = {main!r}
with open({main!r}, "rb") as _f:
    _code = compile(_f.read(), {main!r}, "exec")
del _f, _sys
exec(_code, {{"__name__": "__main__", "__builtins__": __builtins__, "__file__": {main!r}}})
"""
_CHANNEL_CAP = 32 << 20  # bytes of results kept per completion (more ends its run)
_MAX_STDOUT = 4 << 20  # bytes of stdout kept per program run (stdin/stdout cases; more fails it)


@dataclass(frozen=True)
class CodeGrade:
    """How one completion was graded (the reward's ``last_grades``, for inspection).

    ``score = passed / total`` (counted test cases); ``answered`` of ``steps``: how many steps
    got a well-formed answer on the result channel before it ended; ``killed_reason``,
    ``leftover_processes`` and ``uid`` come from the run's :class:`SandboxResult`
    (``"grader_error"`` if the sandbox could not be started); ``errors``: the first few error
    names the sandbox reported (its say-so, for debugging only).
    """

    score: float
    passed: int
    total: int
    answered: int
    steps: int
    killed_reason: str | None
    leftover_processes: int
    uid: int | None
    errors: tuple[str, ...] = ()


def _grade_one(code: str, plan: TestPlan, timeout_s: float, memory_mb: int) -> CodeGrade:
    """Run ``code`` under the fixed harness in one sandbox and judge what comes back."""
    n = plan.n_cases
    try:
        caps = sandbox_capabilities()
        netns = caps["netns_available"]
        files = {"solution.py": code}
        spec: dict[str, Any] = {"fd": 3, "mode": plan.mode}
        if plan.mode == "stdio":
            # Each run is a fresh interpreter; without a network namespace it gets the socket
            # prelude too.
            files["_trustrl_prog.py"] = _EXIT_BUILTINS + (
                _SOCKET_PRELUDE if not netns else _RUN_AS_MAIN).format(main="solution.py")
            spec.update(steps=[s.payload for s in plan.steps], max_stdout=_MAX_STDOUT,
                        program=[_interpreter()[0], "-I", "-S", "-B", "_trustrl_prog.py"])
        else:
            spec["steps"] = [[s.kind, s.payload] for s in plan.steps]
        res = _run(HARNESS, stdin=json.dumps(spec), wall_time_s=timeout_s, cpu_time_s=timeout_s,
                   memory_mb=memory_mb, max_output_bytes=65536, max_processes=16,
                   mode=caps["mode"], netns=netns, disk_mb=32, extra_files=files,
                   channel_cap=_CHANNEL_CAP)
    except Exception as e:  # noqa: BLE001 - a reward must not take the trainer down
        return CodeGrade(0.0, 0, n, 0, len(plan.steps), "grader_error", 0, None,
                         (f"{type(e).__name__}: {e}",))
    outcomes = read_frames(res.channel, plan.steps)
    passed = sum(case_passes(plan, outcomes))
    errors = tuple(o.error for o in outcomes if not o.ok)[:5]
    return CodeGrade(passed / n if n else 0.0, passed, n, len(outcomes), len(plan.steps),
                     res.killed_reason, res.leftover_processes, res.uid, errors)


def _map_daemon(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                on_error: Callable[[Any, Exception], Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on up to ``workers`` *daemon* threads; an item whose ``fn``
    raises gets ``on_error(item, exc)``. Daemon threads (not a ``concurrent.futures`` pool,
    whose exit hook joins its workers) so that a call abandoned by
    :func:`trustrl.rewards.registry.score_completions` never holds up interpreter exit; the
    sandboxes die with the process (parent-death signals)."""
    results: list[Any] = [None] * len(items)
    lock = threading.Lock()
    todo = iter(range(len(items)))

    def work() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except Exception as e:  # noqa: BLE001 - a reward must not take the trainer down
                results[i] = on_error(items[i], e)

    threads = [threading.Thread(target=work, name=f"trustrl-code-tests-{k}", daemon=True)
               for k in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def code_tests_reward(timeout_s: float = 5.0, memory_mb: int = 512, tests_column: str = "tests",
                      language: str = "python", max_workers: int = 2,
                      numeric_tolerance: float | None = None) -> Callable[..., list[float]]:
    """Reward = fraction of the row's test cases the completion's code passes, in [0, 1].

    Returns ``fn(prompts, completions, **columns) -> list[float]``. ``columns[tests_column]``
    holds per row either Python asserts (a string: each top-level assert is one case, other
    statements set-up; or a list of strings: each one case) or stdin/stdout cases
    (``{"inputs": [...], "outputs": [...]}``, its JSON text, or a list of
    ``{"input", "output"}`` dicts); see :mod:`trustrl.rewards.code_grader` for exactly which
    assert forms are supported. Tests the grader cannot judge itself raise ``ValueError``
    naming the row, case and line, before anything runs.

    The code (:func:`extract_code`) runs once per completion in :func:`run_in_sandbox`'s
    sandbox under a fixed harness: with asserts, the solution is imported as module
    ``"solution"`` (its ``if __name__ == "__main__"`` block does not run, its prints go
    nowhere) and each assert's tested expression is evaluated there; with stdin/stdout cases,
    each input runs the program afresh as ``__main__``. Only plain values come back, through a
    private pipe, and the grader judges them here (threat model: the module docstring).
    ``timeout_s`` is the wall-clock and CPU budget of the whole completion, all its cases
    together: cases not answered by then fail, those answered before count.
    ``numeric_tolerance`` (stdin/stdout cases only): two output tokens that are both decimal
    numbers match when within it, relatively or absolutely; ``None`` = exact tokens.
    A syntax error, a crash, a timeout or any hostile behaviour scores 0 for the cases not
    passed; nothing a completion does makes ``fn`` raise. Completions are graded on
    ``max_workers`` daemon threads, each in its own sandbox. After a call, ``fn.last_grades``
    holds one :class:`CodeGrade` per completion and ``fn.last_isolation`` the
    :func:`sandbox_capabilities` used.
    """
    if language != "python":
        raise ValueError(f"code_tests_reward: language={language!r} is not supported "
                         "(only 'python')")
    if timeout_s <= 0 or memory_mb <= 0 or max_workers < 1:
        raise ValueError("code_tests_reward: timeout_s, memory_mb and max_workers must be > 0")
    if numeric_tolerance is not None and not (numeric_tolerance >= 0
                                              and math.isfinite(numeric_tolerance)):
        raise ValueError(f"code_tests_reward: numeric_tolerance must be a finite number >= 0 "
                         f"or None, got {numeric_tolerance!r}")

    def code_tests(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        if tests_column not in columns:
            raise ValueError(f"code_tests_reward: column {tests_column!r} missing from the "
                             f"batch (have {sorted(columns)})")
        tests = columns[tests_column]
        if len(tests) != len(completions):
            raise ValueError(f"code_tests_reward: column {tests_column!r} has {len(tests)} "
                             f"rows but there are {len(completions)} completions")
        # Parsed (and refused) here, before anything runs; the test code is never executed
        # in this process. Rows of one group share their tests: each distinct one is parsed once.
        plans: dict[str, TestPlan] = {}
        jobs = []
        for i, (c, t) in enumerate(zip(completions, tests)):
            try:
                key = json.dumps(t, sort_keys=True, default=repr)
            except (TypeError, ValueError):
                key = f"row {i}"  # not JSON-able: parsed on its own (and refused)
            if key not in plans:
                plans[key] = parse_tests(t, f"code_tests_reward: row {i} of column "
                                            f"{tests_column!r}",
                                         numeric_tolerance=numeric_tolerance)
            jobs.append((extract_code(c), plans[key]))
        code_tests.last_isolation = sandbox_capabilities()
        grades = _map_daemon(
            lambda job: _grade_one(job[0], job[1], timeout_s, memory_mb), jobs, max_workers,
            lambda job, e: CodeGrade(0.0, 0, job[1].n_cases, 0, len(job[1].steps),
                                     "grader_error", 0, None, (f"{type(e).__name__}: {e}",)))
        code_tests.last_grades = grades
        return [g.score for g in grades]

    sandbox_capabilities()  # a sandbox that cannot be set up fails now, before any model loads
    code_tests.last_isolation = None
    code_tests.last_grades = []
    code_tests.required_columns = (tests_column,)
    return code_tests
