"""Schedules and event triggers on NATS primitives: no cron daemon, no state in a process.

* A schedule's definition lives in the schedules KV (``sched.<name>``, history kept: who changed
  it, when); its runtime state (last fire, last run, queued fires) in ``state.<name>`` (CAS).
* The clock is the server's: a message on ``timers.cron.<name>`` carries the cron expression in
  ``Nats-Schedule``; nats-server publishes a tick on ``timers.tick.<name>`` at every fire.
* The engine's :class:`Scheduler` consumes ticks. The fire time is derived from the tick's
  ``Nats-Schedule-Next`` header (minus one period on the cron grid), so every engine and every
  redelivery derives the same fire time, hence the same run id (``s-`` + sha256(name|fire)):
  one fire never starts two runs.
* Everything a schedule decides (fired, skipped, queued, caught up, refused) is appended to its
  log subject ``timers.log.<name>`` (message TTL 90 days).
* Triggers: a stream (``NBFLOW_TRIGGERS``) captures the trigger subjects; its duplicate window
  drops a re-published ``Nats-Msg-Id``, and the run id derives from the stream sequence.

This is the engine side. Cron math: cron.py; what a fire decides: decide.py (both pure); the KV
and subjects: store.py; the client side (add, pause, backfill, ...): api.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import timedelta
from typing import Any

from nbflow.core.events import fire_msg_id, trigger_msg_id
from nbflow.errors import NatsError, NbflowError, TooLarge
from nbflow.nats import infra
from nbflow.nats.layout import SCHEDULE_NEXT, Layout
from nbflow.runs import Runs
from nbflow.schedules import decide
from nbflow.schedules.cron import (iso, parse_iso, parse_spec, schedule_run_id,
                                   trigger_run_id, utcnow)
from nbflow.schedules.store import Store

log = logging.getLogger("nbflow.scheduler")


# --- starting a run for one fire (idempotent) -------------------------------------------------

class Starter:
    """Resolves a schedule's workflow and starts runs (idempotent by run id and message id)."""

    def __init__(self, runs: Runs):
        self.runs = runs
        self._compiled: dict[tuple, Any] = {}

    async def workflow(self, d: dict):
        """The notebook as it is now when it exists and compiles (edits apply), else the version
        stored when the schedule was added."""
        path = d.get("notebook")
        if path and os.path.isfile(path):
            try:
                st = os.stat(path)
                key = (path, st.st_mtime_ns, st.st_size)
                wf = self._compiled.get(key)
                if wf is None:
                    from nbflow.compiler import compile_file

                    wf = compile_file(path)
                    self._compiled = {key: wf}
                if not decide.unknown_params(wf, d.get("params") or {}):
                    return wf
            except Exception as e:  # noqa: BLE001 - broken edit: fall back to the stored one
                log.warning("schedule %s: %s does not compile (%s); using the stored version",
                            d.get("name"), path, e)
        return await self.runs.workflow(d["wf"])

    async def has_run(self, run: str) -> bool:
        return await self.runs.has_run(run)

    async def is_running(self, run: str | None) -> bool:
        if not run:
            return False
        st = await self.runs.snapshot(run)
        if st is None:           # no snapshot yet: running if it has a history
            return await self.has_run(run)
        return not st.is_final

    async def start(self, d: dict, fire_iso: str, *, run_id: str | None = None,
                    by: str | None = None, extra: dict | None = None,
                    msg_id: str | None = None) -> str:
        wf = await self.workflow(d)
        params = dict(d.get("params") or {})
        if decide.declares(wf, "scheduled_for"):
            params["scheduled_for"] = fire_iso
        params.update(extra or {})
        name = d["name"]
        rid = run_id or schedule_run_id(name, fire_iso)
        return await self.runs.submit(
            wf, params, run_id=rid, msg_id=msg_id or fire_msg_id(name, fire_iso),
            by=by or f"schedule:{name}", schedule=f"{name}@{fire_iso}")


def declares(wf, param: str) -> bool:
    return param in wf.param_names()


def unknown_params(wf, params: dict) -> list[str]:
    return sorted(set(params) - wf.param_names())


def refusal(e: Exception) -> bool:
    """True when starting a run failed for good (bad params, too big): the fire is refused.
    NATS trouble (timeouts, a full store) is not a refusal: the fire is retried later."""
    return isinstance(e, NbflowError) and (not isinstance(e, NatsError) or
                                           isinstance(e, TooLarge))


# --- the engine side ----------------------------------------------------------------------------

class Scheduler:
    """Runs inside the engine: turns ticks into runs, catches up missed fires at start,
    starts queued fires, and consumes trigger subjects. Any number may run at once."""

    ACK_WAIT_S = 30.0

    def __init__(self, nc, layout: Layout, stop: asyncio.Event | None = None):
        self.nc, self.js, self.L = nc, nc.jetstream(), layout
        self.store = Store(self.js, layout, role="scheduler")
        self.runs = Runs(nc, layout, role="scheduler")
        self.starter = Starter(self.runs)
        self._stop = stop or asyncio.Event()
        self._triggers: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        self.tick_sub = await self.js.pull_subscribe(
            self.L.cron_tick_subject("*"), durable=self.L.scheduler_consumer,
            stream=self.L.timers_stream,
            config=infra.consumer_config(self.L.scheduler_consumer, self.L.cron_tick_subject("*"),
                                         self.ACK_WAIT_S, 1000))
        # one outstanding pull request, topped up (not a probe + a long poll every second)
        self.tick_pull = infra.Puller(self.tick_sub, 64)
        try:
            await self.catch_up()
        except Exception:  # noqa: BLE001 - never keep the engine from serving
            log.exception("catch-up failed")

    async def run(self) -> None:
        await asyncio.gather(self._tick_loop(), self._housekeeping_loop())

    def stop(self) -> None:
        self._stop.set()

    async def _fetch(self, sub, n: int):
        return await infra.fetch(sub, n, self._stop, what="scheduler fetch")

    # -- ticks --
    async def _tick_loop(self) -> None:
        while not self._stop.is_set():
            for m in await self._fetch(self.tick_pull, 64):
                try:
                    await self.on_tick(m)
                    await m.ack()
                except Exception:  # noqa: BLE001
                    log.exception("tick on %s failed; will be redelivered", m.subject)
                    try:
                        await m.nak(delay=1.0)
                    except Exception:  # noqa: BLE001
                        pass

    async def on_tick(self, m) -> None:
        name = m.subject.rsplit(".", 1)[-1]
        d, _ = await self.store.get(f"sched.{name}")
        if d is None:
            return                                  # removed
        spec = parse_spec(d["cron"], d.get("tz"))
        stamp = getattr(m.metadata, "timestamp", None)
        fire = spec.fire_of_tick((m.headers or {}).get(SCHEDULE_NEXT), stamp)
        fire_iso = iso(fire)
        if decide.tick_ignored(d, fire_iso):
            return                                  # fired after the pause: ignore
        await self.fire(d, fire_iso)

    async def fire(self, d: dict, fire_iso: str, *, catching_up: bool = False) -> str | None:
        """One fire of a schedule: start its run (idempotent), or skip/queue by --overlap."""
        name = d["name"]
        rid = schedule_run_id(name, fire_iso)
        st, _ = await self.store.get(f"state.{name}")
        st = st or {}
        if await self.starter.has_run(rid):
            started = True                          # a redelivery: the run is there already
        else:
            if not catching_up and decide.accounted_for(st, fire_iso):
                return None                         # accounted for by catch-up
            prev = st.get("last_run")
            overlap = d.get("overlap", "skip")
            if decide.may_overlap(d, prev, rid) and await self.starter.is_running(prev):
                if overlap == "skip":
                    await self.store.log(name, "skipped", fire_iso, run=rid,
                                         reason=f"previous run {prev} still running")
                    await self._advance(name, fire_iso, None)
                    return None
                await self.store.log(name, "queued", fire_iso, run=rid,
                                     reason=f"previous run {prev} still running")
                await self._advance(name, fire_iso, None, queue=fire_iso)
                return None
            try:
                await self.starter.start(d, fire_iso, run_id=rid)
            except NbflowError as e:               # e.g. params no longer accepted
                if not refusal(e):
                    raise        # NATS trouble: the tick is redelivered and tried again
                await self.store.log(name, "refused", fire_iso, reason=str(e))
                await self._advance(name, fire_iso, None)
                return None
            started = True
        if started:
            await self.store.log(name, "started", fire_iso, run=rid,
                                 catchup=catching_up or None)
            await self._advance(name, fire_iso, rid)
        return rid

    async def _advance(self, name: str, fire_iso: str, run: str | None,
                       queue: str | None = None) -> None:
        await self.store.update_state(name, lambda st: decide.advance(st, fire_iso, run, queue))

    # -- catch-up --
    async def catch_up(self) -> None:
        """Fires missed while no engine ran (since the last recorded fire): none/latest/all."""
        now = utcnow() - timedelta(seconds=decide.CATCHUP_GRACE_S)
        for name in await self.store.keys("sched."):
            d, _ = await self.store.get(f"sched.{name}")
            if not d or d.get("paused"):
                continue
            st, _ = await self.store.get(f"state.{name}")
            last = (st or {}).get("last_fire") or d.get("armed_at")
            if not last:
                continue
            spec = parse_spec(d["cron"], d.get("tz"))
            missed = decide.missed_fires(spec, parse_iso(last), now)
            # a fire handled just as the last engine stopped has its run already: not missed
            while missed and await self.starter.has_run(schedule_run_id(name, missed[0])):
                missed.pop(0)
            if not missed:
                continue
            policy = d.get("catchup", "latest")
            todo = decide.catchup_todo(policy, missed)
            await self.store.log(name, "catchup", missed[-1], policy=policy, missed=len(missed),
                                 starting=len(todo))
            log.info("schedule %s: %d missed fire(s), catch-up %s starts %d", name, len(missed),
                     policy, len(todo))
            for f in todo:
                await self.fire(d, f, catching_up=True)
            await self._advance(name, missed[-1], None)

    # -- queued fires, trigger consumers --
    async def _housekeeping_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self._start_queued()
                await self._sync_triggers()
            except Exception:  # noqa: BLE001
                log.exception("scheduler housekeeping failed")
            try:
                await asyncio.wait_for(self._stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        for t in self._triggers.values():
            t.cancel()

    async def _start_queued(self) -> None:
        for name in await self.store.keys("state."):
            st, _ = await self.store.get(f"state.{name}")
            if not st or not st.get("queued"):
                continue
            if await self.starter.is_running(st.get("last_run")):
                continue
            d, _ = await self.store.get(f"sched.{name}")
            if d is None:
                continue
            f = st["queued"][0]
            rid = schedule_run_id(name, f)
            await self.starter.start(d, f, run_id=rid)
            await self.store.log(name, "started", f, run=rid, queued=True)
            await self._advance(name, f, rid)

    async def _sync_triggers(self) -> None:
        names = set(await self.store.keys("trig."))
        for n in list(self._triggers):
            if n not in names or self._triggers[n].done():
                self._triggers.pop(n).cancel()
        for n in names - set(self._triggers):
            self._triggers[n] = asyncio.ensure_future(self._trigger_loop(n))

    async def _trigger_loop(self, name: str) -> None:
        try:
            sub = await self.js.pull_subscribe_bind(durable=self.L.trigger_consumer(name),
                                                    stream=self.L.triggers_stream)
        except Exception as e:  # noqa: BLE001 - not created yet / removed: retried next sync
            log.debug("trigger %s: cannot bind (%s)", name, e)
            await asyncio.sleep(1)
            return
        while not self._stop.is_set():
            d, _ = await self.store.get(f"trig.{name}")
            if d is None:
                return
            for m in await self._fetch(sub, 16):
                try:
                    await self.on_trigger(d, m)
                except Exception:  # noqa: BLE001
                    log.exception("trigger %s failed; will be redelivered", name)
                    try:
                        await m.nak(delay=1.0)
                    except Exception:  # noqa: BLE001
                        pass

    async def on_trigger(self, d: dict, m) -> None:
        name = d["name"]
        seq = m.metadata.sequence.stream
        rid = trigger_run_id(name, seq)
        key = f"{name}#{seq}"
        if not await self.starter.has_run(rid):
            if d.get("paused"):
                await m.ack()
                return
            if d.get("validate"):
                ok, reason = await self._validate(d, m)
                if ok is None:                      # no answer yet: try again shortly
                    await m.nak(delay=2.0)
                    return
                if not ok:
                    await self.store.log(name, "refused", key, run=rid, reason=reason,
                                         subject=m.subject)
                    await m.ack()
                    return
            extra = {}
            if d.get("param"):
                extra[d["param"]] = _payload(m.data)
            wf = await self.starter.workflow(d)
            params = {**(d.get("params") or {}), **extra}
            if d.get("param") and not decide.declares(wf, d["param"]):
                params.pop(d["param"])
            try:
                await self.runs.submit(wf, params, run_id=rid, msg_id=trigger_msg_id(name, seq),
                                       by=f"trigger:{name}", schedule=f"trigger:{key}")
            except NbflowError as e:
                if not refusal(e):
                    raise        # NATS trouble: the trigger message is redelivered
                await self.store.log(name, "refused", key, reason=str(e))
                await m.ack()
                return
        await self.store.log(name, "started", key, run=rid, subject=m.subject)
        await m.ack()

    async def _validate(self, d: dict, m) -> tuple[bool | None, str]:
        tries = m.metadata.num_delivered or 1
        try:
            reply = await self.nc.request(d["validate"], m.data, timeout=5.0)
        except Exception as e:  # noqa: BLE001 - no responders / timeout
            if tries >= 5:
                return False, f"validator {d['validate']} did not answer ({type(e).__name__})"
            return None, ""
        try:
            ans = json.loads(reply.data)
        except ValueError:
            return False, f"validator replied with non-JSON: {reply.data[:200]!r}"
        if isinstance(ans, dict) and ans.get("ok") is False:
            return False, str(ans.get("reason") or "refused by the validator")
        return True, ""


def _payload(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")
