"""Workers' task work dirs and kernel pools' dirs: named after the worker's pid, so a dir whose
worker is gone (killed mid-task) is known to be stale and is removed by the next worker's start
or `nbflow gc`.

What a task or kernel leaves on disk lives in one of them: the task's work dir
(``nbflow-w<pid>-<run>-<key>-*``: inputs, the task notebook and its executed copy, outputs, the
connection file of a papermill-engine kernel) is removed when the task ends; a task's private
copy of its bundle (``nbflow-w<pid>-folder-*``) when the task changed it, else it serves the next
task of the bundle (bundles.TaskFolders) and is removed when the worker stops; a kernel pool's dir (``nbflow-kernels-<pid>-*``: the kernels' ipc sockets and
connection files) when the pool shuts down. Kernel connection files that older versions wrote to
the temp dir itself (``tmp*.json`` naming a pool dir that is gone) are removed too."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time

PREFIX = "nbflow-w"
_OURS = re.compile(r"^nbflow-(?:w|kernels-)(\d+)-")
_LEGACY = re.compile(r"^nbflow-(?!w\d|kernels-)[a-z0-9-]+-")   # before pids were in the name
_LEGACY_KERNELS = re.compile(r"^nbflow-kernels-[a-z0-9_]{8}$")
_CONN = re.compile(r"^tmp[a-z0-9_]+\.json$")          # jupyter_client's default connection files
LEGACY_AGE_S = 24 * 3600
LEGACY_KERNELS_AGE_S = 600


def make(run: str, key: str) -> str:
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{run}-{key.replace('#', '-')}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, owned by someone else
        return True
    return True


def clean_stale(root: str | None = None, dry_run: bool = False) -> list[str]:
    """Remove work dirs and kernel pool dirs whose worker process is gone (unnamed work dirs
    older than a day, unnamed pool dirs no live kernel has a socket in), and kernel connection
    files naming a pool dir that is gone. Returns the paths (to be) removed."""
    root = root or tempfile.gettempdir()
    out = []
    try:
        names = os.listdir(root)
    except OSError:
        return out
    now = time.time()
    conns = []
    for n in names:
        path = os.path.join(root, n)
        if _CONN.match(n):
            conns.append(path)
            continue
        m = _OURS.match(n)
        if m:
            stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
        elif _LEGACY_KERNELS.match(n):
            # an older worker's pool dir has no pid in its name: only its sockets tell it is
            # in use, and a kernel that is still starting has not bound them yet — so a young
            # dir is never touched (removing it killed kernels starting beside a new worker)
            try:
                young = now - os.path.getmtime(path) < LEGACY_KERNELS_AGE_S
            except OSError:
                continue
            stale = not young and not _sockets_in_use(path)
        elif _LEGACY.match(n):
            try:
                stale = now - os.path.getmtime(path) > LEGACY_AGE_S
            except OSError:
                continue
        else:
            continue
        if stale and os.path.isdir(path):
            out.append(path)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    gone = set(out)
    for path in conns:
        if _stale_connection_file(path, now, gone):
            out.append(path)
            if not dry_run:
                try:
                    os.unlink(path)
                except OSError:
                    pass
    return out


def _sockets_in_use(folder: str) -> bool:
    """Whether a live process has a unix socket bound in ``folder`` (a kernel pool's ipc
    sockets); True when that cannot be told."""
    try:
        with open("/proc/net/unix") as f:
            bound = f.read()
    except OSError:
        return True
    return (folder.rstrip("/") + "/") in bound


def _stale_connection_file(path: str, now: float, gone: set[str]) -> bool:
    """A kernel connection file an nbflow kernel pool left in the temp dir (older versions):
    its ipc endpoint is in a pool dir that no longer exists."""
    try:
        if now - os.path.getmtime(path) < 60 or os.path.getsize(path) > 4096:
            return False
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    ip = info.get("ip") if isinstance(info, dict) else None
    if info.get("transport") != "ipc" or not isinstance(ip, str):
        return False
    pool = os.path.dirname(ip)
    return os.path.basename(pool).startswith("nbflow-kernels-") and \
        (pool in gone or not os.path.isdir(pool))
