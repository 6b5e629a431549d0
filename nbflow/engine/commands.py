"""Carrying out the state machine's commands: dispatch task messages, set timers, request and
close approvals, cancel tasks, remember fingerprints, record RunFinished — all published with
deterministic ``Nats-Msg-Id`` so a redone step is deduplicated. A mixin of
:class:`nbflow.engine.engine.Engine`; ``_message_id_key`` is the engines' shared secret for
:meth:`Commands.msg_id`."""
from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
import time

from nbflow.core.events import (Command, TaskMessage, finished_msg_id, make, task_msg_id,
                                 timer_msg_id, timer_schedule_msg_id)
from nbflow.core.reads import task_params
from nbflow.core.state import RunState
from nbflow.nats.layout import MSG_ID, SCHEDULE, SCHEDULE_TARGET, Layout

log = logging.getLogger("nbflow.engine")


class Commands:
    async def execute(self, st: RunState, cmds: list[Command]) -> None:
        for f in await self.send(st, cmds):
            await f

    async def send(self, st: RunState, cmds: list[Command]) -> list:
        """Carry out the commands: what is published is sent, in order, when this returns (the
        awaitables returned are its acks); the rest is done."""
        futs = []
        # the parameters a task reads, encoded once for all of this batch's dispatches that read
        # the same names (a map's instances)
        params_json: dict = {}
        for c in cmds:
            if c.kind == "dispatch":
                reads = c.data.get("reads")
                if reads not in params_json:
                    params_json[reads] = TaskMessage.encode_params(task_params(st.params, reads))
                task = TaskMessage.for_dispatch(st.run, {}, c.data)
                futs.append(await self.streams.publish_async(
                    self.L.task_subject(task.queue, st.run), task.encode(params_json[reads]),
                    headers={MSG_ID: task_msg_id(st.run, task.key, task.attempt)}))
            elif c.kind == "timer":
                futs.append(await self.schedule_timer(st.run, c))
            elif c.kind == "approval":
                await self._request_approval(st, c)
            elif c.kind == "approval_closed":
                await self._close_approval(st, c)
            elif c.kind == "cancel_tasks":
                # queued tasks never start: remove them from the work queue; running ones are
                # told to stop (their workers kill the kernel)
                await self.streams.purge(self.L.tasks_stream,
                                         subject=self.L.task_subject("*", st.run))
                await self.nc.publish(self.L.cancel_subject(st.run),
                                      json.dumps({"keys": c["keys"]}).encode())
            elif c.kind == "remember":
                # the index `run --reuse` reads: the latest success of each fingerprint wins.
                # Sent with the batch's other publishes and acked with them (it used to be a
                # round trip of its own before the next task's dispatch, on a chain's path)
                futs.append(await self.fps_kv.put_async(c["fp"], json.dumps(
                    c.data, separators=(",", ":"), default=str).encode()))
            elif c.kind == "finished":
                log.info("run %s %s", st.run, c["state"])
                ev = make("RunFinished", st.run, state=c["state"])
                futs.append(await self.streams.publish_async(
                    self.L.history_subject(st.run, ev.type), ev.encode(),
                    headers={MSG_ID: self.msg_id(finished_msg_id(st.run))}))
        return [f for f in futs if f is not None]

    async def schedule_timer(self, run: str, c: Command):
        ev = make("TimerFired", run, timer=c["id"], kind=c["kind"], key=c["key"],
                  attempt=c["attempt"])
        at = c["at"]
        if at <= time.time() + 0.5:      # already due: record it now
            return await self.streams.publish_async(
                self.L.history_subject(run, ev.type), ev.encode(),
                headers={MSG_ID: self.msg_id(timer_msg_id(c["id"]))})
        # message schedules have one-second resolution: round up so we never fire early
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(at)))
        tid = c["id"].replace(".", "_")
        return await self.streams.publish_async(
            self.L.timer_schedule_subject(tid), ev.encode(),
            headers={SCHEDULE: f"@at {iso}", SCHEDULE_TARGET: self.L.timer_fire_subject(tid),
                     MSG_ID: timer_schedule_msg_id(c["id"])})

    def msg_id(self, base: str) -> str:
        """The ``Nats-Msg-Id`` of an event only the engine publishes: deterministic (a redone
        step is deduplicated) yet unguessable, so that nobody else can publish a message with
        it first and have the genuine event dropped as a duplicate (message ids are per stream,
        not per subject, and workers and authors publish to the history stream too)."""
        return f"{base}.{hmac.new(self._mid_key, base.encode(), 'sha256').hexdigest()[:20]}"


async def _message_id_key(js, L: Layout, replicas: int | None = None) -> bytes:
    """The engines' shared secret for :meth:`Engine.msg_id`, in a bucket only engines can read
    (created by the first engine; another engine racing it reads the winner's)."""
    try:
        kv = await js.key_value(L.engine_bucket)
    except Exception:  # noqa: BLE001 - not there yet (a failed read raises again below)
        from nats.js.api import KeyValueConfig, StorageType

        try:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=L.engine_bucket, history=1, storage=StorageType.FILE,
                replicas=replicas or 1,
                description="nbflow engine-only state (never readable by other roles)"))
        except Exception:  # noqa: BLE001 - another engine created it meanwhile
            kv = await js.key_value(L.engine_bucket)
    try:
        await kv.create("msgid-key", secrets.token_hex(32).encode())
    except Exception:  # noqa: BLE001 - exists (or another engine won the race): read it
        pass
    return (await kv.get("msgid-key")).value
