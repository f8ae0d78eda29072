"""Set-up stage of the code sandbox: runs as the sandbox's first process, ends in ``execve``.

Started by :func:`trustrl.rewards.code.run_in_sandbox` as
``<python> -I -S -B _sandbox_child.py <json-config>`` in a fresh session, with a scrubbed
environment, the sandbox's stdin/stdout/stderr attached and the temporary directory as working
directory. It is a separate single-threaded program rather than a ``preexec_fn`` because
``preexec_fn`` runs Python between ``fork`` and ``exec`` of a possibly multi-threaded parent
(the reward scores completions on a thread pool), which the ``subprocess`` docs warn can
deadlock.

Modes ``root`` and ``userns`` (``userns`` first enters a user namespace mapping only our own
uid, for when we are not root)::

    this process (waiter, outside)      unshare(mount, IPC, pid [, net] [, user]); fork
      +- init = pid 1 of the new pid ns   mounts (below); fork; reap all until the program ends
           +- program (pid 2)             rlimits; drop to the sandbox uid; execve python

Mounts (private to the namespace): a new root, an empty tmpfs holding only bind mounts of the
system directories (``/usr``, ``/etc``, ``/dev``) and the interpreter's prefix, the old root's
top-level symbolic links and empty ``/proc`` and ``/tmp``; nothing else of the machine (the
repository, datasets, ``/home``, ``/root``, ``/mnt``, ...) exists in it. Then a procfs of the
new pid namespace (``hidepid=2``); then *every* mount remounted read-only + nosuid; the work
dir becomes a small size/inode-capped tmpfs holding the program's files - the only writable
place, gone with the namespace. The new network namespace has only a loopback that is
down: nothing is reachable, 127.0.0.1 included.

When the program exits, init passes its raw wait status to the waiter through a pipe and
exits; the kernel then kills and reaps everything else in the pid namespace (processes that
``setsid()`` included), and the waiter exits exactly as the program did (same code, or same
signal), so the parent sees the program's status. Init and the waiter are non-dumpable (no
ptrace) and have parent-death SIGKILL chains, so killing the waiter ends the namespace.

Mode ``plain``: no namespaces; rlimits, uid drop (if root) and ``execve`` only.

Result channel: when the config names a ``channel_fd`` (the write end of a pipe the parent
reads, used by the ``code_tests`` grader), the program gets it as fd 3 and init and the waiter
close their copies, so the parent sees end-of-file as soon as the program and everything it
started are gone.

Every step fails *closed*: exit status 121 and a ``trustrl-sandbox-setup-error:`` line on
stderr, and the untrusted code never runs with less isolation than was asked for. The config
(uid, paths, limits) is visible in ``/proc/<pid>/cmdline``; it holds no secrets.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

# statvfs f_flag bits (ST_*) -> mount flags (MS_*); ST_RELATIME (4096) is *not* MS_RELATIME.
_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
             (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))

MNT_DETACH = 2
# pivot_root(2) syscall numbers (asm-generic: 41; x86_64: 155; i386, s390x: 217; arm: 218;
# powerpc: 203).
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "i686": 217,
               "s390x": 217, "armv7l": 218, "ppc64le": 203, "ppc64": 203}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

SETUP_FAILED = 121
CHANNEL_FD = 3  # where the program finds the code grader's result pipe (if it has one)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _fail(msg: str) -> None:
    os.write(2, f"trustrl-sandbox-setup-error: {msg}\n".encode(errors="replace"))
    os._exit(SETUP_FAILED)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def _mount(source, target, fstype, flags, data=None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}): "
                           f"{os.strerror(err)}")


def _pivot_root(new_root: str, put_old: str) -> bool:
    """pivot_root(2) through syscall(2) (glibc has no wrapper); False if the syscall number
    of this machine is unknown here."""
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        return False
    if _libc.syscall(number, os.fsencode(new_root), os.fsencode(put_old)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    return True


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split()[4]) for line in f if line.strip()]


def _remount_readonly(path: str) -> None:
    try:
        st = os.statvfs(path)
    except OSError:
        return  # vanished / unreachable mount point: nothing reachable to protect
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
    for st_bit, ms_bit in _ST_TO_MS:
        if st.f_flag & st_bit:
            flags |= ms_bit
    _mount(None, path, None, flags)


def _build_root(keep: list[str], workdir: str) -> None:
    """Make a new, nearly empty root the only file system the sandbox sees.

    An empty tmpfs gets bind mounts of the ``keep`` paths (the system directories and the
    interpreter's prefix: none is below another), the top-level symbolic links of the old root
    (``/bin -> usr/bin``, ...), and empty ``/proc``, ``/tmp`` and work-dir mount points; it is
    then made the root with ``pivot_root`` and the old root detached (on machines whose
    syscall number we do not know: moved onto ``/`` and chrooted into, as ``switch_root``
    does), so every other path of the machine (the repository, datasets, ``/tmp``, ``/home``,
    ``/root``, ``/mnt``, ``/opt``, ``/var``, ...) is simply absent.
    """
    new = os.path.join(workdir, ".root")
    os.mkdir(new, 0o755)
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    for path in keep:
        if not os.path.isdir(path):
            continue
        target = new + path
        os.makedirs(target, mode=0o755, exist_ok=True)  # inside the new tmpfs only
        _mount(path, target, None, MS_BIND | MS_REC)
    for name in os.listdir("/"):
        link = os.path.join("/", name)
        if os.path.islink(link) and not os.path.lexists(new + link):
            os.symlink(os.readlink(link), new + link)
    for empty in ("/proc", "/tmp", workdir):
        os.makedirs(new + empty, mode=0o755, exist_ok=True)
    # A procfs of the new pid namespace: only the sandbox's own processes are visible
    # (hidepid=2 further hides the root-owned init from the dropped-uid program). Mounted
    # before the old root goes: in a user namespace the kernel allows a new procfs only while
    # a fully visible one is still mounted.
    _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    os.chdir(new)
    if _pivot_root(".", "."):
        # The old root is now stacked under the new one: detach it, so that not even a
        # process with capabilities in this namespace can reach it again.
        if _libc.umount2(b".", MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount2(old root): {os.strerror(err)}")
    else:  # no pivot_root number for this machine: move the mount and chroot, as switch_root
        _mount(new, "/", None, MS_MOVE)
        os.chroot(".")
    os.chdir("/")


def _set_limits_and_drop(cfg: dict) -> None:
    lim = cfg["rlimits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["as"], lim["as"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    uid = cfg.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) \
                or os.getgroups():
            _fail("privilege drop did not take")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, 9)  # after the uid change (a credential change clears it)


def _close_channel(cfg: dict) -> None:
    """Init and the waiter do not keep the result channel open: once the program and its
    descendants are dead, the parent reads end-of-file on it."""
    if cfg.get("channel_fd") is not None:
        os.close(cfg["channel_fd"])


def _exec_program(cfg: dict) -> None:
    try:
        ch = cfg.get("channel_fd")
        if ch is not None and ch != CHANNEL_FD:  # the program finds its channel at fd 3
            os.dup2(ch, CHANNEL_FD, inheritable=True)
            os.close(ch)
        elif ch is not None:
            os.set_inheritable(ch, True)
        os.chdir(cfg["workdir"])
        _set_limits_and_drop(cfg)
        argv = [cfg["python"], "-I", "-S", "-B", cfg["main"]] + list(cfg.get("args", []))
        os.execve(cfg["python"], argv, dict(os.environ))
    except OSError as e:
        _fail(f"{type(e).__name__}: {e}")


def _detach_stdio() -> None:
    """Point fds 0-2 at /dev/null so this process does not hold the sandbox's pipes open."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _waiter(init_pid: int, status_r: int, status_w: int, alarm_s: int) -> None:
    """Outside the new pid namespace: wait for its init, then exit exactly as the program
    did (the init reports the program's raw wait status through a pipe; an init that dies
    without reporting - killed, or set-up failed - is mirrored itself)."""
    os.close(status_w)
    _prctl(PR_SET_DUMPABLE, 0)
    _detach_stdio()
    # Backstop should the parent hang: SIGALRM's default action ends this waiter, and with it
    # (parent-death signals) init and the whole pid namespace. The parent's own wall-clock
    # limit normally acts long before.
    signal.alarm(alarm_s)
    data = b""
    while True:
        chunk = os.read(status_r, 32)
        if not chunk:
            break
        data += chunk
    _, status = os.waitpid(init_pid, 0)
    if data.strip().isdigit():
        status = int(data)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _init(program_pid: int, status_w: int) -> None:
    """pid 1 of the sandbox's pid namespace: reap everything until the program exits, report
    its status, exit. The kernel then SIGKILLs whatever else is left in the namespace (even
    processes that called setsid()) and reaps it, so no zombie or straggler escapes."""
    _detach_stdio()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == program_pid:
            os.write(status_w, str(status).encode())
            os._exit(0)


def _setup_namespaces(cfg: dict, files: dict[str, bytes]) -> None:
    """In the new init (pid 1): mounts, then the program's files in its private tmpfs."""
    workdir, uid = cfg["workdir"], cfg.get("uid")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _build_root(cfg["keep"], workdir)
    for mp in _mount_points():
        _remount_readonly(mp)
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_bytes']},nr_inodes={cfg['max_inodes']},mode=0700"
           + (f",uid={uid},gid={uid}" if uid is not None else ""))
    for name, data in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        if uid is not None:
            os.chown(path, uid, uid)


def _tie_to_parent(cfg: dict) -> None:
    """SIGKILL us if the process that started us dies (then init and the program follow)."""
    _prctl(PR_SET_PDEATHSIG, 9)
    if os.getppid() != cfg["parent_pid"]:
        _fail("parent process gone")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    mode = cfg["mode"]  # "root" | "userns" | "plain"
    _tie_to_parent(cfg)
    if mode == "plain":  # files already in place (written by the parent)
        _exec_program(cfg)
    files = {}
    for name in cfg["files"]:
        with open(os.path.join(cfg["workdir"], name), "rb") as f:
            files[name] = f.read()
    outer_uid, outer_gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | (CLONE_NEWNET if cfg["netns"] else 0)
    if mode == "userns":
        flags |= CLONE_NEWUSER
    try:
        _unshare(flags)
        _tie_to_parent(cfg)  # entering a user namespace changes credentials: set it again
        if mode == "userns":
            # Identity map of our own uid/gid only: once the program is exec'd (euid != 0 in
            # the namespace) it has no capabilities, so it cannot undo the mounts.
            for name, text in (("setgroups", "deny"), ("uid_map", f"{outer_uid} {outer_uid} 1"),
                               ("gid_map", f"{outer_gid} {outer_gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # under memory pressure, the sandbox dies first
        except OSError:
            pass
        status_r, status_w = os.pipe()
        init_pid = os.fork()
        if init_pid:
            _close_channel(cfg)
            _waiter(init_pid, status_r, status_w, cfg["backstop_s"])
        # pid 1 of the new namespace from here on.
        os.close(status_r)
        _prctl(PR_SET_PDEATHSIG, 9)
        _prctl(PR_SET_DUMPABLE, 0)  # the program (same uid in userns mode) cannot ptrace us
        _setup_namespaces(cfg, files)
        program_pid = os.fork()
    except OSError as e:
        _fail(str(e))
    if program_pid == 0:
        os.close(status_w)
        _exec_program(cfg)
    _close_channel(cfg)
    _init(program_pid, status_w)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - anything unexpected must still fail closed
        _fail(f"{type(e).__name__}: {e}")
