"""Helpers shared by test_schedules.py and test_triggers.py: a private stack per test (its own
namespace, so schedules never leak between tests) and polling with deadlines."""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from support import wait_for

SCHED = Path(__file__).parent / "data" / "sched"


def until(pred, timeout: float = 20.0, what: str = "condition", every: float = 0.1):
    return wait_for(pred, timeout, what, every)


class S:
    """The Schedules API, called synchronously through a SyncClient's loop."""

    def __init__(self, sc):
        from nbflow.schedules.api import Schedules

        self.sc, self.api = sc, Schedules(sc.aclient)
        self.L, self.js = sc.aclient.L, sc.aclient.js

    def __getattr__(self, name):
        fn = getattr(self.api, name)

        def call(*a, **kw):
            return self.sc._call(fn(*a, **kw))
        return call

    def run(self, coro, timeout: float | None = 30):
        return self.sc._call(coro, timeout)

    def starts(self, prefix: str) -> list:
        """RunStarted events in history whose schedule field starts with ``prefix``."""
        from nbflow.schedules.api import _run_starts

        async def go():
            return [ev async for ev in _run_starts(self.sc.aclient)
                    if ev.get("schedule", "").startswith(prefix)]
        return self.run(go())

    def count(self, subject: str) -> int:
        """Messages on ``subject`` in the timers stream (ticks, schedule messages, log)."""
        async def go():
            info = await self.js.stream_info(self.L.timers_stream, subjects_filter=subject)
            return (info.state.subjects or {}).get(subject, 0)
        return self.run(go())

    def consumer(self, stream: str, durable: str):
        async def go():
            try:
                return await self.js.consumer_info(stream, durable)
            except Exception:  # noqa: BLE001 - not created yet
                return None
        return self.run(go())

    def scheduler_ready(self, engines: int = 1) -> bool:
        ci = self.consumer(self.L.timers_stream, self.L.scheduler_consumer)
        return bool(ci) and (ci.num_waiting or 0) >= engines


@contextmanager
def private_stack(nats_server, tmp_path, engines: int = 1, workers: int = 0,
                  namespace: str | None = None, wait_ready: bool = True):
    """Engine(s) + workers in a fresh namespace, and an S over a client of it."""
    from nbflow.client import SyncClient
    from nbflow.stack import Supervisor

    ns = namespace or f"sched-{uuid.uuid4().hex[:8]}"
    sup = Supervisor(nats_server.url, workers=workers, engines=engines, namespace=ns,
                     log_file=tmp_path / f"{ns}.log").start()
    sc = SyncClient(nats_server.url, namespace=ns)
    s = S(sc)
    try:
        if wait_ready:
            until(lambda: s.scheduler_ready(engines), 30, f"{engines} engine(s) to serve")
        yield s, sup, ns
    finally:
        sup.stop()
        sc.close()


def fires(events) -> list[str]:
    return sorted(ev["schedule"].partition("@")[2] for ev in events)


def run_async(coro):
    return asyncio.run(coro)
