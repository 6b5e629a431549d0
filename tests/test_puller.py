"""The engine's one outstanding pull request (nats/infra.Puller) on a real nats-server: it
delivers what is published, one request serves many calls (counted on the wire: nats-py's
fetch sends a probe and a long poll per call), an expired request is replaced, nothing is lost
or delivered twice."""
from __future__ import annotations

import asyncio

import nats
import pytest

from nbflow.nats.infra import Puller


async def _setup(url: str, name: str):
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
    sub = await js.pull_subscribe(f"{name.lower()}.>", durable="d", stream=name)
    tap = await nats.connect(url)
    seen: list[bytes] = []

    async def on_req(msg):
        seen.append(msg.data)
    await tap.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{name}.d", cb=on_req)
    await tap.flush()
    return nc, js, sub, tap, seen


def test_one_pull_request_serves_many_calls(nats_server):
    async def go():
        nc, js, sub, tap, seen = await _setup(nats_server.url, "PULLA")
        try:
            p = Puller(sub, batch=64)
            got = []
            for i in range(30):
                await js.publish("pulla.x", str(i).encode())
                msgs = await p.fetch(64, timeout=5)
                for m in msgs:
                    got.append(int(m.data))
                    await m.ack()
            # published while the caller waits: it comes
            asyncio.get_running_loop().call_later(
                0.2, lambda: asyncio.ensure_future(js.publish("pulla.x", b"30")))
            msgs = await p.fetch(64, timeout=5)
            got += [int(m.data) for m in msgs]
            for m in msgs:
                await m.ack()
            await tap.flush()
            await asyncio.sleep(0.1)
            assert got == list(range(31))
            assert len(seen) == p.requests == 1
            with pytest.raises(asyncio.TimeoutError):
                await p.fetch(64, timeout=0.3)       # nothing there: a quiet timeout
        finally:
            await tap.close()
            await nc.close()
    asyncio.run(go())


def test_an_expired_request_is_replaced_and_nothing_is_lost_or_doubled(nats_server):
    async def go():
        nc, js, sub, tap, seen = await _setup(nats_server.url, "PULLB")
        try:
            p = Puller(sub, batch=16, expires=1.0, heartbeat=0.3)
            with pytest.raises(asyncio.TimeoutError):
                await p.fetch(16, timeout=1.5)        # the request expires meanwhile
            for i in range(100):
                await js.publish("pullb.x", str(i).encode())
            got = []
            while len(got) < 100:
                msgs = await p.fetch(16, timeout=5)
                assert 0 < len(msgs) <= 16
                for m in msgs:
                    got.append(int(m.data))
                    await m.ack()
            assert got == list(range(100))
            with pytest.raises(asyncio.TimeoutError):
                await p.fetch(16, timeout=0.5)
            await nc.flush()        # the requests reached the server, then their copies the tap
            await tap.flush()
            assert len(seen) == p.requests >= 2
            assert p.requests < 100 / 16 + 3         # top-ups, not a request per call
        finally:
            await tap.close()
            await nc.close()
    asyncio.run(go())


def test_an_idle_engine_keeps_one_pull_request_per_loop(nats_server):
    """The engine's history, timer and schedule-tick loops and the noop worker each hold one
    outstanding request while idle (counted on the wire; nats-py's fetch sent a probe and a
    long poll per loop every second: ~16 requests per loop here)."""
    from nbflow.engine.engine import Engine
    from nbflow.nats import infra
    from nbflow.nats.layout import Layout
    from nbflow.worker.noop import NoopWorker

    async def go():
        L = Layout("idlepulls")
        nc = await infra.connect(nats_server.url, name="test-engine")
        tap = await nats.connect(nats_server.url)
        seen: dict[str, int] = {}

        # this namespace's streams only: the test server is shared with the other tests of
        # this process, whose consumers have the same names in other namespaces' streams
        mine = {L.history_stream, L.tasks_stream, L.timers_stream, L.deadletter_stream,
                L.triggers_stream}

        async def on_req(msg):
            stream, consumer = msg.subject.rsplit(".", 2)[1:]
            if stream in mine:
                seen[consumer] = seen.get(consumer, 0) + 1
        await tap.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=on_req)
        await tap.flush()
        eng = Engine(nc, L)
        await eng.start()
        w = NoopWorker(nc, L)
        await w.start()
        tasks = [asyncio.create_task(x.run()) for x in (eng, w)]
        try:
            await asyncio.sleep(8)
        finally:
            eng.stop()
            w.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            await tap.close()
            await nc.close()
        for consumer in (L.engine_consumer, L.timers_consumer, L.scheduler_consumer,
                         L.worker_consumer("default")):
            assert 1 <= seen.get(consumer, 0) <= 2, (consumer, seen)
    asyncio.run(go())
