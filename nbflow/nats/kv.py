"""Typed KV calls: one small wrapper over a nats-py KeyValue bucket.

Errors are nbflow's (:mod:`nbflow.errors`): ``get`` of a missing or deleted key raises
NotFound, a lost compare-and-set raises Conflict, timeouts and disconnects raise Transient.
"""
from __future__ import annotations

from typing import Any, Awaitable

from nbflow.errors import NotFound
from nbflow.nats.calls import NO_RETRY, Retrying, call


class KV:
    def __init__(self, kv, bucket: str, role: str = "", retrying: Retrying = NO_RETRY):
        self.raw, self.bucket, self.role, self.retrying = kv, bucket, role, retrying

    @classmethod
    async def open(cls, js, bucket: str, role: str = "",
                   retrying: Retrying = NO_RETRY) -> "KV":
        async def _open():
            return await call("kv.open", bucket, role, js.key_value, bucket)
        return cls(await retrying.run(_open, f"open bucket {bucket}"), bucket, role, retrying)

    async def _do(self, op: str, key: str, fn, *a, **kw) -> Any:
        what = f"{self.bucket}/{key}"

        async def once():
            return await call(op, what, self.role, fn, *a, **kw)
        return await self.retrying.run(once, f"{op} {what}")

    async def get(self, key: str):
        """The entry (``.value``, ``.revision``); NotFound when missing or deleted."""
        return await self._do("kv.get", key, self.raw.get, key)

    async def get_or_none(self, key: str):
        try:
            return await self.get(key)
        except NotFound:
            return None

    async def put(self, key: str, value: bytes) -> int:
        return await self._do("kv.put", key, self.raw.put, key, value)

    async def put_async(self, key: str, value: bytes) -> Awaitable:
        """Send a put now; returns an awaitable for its ack (the revision's PubAck), so that a
        put can travel with other publishes and share their wait."""
        from nbflow.nats.streams import _ack

        subject = f"{self.raw._pre}{key}"
        fut = await call("kv.put", f"{self.bucket}/{key}", self.role,
                         self.raw._js.publish_async, subject, value)
        return _ack(fut, subject)

    async def create(self, key: str, value: bytes) -> int:
        """Write only if absent (or deleted); Conflict when it exists."""
        return await self._do("kv.put", key, self.raw.create, key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Compare-and-set on ``last`` revision; Conflict when someone wrote since."""
        return await self._do("kv.put", key, self.raw.update, key, value, last=last)

    async def delete(self, key: str, missing_ok: bool = True) -> None:
        try:
            await self._do("kv.put", key, self.raw.delete, key)
        except NotFound:
            if not missing_ok:
                raise

    async def purge(self, key: str) -> None:
        await self._do("kv.put", key, self.raw.purge, key)

    async def keys(self) -> list[str]:
        """All keys; [] for an empty bucket. nats-py's listing can end before the first key
        arrives (it reads its watcher's pending count after the server has sent every key but
        before its callback saw one, and then reports no keys): an empty answer from a bucket
        whose stream holds messages is asked again (three times in all; a bucket of deleted
        keys only is then []), so one unlucky listing does not read a full bucket as
        empty."""
        for _ in range(3):
            try:
                return await self._do("kv.keys", "*", self.raw.keys)
            except NotFound:
                if not await self._holds_messages():
                    return []
        return []

    async def _holds_messages(self) -> bool:
        info = await self._do("kv.keys", "*", self.raw._js.stream_info, self.raw._stream)
        return bool(info.state.messages)

    async def history(self, key: str) -> list:
        try:
            return await self._do("kv.get", key, self.raw.history, key)
        except NotFound:
            return []

    async def watch(self, key: str, **kw):
        return await self._do("kv.get", key, self.raw.watch, key, **kw)

    async def watchall(self, **kw):
        return await self._do("kv.get", "*", self.raw.watchall, **kw)
