"""Workers' task work dirs: named after the worker's pid, so a dir whose worker is gone (killed
mid-task) is known to be stale and is removed by the next worker's start or `nbflow gc`."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

PREFIX = "nbflow-w"
_OURS = re.compile(r"^nbflow-w(\d+)-")
_LEGACY = re.compile(r"^nbflow-(?!w\d|kernels-)[a-z0-9-]+-")   # before pids were in the name
LEGACY_AGE_S = 24 * 3600


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
    """Remove work dirs whose worker process is gone (and unnamed ones older than a day)."""
    root = root or tempfile.gettempdir()
    out = []
    try:
        names = os.listdir(root)
    except OSError:
        return out
    now = time.time()
    for n in names:
        path = os.path.join(root, n)
        m = _OURS.match(n)
        if m:
            stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
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
    return out
