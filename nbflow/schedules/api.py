"""Schedules and event triggers, client side: add / list / pause / resume / rm / run-now /
backfill, and trigger add / list / rm. The engine's Scheduler (scheduler.py) does the firing.

    async with Client.connect() as c:
        s = Schedules(c)
        await s.add("report.ipynb", cron="0 6 * * *", tz="Europe/London", name="daily")

A definition is stored with the compiled workflow (so a fire does not need the notebook file);
at fire time the notebook is recompiled if it still exists and compiles, so edits apply.
"""
from __future__ import annotations

import asyncio
import os
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

from nbflow.client import Client, parse_param, run_once, whoami
from nbflow.core.events import fire_msg_id
from nbflow.errors import Conflict, NbflowError, NotFound, ScheduleError
from nbflow.nats.calls import call
from nbflow.schedules.cron import check_name, default_name, iso, parse_spec, schedule_run_id, utcnow
from nbflow.schedules.decide import CATCHUP, OVERLAP, declares, unknown_params
from nbflow.schedules.scheduler import Starter
from nbflow.schedules.store import Store, ensure_triggers_stream


def _err(e: Exception) -> NbflowError:
    return NbflowError(str(e))


def _compile(notebook: str):
    from nbflow.compiler import compile_file

    if not os.path.isfile(notebook):
        raise NbflowError(f"notebook {notebook!r} does not exist")
    return compile_file(notebook)


def _params(wf, params: dict[str, Any] | list[tuple[str, str]] | None) -> dict[str, Any]:
    if isinstance(params, (list, tuple)):
        params = {k: parse_param(v, wf.params.get(k)) for k, v in params}
    params = dict(params or {})
    bad = unknown_params(wf, params)
    if bad:
        known = ", ".join(sorted(wf.params)) or "(none: add a cell tagged 'parameters')"
        raise NbflowError(f"unknown parameter {', '.join(map(repr, bad))} for {wf.name}; "
                          f"its parameters are: {known}")
    return params


class Schedules:
    def __init__(self, client: Client):
        self.c = client
        self.store = Store(client.js, client.L)

    # --- schedules ---------------------------------------------------------------------------
    async def add(self, notebook: str, cron: str, *, tz: str | None = None,
                  params: dict | list | None = None, name: str | None = None,
                  catchup: str = "latest", overlap: str = "skip", by: str | None = None,
                  replace: bool = False) -> dict:
        """Validate (cron, time zone, notebook, params), store the definition, arm the clock."""
        try:
            spec = parse_spec(cron, tz)
            name = check_name(name or default_name(notebook))
        except ScheduleError as e:
            raise _err(e) from None
        if catchup not in CATCHUP:
            raise NbflowError(f"--catchup must be one of {', '.join(CATCHUP)}")
        if overlap not in OVERLAP:
            raise NbflowError(f"--overlap must be one of {', '.join(OVERLAP)}")
        wf = _compile(notebook)
        params = _params(wf, params)
        old, rev = await self.store.get(f"sched.{name}")
        if old is not None and not replace:
            raise NbflowError(f"a schedule named {name!r} exists already (rm it first, or "
                              f"pass --name)")
        if (await self.store.get(f"trig.{name}"))[0] is not None:
            raise NbflowError(f"a trigger named {name!r} exists already")
        h = await self.c.put_workflow(wf)
        now = utcnow()
        d = {"kind": "schedule", "name": name, "notebook": os.path.abspath(notebook),
             "wf": h, "workflow": wf.name, "cron": cron, "tz": spec.tz, "params": params,
             "catchup": catchup, "overlap": overlap, "paused": False,
             "armed_at": iso(spec.floor(now)), "by": by or whoami(), "at": time.time(),
             "change": "replaced" if old else "added"}
        await self.store.put(f"sched.{name}", d, last=rev)
        await self.store.update_state(name, lambda st: {**st, "last_fire": d["armed_at"],
                                                        "queued": []})
        try:
            await self.store.arm(name, spec)
        except Exception as e:  # noqa: BLE001 - the server refused the schedule header
            await self.store.delete(f"sched.{name}")
            raise NbflowError(f"nats-server refused schedule {cron!r}: {e!r}") from None
        return d

    async def get(self, name: str) -> dict:
        d, _ = await self.store.get(f"sched.{name}")
        if d is None:
            names = await self.store.keys("sched.")
            raise NbflowError(f"no schedule {name!r} (schedules: {', '.join(names) or 'none'})")
        return d

    async def list(self) -> list[dict]:
        """Every schedule with its next fire (UTC datetime), state and last run."""
        out = []
        for name in await self.store.keys("sched."):
            d, _ = await self.store.get(f"sched.{name}")
            if d is None:
                continue
            st, _ = await self.store.get(f"state.{name}")
            st = st or {}
            spec = parse_spec(d["cron"], d.get("tz"))
            row = {**d, "next": None if d.get("paused") else spec.next_after(utcnow()),
                   "last_fire": st.get("last_fire"), "last_run": st.get("last_run"),
                   "last_run_state": None, "queued": st.get("queued") or []}
            if st.get("last_run"):
                try:
                    row["last_run_state"] = (await self.c.status(st["last_run"])).state
                except NbflowError:
                    row["last_run_state"] = "starting"
            out.append(row)
        return out

    async def _change(self, name: str, change: str, by: str | None, **fields) -> dict:
        for _ in range(20):
            d, rev = await self.store.get(f"sched.{name}")
            if d is None:
                await self.get(name)                       # raises the clear error
            d = {**d, **fields, "by": by or whoami(), "at": time.time(), "change": change}
            try:
                await self.store.put(f"sched.{name}", d, last=rev)
                return d
            except Conflict:     # CAS lost: reread
                continue
        raise NbflowError(f"schedule {name!r} keeps changing; try again")

    async def pause(self, name: str, by: str | None = None) -> dict:
        d = await self.get(name)
        spec = parse_spec(d["cron"], d.get("tz"))
        d = await self._change(name, "paused", by, paused=True,
                               paused_at=iso(spec.floor(utcnow())))
        await self.store.disarm(name)
        return d

    async def resume(self, name: str, by: str | None = None) -> dict:
        """Fires missed while paused are not caught up: the schedule restarts from now."""
        d = await self.get(name)
        spec = parse_spec(d["cron"], d.get("tz"))
        now = iso(spec.floor(utcnow()))
        await self.store.update_state(name, lambda st: {
            **st, "last_fire": max(now, st.get("last_fire", ""))})
        d = await self._change(name, "resumed", by, paused=False, paused_at=None, armed_at=now)
        await self.store.arm(name, spec)
        return d

    async def rm(self, name: str, by: str | None = None) -> None:
        await self.get(name)
        await self.store.disarm(name)
        await self._change(name, "removed", by)            # the last revision says who removed it
        await self.store.delete(f"sched.{name}")
        await self.store.delete(f"state.{name}")

    async def run_now(self, name: str, by: str | None = None) -> str:
        """Start a run at once (ignores --overlap: an explicit request)."""
        d = await self.get(name)
        fire = iso(utcnow())
        rid = schedule_run_id(name, f"now|{fire}")
        rid = await Starter(self.c).start(d, fire, run_id=rid, by=by or whoami(),
                                          msg_id=fire_msg_id(name, f"now.{fire}"))
        await self.store.log(name, "started", fire, run=rid, manual=True, by=by or whoami())
        await self.store.update_state(name, lambda st: {**st, "last_run": rid,
                                                        "last_run_fire": fire})
        return rid

    async def log(self, name: str) -> list[dict]:
        events = await self.store.read_log(name)
        if not events and not await self.changes(name):
            await self.get(name)             # no such schedule, ever: say so, listing them
        return events

    async def changes(self, name: str) -> list[dict]:
        """Revisions of the definition: who changed it, when, how."""
        return await self.store.history(f"sched.{name}")

    async def runs(self, name: str) -> list[tuple[str, str]]:
        """(run id, fire time) of every RunStarted in history for this schedule."""
        return [(ev.run, ev.get("schedule", "").partition("@")[2])
                async for ev in _run_starts(self.c) if ev.get("schedule", "").startswith(name + "@")]

    # --- backfill ---------------------------------------------------------------------------
    def fires_between(self, d: dict, start: datetime, end: datetime) -> list[str]:
        spec = parse_spec(d["cron"], d.get("tz"))
        return [iso(t) for t in spec.between(start - timedelta(seconds=1), end)]

    async def backfill(self, name: str, start: str | date | datetime, end: str | date | datetime,
                       max_parallel: int = 4, by: str | None = None, on_event=None,
                       wait_timeout: float | None = None) -> dict[str, list[str]]:
        """Start the runs the schedule would have started in [start, end] (a date as ``end``
        means the whole day), at most ``max_parallel`` running at once; fire times that already
        have a run are skipped. Returns {"started": [...], "existing": [...]} of run ids."""
        d = await self.get(name)
        tz = parse_spec(d["cron"], d.get("tz")).zone
        t0, t1 = _instant(start, tz, end=False), _instant(end, tz, end=True)
        if t1 < t0:
            raise NbflowError(f"--to {end} is before --from {start}")
        if max_parallel < 1:
            raise NbflowError("--max-parallel must be at least 1")
        starter = Starter(self.c)
        out: dict[str, list[str]] = {"started": [], "existing": []}
        running: set[asyncio.Task] = set()
        for fire in self.fires_between(d, t0, t1):
            rid = schedule_run_id(name, fire)
            if await starter.has_run(rid):
                out["existing"].append(rid)
                if on_event:
                    on_event("existing", rid, fire)
                continue
            while len(running) >= max_parallel:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running -= done
            await starter.start(d, fire, run_id=rid, by=by or whoami())
            await self.store.log(name, "started", fire, run=rid, backfill=True)
            out["started"].append(rid)
            if on_event:
                on_event("started", rid, fire)
            running.add(asyncio.ensure_future(self.c.wait(rid, wait_timeout)))
        if running:
            await asyncio.wait(running)
        return out

    # --- triggers ---------------------------------------------------------------------------
    async def trigger_add(self, notebook: str, subject: str, *, name: str | None = None,
                          param: str | None = None, validate: str | None = None,
                          params: dict | list | None = None, by: str | None = None) -> dict:
        """Start a run for every message on ``subject`` (body bound to parameter ``param``)."""
        from nats.js.api import ConsumerConfig, DeliverPolicy

        try:
            name = check_name(name or default_name(notebook), "trigger")
        except ScheduleError as e:
            raise _err(e) from None
        subject = (subject or "").strip()
        if not subject or " " in subject or subject.startswith(("nbflow.", "$")) or \
                subject in (">", "nbflow"):
            raise NbflowError(f"trigger subject {subject!r} is invalid (nbflow.* and $* "
                              f"subjects are nbflow's/the server's own)")
        wf = _compile(notebook)
        params = _params(wf, params)
        if param:
            if not declares(wf, param):
                raise NbflowError(f"{wf.name} has no parameter {param!r} to receive the message "
                                  f"(its parameters are: {', '.join(sorted(wf.params)) or 'none'})")
        if (await self.store.get(f"trig.{name}"))[0] is not None:
            raise NbflowError(f"a trigger named {name!r} exists already")
        if (await self.store.get(f"sched.{name}"))[0] is not None:
            raise NbflowError(f"a schedule named {name!r} exists already")
        h = await self.c.put_workflow(wf)
        subjects = await self._trigger_subjects()
        try:
            await ensure_triggers_stream(self.c.js, self.c.L, subjects + [subject])
        except Exception as e:  # noqa: BLE001 - overlaps another stream, bad subject
            raise NbflowError(f"cannot capture subject {subject!r}: {e!r}") from None
        await self.c.js.add_consumer(self.c.L.triggers_stream, ConsumerConfig(
            durable_name=self.c.L.trigger_consumer(name), filter_subject=subject,
            deliver_policy=DeliverPolicy.NEW, ack_wait=30, max_ack_pending=1000))
        d = {"kind": "trigger", "name": name, "notebook": os.path.abspath(notebook), "wf": h,
             "workflow": wf.name, "subject": subject, "param": param, "validate": validate,
             "params": params, "by": by or whoami(), "at": time.time(), "change": "added"}
        await self.store.put(f"trig.{name}", d, last=0)
        return d

    async def _trigger_subjects(self) -> list[str]:
        return [d["subject"] for d in await self.trigger_list()]

    async def trigger_list(self) -> list[dict]:
        out = []
        for n in await self.store.keys("trig."):
            d, _ = await self.store.get(f"trig.{n}")
            if d:
                out.append(d)
        return out

    async def trigger_rm(self, name: str, by: str | None = None) -> None:
        d, rev = await self.store.get(f"trig.{name}")
        if d is None:
            names = await self.store.keys("trig.")
            raise NbflowError(f"no trigger {name!r} (triggers: {', '.join(names) or 'none'})")
        await self.store.put(f"trig.{name}", {**d, "by": by or whoami(), "at": time.time(),
                                              "change": "removed"}, last=rev)
        await self.store.delete(f"trig.{name}")
        try:
            await call("stream.admin", name, "client", self.c.js.delete_consumer,
                       self.c.L.triggers_stream, self.c.L.trigger_consumer(name))
        except NotFound:         # gone already
            pass
        await ensure_triggers_stream(self.c.js, self.c.L, await self._trigger_subjects())


def _instant(v, tz, end: bool) -> datetime:
    """A date (whole day in the schedule's zone) or an ISO-8601 datetime."""
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, date):
        dt = datetime(v.year, v.month, v.day)
        if end:
            dt += timedelta(days=1, seconds=-1)
    else:
        s = str(v).strip()
        try:
            if len(s) == 10:
                return _instant(date.fromisoformat(s), tz, end)
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise NbflowError(f"{s!r} is not a date (2026-11-01) or ISO-8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.astimezone(timezone.utc)


async def _run_starts(c: Client):
    """Every RunStarted in the history stream (a full scan: for tests and small histories)."""
    from nbflow.core.events import decode

    try:
        info = await c.streams.info(c.L.history_stream)
        last = info.state.last_seq
    except NotFound:
        return
    if not last:
        return
    sub = await c.js.subscribe(c.L.history_wildcard, ordered_consumer=True,
                               stream=c.L.history_stream)
    try:
        while True:
            try:
                m = await sub.next_msg(timeout=5)
            except asyncio.TimeoutError:
                return
            if b'"RunStarted"' in m.data:
                try:
                    yield decode(m.data, seq=m.metadata.sequence.stream)
                except Exception:  # noqa: BLE001
                    pass
            if m.metadata.sequence.stream >= last:
                return
    finally:
        await sub.unsubscribe()


def run_sync(coro_fn, url: str | None = None, namespace: str | None = None):
    """Blocking: connect, ``await coro_fn(Schedules)``, close (``url`` as the client takes it)."""
    return run_once(lambda c: coro_fn(Schedules(c)), url, namespace)


__all__ = ["Schedules", "ScheduleError", "run_sync"]
