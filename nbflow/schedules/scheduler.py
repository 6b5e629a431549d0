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
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from nbflow.nats import infra
from nbflow.nats.layout import (DUPLICATE_WINDOW_S, MSG_ID, SCHEDULE, SCHEDULE_NEXT,
                                  SCHEDULE_TARGET, SCHEDULE_TZ, Layout)

log = logging.getLogger("nbflow.scheduler")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
CATCHUP = ("none", "latest", "all")
OVERLAP = ("skip", "queue", "allow")
LOG_TTL = "2160h"              # schedule log events are kept 90 days
TICK_TTL = "24h"               # server-made ticks expire after a day
CATCHUP_GRACE_S = 2.0          # fires younger than this are left to their tick (not "missed")
CATCHUP_MAX = 1000             # at most this many missed fires are started by --catchup all
ISO = "%Y-%m-%dT%H:%M:%SZ"

_PREDEFINED = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_DUR_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class ScheduleError(ValueError):
    """A schedule or trigger definition that cannot work: the message says why."""


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime(ISO)


def parse_iso(s: str) -> datetime:
    return datetime.strptime(s, ISO).replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --- cron specs --------------------------------------------------------------------------------

def _parse_every(text: str) -> float:
    """A Go ``time.ParseDuration`` subset: 30s, 1m30s, 2h, 500ms (whole seconds, >= 1s)."""
    pos, total = 0, 0.0
    for m in _DUR_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ScheduleError(f"@every {text!r}: use a duration like 30s, 5m, 1h30m")
    if total < 1 or total != int(total):
        raise ScheduleError(f"@every {text!r}: the period must be a whole number of seconds >= 1s")
    return total


@dataclass(frozen=True)
class Spec:
    """A parsed schedule: ``server`` is what nats-server gets in ``Nats-Schedule``."""
    text: str
    tz: str = "UTC"
    cron6: str | None = None        # 6-field cron, seconds first
    every: float | None = None      # @every period in seconds

    @property
    def server(self) -> str:
        return self.cron6 if self.cron6 else f"@every {int(self.every)}s"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def _it(self, start: datetime) -> croniter:
        return croniter(self.cron6, start.astimezone(self.zone), second_at_beginning=True)

    def next_after(self, dt: datetime) -> datetime:
        """The first fire strictly after ``dt`` (for @every: on the grid anchored at ``dt``)."""
        if self.every:
            return dt + timedelta(seconds=self.every)
        return self._it(dt).get_next(datetime).astimezone(timezone.utc)

    def prev_before(self, dt: datetime) -> datetime:
        """The last fire strictly before ``dt`` (for @every: ``dt`` minus one period)."""
        if self.every:
            return dt - timedelta(seconds=self.every)
        return self._it(dt).get_prev(datetime).astimezone(timezone.utc)

    def floor(self, dt: datetime) -> datetime:
        """The last fire at or before ``dt`` (whole seconds)."""
        dt = dt.replace(microsecond=0)
        if self.every:
            return dt
        return self.prev_before(dt + timedelta(seconds=1))

    def between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Fire times t with after < t <= until."""
        t = self.next_after(after)
        while t <= until:
            yield t
            t = self.next_after(t)

    def fire_of_tick(self, next_header: str | None, stamp: datetime | None) -> datetime:
        """The fire a server tick stands for: one period before its ``Nats-Schedule-Next``
        (deterministic for every engine and redelivery), else its timestamp on the grid."""
        if next_header:
            try:
                nxt = datetime.strptime(next_header.strip(), ISO).replace(tzinfo=timezone.utc)
                return self.prev_before(nxt)
            except ValueError:
                pass
        return self.floor(stamp or utcnow())


def parse_spec(cron: str, tz: str | None = None) -> Spec:
    """Validate and normalise a schedule. Raises ScheduleError with a clear sentence."""
    tz = tz or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError):
        raise ScheduleError(f"unknown time zone {tz!r} (use an IANA name like Europe/London "
                            f"or UTC)") from None
    text = (cron or "").strip()
    low = text.lower()
    if low.startswith("@every"):
        return Spec(text, tz, every=_parse_every(text[6:].strip()))
    if low in _PREDEFINED:
        return Spec(text, tz, cron6=_PREDEFINED[low])
    if low.startswith("@"):
        raise ScheduleError(f"unknown schedule {text!r}: use a cron expression, "
                            f"{', '.join(sorted(set(_PREDEFINED)))} or @every DURATION")
    fields = text.split()
    if len(fields) == 5:
        cron6 = "0 " + " ".join(fields)
    elif len(fields) == 6:
        cron6 = " ".join(fields)
    else:
        raise ScheduleError(f"bad cron expression {text!r}: use 5 fields (minute hour day month "
                            f"weekday, e.g. \"0 6 * * *\") or 6 with seconds first")
    if not croniter.is_valid(cron6, second_at_beginning=True):
        raise ScheduleError(f"bad cron expression {text!r}: a field is out of range or "
                            f"malformed (e.g. \"0 6 * * *\" is 06:00 every day)")
    try:
        croniter(cron6, utcnow(), second_at_beginning=True).get_next(datetime)
    except Exception as e:  # noqa: BLE001 - e.g. 31 Feb never happens
        raise ScheduleError(f"bad cron expression {text!r}: {e}") from None
    return Spec(text, tz, cron6=cron6)


def check_name(name: str, what: str = "schedule") -> str:
    if not NAME_RE.match(name or ""):
        raise ScheduleError(f"{what} name {name!r} is invalid: use lowercase letters, digits, "
                            f"'-' or '_' (up to 48, starting with a letter or digit)")
    return name


def default_name(notebook: str) -> str:
    stem = os.path.splitext(os.path.basename(notebook))[0].lower()
    return (re.sub(r"[^a-z0-9_-]+", "-", stem).strip("-_") or "schedule")[:48]


def schedule_run_id(name: str, fire_iso: str) -> str:
    """Deterministic: one run per (schedule, fire time). 14 chars of [a-z0-9-]."""
    return "s-" + hashlib.sha256(f"{name}|{fire_iso}".encode()).hexdigest()[:12]


def trigger_run_id(name: str, seq: int) -> str:
    return "t-" + hashlib.sha256(f"{name}|{seq}".encode()).hexdigest()[:12]


def fire_msg_id(name: str, fire_iso: str) -> str:
    return f"sched.{name}.{fire_iso}"


# --- the store: definitions, state, log (shared by client and engine) -----------------------

def _is_wrong_seq(e: Exception) -> bool:
    return type(e).__name__ == "KeyWrongLastSequenceError" or \
        "wrong last sequence" in str(e).lower()


def _is_not_found(e: Exception) -> bool:
    n = type(e).__name__
    return n in ("KeyNotFoundError", "KeyDeletedError", "NotFoundError", "NoKeysError") or \
        "not found" in str(e).lower()


class Store:
    """Schedules KV + schedule/tick/log subjects, over one JetStream context."""

    def __init__(self, js, layout: Layout):
        self.js, self.L = js, layout
        self._kv = None

    async def kv(self):
        if self._kv is None:
            self._kv = await self.js.key_value(self.L.schedules_bucket)
        return self._kv

    async def get(self, key: str) -> tuple[dict | None, int]:
        kv = await self.kv()
        try:
            e = await kv.get(key)
        except Exception as e:  # noqa: BLE001
            if _is_not_found(e):
                return None, 0
            raise
        if e.value is None or not e.value:
            return None, e.revision
        return json.loads(e.value), e.revision

    async def put(self, key: str, value: dict, last: int | None = None) -> int:
        """CAS write: ``last`` = revision read (0 = must not exist); None = unconditional."""
        kv = await self.kv()
        raw = json.dumps(value, separators=(",", ":")).encode()
        if last is None:
            return await kv.put(key, raw)
        if last == 0:
            return await kv.create(key, raw)         # nats-py recreates deleted keys too
        return await kv.update(key, raw, last=last)

    async def delete(self, key: str) -> None:
        kv = await self.kv()
        try:
            await kv.delete(key)
        except Exception as e:  # noqa: BLE001
            if not _is_not_found(e):
                raise

    async def keys(self, prefix: str) -> list[str]:
        kv = await self.kv()
        try:
            ks = await kv.keys()
        except Exception:  # noqa: BLE001 - NoKeysError on an empty bucket
            return []
        return sorted(k[len(prefix):] for k in ks if k.startswith(prefix))

    async def history(self, key: str) -> list[dict]:
        kv = await self.kv()
        try:
            entries = await kv.history(key)
        except Exception:  # noqa: BLE001
            return []
        out = []
        for e in entries:
            out.append({"revision": e.revision, "op": str(getattr(e, "operation", "") or "PUT"),
                        **(json.loads(e.value) if e.value else {})})
        return out

    async def update_state(self, name: str, fn) -> dict:
        """Read-modify-CAS ``state.<name>``: ``fn(state) -> state``; retried on conflicts."""
        for _ in range(50):
            st, rev = await self.get(f"state.{name}")
            new = fn(dict(st or {}))
            try:
                await self.put(f"state.{name}", new, last=rev)
                return new
            except Exception as e:  # noqa: BLE001
                if not _is_wrong_seq(e):
                    raise
        raise RuntimeError(f"schedule {name}: state CAS kept conflicting")

    async def log(self, name: str, what: str, fire: str | None = None, **data: Any) -> None:
        """Append to the schedule's log; one event per (name, fire, what) thanks to msg-id dedup."""
        ev = {"type": what, "schedule": name, "fire": fire, "ts": time.time(), **data}
        mid = f"log.{name}.{fire or time.time()}.{what}"
        await self.js.publish(self.L.schedule_log_subject(name),
                              json.dumps(ev, separators=(",", ":"), default=str).encode(),
                              headers={MSG_ID: mid, "Nats-TTL": LOG_TTL})

    async def read_log(self, name: str) -> list[dict]:
        subj = self.L.schedule_log_subject(name)
        try:
            info = await self.js.stream_info(self.L.timers_stream, subjects_filter=subj)
            total = (info.state.subjects or {}).get(subj, 0)
        except Exception:  # noqa: BLE001
            total = 0
        if not total:
            return []
        out: list[dict] = []
        sub = await self.js.subscribe(subj, ordered_consumer=True, stream=self.L.timers_stream)
        try:
            while len(out) < total:
                try:
                    m = await sub.next_msg(timeout=5)
                except asyncio.TimeoutError:
                    break
                out.append(json.loads(m.data))
        finally:
            await sub.unsubscribe()
        return out

    # -- the server-side clock --
    async def arm(self, name: str, spec: Spec) -> None:
        """(Re)publish the schedule message: nats-server fires ticks from now on."""
        await self.disarm(name)
        hdrs = {SCHEDULE: spec.server, SCHEDULE_TARGET: self.L.cron_tick_subject(name),
                "Nats-Schedule-TTL": TICK_TTL}
        if spec.tz and spec.tz != "UTC" and spec.cron6:
            hdrs[SCHEDULE_TZ] = spec.tz
        await self.js.publish(self.L.cron_schedule_subject(name),
                              json.dumps({"schedule": name}).encode(), headers=hdrs)

    async def disarm(self, name: str) -> None:
        """Remove the schedule message: the server stops firing."""
        await self.js.purge_stream(self.L.timers_stream,
                                   subject=self.L.cron_schedule_subject(name))


# --- starting a run for one fire (idempotent) -------------------------------------------------

class Starter:
    """Resolves a schedule's workflow and starts runs, over an nbflow Client."""

    def __init__(self, client):
        self.client = client
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
                if not unknown_params(wf, d.get("params") or {}):
                    return wf
            except Exception as e:  # noqa: BLE001 - broken edit: fall back to the stored one
                log.warning("schedule %s: %s does not compile (%s); using the stored version",
                            d.get("name"), path, e)
        return await self.client.workflow(d["wf"])

    async def has_run(self, run: str) -> bool:
        return await self.client.has_run(run)

    async def is_running(self, run: str | None) -> bool:
        if not run:
            return False
        runs = await self.client.kv(self.client.L.runs_bucket)
        try:
            e = await runs.get(run)
            from nbflow.core.state import RunState

            return not RunState.from_dict(json.loads(e.value)).is_final
        except Exception:  # noqa: BLE001 - no snapshot yet: running if it has a history
            return await self.has_run(run)

    async def start(self, d: dict, fire_iso: str, *, run_id: str | None = None,
                    by: str | None = None, extra: dict | None = None,
                    msg_id: str | None = None) -> str:
        wf = await self.workflow(d)
        params = dict(d.get("params") or {})
        if declares(wf, "scheduled_for"):
            params["scheduled_for"] = fire_iso
        params.update(extra or {})
        name = d["name"]
        rid = run_id or schedule_run_id(name, fire_iso)
        return await self.client.submit(
            wf, params, run_id=rid, msg_id=msg_id or fire_msg_id(name, fire_iso),
            by=by or f"schedule:{name}", schedule=f"{name}@{fire_iso}")


def declares(wf, param: str) -> bool:
    return param in wf.param_names()


def unknown_params(wf, params: dict) -> list[str]:
    return sorted(set(params) - wf.param_names())


# --- the engine side ----------------------------------------------------------------------------

class Scheduler:
    """Runs inside the engine: turns ticks into runs, catches up missed fires at start,
    starts queued fires, and consumes trigger subjects. Any number may run at once."""

    ACK_WAIT_S = 30.0

    def __init__(self, nc, layout: Layout, stop: asyncio.Event | None = None):
        from nbflow.client import Client

        self.nc, self.js, self.L = nc, nc.jetstream(), layout
        self.store = Store(self.js, layout)
        self.client = Client(nc, layout)
        self.starter = Starter(self.client)
        self._stop = stop or asyncio.Event()
        self._triggers: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        self.tick_sub = await self.js.pull_subscribe(
            self.L.cron_tick_subject("*"), durable=self.L.scheduler_consumer,
            stream=self.L.timers_stream,
            config=infra.consumer_config(self.L.scheduler_consumer, self.L.cron_tick_subject("*"),
                                         self.ACK_WAIT_S, 1000))
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
            for m in await self._fetch(self.tick_sub, 64):
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
        if d.get("paused") and fire_iso > d.get("paused_at", ""):
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
            if not catching_up and st.get("last_fire") and fire_iso <= st["last_fire"] \
                    and fire_iso not in (st.get("queued") or []):
                return None                         # accounted for by catch-up
            prev = st.get("last_run")
            overlap = d.get("overlap", "skip")
            if overlap != "allow" and prev and prev != rid and \
                    await self.starter.is_running(prev):
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
            except Exception as e:  # noqa: BLE001 - e.g. params no longer accepted
                from nbflow.client import NbflowError

                if not isinstance(e, NbflowError):
                    raise
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
        def fn(st: dict) -> dict:
            if fire_iso > st.get("last_fire", ""):
                st["last_fire"] = fire_iso
            q = [f for f in st.get("queued") or [] if f != fire_iso]
            if queue:
                q.append(queue)
            st["queued"] = sorted(set(q))
            if run:
                st["last_run"], st["last_run_fire"] = run, fire_iso
                st["fires"] = st.get("fires", 0) + 1
            return st
        await self.store.update_state(name, fn)

    # -- catch-up --
    async def catch_up(self) -> None:
        """Fires missed while no engine ran (since the last recorded fire): none/latest/all."""
        now = utcnow() - timedelta(seconds=CATCHUP_GRACE_S)
        for name in await self.store.keys("sched."):
            d, _ = await self.store.get(f"sched.{name}")
            if not d or d.get("paused"):
                continue
            st, _ = await self.store.get(f"state.{name}")
            last = (st or {}).get("last_fire") or d.get("armed_at")
            if not last:
                continue
            spec = parse_spec(d["cron"], d.get("tz"))
            missed: list[str] = []
            for t in spec.between(parse_iso(last), now):
                missed.append(iso(t))
                if len(missed) > CATCHUP_MAX:
                    missed.pop(0)
            # a fire handled just as the last engine stopped has its run already: not missed
            while missed and await self.starter.has_run(schedule_run_id(name, missed[0])):
                missed.pop(0)
            if not missed:
                continue
            policy = d.get("catchup", "latest")
            todo = {"none": [], "latest": missed[-1:], "all": missed}[policy]
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
            if d.get("param") and not declares(wf, d["param"]):
                params.pop(d["param"])
            try:
                await self.client.submit(wf, params, run_id=rid, msg_id=f"trig.{name}.{seq}",
                                         by=f"trigger:{name}", schedule=f"trigger:{key}")
            except Exception as e:  # noqa: BLE001
                from nbflow.client import NbflowError

                if not isinstance(e, NbflowError):
                    raise
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


async def ensure_triggers_stream(js, L: Layout, subjects: list[str]) -> None:
    """The stream capturing trigger subjects (dedup window = ours). Deleted with the last one."""
    from nats.js.api import StorageType, StreamConfig

    if not subjects:
        try:
            await js.delete_stream(L.triggers_stream)
        except Exception:  # noqa: BLE001 - not there
            pass
        return
    cfg = StreamConfig(name=L.triggers_stream, subjects=sorted(set(subjects)),
                       storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S,
                       max_age=7 * 24 * 3600,
                       description="nbflow event triggers: messages that start runs")
    try:
        await js.stream_info(L.triggers_stream)
        await js.update_stream(cfg)
    except Exception as e:  # noqa: BLE001
        if not _is_not_found(e) and "not found" not in repr(e).lower():
            raise
        await js.add_stream(cfg)
