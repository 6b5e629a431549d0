"""What the worker tells the history: publishing a task's events (riding out a NATS restart;
the deterministic msg id makes retries safe), a failure the server's permissions cause,
discarding a late duplicate result's artifacts, and dead letters. A mixin of
:class:`nbflow.worker.worker.Worker`."""
from __future__ import annotations

import asyncio
import json
import logging
import time

from nbflow.core.events import TaskMessage, done_msg_id, make
from nbflow.errors import Permission, Transient
from nbflow.nats.layout import MSG_ID
from nbflow.worker.artifacts import written_keys

log = logging.getLogger("nbflow.worker")


class Reporting:
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

    async def _dead_letter(self, msg, why: str) -> None:
        log.warning("dead letter on %s: %s", msg.subject, why)
        record = {"where": msg.subject, "why": why, "ts": time.time(),
                  "data": msg.data[:65536].decode("utf-8", "replace")}
        await self.streams.publish(self.L.dead_letter_subject(), json.dumps(record).encode())
        await msg.term()          # only once the dead letter is recorded
