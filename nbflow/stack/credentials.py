"""Credentials of the embedded stack: its users, the nats-server ``authorization`` block that
enforces their roles (nbflow/nats/auth.py has the roles), and which user each child is."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from nbflow.stack.files import data_dir
from nbflow.stack.record import read_stack
from nbflow.stack.server import NatsServer


def stack_authorization(d: Path, namespace: str | None) -> str:
    """Generate the stack's users on first start (credentials.json, 0600) and return the
    nats-server ``authorization`` block that enforces their roles."""
    from nbflow.runs import whoami
    from nbflow.nats import auth
    from nbflow.nats.layout import Layout, default_namespace

    creds = auth.ensure_credentials(d, owner_name(whoami()))
    ns = default_namespace() if namespace is None else namespace
    return auth.authorization_conf(creds, [Layout(ns)])


def add_user(name: str, roles: list[str], data: str | None = None) -> str:
    """Add a user with roles to the embedded stack (effective at once when it runs: the
    server reloads its config); returns the generated password."""
    from nbflow.nats import auth

    d = data_dir(data)
    stack_authorization(d, None)                 # first use: generate the stack's users
    pw = auth.add_user(d, name, roles)
    info = read_stack(d)
    if info and info.get("server_pid"):
        conf = stack_authorization(d, info.get("namespace"))
        NatsServer(d, port=info["port"], extra_conf=conf).write_config()
        os.kill(info["server_pid"], signal.SIGHUP)      # nats-server reloads its config
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
