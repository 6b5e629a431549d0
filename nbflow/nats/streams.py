"""Typed stream calls: publish (with an ack), read one message, delete, purge, info.

Errors are nbflow's (:mod:`nbflow.errors`). An async publish's ack is awaited with a timeout:
a server that dies between publish and ack is a Transient error, never a hang.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from nbflow.errors import Transient
from nbflow.nats.calls import NO_RETRY, Retrying, call, translate

ACK_TIMEOUT_S = 10.0


class Streams:
    def __init__(self, js, role: str = "", retrying: Retrying = NO_RETRY):
        self.js, self.role, self.retrying = js, role, retrying

    async def _do(self, op: str, what: str, fn, *a, **kw) -> Any:
        async def once():
            return await call(op, what, self.role, fn, *a, **kw)
        return await self.retrying.run(once, f"{op} {what}")

    async def publish(self, subject: str, data: bytes, headers: dict | None = None,
                      timeout: float | None = None):
        """Publish and wait for JetStream's ack (a PubAck: ``.seq``, ``.duplicate``)."""
        return await self._do("publish", subject, self.js.publish, subject, data,
                              headers=headers, timeout=timeout)

    async def publish_async(self, subject: str, data: bytes,
                            headers: dict | None = None) -> Awaitable:
        """Send now; returns an awaitable for the ack (many in flight pipeline well)."""
        fut = await call("publish", subject, self.role, self.js.publish_async, subject, data,
                         headers=headers)
        return _ack(fut, subject)

    async def get_msg(self, stream: str, seq: int, subject: str | None = None,
                      next: bool = False):
        return await self._do("stream.get", f"{stream}#{seq}", self.js.get_msg, stream,
                              seq=seq, subject=subject, next=next)

    async def get_last(self, stream: str, subject: str):
        return await self._do("stream.get", f"{stream}/{subject}", self.js.get_last_msg, stream,
                              subject)

    async def delete_msg(self, stream: str, seq: int) -> None:
        await self._do("stream.admin", f"{stream}#{seq}", self.js.delete_msg, stream, seq)

    async def purge(self, stream: str, subject: str | None = None, keep: int | None = None):
        kw: dict = {"subject": subject}
        if keep is not None:
            kw["keep"] = keep
        return await self._do("stream.admin", f"{stream}/{subject or '*'}", self.js.purge_stream,
                              stream, **kw)

    async def info(self, stream: str, subjects_filter: str | None = None):
        return await self._do("stream.admin", stream, self.js.stream_info, stream,
                              subjects_filter=subjects_filter)


async def _ack(fut, subject: str):
    try:
        return await asyncio.wait_for(fut, ACK_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise Transient(f"publish {subject}: no ack within {ACK_TIMEOUT_S:.0f}s",
                        op="publish", what=subject) from None
    except Exception as e:  # noqa: BLE001 - translated once, here
        t = translate(e, "publish", subject)
        if t is None:
            raise
        raise t from e
