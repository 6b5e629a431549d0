"""--map chunks: a worker slot takes several instances of one map node at once and runs them one
after another in one held kernel (the setup cells once; per instance its parameters, task cell
and outputs: :mod:`nbflow.worker.chunkrun`). Each instance is still its own task message with
its own TaskStarted, result event, executed notebook, retry and ack, so a crash mid-chunk loses
nothing and records nothing twice: finished instances are recorded and acked, the others are
redelivered. A chunk is sized to about CHUNK_TARGET_S of work from the instances this worker has
timed (CHUNK_FIRST before any), at most CHUNK_MAX, and never more than the queue's share per live
worker slot (every slot keeps work while instances remain). A mixin of
:class:`nbflow.worker.worker.Worker`."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nbflow.core.events import TaskMessage
from nbflow.errors import BadMessage, BundleError, NotFound
from nbflow.worker import bundles, environment, workdirs
from nbflow.worker.presence import PRESENCE_S

log = logging.getLogger("nbflow.worker")

CHUNK_TARGET_S = float(os.environ.get("NBFLOW_CHUNK_TARGET_S", "2.0"))
CHUNK_FIRST = 4
CHUNK_MAX = int(os.environ.get("NBFLOW_CHUNK_MAX", "64"))       # 1: no chunks


@dataclass
class _Chunk:
    """What the instances of one chunk share: its folder, bundle lease and held kernel."""
    dir: str
    leases: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    ready: bool = False
    off: bool = False                  # cannot run here: each instance takes the single path
    kernel: Any = None                 # chunkrun.ChunkKernel
    node: Any = None
    free: Any = None                   # asyncio.Event: the current instance left the kernel
    kernel_s: float = 0.0              # time its instances spent in run_one


class Chunks:
    async def _gather(self, msg) -> list:
        """``msg`` and, when it is a --map instance, more instances of the same map node to run
        after it in the same slot (other messages fetched meanwhile wait in the backlog)."""
        try:
            t = TaskMessage.decode(msg.data)
        except BadMessage:
            return [msg]
        if t.run in self._cancelled_runs:     # held here (backlog) while its run was cancelled
            with contextlib.suppress(Exception):
                await msg.ack()
            return []
        if self._stop.is_set() or _delivered(msg) > 1 or t.map is None \
                or t.isolation == "fresh":
            return [msg]
        want = self._chunk_size(t.wf, t.node) - 1
        if want <= 0:
            return [msg]
        same = (t.run, t.node, t.wf, t.isolation)
        group = [msg]
        if self._backlog:                     # its siblings fetched earlier come first
            rest = []
            for m in self._backlog:
                o = _decoded(m)
                if len(group) <= want and o is not None and o.map is not None \
                        and _delivered(m) == 1 and (o.run, o.node, o.wf, o.isolation) == same:
                    group.append(m)
                else:
                    rest.append(m)
            self._backlog.clear()              # (the same deque: its heartbeat task holds it)
            self._backlog.extend(rest)
            want -= len(group) - 1
            if want <= 0:
                return group
        try:
            pending, slots = await self._pending(), await self._live_slots()
            # never fewer chunks than live slots while instances remain
            want = min(want, pending // max(1, slots))
            if want <= 0:
                return group
            more = await self.sub.fetch(want, timeout=0.2)
        except Exception:  # noqa: BLE001 - no more at hand (timeout) or NATS away: run these
            return group
        for m in more:
            o = _decoded(m)
            if (o is not None and o.map is not None and _delivered(m) == 1
                    and (o.run, o.node, o.wf, o.isolation) == same):
                group.append(m)
            else:
                self._backlog.append(m)
        return group

    def _chunk_size(self, wf: str, node: str) -> int:
        est = self._instance_s.get((wf, node))
        if est is None:
            return min(CHUNK_FIRST, CHUNK_MAX)
        return max(1, min(CHUNK_MAX, int(CHUNK_TARGET_S / max(est, 0.001))))

    async def _live_slots(self) -> int:
        """Task slots of the live workers on this queue (their heartbeat records; cached)."""
        at, n = self._slots_seen
        if n and time.monotonic() - at < PRESENCE_S:
            return n
        n = 0
        try:
            for k in await self.workers_kv.keys():
                e = await self.workers_kv.get_or_none(k)
                d = json.loads(e.value) if e is not None else {}
                if d.get("queue") == self.queue and time.time() - d.get("ts", 0) < 3 * PRESENCE_S:
                    n += int(d.get("concurrency") or 1)
        except Exception:  # noqa: BLE001 - cannot read them: count this worker only
            n = 0
        n = max(n, self.concurrency)
        self._slots_seen = (time.monotonic(), n)
        return n

    async def _handle_chunk(self, group: list) -> None:
        """Run a chunk's instances one after another in this slot; each its own lifecycle."""
        waiting = collections.deque(group)
        beat = asyncio.create_task(self._beat_many(waiting))
        first = TaskMessage.decode(group[0].data)
        ch = _Chunk(workdirs.make(first.run, f"chunk-{first.key}"))
        mine, tails, c0 = [], set(), time.monotonic()
        for m in group:
            with contextlib.suppress(BadMessage):
                t = TaskMessage.decode(m.data)
                self._in_chunk[(t.run, t.key)] = ch
                mine.append((t.run, t.key))
        try:
            while waiting:
                m = waiting.popleft()
                if self._stop.is_set():           # stopping: the rest go back to the queue
                    await _nak(m)
                    continue
                try:
                    t = TaskMessage.decode(m.data)
                except BadMessage:
                    t = None
                if t is not None and t.run in self._cancelled_runs:
                    with contextlib.suppress(Exception):
                        await m.ack()             # its run was cancelled while it waited here
                    continue
                t0 = time.monotonic()
                # the next instance starts once this one is out of the kernel: its results'
                # upload, publish and ack overlap the next one's run
                ch.free = asyncio.Event()
                job = asyncio.create_task(self._handle(m, release=False))
                tails.add(job)
                job.add_done_callback(tails.discard)
                freed = asyncio.create_task(ch.free.wait())
                await asyncio.wait({job, freed}, return_when=asyncio.FIRST_COMPLETED)
                freed.cancel()
                while len(tails) > 4:
                    await asyncio.wait(set(tails), return_when=asyncio.FIRST_COMPLETED)
                if t is not None and m is not group[0]:   # the first also paid kernel + setup
                    k = (t.wf, t.node)
                    dt = time.monotonic() - t0
                    old = self._instance_s.get(k)
                    self._instance_s[k] = dt if old is None else 0.7 * old + 0.3 * dt
            if tails:
                await asyncio.gather(*tails, return_exceptions=True)
            log.debug("chunk of %d instance(s) of %s: %.2f s (%.2f s in the kernel)", len(group),
                     first.node, time.monotonic() - c0, ch.kernel_s)
        finally:
            beat.cancel()
            for k in mine:
                self._in_chunk.pop(k, None)
            if ch.kernel is not None:
                await asyncio.get_running_loop().run_in_executor(None, ch.kernel.drop)
            with contextlib.suppress(Exception):
                await ch.leases.aclose()
            shutil.rmtree(ch.dir, ignore_errors=True)
            self._slots.release()

    async def _beat_many(self, msgs) -> None:
        """Keep held messages (a chunk's later instances, the backlog) from redelivery."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            for m in list(msgs):
                with contextlib.suppress(Exception):
                    await m.in_progress()


    async def _execute(self, task: TaskMessage, workdir: str, cancel: threading.Event,
                       leases: contextlib.AsyncExitStack, *args, **kwargs):
        """A chunk's instance runs in the chunk's kernel; anything else as one task."""
        ch = self._in_chunk.get((task.run, task.key))
        if ch is not None and not ch.off:
            try:
                ev = await self._execute_in_chunk(ch, task, workdir, cancel)
            except Exception:  # noqa: BLE001 - the chunk path failed: run it the usual way
                log.exception("task %s of run %s: chunk path failed; running it alone",
                              task.key, task.run)
                ch.off, ev = True, None
            if ev is not None:
                return ev
        return await super()._execute(task, workdir, cancel, leases, *args, **kwargs)

    async def _chunk_ready(self, ch: _Chunk, task: TaskMessage) -> bool:
        """Definition, bundle, notebook, environment, folder and kernel of the chunk, once;
        False (each instance then runs alone and reports what is wrong) when any is missing."""
        if ch.ready or ch.off:
            return ch.ready
        ch.off = True
        if self.engine != "nbflow":
            return False
        try:
            wf = await self.workflow(task.wf)
            unpacked = (await ch.leases.enter_async_context(self.bundles.using(wf.bundle))
                        if wf.bundle else None)
            here = wf if unpacked is None else bundles.located(wf, unpacked)
            nb = self.task_notebook(here, task.wf, task.node)
            cwd = await self._task_cwd(wf, ch.dir, unpacked)
        except (NotFound, BundleError):
            return False
        except Exception:  # noqa: BLE001 - a definition we cannot build: the single path says so
            return False
        env_key = (task.wf, task.node)
        if env_key not in self._env_checks:
            self._env_checks[env_key] = await asyncio.get_running_loop().run_in_executor(
                None, environment.check, wf, task.node, cwd)
        missing, warnings = self._env_checks[env_key]
        if missing:
            return False
        from nbflow.worker.chunkrun import ChunkKernel

        try:
            ch.kernel = ChunkKernel(environment.with_warnings(nb, warnings), cwd, task.run,
                                    task.isolation)
        except ValueError:
            return False
        ch.node = wf.node(task.node)
        ch.ready, ch.off = True, False
        return True

    async def _execute_in_chunk(self, ch: _Chunk, task: TaskMessage, workdir: str,
                                cancel: threading.Event):
        """The completion event of one instance run in the chunk's kernel (None: run alone)."""
        if not await self._chunk_ready(ch, task):
            return None
        node = ch.node
        io = await self._task_io(task, node, workdir)
        try:
            res = await asyncio.get_running_loop().run_in_executor(
                None, ch.kernel.run_one, io, task.params, task.timeout, cancel)
        finally:
            if ch.free is not None:
                ch.free.set()
        ch.kernel_s += res.duration
        return await self._result_event(task, node, res)


def _decoded(msg) -> TaskMessage | None:
    try:
        return TaskMessage.decode(msg.data)
    except BadMessage:
        return None


async def _nak(msg) -> None:
    with contextlib.suppress(Exception):     # unacked: redelivered after AckWait anyway
        await msg.nak()


def _delivered(msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message
        return 1
