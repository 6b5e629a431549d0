"""Credentials of the embedded stack: its users, the nats-server ``authorization`` block that
enforces their roles (nbflow/nats/auth.py has the roles), and which user each child is."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

from nbflow.errors import StackError
from nbflow.stack.files import data_dir, open_private
from nbflow.stack.record import read_stack
from nbflow.stack.server import NatsServer


NAMESPACES_FILE = "namespaces.json"


def served_namespaces(d: Path, namespace: str | None) -> list[str]:
    """The namespaces the stack serves: the one it was started with (``namespace``, else
    NBFLOW_NAMESPACE) and every one a client of this data dir asked for since
    (``namespaces.json``; see :func:`request_namespace`)."""
    from nbflow.nats.layout import Layout, default_namespace

    out = [default_namespace() if namespace is None else namespace]
    try:
        extra = json.loads((d / NAMESPACES_FILE).read_text())
    except (OSError, ValueError):
        extra = []
    for ns in extra if isinstance(extra, list) else []:
        try:
            Layout(ns)                     # a hand-edited file: skip what is not a namespace
        except (ValueError, TypeError):
            continue
        if ns not in out:
            out.append(ns)
    return out


def request_namespace(d: Path, namespace: str) -> None:
    """Ask the stack of data dir ``d`` to serve ``namespace`` too (it looks every half second:
    permissions for it, its streams, an engine and workers)."""
    with open_private(d / (NAMESPACES_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # two clients asking at once: both kept
        try:
            have = json.loads((d / NAMESPACES_FILE).read_text())
        except (OSError, ValueError):
            have = []
        if namespace in have:
            return
        tmp = d / (NAMESPACES_FILE + ".tmp")
        with open_private(tmp, "w") as f:
            f.write(json.dumps([*have, namespace]))
        os.replace(tmp, d / NAMESPACES_FILE)


def stack_authorization(d: Path, namespace: str | None) -> str:
    """Generate the stack's users on first start (credentials.json, 0600) and return the
    nats-server ``authorization`` block that enforces their roles in every namespace the stack
    serves."""
    from nbflow.runs import whoami
    from nbflow.nats import auth
    from nbflow.nats.layout import Layout

    creds = auth.ensure_credentials(d, owner_name(whoami()))
    return auth.authorization_conf(creds, [Layout(ns) for ns in served_namespaces(d, namespace)])


def reload_server(d: Path, port: int, server_pid: int, namespace: str | None) -> None:
    """Rewrite the running server's config (users, namespaces) and have it reload."""
    conf = stack_authorization(d, namespace)
    NatsServer(d, port=port, extra_conf=conf).write_config()
    os.kill(server_pid, signal.SIGHUP)      # nats-server reloads its config


def wait_permitted(d: Path, url: str, namespace: str, timeout: float = 15.0) -> None:
    """Wait until the stack's owner may read ``namespace``'s streams (a reload took effect)."""
    import asyncio

    from nbflow.nats import auth, infra
    from nbflow.nats.layout import Layout

    creds = auth.load_credentials(d)
    owner = creds["owner"]

    async def ok() -> bool:
        nc = await infra.connect(infra.ConnectOptions(
            url=url, user=owner, password=creds["users"][owner]["password"]),
            name="nbflow-stack", reconnect=False)
        try:
            await infra.guarded(nc, nc.jetstream().stream_info(Layout(namespace).history_stream))
            return True
        except Exception:  # noqa: BLE001 - not reloaded yet
            return False
        finally:
            await nc.close()
    deadline = time.monotonic() + timeout
    while not asyncio.run(ok()):
        if time.monotonic() > deadline:
            raise StackError(f"nats-server did not take the permissions for namespace "
                             f"{namespace!r} within {timeout:.0f}s")
        time.sleep(0.1)


def add_user(name: str, roles: list[str], data: str | None = None) -> str:
    """Add a user with roles to the embedded stack (effective at once when it runs: the
    server reloads its config); returns the generated password."""
    from nbflow.nats import auth

    d = data_dir(data)
    stack_authorization(d, None)                 # first use: generate the stack's users
    pw = auth.add_user(d, name, roles)
    info = read_stack(d)
    if info and info.get("server_pid"):
        reload_server(d, info["port"], info["server_pid"], info.get("namespace"))
    return pw


def owner_name(who: str) -> str:
    clean = "".join(c if c.isalnum() or c in "_-" else "_" for c in who)[:64]
    return clean or "owner"


def stack_role_env(d: Path) -> dict[str, dict[str, str]]:
    """Which stack user each child connects as (its password is read from the data dir)."""
    path = str(d / "credentials.json")
    return {"engine": {"NBFLOW_NATS_USER": "engine", "NBFLOW_STACK_CREDENTIALS": path},
            "worker": {"NBFLOW_NATS_USER": "worker", "NBFLOW_STACK_CREDENTIALS": path}}


def create_streams(d: Path, url: str, namespace: str | None) -> None:
    """Create nbflow's streams as the engine before workers start (they may not create)."""
    import asyncio

    from nbflow.nats import auth, infra
    from nbflow.nats.layout import Layout, default_namespace

    user, pw = "engine", auth.load_credentials(d)["users"]["engine"]["password"]

    async def go():
        nc = await infra.connect(infra.ConnectOptions(url=url, user=user, password=pw),
                                 name="nbflow-stack", reconnect=False)
        try:
            ns = default_namespace() if namespace is None else namespace
            await infra.ensure(nc.jetstream(), Layout(ns), look_first=False)
        finally:
            await nc.close()
    asyncio.run(go())
