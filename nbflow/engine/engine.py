"""The NATS shell around ``state.py``: consume history events, apply them, carry out commands.

Crash safety (as SHAR does it): for every batch of a run's history messages the engine
  1. catches the run's state up to just before the messages (its cached state, else the KV
     snapshot plus the history read by subject from the snapshot's sequence on),
  2. applies the messages with the pure state machine (a new state; the cached one is kept),
  3. publishes the resulting commands with deterministic ``Nats-Msg-Id`` (server dedup),
  4. writes the snapshot with compare-and-set on its revision when the run is new, has ended,
     or now waits only on a person — otherwise the snapshot is written behind, once it has
     lagged NBFLOW_SNAPSHOT_EVERY seconds (0.25 s by default; longer for a run whose snapshot
     takes long to write, so writes stay under ~10 % of the engine's time),
  5. and only then acks the messages.
History is the truth and the snapshot a cache of its fold: a kill at any point leaves either
unacked messages (redelivered) or a snapshot behind the acked history, which the next event of
the run catches up from the history (step 1); re-published commands are deduplicated. A run
that has ended always has its final snapshot before its last event is acked, and a run that
waits on a person has its current one, so no snapshot stays behind with nothing to heal it.
Per event the engine does O(what the event changed), not O(run size) — but for copying the
run's two record indexes once per batch (a C-speed dict copy) — so a 1,000-step chain no longer
rewrites a 100 KB snapshot 2,000 times.
Two engines may run at once: CAS conflicts make the loser reload and retry (a written-behind
snapshot that loses is dropped: the winner's is a later or equal fold of the same history).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import signal
import time
from collections import OrderedDict
from typing import Any

from nbflow.core.ir import Workflow
from nbflow.errors import Conflict, NotFound, Transient
from nbflow.nats import infra
from nbflow.nats.kv import KV
from nbflow.nats.streams import Streams
from nbflow.core.events import (Command, Event, TaskMessage, decode, finished_msg_id, make,
                                 task_msg_id, timer_msg_id, timer_schedule_msg_id)
from nbflow.errors import BadMessage
from nbflow.nats.layout import MSG_ID, SCHEDULE, SCHEDULE_TARGET, Layout
from nbflow.core.state import RunState, fold, has_active_tasks

log = logging.getLogger("nbflow.engine")

# An event not acked within this time (engine died or stalled) goes to another engine.
# Short, so events a killed engine held reach another engine within seconds; a batch that takes
# longer is kept alive with in_progress() (_keep_alive), so a slow engine is not duplicated.
ACK_WAIT_S = float(os.environ.get("NBFLOW_ENGINE_ACK_WAIT", "5"))
# A busy run's snapshot is written once it has lagged this long (history has what it lacks).
SNAPSHOT_EVERY_S = float(os.environ.get("NBFLOW_SNAPSHOT_EVERY", "0.25"))


def _crash_point(name: str) -> None:
    """Fault injection for the kill tests: NBFLOW_CRASH_AT=<point>[:<nth>] kills us with SIGKILL."""
    spec = os.environ.get("NBFLOW_CRASH_AT", "")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    count = _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if count >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, k, v):
        self[k] = v
        self.move_to_end(k)
        while len(self) > self.size:
            self.popitem(last=False)


class Engine:
    def __init__(self, nc, layout: Layout | None = None, *, batch: int = 256,
                 snapshot_cache: int = 500):
        self.nc = nc
        self.js = nc.jetstream()
        self.streams = Streams(self.js, role="engine")
        self.L = layout or Layout()
        self.batch = batch
        self.snapshots: LRU = LRU(snapshot_cache)   # run -> (RunState, kv revision)
        self.behind: dict[str, float] = {}          # run -> since when its KV snapshot lags
        self.write_s: dict[str, float] = {}         # run -> what its last snapshot write took
        self.snapshot_writes = 0
        self.defs: LRU = LRU(256)                   # wf hash -> Workflow
        self._stop = asyncio.Event()
        self.processed = 0
        self.dead_letters = 0

    # --- setup --------------------------------------------------------------------------------
    async def start(self, replicas: int | None = None) -> None:
        await infra.ensure(self.js, self.L, replicas, look_first=False)
        self.runs_kv = await KV.open(self.js, self.L.runs_bucket, role="engine")
        self.defs_kv = await KV.open(self.js, self.L.defs_bucket, role="engine")
        self.approvals_kv = await KV.open(self.js, self.L.approvals_bucket, role="engine")
        self.fps_kv = await KV.open(self.js, self.L.fps_bucket, role="engine")
        self._mid_key = await _message_id_key(self.js, self.L, replicas)
        # a durable an older version created keeps its filter (nbflow.history.<run>, before
        # subjects carried the event kind) unless it is updated: it would receive nothing
        await self.js.add_consumer(self.L.history_stream, infra.consumer_config(
            self.L.engine_consumer, self.L.history_wildcard, ACK_WAIT_S, 10_000))
        self.history_sub = await self.js.pull_subscribe(
            self.L.history_wildcard, durable=self.L.engine_consumer,
            stream=self.L.history_stream,
            config=infra.consumer_config(self.L.engine_consumer, self.L.history_wildcard,
                                         ACK_WAIT_S, 10_000))
        self.timer_sub = await self.js.pull_subscribe(
            self.L.timer_fire_subject(">"), durable=self.L.timers_consumer,
            stream=self.L.timers_stream,
            config=infra.consumer_config(self.L.timers_consumer, self.L.timer_fire_subject(">"),
                                         ACK_WAIT_S, 10_000))
        from nbflow.engine.decide import DecideService   # approvals and signals, by subject

        self.decide = DecideService(self)
        await self.decide.start()
        from nbflow.schedules.scheduler import Scheduler  # schedules & triggers
        self.scheduler = Scheduler(self.nc, self.L, self._stop)
        await self.scheduler.start()

    async def run(self) -> None:
        """Serve until stop() is called."""
        await asyncio.gather(self._history_loop(), self._timer_loop(),
                             self.scheduler.run())  # scheduler: engine/timers.py

    def stop(self) -> None:
        self._stop.set()

    # --- loops --------------------------------------------------------------------------------
    async def _fetch(self, sub, n: int, timeout: float = 1.0):
        return await infra.fetch(sub, n, self._stop, timeout=timeout, what="engine fetch")

    async def _history_loop(self) -> None:
        try:
            while not self._stop.is_set():
                wait = 1.0
                if self.behind:       # wake up in time for the first lagging snapshot due
                    due = min(self._due(r) for r in self.behind) - time.monotonic()
                    wait = min(1.0, max(0.05, due))
                msgs = await infra.fetch(self.history_sub, self.batch, self._stop, timeout=wait,
                                         what="engine fetch")
                if msgs:
                    by_run: dict[str, list] = {}
                    for m in msgs:
                        by_run.setdefault(self.L.history_run(m.subject), []).append(m)
                    hb = asyncio.create_task(self._keep_alive(msgs))
                    try:
                        await asyncio.gather(*(self._guarded(run, ms)
                                               for run, ms in by_run.items()))
                    finally:
                        hb.cancel()
                if self.behind:
                    await self._write_behind()
        finally:
            if self.behind:
                try:
                    await self._write_behind(idle=True)
                except Exception:  # noqa: BLE001 - stopping: history still has everything
                    pass

    def _due(self, run: str) -> float:
        """When a lagging snapshot is written: SNAPSHOT_EVERY_S after it started to lag, or ten
        times what its last write took if that is longer — a big run's snapshot (O(run size) to
        encode and send) then costs at most ~10 % of the engine's time however big it grows."""
        return self.behind[run] + max(SNAPSHOT_EVERY_S, 10 * self.write_s.get(run, 0.0))

    async def _write_behind(self, idle: bool = False) -> None:
        """Write the lagging snapshots that are due (all of them with ``idle``). Between
        batches, so never concurrently with a batch of the same run."""
        now = time.monotonic()
        for run in list(self.behind):
            if not idle and now < self._due(run):
                continue
            cached = self.snapshots.get(run)
            if cached is None:               # evicted: the next event catches the run up
                self.behind.pop(run, None)
                self.write_s.pop(run, None)
                continue
            st, rev = cached
            try:
                new_rev = await self._write_snapshot(st, rev)
            except Conflict:                 # another engine wrote a later fold: reload later
                self.snapshots.pop(run, None)
                self.behind.pop(run, None)
                continue
            except Exception as e:  # noqa: BLE001 - transient: try again on the next round
                log.warning("run %s: snapshot write failed (%s); will retry", run, e)
                continue
            self.snapshots.put(run, (st, new_rev))
            self.behind.pop(run, None)

    async def _write_snapshot(self, st: RunState, rev: int) -> int:
        _crash_point("before_snapshot")
        t0 = time.monotonic()
        value = json.dumps(st.to_dict(compact=True), separators=(",", ":")).encode()
        self.snapshot_writes += 1
        try:
            if rev:
                return await self.runs_kv.update(st.run, value, last=rev)
            return await self.runs_kv.create(st.run, value)
        finally:
            if st.is_final:
                self.write_s.pop(st.run, None)
            else:
                self.write_s[st.run] = time.monotonic() - t0

    async def _keep_alive(self, msgs: list) -> None:
        """While a batch is being handled, tell JetStream we are alive (AckWait is short)."""
        while True:
            await asyncio.sleep(ACK_WAIT_S / 3)
            for m in msgs:
                try:
                    await m.in_progress()
                except Exception:  # noqa: BLE001 - acked meanwhile, or reconnecting
                    pass

    async def _guarded(self, run: str, msgs: list) -> None:
        try:
            await self._handle_run_batch(run, msgs)
        except Exception as e:  # noqa: BLE001 - one run's trouble must not stop the engine
            # the cached state is still the one before this batch (fold returns a new state and
            # it is cached only once the batch's commands are out): the redelivery re-applies
            if isinstance(e, Transient):
                log.warning("run %s: %s; %d event(s) will be redelivered", run, e, len(msgs))
            else:
                log.exception("run %s: handling %d event(s) failed; they will be redelivered",
                              run, len(msgs))
            for m in msgs:
                try:
                    await m.nak(delay=1.0)
                except Exception:  # noqa: BLE001 - unacked: redelivered after AckWait anyway
                    pass

    async def _timer_loop(self) -> None:
        while not self._stop.is_set():
            msgs = await self._fetch(self.timer_sub, 64)
            for m in msgs:
                try:
                    ev = decode(m.data)
                    ev.ts = time.time()     # it went off now (it was made when it was set)
                    tid = ev["timer"]
                    await self.streams.publish(self.L.history_subject(ev.run, ev.type),
                                               ev.encode(),
                                               headers={MSG_ID: self.msg_id(timer_msg_id(tid))})
                    await m.ack()
                except BadMessage as e:
                    await self.dead_letter(m, f"timer message: {e}")
                except Exception as e:  # noqa: BLE001 - transient or not: retried later
                    log.warning("timer fire failed (%s); will retry", e)
                    try:
                        await m.nak(delay=1.0)
                    except Exception:  # noqa: BLE001 - redelivered after AckWait anyway
                        pass

    # --- one run's batch of events ------------------------------------------------------------
    async def _handle_run_batch(self, run: str, msgs: list) -> None:
        # one batch per run at a time: _history_loop groups a fetch by run and awaits them all
        good: list[tuple[Any, Event]] = []
        for m in msgs:
            try:
                ev = decode(m.data, seq=m.metadata.sequence.stream)
            except BadMessage as e:
                await self.dead_letter(m, str(e))
                continue
            if self.L.history_kind(m.subject) != ev.type:
                await self._forged(ev, f"{ev.type} published on the subject of "
                                       f"{self.L.history_kind(m.subject)} events (its publisher "
                                       f"may not send {ev.type})")
                await m.ack()
                continue
            good.append((m, ev))
        if not good:
            return
        for _ in range(20):
            if await self._apply_batch(run, good):
                break
            self.snapshots.pop(run, None)       # CAS lost to another engine: reload, retry
            self.behind.pop(run, None)
        else:
            raise RuntimeError(f"run {run}: snapshot CAS kept conflicting")
        _crash_point("before_ack")
        for m, _ in good:
            await m.ack()
        self.processed += len(good)

    async def load_snapshot(self, run: str) -> tuple[RunState | None, int]:
        cached = self.snapshots.get(run)
        if cached:
            return cached
        try:
            e = await self.runs_kv.get(run)
        except NotFound:
            return None, 0
        return RunState.from_dict(json.loads(e.value)), e.revision

    async def workflow(self, wf_hash: str) -> Workflow:
        wf = self.defs.get(wf_hash)
        if wf is None:
            wf = Workflow.stored((await self.defs_kv.get(wf_hash)).value, wf_hash)
            self.defs.put(wf_hash, wf)
        return wf

    async def _events_between(self, run: str, after: int, before: int) -> list[Event]:
        """History events of ``run`` with after < seq < before (what this batch must follow).

        Read through the stream leader (not a direct get, which a lagging replica or a server
        still recovering its store may answer), and never take "not found" for "no more": the
        event at ``before`` is on this subject, so a miss is a glitch and the batch is retried."""
        out: list[Event] = []
        seq = after + 1
        subj = self.L.history_subject(run)
        while seq < before:
            try:
                raw = await self.streams.get_msg(self.L.history_stream, seq=seq, subject=subj,
                                                 next=True)
            except NotFound:
                raise RuntimeError(f"run {run}: history read from #{seq} found nothing though "
                                   f"#{before} exists; retrying") from None
            if raw.seq >= before:
                break
            try:
                ev = decode(raw.data, seq=raw.seq)
                if raw.subject is None or self.L.history_kind(raw.subject) == ev.type:
                    out.append(ev)            # (else forged: dead-lettered when delivered)
            except BadMessage:
                pass                          # was dead-lettered when it was delivered
            seq = raw.seq + 1
        return out

    async def _apply_batch(self, run: str, batch: list[tuple[Any, Event]]) -> bool:
        st, rev = await self.load_snapshot(run)
        last = st.seq if st else 0
        todo = [ev for _, ev in batch if ev.seq > last]
        if not todo:
            return True                      # all applied before (redelivery after a crash)
        todo.sort(key=lambda e: e.seq)
        # Apply the run's history in order and without holes. This batch may lack some of the
        # run's events (another engine holds them, or they wait for redelivery): read whatever
        # lies before each of its events from the history itself. Consecutive stream sequences
        # cannot hide anything, and a run's first event has nothing before it.
        events: list[Event] = []
        prev = last
        for ev in todo:
            fresh = prev == 0 and ev.type == "RunStarted"
            if ev.seq != prev + 1 and not fresh:
                events += await self._events_between(run, prev, ev.seq)
            events.append(ev)
            prev = ev.seq
        # an approval counts only when decided through the approvals bucket, a start only when
        # its submitter recorded it (checked, and a forgery dead-lettered, before the fold)
        forged: set[int | None] = set()
        started = st is not None
        for ev in events:
            if ev.type == "ApprovalDecided" and not await self._decision_recorded(ev):
                forged.add(ev.seq)
            elif ev.type == "RunStarted" and not started:
                if await self._start_recorded(ev):
                    started = True
                else:
                    forged.add(ev.seq)
        first = next((ev for ev in events if ev.seq not in forged and
                      (st is not None or ev.type == "RunStarted")), None)
        wf_hash = st.wf if st is not None else (first["wf"] if first is not None else None)
        wf: Workflow | None = None
        if first is not None:
            try:
                wf = await self.workflow(wf_hash)
            except NotFound:     # only a missing definition; transient errors: redelivery
                await self._dead_letter_raw(run, first.encode(),
                                            f"unknown workflow version {wf_hash}")
                return True
        skipped: list[tuple[Event, str]] = []
        st, cmds = fold(events, wf, st, verified=lambda ev: ev.seq not in forged, skipped=skipped)
        for ev, why in skipped:
            if ev.seq in forged:
                continue                            # dead-lettered by the check above
            if "before RunStarted" in why:
                log.error("run %s: %s; dead-lettering", run, why)
                why = "event before RunStarted"
            await self._dead_letter_raw(run, ev.encode(), why)
        if st is None:
            return True
        await self.execute(st, cmds)
        if rev and not st.is_final and has_active_tasks(st):
            # a worker or a timer will speak next: write the snapshot behind (history has it)
            self.snapshots.put(run, (st, rev))
            self.behind.setdefault(run, time.monotonic())
            return True
        try:
            new_rev = await self._write_snapshot(st, rev)
        except Conflict:
            return False
        self.snapshots.put(run, (st, new_rev))
        self.behind.pop(run, None)
        return True

    # --- commands -----------------------------------------------------------------------------
    async def execute(self, st: RunState, cmds: list[Command]) -> None:
        futs = []
        params_json = None          # encoded once for all of this batch's dispatches (a map's)
        for c in cmds:
            if c.kind == "dispatch":
                task = TaskMessage.for_dispatch(st.run, st.params, c.data)
                if params_json is None:
                    params_json = TaskMessage.encode_params(st.params)
                futs.append(await self.streams.publish_async(
                    self.L.task_subject(task.queue, st.run), task.encode(params_json),
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
                # the index `run --reuse` reads: the latest success of each fingerprint wins
                await self.fps_kv.put(c["fp"], json.dumps(c.data, separators=(",", ":"),
                                                          default=str).encode())
            elif c.kind == "finished":
                log.info("run %s %s", st.run, c["state"])
                ev = make("RunFinished", st.run, state=c["state"])
                futs.append(await self.streams.publish_async(
                    self.L.history_subject(st.run, ev.type), ev.encode(),
                    headers={MSG_ID: self.msg_id(finished_msg_id(st.run))}))
        for f in futs:
            if f is not None:
                await f

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

    # --- dead letters -------------------------------------------------------------------------
    async def dead_letter(self, msg, why: str) -> None:
        await self._dead_letter_raw(msg.subject, msg.data, why)
        try:
            await msg.term()
        except Exception:  # noqa: BLE001
            await msg.ack()

    async def _dead_letter_raw(self, where: str, data: bytes, why: str) -> None:
        self.dead_letters += 1
        log.warning("dead letter on %s: %s", where, why)
        record = {"where": where, "why": why, "data": data[:65536].decode("utf-8", "replace"),
                  "ts": time.time()}
        # a dead letter that cannot be recorded must not be dropped: the caller's message stays
        # unacked (the exception propagates) and is handled again later
        mid = "dl." + hashlib.sha256(where.encode() + b"\0" + data).hexdigest()[:32]
        await self.streams.publish(self.L.dead_letter_subject(), json.dumps(record).encode(),
                                   headers={MSG_ID: mid})


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


async def serve(url: str, namespace: str = "", replicas: int | None = None,
                ready: asyncio.Event | None = None) -> None:
    """`nbflow engine`: connect and serve until cancelled."""
    nc = await infra.connect(url, name="nbflow-engine")
    eng = Engine(nc, Layout(namespace))
    await eng.start(replicas)
    await infra.run_service(nc, eng, ready)
