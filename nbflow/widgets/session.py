"""This kernel's side of the widgets: one shared client per NATS url and namespace, the
kernel's asyncio loop, and the RunView shown last (``%flow run`` / ``%flow watch``)."""
from __future__ import annotations

import asyncio
import threading

from nbflow.client import SyncClient
from nbflow.errors import NbflowError

_CLIENTS: dict[tuple[str | None, str | None], SyncClient] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(url: str | None = None, namespace: str | None = None) -> SyncClient:
    """One SyncClient per (url, namespace) for this process (a kernel keeps one connection).
    ``url``/``namespace`` default to NBFLOW_NATS_URL / NBFLOW_NAMESPACE, else the embedded
    stack (started in the background as its own process: a kernel restart does not stop it)."""
    key = (url, namespace)
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(key)
        if c is None or not c.loop.is_running():
            from nbflow.stack import nats_url       # the magics' face: start it on demand

            c = _CLIENTS[key] = SyncClient(nats_url(url), namespace=namespace)
        return c


def kernel_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running in this thread (the kernel's), if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_LAST: list = []          # [the RunView shown last]


def last_view() -> "RunView":  # noqa: F821 (runview imports this module)
    """The RunView that ``%flow run`` / ``%flow watch`` showed last in this kernel."""
    if not _LAST:
        raise NbflowError("no run shown yet in this kernel: `%flow run` starts one")
    return _LAST[-1]


def remember(view: "RunView") -> "RunView":  # noqa: F821
    _LAST[:] = [view]
    return view
