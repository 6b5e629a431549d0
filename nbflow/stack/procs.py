"""Process supervision on this machine.

Children must never outlive the stack (an orphaned nats-server once kept a store open while a
new stack opened it too): each child asks the kernel for a signal when its parent dies, the
store dir is locked by the server that has it open, and a listener is checked to be ours.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from nbflow.errors import StackError
from nbflow.stack.files import STORE_LOCK

PR_SET_PDEATHSIG = 1


def child_setup(die_with_parent: bool):
    """A preexec_fn: with ``die_with_parent``, the child gets SIGTERM when the process that
    started it dies (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not die_with_parent or not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def setup():
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:          # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def lock_store(store_dir: Path, timeout: float = 15.0):
    """Lock ``store_dir`` for one nats-server (flock on store.lock). The returned file is passed
    to the server, whose copy holds the lock as long as it runs. Waits ``timeout`` s for a dying
    server to let go; then raises StackError naming the holder."""
    store_dir.mkdir(parents=True, exist_ok=True)
    f = open(store_dir / STORE_LOCK, "a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            if time.monotonic() >= deadline:
                f.close()
                holders = store_holders(store_dir)
                raise StackError(
                    f"the store {store_dir} is in use by another nats-server "
                    f"(pid {', '.join(map(str, holders)) or '?'}); two servers must never share "
                    f"a store: stop it (nbflow down, or kill that pid) and try again") from None
            time.sleep(0.1)


def store_holders(store_dir: Path) -> list[int]:
    """Pids of processes that have ``store_dir``'s lock file open (Linux /proc; else [])."""
    target = str((store_dir / STORE_LOCK).resolve())
    out = []
    for pid in _pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    out.append(pid)
                    break
        except OSError:
            continue
    return out


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def listens_on(pid: int, port: int) -> bool:
    """True when process ``pid`` owns the socket listening on ``port`` (Linux /proc; elsewhere
    True: the check is skipped)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not os.path.isdir("/proc/self/fd"):
        return True
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def exited(pid: int) -> bool:
    """``pid`` has ended: reaped here when it is this process's own child (a notebook kernel or a
    test that started the stack in the background: until reaped, its stack stays a zombie that
    ``kill(pid, 0)`` still finds), or a zombie waiting for another parent."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:          # not our child: its parent (or init) reaps it
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def alive(pid: int | None, *cmd_words: str) -> bool:
    """``pid`` runs and (where /proc tells) its command line contains every word."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (OSError, TypeError):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return True
    return all(w in cmd for w in cmd_words)
