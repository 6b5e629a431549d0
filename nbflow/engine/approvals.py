"""The approvals bucket as the engine keeps it: a requested approval's record (with its
single-use token), its closing when it can no longer be given, and the checks that a decision
or a start on the history was recorded by who may make it (else the event is removed from the
history and dead-lettered). A mixin of :class:`nbflow.engine.engine.Engine`."""
from __future__ import annotations

import json
import secrets
import time

from nbflow.core.events import Command, Event
from nbflow.core.state import RunState
from nbflow.errors import Conflict, NotFound


class Approvals:
    async def _forged(self, ev: Event, why: str) -> None:
        """An event its publisher may not produce: dead-lettered and removed from the history
        (readers replaying the run must not see it either); never applied."""
        await self._dead_letter_raw(self.L.history_subject(ev.run, ev.type), ev.encode(), why)
        try:
            await self.streams.delete_msg(self.L.history_stream, ev.seq)
        except NotFound:         # already deleted by another engine
            pass

    async def _decision_recorded(self, ev: Event) -> bool:
        """An approval counts only when the decide service recorded it (authenticated decider,
        single-use token, compare-and-set, fresh decision id): a decision published straight
        onto the history stream by anyone else is removed from the history and dead-lettered,
        never applied."""
        from nbflow.engine.decide import decision_is_genuine

        # a failed read (Transient) propagates: the batch is redelivered, never dead-lettered
        try:
            rec = json.loads((await self.approvals_kv.get(f"{ev.run}.{ev['node']}")).value)
        except NotFound:         # no such approval was ever requested
            rec = {}
        if decision_is_genuine(ev, rec):
            return True
        await self._dead_letter_raw(self.L.history_subject(ev.run), ev.encode(),
                                    f"ApprovalDecided for {ev['node']!r} was not decided through "
                                    f"the approvals bucket (record: {rec.get('state', 'none')})")
        try:
            await self.streams.delete_msg(self.L.history_stream, ev.seq)
        except NotFound:         # already deleted by another engine
            pass
        return False

    async def _start_recorded(self, ev: Event) -> bool:
        """A run starts only when its submitter recorded the start in the definitions bucket
        (which workers cannot write): a RunStarted published by anyone else is removed from
        the history and dead-lettered."""
        from nbflow.core.events import start_record

        try:
            rec = json.loads((await self.defs_kv.get(f"start.{ev.run}")).value)
        except NotFound:         # a failed read (Transient) propagates: the batch is redelivered
            rec = {}
        if rec == start_record(ev["wf"], ev.get("params") or {}):
            return True
        await self._dead_letter_raw(self.L.history_subject(ev.run), ev.encode(),
                                    "RunStarted without a matching start record (only authors "
                                    "may start runs)")
        try:                              # readers replaying history must not see it either
            await self.js.delete_msg(self.L.history_stream, ev.seq)
        except Exception:  # noqa: BLE001 - already deleted by another engine
            pass
        return False

    async def _close_approval(self, st: RunState, c: Command) -> None:
        """A pending approval that can no longer be given (timed out, run cancelled): its
        record stops being pending and its token is dropped."""
        key = f"{st.run}.{c['node']}"
        for _ in range(5):
            try:
                entry = await self.approvals_kv.get(key)
            except NotFound:     # never recorded
                return
            rec = json.loads(entry.value)
            if rec.get("state") != "pending":
                return
            rec.pop("token", None)
            rec.update(state=c["state"], by=c["by"], reason=c["reason"], at=time.time())
            try:
                await self.approvals_kv.update(key, json.dumps(rec).encode(), last=entry.revision)
                return
            except Conflict:     # a person decided meanwhile: look again
                continue

    async def _request_approval(self, st: RunState, c: Command) -> None:
        key = f"{st.run}.{c['node']}"
        body = {"run": st.run, "node": c["node"], "prompt": c["prompt"],
                "expires": c.data.get("expires"),
                "token": secrets.token_urlsafe(24), "state": "pending",
                "requested": time.time()}
        try:
            await self.approvals_kv.create(key, json.dumps(body).encode())
        except Conflict:         # exists already: a replayed command
            pass
