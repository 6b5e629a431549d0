"""``stack.json``: what a running stack records about itself. Checked, never trusted; what a
dead stack left behind is cleaned up."""
from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

from nbflow.stack.files import LOCK_FILE, STACK_FILE, open_private
from nbflow.stack.procs import alive, listens_on, store_holders


def write_stack(d: Path, info: dict) -> None:
    """Replace ``stack.json`` in one step (0600)."""
    tmp = d / (STACK_FILE + ".tmp")
    with open_private(tmp, "w") as f:
        f.write(json.dumps(info))
    os.replace(tmp, d / STACK_FILE)


def read_stack(data: Path) -> dict | None:
    """The running stack's stack.json, or None. Checked, never trusted: its supervisor must be
    an `nbflow up` that is alive and its nats-server must own the listening port."""
    f = data / STACK_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not alive(info.get("pid"), "nbflow", "up"):
        return None
    spid = info.get("server_pid")
    if spid and not (alive(spid) and listens_on(spid, int(info.get("port") or 0))):
        return None
    return info


def clean_stale(d: Path, locked: bool = False) -> None:
    """A stack.json whose supervisor is gone is stale: stop what it left (its nats-server, if
    it still runs on this store) and remove the file. Never trust it. ``locked``: the caller
    holds the stack lock; else it is taken here (a live `nbflow up` holds it: nothing is stale)."""
    if not locked:
        try:
            lock = open(d / LOCK_FILE, "a+")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        try:
            return clean_stale(d, locked=True)
        finally:
            lock.close()
    f = d / STACK_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        info = None
    if info is not None and alive(info.get("pid"), "nbflow", "up"):
        return
    conf = str(d / "nats-server.conf")
    for pid in ([info.get("server_pid")] if info else []) + store_holders(d):
        if pid and alive(pid, conf):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    try:
        f.unlink()
    except OSError:
        pass
