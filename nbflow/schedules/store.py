"""The schedules store: definitions (``sched.<name>``), triggers (``trig.<name>``) and runtime
state (``state.<name>``, CAS) in the schedules KV; each schedule's log subject; the schedule
message that makes nats-server fire ticks. Shared by the client side (api.py) and the engine side
(scheduler.py).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from nbflow.core.events import schedule_log_msg_id
from nbflow.errors import Conflict, NotFound
from nbflow.nats.calls import CLIENT_RETRY, Retrying, call
from nbflow.nats.kv import KV
from nbflow.nats.streams import Streams
from nbflow.nats.layout import (DUPLICATE_WINDOW_S, MSG_ID, SCHEDULE, SCHEDULE_TARGET, SCHEDULE_TZ,
                                Layout)
from nbflow.schedules.cron import Spec

LOG_TTL = "2160h"              # schedule log events are kept 90 days
TICK_TTL = "24h"               # server-made ticks expire after a day


class Store:
    """Schedules KV + schedule/tick/log subjects, over one JetStream context (through the
    typed NATS boundary: ``role`` names the caller for fault injection)."""

    def __init__(self, js, layout: Layout, role: str = "client",
                 retrying: Retrying = CLIENT_RETRY):
        self.js, self.L, self.role, self.retrying = js, layout, role, retrying
        self.streams = Streams(js, role=role, retrying=retrying)
        self._kv: KV | None = None

    async def kv(self) -> KV:
        if self._kv is None:
            self._kv = await KV.open(self.js, self.L.schedules_bucket, role=self.role,
                                     retrying=self.retrying)
        return self._kv

    async def get(self, key: str) -> tuple[dict | None, int]:
        kv = await self.kv()
        e = await kv.get_or_none(key)
        if e is None:
            return None, 0
        if e.value is None or not e.value:
            return None, e.revision
        return json.loads(e.value), e.revision

    async def put(self, key: str, value: dict, last: int | None = None) -> int:
        """CAS write: ``last`` = revision read (0 = must not exist); None = unconditional."""
        kv = await self.kv()
        raw = json.dumps(value, separators=(",", ":")).encode()
        if last is None:
            return await kv.put(key, raw)
        if last == 0:
            return await kv.create(key, raw)         # nats-py recreates deleted keys too
        return await kv.update(key, raw, last=last)

    async def delete(self, key: str) -> None:
        kv = await self.kv()
        await kv.delete(key)

    async def keys(self, prefix: str) -> list[str]:
        kv = await self.kv()
        ks = await kv.keys()
        return sorted(k[len(prefix):] for k in ks if k.startswith(prefix))

    async def history(self, key: str) -> list[dict]:
        kv = await self.kv()
        entries = await kv.history(key)
        out = []
        for e in entries:
            out.append({"revision": e.revision, "op": str(getattr(e, "operation", "") or "PUT"),
                        **(json.loads(e.value) if e.value else {})})
        return out

    async def update_state(self, name: str, fn) -> dict:
        """Read-modify-CAS ``state.<name>``: ``fn(state) -> state``; retried on conflicts."""
        for _ in range(50):
            st, rev = await self.get(f"state.{name}")
            new = fn(dict(st or {}))
            try:
                await self.put(f"state.{name}", new, last=rev)
                return new
            except Conflict:
                continue
        raise RuntimeError(f"schedule {name}: state CAS kept conflicting")

    async def log(self, name: str, what: str, fire: str | None = None, **data: Any) -> None:
        """Append to the schedule's log; one event per (name, fire, what) thanks to msg-id dedup."""
        ev = {"type": what, "schedule": name, "fire": fire, "ts": time.time(), **data}
        mid = schedule_log_msg_id(name, fire or str(time.time()), what)
        await self.streams.publish(self.L.schedule_log_subject(name),
                                   json.dumps(ev, separators=(",", ":"), default=str).encode(),
                                   headers={MSG_ID: mid, "Nats-TTL": LOG_TTL})

    async def read_log(self, name: str) -> list[dict]:
        subj = self.L.schedule_log_subject(name)
        try:
            info = await self.streams.info(self.L.timers_stream, subjects_filter=subj)
            total = (info.state.subjects or {}).get(subj, 0)
        except NotFound:
            total = 0
        if not total:
            return []
        out: list[dict] = []
        sub = await self.js.subscribe(subj, ordered_consumer=True, stream=self.L.timers_stream)
        try:
            while len(out) < total:
                try:
                    m = await sub.next_msg(timeout=5)
                except asyncio.TimeoutError:
                    break
                out.append(json.loads(m.data))
        finally:
            await sub.unsubscribe()
        return out

    # -- the server-side clock --
    async def arm(self, name: str, spec: Spec) -> None:
        """(Re)publish the schedule message: nats-server fires ticks from now on."""
        await self.disarm(name)
        hdrs = {SCHEDULE: spec.server, SCHEDULE_TARGET: self.L.cron_tick_subject(name),
                "Nats-Schedule-TTL": TICK_TTL}
        if spec.tz and spec.tz != "UTC" and spec.cron6:
            hdrs[SCHEDULE_TZ] = spec.tz
        await self.streams.publish(self.L.cron_schedule_subject(name),
                                   json.dumps({"schedule": name}).encode(), headers=hdrs)

    async def disarm(self, name: str) -> None:
        """Remove the schedule message: the server stops firing."""
        await self.streams.purge(self.L.timers_stream, subject=self.L.cron_schedule_subject(name))


async def ensure_triggers_stream(js, L: Layout, subjects: list[str]) -> None:
    """The stream capturing trigger subjects (dedup window = ours). Deleted with the last one."""
    from nats.js.api import StorageType, StreamConfig

    if not subjects:
        try:
            await call("stream.admin", L.triggers_stream, "client", js.delete_stream,
                       L.triggers_stream)
        except NotFound:
            pass
        return
    cfg = StreamConfig(name=L.triggers_stream, subjects=sorted(set(subjects)),
                       storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S,
                       max_age=7 * 24 * 3600,
                       description="nbflow event triggers: messages that start runs")
    try:
        await call("stream.admin", L.triggers_stream, "client", js.stream_info,
                   L.triggers_stream)
    except NotFound:
        await call("stream.admin", L.triggers_stream, "client", js.add_stream, cfg)
        return
    await call("stream.admin", L.triggers_stream, "client", js.update_stream, cfg)
