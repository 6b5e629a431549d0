"""The engine reads a run's history only when it does not hold the run's current state (#14).

A fan-out's events of many runs interleave in the history stream, so a run's events are never at
consecutive stream sequences; the engine used to read the history between them for every batch
(a `get_msg` round trip each). Now it follows the consumer's delivery sequence and reads only
when some deliveries may have gone elsewhere (another engine, a restart) or the run's state is
not its own. Counted on the engine's NATS boundary (its `get_msg` calls to a real nats-server),
and checked against what matters: every run completes, each task succeeds once, and the stored
snapshot equals the replay of the history — with one engine, two engines sharing the work, and
an engine killed with SIGKILL mid-fan-out."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from support import REPO

from nbflow.core.ir import Edge, Node, Workflow
from nbflow.engine.engine import Engine
from nbflow.nats import infra
from nbflow.nats.layout import Layout
from nbflow.worker.noop import NoopWorker


def fanout(width: int, name: str) -> Workflow:
    ids = [f"p{i:02d}" for i in range(width)]
    return Workflow(name, nodes=[Node("start", "start")] + [Node(i, "task", code="pass")
                                                             for i in ids] + [Node("end", "end")],
                    edges=[Edge("start", i) for i in ids] + [Edge(i, "end") for i in ids]
                    ).validate()


def counting_reads(eng: Engine) -> list:
    calls: list = []
    real = eng.streams.get_msg

    async def get_msg(stream, seq, subject=None, next=False):
        if stream == eng.L.history_stream:
            calls.append(seq)
        return await real(stream, seq, subject=subject, next=next)
    eng.streams.get_msg = get_msg
    return calls


async def check_runs(c, runs: list[str], width: int) -> None:
    for run in runs:
        st = await c.wait(run, timeout=120)
        assert st.state == "succeeded", (run, st.state)
        history = await c.history(run)
        done = [ev["key"] for ev in history if ev.type == "TaskSucceeded"]
        assert sorted(done) == [f"p{i:02d}" for i in range(width)], run   # each once
        assert [ev.type for ev in history].count("RunFinished") == 1
        deadline = time.monotonic() + 30
        while True:          # the final snapshot is written before RunFinished is acked
            snap, replayed = await c.snapshot(run), await c.replay(run)
            if snap is not None and snap.to_dict() == replayed.to_dict():
                break
            assert time.monotonic() < deadline, f"run {run}: snapshot differs from replay"
            await asyncio.sleep(0.05)


async def serve(nc, ns: str, engines: int, batch: int = 256):
    L = Layout(ns)
    engs = []
    for _ in range(engines):
        e = Engine(nc, L, batch=batch)
        await e.start()
        engs.append(e)
    w = NoopWorker(nc, L, concurrency=16)
    await w.start()
    tasks = [asyncio.create_task(x.run()) for x in (*engs, w)]
    return engs, w, tasks


async def stop(services, tasks) -> None:
    for s in services:
        s.stop()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


def test_a_fan_out_of_many_runs_reads_no_history_with_one_engine(nats_server):
    from nbflow.client import Client

    runs_n, width = 12, 8

    async def go():
        nc = await infra.connect(nats_server.url, name="test-engine")
        (eng,), w, tasks = await serve(nc, "catchup1", 1)
        reads = counting_reads(eng)
        c = await Client.connect(nats_server.url, namespace="catchup1")
        try:
            wf = fanout(width, "catchup1")
            runs = list(await asyncio.gather(*(c.submit(wf, {}) for _ in range(runs_n))))
            await check_runs(c, runs, width)
            # the runs' events interleave in the stream (the old engine read the history
            # before most batches: dozens of reads here)
            assert reads == [], f"{len(reads)} history reads for {runs_n} runs"
            assert eng.catchup_reads == 0
            # and it keeps nothing of the finished runs
            assert (len(eng.snapshots), eng.behind, eng.write_s) == (0, {}, {})
            # the acks the engine and the worker defer to their next write all went out: no
            # event and no task is left unacked, none was redelivered
            L, js = Layout("catchup1"), nc.jetstream()
            for stream, durable in ((L.history_stream, L.engine_consumer),
                                    (L.tasks_stream, L.worker_consumer("default"))):
                for _ in range(200):
                    info = await js.consumer_info(stream, durable)
                    if info.num_ack_pending == 0:
                        break
                    await asyncio.sleep(0.05)
                assert (info.num_ack_pending, info.num_redelivered) == (0, 0), durable
        finally:
            await stop([eng, w], tasks)
            await c.close()
            await nc.close()
    asyncio.run(go())


def test_two_engines_sharing_a_fan_out_read_the_history_they_did_not_see(nats_server):
    """Two engines take turns (small batches): each sees gaps in the deliveries and reads what
    the other applied; every run still completes once and its snapshot equals its replay."""
    from nbflow.client import Client

    runs_n, width = 12, 8

    async def go():
        nc1 = await infra.connect(nats_server.url, name="test-engine-1")
        nc2 = await infra.connect(nats_server.url, name="test-engine-2")
        L = Layout("catchup2")
        e1, e2 = Engine(nc1, L, batch=3), Engine(nc2, L, batch=3)
        await e1.start()
        await e2.start()
        w = NoopWorker(nc1, L, concurrency=4)
        await w.start()
        tasks = [asyncio.create_task(x.run()) for x in (e1, e2, w)]
        reads1, reads2 = counting_reads(e1), counting_reads(e2)
        c = await Client.connect(nats_server.url, namespace="catchup2")
        try:
            wf = fanout(width, "catchup2")
            runs = list(await asyncio.gather(*(c.submit(wf, {}) for _ in range(runs_n))))
            await check_runs(c, runs, width)
            assert e1.processed and e2.processed, (e1.processed, e2.processed)
            # each engine noticed deliveries it did not get, and read the history for them
            assert reads1 or reads2
        finally:
            await stop([e1, e2, w], tasks)
            await c.close()
            await nc1.close()
            await nc2.close()
    asyncio.run(go())


def test_an_engine_killed_mid_fan_out_loses_nothing_and_records_nothing_twice(nats_server,
                                                                               tmp_path):
    from nbflow.client import Client

    ns, runs_n, width = "catchupkill", 10, 8
    env = dict(os.environ, NBFLOW_ENGINE_ACK_WAIT="2", PYTHONPATH=str(REPO))

    def engine(crash: str | None = None) -> subprocess.Popen:
        e = dict(env, NBFLOW_CRASH_AT=crash) if crash else env
        return subprocess.Popen([sys.executable, "-m", "nbflow", "engine", "--nats",
                                 nats_server.url, "--namespace", ns], env=e,
                                stdout=open(tmp_path / "engine.log", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    async def go():
        # killed (SIGKILL, by itself) at its 6th batch, before acking it
        victim = engine("before_ack:6")
        nc = await infra.connect(nats_server.url, name="test-worker")
        L = Layout(ns)
        await infra.ensure(nc.jetstream(), L)
        w = NoopWorker(nc, L, concurrency=16)
        await w.start()
        wt = asyncio.create_task(w.run())
        c = await Client.connect(nats_server.url, namespace=ns)
        second = None
        try:
            wf = fanout(width, ns)
            runs = list(await asyncio.gather(*(c.submit(wf, {}) for _ in range(runs_n))))
            for _ in range(600):
                if victim.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            assert victim.returncode == -signal.SIGKILL, "the engine was not killed mid-fan-out"
            unfinished = [r for r in runs if "RunFinished" not in
                          [ev.type for ev in await c.history(r)]]
            assert unfinished, "every run had finished before the kill"
            second = engine()
            await check_runs(c, runs, width)
        finally:
            for p in (victim, second):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(10)
            w.stop()
            await asyncio.wait_for(wt, 10)
            await c.close()
            await nc.close()
    asyncio.run(go())
