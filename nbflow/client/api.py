"""The public face: :class:`Client` (the connection, reading, steering and outputs put
together), :class:`SyncClient` (the same calls, blocking), :func:`run_once` and
:func:`parse_param` for one-shot callers."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from nbflow.client.outputs import Outputs
from nbflow.client.steering import Steering
from nbflow.nats import infra


class Client(Steering, Outputs):
    """Everything the faces do with runs: submit (from :class:`~nbflow.runs.Runs`), read, watch,
    steer, fetch artifacts."""


def parse_param(value: str, default: Any = None) -> Any:
    """A -p value from the shell: JSON when it parses (numbers, lists, true/false), else text.
    A parameter whose default is a string stays a string."""
    if isinstance(default, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value



def run_once(fn, url: str | None = None, namespace: str | None = None):
    """Blocking, for one-shot callers (a CLI command): connect, ``await fn(client)``, close."""
    async def go():
        c = await Client.connect(url, namespace)
        try:
            return await fn(c)
        finally:
            await c.close()
    return asyncio.run(go())


class SyncClient:
    """The same calls, blocking. The event loop lives in a daemon thread, so this works in
    plain scripts and inside Jupyter kernels (which already run a loop)."""

    def __init__(self, url: str | None = None, namespace: str | None = None, **conn):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="nbflow-client")
        self._thread.start()
        self.aclient: Client = self._call(Client.connect(url, namespace, reconnect=True, **conn))

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def close(self) -> None:
        try:
            self._call(self.aclient.close(), 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name: str):
        fn = getattr(self.aclient, name)
        if not asyncio.iscoroutinefunction(fn):
            raise AttributeError(name)

        def call(*a, **kw):     # a denied action raises PermissionDenied, not a timeout
            return self._call(infra.guarded(self.aclient.nc, fn(*a, **kw)))
        call.__name__ = name
        call.__doc__ = fn.__doc__
        return call
