"""The worker: pull tasks from ``NBFLOW_TASKS``, run them through papermill, report to history.

Crash safety: the completion event is published (and acknowledged by JetStream, with a
deterministic ``Nats-Msg-Id``) *before* the task message is acked. While a notebook runs the
worker sends ``in_progress()`` so AckWait only expires when the worker is gone; then the task
is redelivered to another worker. A task redelivered more than ``MAX_DELIVER`` times is
dead-lettered as a failed attempt (reason ``lost``), never silently dropped.
"""
from __future__ import annotations

import asyncio
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
from nbflow.errors import NatsError, NotFound, Permission, StoreFull, TooLarge, Transient
from nbflow.nats import infra
from nbflow.nats.calls import Retrying
from nbflow.nats.kv import KV
from nbflow.nats.streams import Streams
from nbflow.core.events import TaskMessage, done_msg_id, make, started_msg_id
from nbflow.errors import BadMessage, BundleError
from nbflow.nats.layout import MSG_ID, Layout
from nbflow.worker import bundles, environment
from nbflow.worker import workdirs
from nbflow.worker.artifacts import Artifacts, notebook_key, output_key, written_keys

log = logging.getLogger("nbflow.worker")

# How long a task may go without a heartbeat before JetStream redelivers it to another worker.
ACK_WAIT_S = float(os.environ.get("NBFLOW_TASK_ACK_WAIT", "30"))
HEARTBEAT_S = ACK_WAIT_S / 4
MAX_DELIVER = 5
# how long a finished task's result waits for JetStream (a site cut off from its hub)
RESULT_PATIENCE_S = float(os.environ.get("NBFLOW_RESULT_PATIENCE_S", str(24 * 3600)))
PRESENCE_S = float(os.environ.get("NBFLOW_PRESENCE_S", "5"))   # heartbeat (the KV's TTL is 30 s)
# An output bigger than this fails the task with a clear message instead of filling the store.
MAX_OUTPUT_BYTES = int(float(os.environ.get("NBFLOW_MAX_OUTPUT_MB", "2048")) * 1024 * 1024)
# A failure's text in TaskFailed stays small, so publishing it always fits in one message; the
# full error and traceback stay in the executed notebook.
MAX_ERROR_CHARS = 4_000
MAX_TRACEBACK_CHARS = 32_000
MAX_CELL_CHARS = 16_000


def bounded(text: str | None, limit: int) -> str:
    """``text`` cut to about ``limit`` characters (head and tail kept, the cut said)."""
    text = text or ""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 3 // 4], text[-(limit // 4):]
    return (f"{head}\n... [{len(text) - len(head) - len(tail):,} characters cut; the full text "
            f"is in the task's executed notebook: nbflow logs] ...\n{tail}")


class Worker:
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
        scaling = None
        if self.scaler is not None:
            scaling = asyncio.create_task(self.scaler.run(self._pending, lambda: len(self._running)))
        try:
            while not self._stop.is_set():
                await self._slots.acquire()
                while self.scaler is not None and len(self._running) >= self.scaler.capacity \
                        and not self._stop.is_set():
                    await asyncio.sleep(0.05)         # hold no more tasks than kernels
                msg = None
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
                t = asyncio.create_task(self._handle(msg))
                self._running.add(t)
                t.add_done_callback(self._running.discard)
        finally:
            hb.cancel()
            if scaling is not None:
                scaling.cancel()
            for ev in self._cancels.values():
                ev.set()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _pending(self) -> int:
        """Tasks on this worker's queue that no worker has taken yet."""
        return (await self.sub.consumer_info()).num_pending

    def presence(self) -> dict:
        """What `nbflow workers` shows: the heartbeat record."""
        from nbflow.worker.autoscale import tree_rss_mb
        from nbflow.worker.kernels import registry as kernels

        d = {"name": self.name, "host": socket.gethostname(), "queue": self.queue,
             "concurrency": self.scaler.capacity if self.scaler else self.concurrency,
             "pid": os.getpid(), "done": self.done, "in_flight": len(self._running),
             "kernels": kernels.live_kernels(),
             "rss_mb": round(tree_rss_mb(), 1), "started": self.started_at, "ts": time.time()}
        if self.scale:
            d.update(min_kernels=self.scale["min_kernels"], max_kernels=self.scale["max_kernels"])
        return d

    async def _presence(self) -> None:
        while True:
            try:
                await self.workers_kv.put(self.name.replace(".", "_"),
                                          json.dumps(self.presence()).encode())
            except NatsError:   # best effort: the next beat retries
                pass
            await asyncio.sleep(PRESENCE_S)

    async def _on_cancel(self, msg) -> None:
        run = msg.subject.rsplit(".", 1)[-1]
        try:
            keys = json.loads(msg.data).get("keys") or []
        except ValueError:
            return
        for key in keys:
            ev = self._cancels.get((run, key))
            if ev:
                ev.set()

    async def _publish(self, ev, msg_id: str, patience: float = 120.0):
        """Publish to history, riding out a NATS restart: a finished task's result is never
        thrown away because the server was briefly gone (the msg id makes retries safe)."""
        t0 = time.monotonic()
        deadline = t0 + patience
        delay, failures = 0.2, 0
        while True:
            try:
                ack = await self.streams.publish(self.L.history_subject(ev.run, ev.type), ev.encode(),
                                                 headers={MSG_ID: msg_id})
                if failures:
                    log.info("JetStream reachable again: %s for run %s %s recorded after %.0f s",
                             ev.type, ev.run, ev.get("key", ""), time.monotonic() - t0)
                return ack
            except Transient as e:   # timeouts, no responders while reconnecting
                if time.monotonic() > deadline:
                    raise
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("publishing %s for run %s failed (%s); retrying", ev.type,
                                ev.run, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

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

    async def workflow(self, wf_hash: str) -> Workflow:
        wf = self._defs.get(wf_hash)
        if wf is None:
            wf = Workflow.stored((await self.defs_kv.get(wf_hash)).value, wf_hash)
            self._defs[wf_hash] = wf
        return wf

    def task_notebook(self, wf: Workflow, wf_hash: str, node: str):
        from nbflow.compiler.tasknb import task_notebook

        k = (wf_hash, node)
        if k not in self._nbs:
            self._nbs[k] = task_notebook(wf, node)
        return self._nbs[k]

    async def _handle(self, msg) -> None:
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
            self._slots.release()

    async def _refused(self, msg, e: Permission) -> bool:
        """The server refused something this task needs (the worker's role does not allow it):
        permanent, so the attempt fails saying so instead of being redelivered forever."""
        try:
            task = TaskMessage.decode(msg.data)
            ev = make("TaskFailed", task.run, key=task.key, attempt=task.attempt,
                      reason="config", worker=self.name,
                      error=f"PermissionDenied: worker {self.name}: {e}")
            await self._publish(ev, done_msg_id(task.run, task.key, task.attempt), 30.0)
            await msg.ack()
        except Exception:  # noqa: BLE001 - cannot even report it: redelivered later
            log.exception("task %s: %s; could not record the failure", msg.subject, e)
            return False
        log.error("task %s failed: %s", msg.subject, e)
        return True

    async def _handle_inner(self, msg) -> None:
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
        await self._publish(make("TaskStarted", run, key=key, attempt=attempt, worker=self.name),
                            started_msg_id(run, key, attempt, delivered))
        workdir = workdirs.make(run, key)
        cancel = threading.Event()
        self._cancels[(run, key)] = cancel
        holder = self._held[(run, key, attempt)] = [msg]     # the latest delivery of this task
        hb = asyncio.create_task(self._heartbeat(holder))
        try:
            task.delivery = secrets.token_hex(4)      # this delivery's artifact keys
            try:
                async with contextlib.AsyncExitStack() as leases:   # the bundle in use
                    ev = await self._execute(task, workdir, cancel, leases)
            except StoreFull as e:       # say which limit, not "worker lost"
                ev = make("TaskFailed", run, key=key, attempt=attempt, reason="store_full",
                          error=f"StoreFull: {e}")
            ev.data.setdefault("duration", time.time() - wall0)
            ev.data["worker"] = self.name
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
            shutil.rmtree(workdir, ignore_errors=True)

    async def _discard_late_result(self, ev) -> None:
        """Another delivery's result of this attempt was recorded first (this worker was frozen
        or cut off past the ack wait): what it wrote is not named by any recorded completion.
        Remove it; what cannot be removed is left to ``orphan_artifacts``/`nbflow gc`."""
        log.warning("task %s of run %s: a result was recorded by another delivery; discarding "
                    "this late one", ev["key"], ev.run)
        for k in written_keys(ev):
            try:
                await self.art.delete(k)
            except Exception as e:  # noqa: BLE001 - not allowed or gone: gc finds it
                log.warning("could not remove late artifact %s (%s)", k, e)

    async def _heartbeat(self, holder: list) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await holder[0].in_progress()
            except Exception:  # noqa: BLE001 - reconnecting; the next beat retries
                pass

    async def _execute(self, task: TaskMessage, workdir: str, cancel: threading.Event,
                       leases: contextlib.AsyncExitStack):
        from nbflow.worker.runner import run_task

        run, key, attempt, node_id = task.run, task.key, task.attempt, task.node
        # a NATS hiccup reading the definition propagates (Transient: the task is nakked and
        # runs later); only a definition that is missing or cannot be built fails the attempt
        try:
            wf = await self.workflow(task.wf)
        except NotFound:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"cannot build the task notebook for {node_id!r}: its workflow "
                              f"definition {task.wf} is not in {self.L.defs_bucket}")
        try:
            unpacked = (await leases.enter_async_context(self.bundles.using(wf.bundle))
                        if wf.bundle else None)
        except BundleError as e:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"{type(e).__name__}: {e}")
        try:
            # other notebooks a task runs (BPMN imports) are found in the bundle, not on the
            # submitter's disk
            here = wf if unpacked is None else bundles.located(wf, unpacked)
            nb = self.task_notebook(here, task.wf, node_id)
        except Exception as e:  # noqa: BLE001 - a definition we cannot build is a failed attempt
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"cannot build the task notebook for {node_id!r}: {e}")
        node = wf.node(node_id)
        inputs: dict[str, Any] = {}
        os.makedirs(os.path.join(workdir, "in"), exist_ok=True)
        for name, ref in task.inputs.items():
            if isinstance(ref, list):
                files = []
                for i, r in enumerate(ref):
                    if r is None:
                        files.append(None)
                        continue
                    rel = f"in/{name}.{i}.pkl"
                    await self.art.get_file(r, os.path.join(workdir, rel))
                    files.append(rel)
                inputs[name] = files
            else:
                rel = f"in/{name}.pkl"
                await self.art.get_file(ref, os.path.join(workdir, rel))
                inputs[name] = rel
        io = {"task": node_id, "key": key, "run": run, "dir": workdir, "inputs": inputs,
              "map": task.map, "signal": task.signal, "outputs": node.outputs}
        try:
            cwd = await self._task_cwd(wf, workdir, unpacked)
        except BundleError as e:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"{type(e).__name__}: {e}")
        env_key = (task.wf, node_id)
        if env_key not in self._env_checks:       # the first check scans installed packages
            self._env_checks[env_key] = await asyncio.get_running_loop().run_in_executor(
                None, environment.check, wf, node_id, cwd)
        missing, warnings = self._env_checks[env_key]
        if missing:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=environment.missing_error(missing, node_id, self.name, wf))
        nb = environment.with_warnings(nb, warnings)
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(None, lambda: run_task(
            nb, params=task.params, io=io, cwd=cwd, timeout=task.timeout,
            cancel=cancel, engine=self.engine, isolation=task.isolation, scope=run))
        if unpacked and cwd and res.notebook_path and os.path.exists(res.notebook_path):
            # relative writes land in the task's private copy of the bundle and vanish: say so
            written = await loop.run_in_executor(None, bundles.written_files, unpacked, cwd)
            if written:
                log.info("task %s of run %s wrote %d file(s) relative to its folder: %s", key,
                         run, len(written), ", ".join(written[:10]))
                await loop.run_in_executor(None, bundles.note_writes, res.notebook_path,
                                           written)
        nb_key = ""
        if res.notebook_path and os.path.exists(res.notebook_path):
            nb_key = notebook_key(run, key, attempt, task.delivery)
            await self.art.put_file(nb_key, res.notebook_path)
        if res.status == "succeeded":
            outputs, lens = {}, {}
            meta_path = os.path.join(res.outputs_dir or "", "_meta.json")
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    lens = json.load(f).get("lens", {})
            too_big = [(n, os.path.getsize(p)) for n in node.outputs
                       if os.path.exists(p := os.path.join(res.outputs_dir or "", f"{n}.pkl"))
                       and os.path.getsize(p) > MAX_OUTPUT_BYTES]
            if too_big:
                name, size = too_big[0]
                return make("TaskFailed", run, key=key, attempt=attempt, reason="too_big",
                            error=f"OutputTooLarge: output {name!r} of task {node_id!r} is "
                                  f"{size / 2**20:.0f} MB, over the limit of "
                                  f"{MAX_OUTPUT_BYTES / 2**20:.0f} MB (NBFLOW_MAX_OUTPUT_MB); "
                                  f"write big data to files or a database and pass its path",
                            notebook=nb_key, duration=res.duration)
            for name in node.outputs:
                p = os.path.join(res.outputs_dir or "", f"{name}.pkl")
                if os.path.exists(p):
                    ok = output_key(run, key, attempt, name, task.delivery)
                    await self.art.put_file(ok, p)
                    outputs[name] = ok
            return make("TaskSucceeded", run, key=key, attempt=attempt, outputs=outputs,
                        lens=lens, notebook=nb_key, exec_s=res.exec_s, duration=res.duration)
        if res.status == "skipped":
            return make("TaskSkipped", run, key=key, attempt=attempt, reason=res.reason or "when",
                        notebook=nb_key)
        reason = res.reason or "error"
        if "cannot be pickled" in res.error:
            reason = "unpicklable"
        return make("TaskFailed", run, key=key, attempt=attempt,
                    error=bounded(res.error or "failed", MAX_ERROR_CHARS),
                    traceback=bounded(res.traceback, MAX_TRACEBACK_CHARS),
                    cell=bounded(res.cell, MAX_CELL_CHARS), notebook=nb_key, reason=reason,
                    duration=res.duration)

    async def _task_cwd(self, wf: Workflow, workdir: str, unpacked: str | None) -> str | None:
        """The task's cwd: its own copy of the run's bundle (``unpacked``); without a bundle the
        notebook's folder in place (a shared filesystem); None (its work dir) for a workflow
        without one."""
        if unpacked:
            return await asyncio.get_running_loop().run_in_executor(
                None, bundles.task_folder, unpacked, workdir)
        if not wf.source:
            return None
        if not os.path.isfile(wf.source):
            raise BundleError(
                f"the notebook {wf.source} is not on worker {self.name}'s filesystem: the run "
                f"was submitted without a bundle (--no-bundle / NBFLOW_BUNDLE=0), which needs "
                f"the notebook's folder on a filesystem the workers share; submit with bundles "
                f"(the default) instead")
        return os.path.dirname(wf.source)

    async def _dead_letter(self, msg, why: str) -> None:
        log.warning("dead letter on %s: %s", msg.subject, why)
        record = {"where": msg.subject, "why": why, "ts": time.time(),
                  "data": msg.data[:65536].decode("utf-8", "replace")}
        await self.streams.publish(self.L.dead_letter_subject(), json.dumps(record).encode())
        await msg.term()          # only once the dead letter is recorded


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


__all__ = ["Worker", "serve", "BadMessage"]
