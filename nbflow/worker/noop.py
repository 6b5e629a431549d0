"""A worker that completes every task instantly: the engine's benchmark partner.

It pulls from a queue's tasks stream like the real worker and reports ``TaskSucceeded`` with no
outputs (optionally ``TaskStarted`` first), so what a benchmark measures is the engine and NATS,
never papermill. Crash safety is the real worker's: the completion event is published and
acknowledged by JetStream (``Nats-Msg-Id`` = ``done.<run>.<key>.<attempt>``) before the task
message is acked. Tasks are handled in batches (one outstanding pull request, completions
published async, then the acks — sent with the next batch's completions, or within
ACK_DEFER_S when none come), which is what lets it keep up with an engine.

    python -m nbflow.worker.noop --nats nats://127.0.0.1:4222 --namespace bench --concurrency 64

or in-process::

    w = NoopWorker(nc, Layout("bench"), concurrency=64)
    await w.start(); task = asyncio.create_task(w.run()); ...; w.stop(); await task
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time

from nbflow.nats import infra
from nbflow.core.events import TaskMessage, done_msg_id, make, started_msg_id
from nbflow.errors import BadMessage
from nbflow.nats.layout import MSG_ID, Layout

log = logging.getLogger("nbflow.worker.noop")

ACK_WAIT_S = 30.0
ACK_DEFER_S = 0.02      # a completed task's ack waits this long at most for the next write


class NoopWorker:
    def __init__(self, nc, layout: Layout | None = None, *, queue: str = "default",
                 concurrency: int = 64, started: bool = False, name: str | None = None):
        self.nc, self.js = nc, nc.jetstream()
        self.L = layout or Layout()
        self.queue, self.concurrency, self.started = queue, max(1, concurrency), started
        self.name = name or f"noop-{socket.gethostname()}-{os.getpid()}"
        self._stop = asyncio.Event()
        self.done = 0
        self._acks: list = []            # completed tasks (their events stored), not acked yet

    async def start(self, ensure: bool = True) -> None:
        if ensure:
            await infra.ensure(self.js, self.L)
        self.sub = await infra.pull_tasks(self.js, self.L, self.queue, ACK_WAIT_S)
        # one outstanding pull request, topped up (not fetch()'s probe + request per call)
        self.pull = infra.Puller(self.sub, self.concurrency)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            await self._send_acks()

    async def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        await infra.ack_all(acks)

    async def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msgs = await self.pull.fetch(self.concurrency,
                                             timeout=ACK_DEFER_S if self._acks else 0.5)
            except asyncio.TimeoutError:
                await self._send_acks()
                continue
            except Exception as e:  # noqa: BLE001 - reconnecting: keep trying
                if self._stop.is_set():
                    break
                log.warning("fetch failed (%s); retrying", e)
                await asyncio.sleep(0.2)
                continue
            # the last batch's acks go with this batch's completions (one write), or alone
            # when no task came within ACK_DEFER_S
            await self._send_acks()
            try:
                await self.handle(msgs)
            except Exception:  # noqa: BLE001 - unacked messages are redelivered
                log.exception("completing %d task(s) failed; they will be redelivered", len(msgs))

    async def handle(self, msgs: list) -> None:
        """Complete a batch: publish every completion, wait for JetStream's acks, then ack."""
        futs, todo = [], []
        for m in msgs:
            try:
                t = TaskMessage.decode(m.data)
            except BadMessage:
                await m.term()            # not a task: the real worker dead-letters it
                continue
            run, key, attempt = t.run, t.key, t.attempt
            now = time.time()
            if self.started:
                ev = make("TaskStarted", run, ts=now, key=key, attempt=attempt, worker=self.name)
                futs.append(await self.js.publish_async(
                    self.L.history_subject(run, ev.type), ev.encode(),
                    headers={MSG_ID: started_msg_id(run, key, attempt, m.metadata.num_delivered)}))
            ev = make("TaskSucceeded", run, ts=now, key=key, attempt=attempt, outputs={},
                      exec_s=0.0, duration=0.0, worker=self.name)
            futs.append(await self.js.publish_async(
                self.L.history_subject(run, ev.type), ev.encode(),
                headers={MSG_ID: done_msg_id(run, key, attempt)}))
            todo.append(m)
        for f in futs:
            await f                       # raises if JetStream did not store it: no ack then
        self._acks.extend(todo)           # acked by run(), with the next write
        self.done += len(todo)


async def serve(url: str, namespace: str = "", queue: str = "default", concurrency: int = 64,
                started: bool = False, ready: asyncio.Event | None = None) -> None:
    nc = await infra.connect(url, name="nbflow-noop-worker")
    w = NoopWorker(nc, Layout(namespace), queue=queue, concurrency=concurrency, started=started)
    await w.start()
    await infra.run_service(nc, w, ready, stop_on_signals=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbflow.worker.noop",
                                description="A worker that completes every task instantly.")
    p.add_argument("--nats", default=os.environ.get("NBFLOW_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--namespace", default=os.environ.get("NBFLOW_NAMESPACE", ""))
    p.add_argument("--queue", default="default")
    p.add_argument("--concurrency", type=int, default=64,
                   help="tasks fetched and completed per batch")
    p.add_argument("--started", action="store_true", help="also publish TaskStarted")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s noop %(levelname)s %(message)s")
    try:
        asyncio.run(serve(a.nats, a.namespace, a.queue, a.concurrency, a.started))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
