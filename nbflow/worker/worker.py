"""The worker: pull tasks from ``NBFLOW_TASKS``, run them through papermill, report to history.

Crash safety: the completion event is published (and acknowledged by JetStream, with a
deterministic ``Nats-Msg-Id``) *before* the task message is acked. While a notebook runs the
worker sends ``in_progress()`` so AckWait only expires when the worker is gone; then the task
is redelivered to another worker. A task redelivered more than ``MAX_DELIVER`` times is
dead-lettered as a failed attempt (reason ``lost``), never silently dropped.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from typing import Any

from nbflow.core.ir import Workflow
from nbflow.errors import NotFound, Permission, StoreFull, TooLarge, Transient
from nbflow.nats import infra
from nbflow.nats.calls import Retrying
from nbflow.nats.kv import KV
from nbflow.nats.streams import Streams
from nbflow.core.events import TaskMessage, done_msg_id, make, started_msg_id
from nbflow.errors import BadMessage
from nbflow.nats.layout import Layout
from nbflow.worker import bundles
from nbflow.worker import workdirs
from nbflow.worker.artifacts import Artifacts
from nbflow.worker.chunks import CHUNK_FIRST, CHUNK_MAX, CHUNK_TARGET_S, Chunks, _nak  # noqa: F401
from nbflow.worker.execute import (MAX_CELL_CHARS, MAX_ERROR_CHARS, MAX_OUTPUT_BYTES,
                                   MAX_TRACEBACK_CHARS, Execution, Phases, bounded)
from nbflow.worker.presence import PRESENCE_S, Presence
from nbflow.worker.reporting import Reporting

log = logging.getLogger("nbflow.worker")

# How long a task may go without a heartbeat before JetStream redelivers it to another worker.
ACK_WAIT_S = float(os.environ.get("NBFLOW_TASK_ACK_WAIT", "30"))
HEARTBEAT_S = ACK_WAIT_S / 4
MAX_DELIVER = 5
# how long a finished task's result waits for JetStream (a site cut off from its hub)
RESULT_PATIENCE_S = float(os.environ.get("NBFLOW_RESULT_PATIENCE_S", str(24 * 3600)))


class Worker(Chunks, Execution, Reporting, Presence):
    """Pulls tasks and follows each through its lifecycle (stale checks, TaskStarted,
    heartbeats, cancel, the completion published before the ack). Its rooms: chunks.py (--map
    instances taken and run several at a time), execute.py (running one task), reporting.py (publishing to the history, dead letters), presence.py
    (the heartbeat record)."""

    heartbeat_s = HEARTBEAT_S

    def __init__(self, nc, layout: Layout | None = None, *, queue: str = "default",
                 concurrency: int = 1, name: str | None = None, engine: str | None = None,
                 scale: dict | None = None):
        """``scale``: ``{"min_kernels", "max_kernels", "max_memory_mb"}`` — kernels (and the
        tasks held at once) follow the queue's demand (:mod:`nbflow.worker.autoscale`) instead
        of ``concurrency``."""
        self.nc, self.js = nc, nc.jetstream()
        self.L = layout or Layout()
        self.scale = scale
        if scale:
            concurrency = scale["max_kernels"]
        self.queue, self.concurrency = queue, max(1, concurrency)
        self.scaler = None
        self.started_at = time.time()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.engine = engine or os.environ.get("NBFLOW_PAPERMILL_ENGINE", "nbflow")
        self.streams = Streams(self.js, role="worker")
        # reads before a task runs ride out a short outage in place (the task message is kept
        # alive by heartbeats meanwhile); beyond that the task is nakked and tried again later
        self.reads = Retrying(5, 0.2, 2.0, budget=20.0)
        self.art = Artifacts(self.js, self.L.artifacts_store, role="worker",
                             retrying=Retrying(4, 0.2, 2.0, budget=20.0))
        self.bundles = bundles.BundleCache(self.art)
        self._defs: dict[str, Workflow] = {}
        self._nbs: dict[tuple[str, str], Any] = {}
        self._slots = asyncio.Semaphore(self.concurrency)
        self._cancels: dict[tuple[str, str], threading.Event] = {}
        self._stop = asyncio.Event()
        self._running: set[asyncio.Task] = set()
        self._held: dict[tuple[str, str, int], list] = {}
        self._env_checks: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        self.done = 0
        self._tail_ms: float | None = None    # the last task's result publish, ack and cleanup
        # map chunks: messages taken for a later turn (kept alive by heartbeats), the measured
        # seconds per instance of a (workflow, node), live slots on the queue (cached), runs
        # cancelled while some of their messages were held here
        self._backlog: collections.deque = collections.deque()
        self._instance_s: dict[tuple[str, str], float] = {}
        self._slots_seen: tuple[float, int] = (0.0, 0)
        self._cancelled_runs: dict[str, float] = {}
        self._in_chunk: dict[tuple[str, str], Any] = {}   # (run, key) -> its chunk

    async def start(self) -> None:
        from nbflow.worker.kernels import registry as kernels

        stale = workdirs.clean_stale()       # left by workers killed mid-task on this machine
        if stale:
            log.info("removed %d stale work dir(s) of workers that are gone", len(stale))

        if self.scale:
            from nbflow.worker.autoscale import Scaler

            kernels.configure(size=max(1, self.scale["min_kernels"]))
            self.scaler = Scaler(kernels.get_pool(), min_kernels=self.scale["min_kernels"],
                                 max_kernels=self.scale["max_kernels"],
                                 max_memory_mb=self.scale.get("max_memory_mb"))
        else:
            kernels.configure(concurrency=self.concurrency)  # warm kernels: one per slot + a spare
        self.bundles.sweep()
        await infra.ensure(self.js, self.L)
        self.sub = await infra.pull_tasks(self.js, self.L, self.queue, ACK_WAIT_S)
        self.defs_kv = await KV.open(self.js, self.L.defs_bucket, role="worker",
                                     retrying=self.reads)
        self.runs_kv = await KV.open(self.js, self.L.runs_bucket, role="worker",
                                     retrying=self.reads)
        self.workers_kv = await KV.open(self.js, self.L.workers_bucket, role="worker")
        await self.nc.subscribe(self.L.cancel_subject("*"), cb=self._on_cancel)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        hb = asyncio.create_task(self._presence())
        held_beat = asyncio.create_task(self._beat_many(self._backlog))
        scaling = None
        if self.scaler is not None:
            scaling = asyncio.create_task(self.scaler.run(self._pending, lambda: len(self._running)))
        try:
            while not self._stop.is_set():
                await self._slots.acquire()
                while self.scaler is not None and len(self._running) >= self.scaler.capacity \
                        and not self._stop.is_set():
                    await asyncio.sleep(0.05)         # hold no more tasks than kernels
                msg = self._backlog.popleft() if self._backlog else None
                while msg is None and not self._stop.is_set():
                    try:
                        msgs = await self.sub.fetch(1, timeout=1.0)
                        msg = msgs[0]
                    except asyncio.TimeoutError:
                        continue
                    except Exception as e:  # noqa: BLE001 - reconnecting: keep trying
                        log.warning("fetch failed (%s); retrying", e)
                        await asyncio.sleep(0.5)
                if msg is None:
                    self._slots.release()
                    break
                group = await self._gather(msg)
                if not group:
                    self._slots.release()
                    continue
                t = asyncio.create_task(self._handle(msg) if len(group) == 1
                                        else self._handle_chunk(group))
                self._running.add(t)
                t.add_done_callback(self._running.discard)
        finally:
            hb.cancel()
            held_beat.cancel()
            while self._backlog:                 # not started: back to the queue for others
                await _nak(self._backlog.popleft())
            if scaling is not None:
                scaling.cancel()
            for ev in self._cancels.values():
                ev.set()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            self.drop_task_folders()

    async def _pending(self) -> int:
        """Tasks on this worker's queue that no worker has taken yet."""
        return (await self.sub.consumer_info()).num_pending

    async def _on_cancel(self, msg) -> None:
        run = msg.subject.rsplit(".", 1)[-1]
        try:
            keys = json.loads(msg.data).get("keys") or []
        except ValueError:
            return
        if keys:
            self._cancelled_runs[run] = time.time()
            if len(self._cancelled_runs) > 1000:
                self._cancelled_runs.pop(next(iter(self._cancelled_runs)))
        for key in keys:
            ev = self._cancels.get((run, key))
            if ev:
                ev.set()

    async def _still_wanted(self, run: str, key: str, attempt: int) -> bool:
        """False when the run is over or this attempt is already decided (stale message)."""
        try:
            e = await self.runs_kv.get(run)
        except NotFound:         # no snapshot yet: the engine is behind, run it
            return True
        snap = json.loads(e.value)
        if snap.get("state") != "running":
            return False
        t = snap.get("tasks", {}).get(key)
        if t is None:
            return True
        if t.get("attempt", 0) > attempt:
            return False
        return not (t.get("attempt") == attempt and t.get("state") in
                    ("succeeded", "failed", "skipped", "cancelled"))

    async def _handle(self, msg, release: bool = True) -> None:
        try:
            await self._handle_inner(msg)
        except Exception as e:  # noqa: BLE001 - never lose the worker over one task
            if isinstance(e, Permission) and await self._refused(msg, e):
                return
            # transient trouble (NATS away, leader moving): try again later, never a failure;
            # later deliveries wait longer so an outage of a minute or two is ridden out
            delay = min(5.0 * 2 ** max(0, _delivered(msg) - 1), 60.0)
            if isinstance(e, Transient):
                log.warning("task %s: %s; retrying in %.0fs", msg.subject, e, delay)
            else:
                log.exception("task handling failed; it will be redelivered")
            try:
                await msg.nak(delay=delay)
            except Exception:  # noqa: BLE001 - unacked: redelivered after AckWait anyway
                pass
        finally:
            if release:
                self._slots.release()

    async def _handle_inner(self, msg) -> None:
        ph = Phases()
        try:
            task = TaskMessage.decode(msg.data)
        except BadMessage as e:
            await self._dead_letter(msg, f"malformed task message: {e}")
            return
        run, key, attempt = task.run, task.key, task.attempt
        held = self._held.get((run, key, attempt))
        if held is not None:
            # redelivered while it still runs here: heartbeats could not reach the server (a
            # site's link to the hub was down). Keep running it once; ack this delivery at the end
            log.info("task %s of run %s came back while running here; running it once", key, run)
            held[0] = msg
            return
        delivered = msg.metadata.num_delivered
        if delivered > MAX_DELIVER:
            ev = make("TaskFailed", run, key=key, attempt=attempt, reason="lost",
                      error=f"WorkerLost: the task was picked up {delivered - 1} times and its "
                            f"worker died each time (killed, out of memory? see the worker's log)")
            await self._publish(ev, done_msg_id(run, key, attempt))
            await msg.ack()
            return
        # a redelivery may be stale (its result recorded before a crash, or the run over);
        # first deliveries are current: cancel purges a run's queued tasks from the stream
        if delivered > 1 and not await self._still_wanted(run, key, attempt):
            await msg.ack()
            return
        wall0 = time.time()
        ph.mark("accept")
        # TaskStarted goes out while the task runs: it is awaited before the completion is
        # published, so the history still has the start first (a crash before that leaves a
        # start or nothing; the redelivery starts again under its own msg id)
        started = asyncio.ensure_future(self._publish(
            make("TaskStarted", run, key=key, attempt=attempt, worker=self.name),
            started_msg_id(run, key, attempt, delivered)))
        started.add_done_callback(_retrieved)
        ph.mark("started")
        workdir = workdirs.make(run, key)
        cancel = threading.Event()
        self._cancels[(run, key)] = cancel
        holder = self._held[(run, key, attempt)] = [msg]     # the latest delivery of this task
        hb = asyncio.create_task(self._heartbeat(holder))
        try:
            task.delivery = secrets.token_hex(4)      # this delivery's artifact keys
            try:
                async with contextlib.AsyncExitStack() as leases:   # the bundle in use
                    ev = await self._execute(task, workdir, cancel, leases, ph)
            except StoreFull as e:       # say which limit, not "worker lost"
                ev = make("TaskFailed", run, key=key, attempt=attempt, reason="store_full",
                          error=f"StoreFull: {e}")
            ev.data.setdefault("duration", time.time() - wall0)
            ev.data["worker"] = self.name
            ph.mark("result")
            ev.data["phases"] = ph.rounded()
            if self._tail_ms is not None and self.concurrency == 1:
                # the time between two tasks of this worker starts with the previous one's tail
                ev.data["phases_prev_tail"] = round(self._tail_ms, 2)
            await started                      # the start is recorded before the completion
            # a result is held until JetStream takes it (a site may be cut off from the hub
            # for a while); the msg id makes the retries safe
            try:
                ack = await self._publish(ev, done_msg_id(run, key, attempt), RESULT_PATIENCE_S)
                if getattr(ack, "duplicate", False):
                    await self._discard_late_result(ev)
            except TooLarge as e:    # never re-run a task because its report does not fit
                await self._publish(make(
                    "TaskFailed", run, key=key, attempt=attempt, reason="too_big",
                    notebook=ev.get("notebook") or "", worker=self.name,
                    error=f"ResultTooLarge: the task's {ev.type} event is over the NATS max "
                          f"payload ({e}); see its executed notebook"),
                    done_msg_id(run, key, attempt))
            try:
                await holder[0].ack()
            except Exception:  # noqa: BLE001 - redelivery is harmless: the result is recorded
                log.warning("ack of %s failed; a redelivery will be dropped as stale", key)
            self.done += 1
        finally:
            hb.cancel()
            self._cancels.pop((run, key), None)
            self._held.pop((run, key, attempt), None)
            # off the loop and off the path to the next task (work dirs are never reused)
            asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, workdir, True)
            self._tail_ms = ph.since_last()

    async def _heartbeat(self, holder: list) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await holder[0].in_progress()
            except Exception:  # noqa: BLE001 - reconnecting; the next beat retries
                pass


def _retrieved(fut: asyncio.Future) -> None:
    """Done callback: a failure of a background publish is read where it is awaited; this only
    keeps asyncio from logging it as never retrieved when the task failed first."""
    if not fut.cancelled():
        fut.exception()


def _delivered(msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message
        return 1


async def serve(url: str, namespace: str = "", queue: str = "default", concurrency: int = 1,
                ready: asyncio.Event | None = None, *, name: str | None = None,
                scale: dict | None = None) -> None:
    """`nbflow worker`: connect and serve until cancelled."""
    logging.getLogger("papermill").setLevel(logging.WARNING)   # its per-notebook INFO lines
    nc = await infra.connect(url, name="nbflow-worker")
    w = Worker(nc, Layout(namespace), queue=queue, concurrency=concurrency, name=name,
               scale=scale)
    await w.start()
    try:
        await infra.run_service(nc, w, ready)
    finally:
        from nbflow.worker.kernels import registry as kernels

        kernels.shutdown_pool()


__all__ = ["Worker", "serve", "BadMessage", "bounded", "ACK_WAIT_S", "HEARTBEAT_S",
           "MAX_DELIVER", "RESULT_PATIENCE_S", "PRESENCE_S", "MAX_OUTPUT_BYTES",
           "MAX_ERROR_CHARS", "MAX_TRACEBACK_CHARS", "MAX_CELL_CHARS"]
