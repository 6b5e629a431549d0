"""The NATS shell around ``state.py``: consume history events, apply them, carry out commands.

Crash safety (as SHAR does it): for every batch of a run's history messages the engine
  1. catches the run's state up to just before the messages: its cached state when this engine
     saw every history message since (_placed: no history read), else the cached state or the
     KV snapshot plus the history read by subject from the state's sequence on,
  2. applies the messages with the pure state machine (a new state; the cached one is kept),
  3. publishes the resulting commands with deterministic ``Nats-Msg-Id`` (server dedup),
  4. writes the snapshot with compare-and-set on its revision when the run is new, has ended,
     or now waits only on a person — otherwise the snapshot is written behind, once it has
     lagged NBFLOW_SNAPSHOT_EVERY seconds (0.25 s by default; longer for a run whose snapshot
     takes long to write, so writes stay under ~10 % of the engine's time),
  5. and only then acks the messages (the acks go out with the next batch's first write).
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
import json
import logging
import os
import time
from typing import Any

from nbflow.core.ir import Workflow
from nbflow.errors import Conflict, NotFound, Transient
from nbflow.nats import infra
from nbflow.nats.kv import KV
from nbflow.nats.streams import Streams
from nbflow.core.events import Event, decode, timer_msg_id
from nbflow.errors import BadMessage
from nbflow.nats.layout import MSG_ID, Layout
from nbflow.core.state import RunState, fold, has_active_tasks  # noqa: F401 - RunState: bench/profile_engine.py
from nbflow.engine.approvals import Approvals
from nbflow.engine.commands import Commands, _message_id_key
from nbflow.engine.crash import _crash_point
from nbflow.engine.deadletter import DeadLetters
from nbflow.engine.snapshots import LRU, SNAPSHOT_EVERY_S, Snapshots

log = logging.getLogger("nbflow.engine")

# An event not acked within this time (engine died or stalled) goes to another engine.
# Short, so events a killed engine held reach another engine within seconds; a batch that takes
# longer is kept alive with in_progress() (_keep_alive), so a slow engine is not duplicated.
ACK_WAIT_S = float(os.environ.get("NBFLOW_ENGINE_ACK_WAIT", "5"))
# A handled event's ack waits this long at most for the engine's next write (see _history_loop)
ACK_DEFER_S = 0.02

__all__ = ["ACK_WAIT_S", "SNAPSHOT_EVERY_S", "Engine", "LRU", "serve"]


class Engine(Snapshots, Commands, Approvals, DeadLetters):
    """The history loop and the timer loop around ``core.state.fold``. Its rooms: snapshots.py
    (the snapshot cache and writes), commands.py (carrying out commands), approvals.py (approval
    records, checks of decisions and starts), deadletter.py (dead letters)."""

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
        # Where this engine alone has seen the history (see _track_deliveries): the stream
        # sequence from which every history message was delivered first to this engine, or
        # None (not known: nothing delivered yet, or some deliveries went elsewhere)
        self._seen_from: int | None = None
        self._next_delivery: int | None = None      # the consumer sequence expected next
        self.catchup_reads = 0                      # history reads to catch a run up
        self._acks: list = []                       # handled messages, their acks not sent yet

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
        # one outstanding pull request, topped up, instead of a probe + a long poll per fetch
        self.history_pull = infra.Puller(self.history_sub, self.batch)
        self.timer_sub = await self.js.pull_subscribe(
            self.L.timer_fire_subject(">"), durable=self.L.timers_consumer,
            stream=self.L.timers_stream,
            config=infra.consumer_config(self.L.timers_consumer, self.L.timer_fire_subject(">"),
                                         ACK_WAIT_S, 10_000))
        # one outstanding pull (as for the history): an idle engine no longer sends a probe
        # and a long poll to the timers stream every second
        self.timer_pull = infra.Puller(self.timer_sub, 64)
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
                if self._acks:
                    wait = min(wait, ACK_DEFER_S)
                msgs = await infra.fetch(self.history_pull, self.batch, self._stop, timeout=wait,
                                         what="engine fetch")
                # The last batch's acks go out now: with this batch's first write (its dispatches:
                # nothing between here and there waits, so the connection sends them together),
                # or on their own when no event came within ACK_DEFER_S. One write per step of a
                # chain instead of two. Safe: an ack only ever follows its batch's commands and
                # snapshot (stored), and an event redelivered for a late ack is one the run's
                # state already holds (skipped by sequence)
                if self._acks:
                    await self._send_acks()
                if msgs:
                    self._track_deliveries(msgs)
                    by_run: dict[str, list] = {}
                    for m in msgs:
                        by_run.setdefault(self.L.history_run(m.subject), []).append(m)
                    hb = asyncio.create_task(self._keep_alive(msgs))
                    try:
                        if len(by_run) == 1:
                            await self._guarded(*next(iter(by_run.items())))
                        else:
                            await asyncio.gather(*(self._guarded(run, ms)
                                                   for run, ms in by_run.items()))
                    finally:
                        hb.cancel()
                if self.behind:
                    await self._write_behind()
        finally:
            if self._acks:
                await self._send_acks()
            if self.behind:
                try:
                    await self._write_behind(idle=True)
                except Exception:  # noqa: BLE001 - stopping: history still has everything
                    pass

    def _track_deliveries(self, msgs: list) -> None:
        """Follow the consumer's delivery sequence: it counts every delivery of the engines'
        shared consumer, to whichever engine, first deliveries and redeliveries alike. While
        it has no gap, every delivery since came here; first deliveries come in stream order,
        so from the first one seen after a gap (stream sequence W) on, every history message
        with sequence >= W was first delivered to this engine. A gap (another engine took
        some, or deliveries were lost with a connection) makes W unknown until the next first
        delivery."""
        for m in msgs:
            try:
                md = m.metadata
                delivery, seq, first = md.sequence.consumer, md.sequence.stream, \
                    md.num_delivered == 1
            except Exception:  # noqa: BLE001 - no metadata: cannot vouch for anything
                self._seen_from = self._next_delivery = None
                continue
            if self._next_delivery is not None and delivery != self._next_delivery:
                self._seen_from = None
            self._next_delivery = delivery + 1
            if self._seen_from is None and first:
                self._seen_from = seq

    def _placed(self, run: str, after: int) -> bool:
        """Whether this engine holds every event of ``run`` after stream sequence ``after``
        that came before the batch: its cached state is at ``after``, and every history
        message after it was delivered first to this engine (_track_deliveries), which kept
        the state of each batch it applied and dropped the run's state when a batch failed.
        The events in between were then other runs' (or dead-lettered): no history read."""
        return self._seen_from is not None and after + 1 >= self._seen_from

    async def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        await infra.ack_all(acks)

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
            # forget the run's state: the redelivered events and any later event of the run
            # are placed from the snapshot and the history, which has what this batch brought
            self.snapshots.pop(run, None)
            self.behind.pop(run, None)
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
            msgs = await self._fetch(self.timer_pull, 64)
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
        self._acks.extend(m for m, _ in good)       # sent by _history_loop, with its next write
        self.processed += len(good)

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
        cached = run in self.snapshots
        st, rev = await self.load_snapshot(run)
        before = st
        last = st.seq if st else 0
        todo = [ev for _, ev in batch if ev.seq > last]
        if not todo:
            return True                      # all applied before (redelivery after a crash)
        todo.sort(key=lambda e: e.seq)
        # Apply the run's history in order and without holes. This batch may lack some of the
        # run's events (another engine holds them, they wait for redelivery, or the state is a
        # snapshot behind the history): read whatever lies before each of its events from the
        # history itself — unless this engine's own state of the run is placed (_placed).
        # Consecutive stream sequences cannot hide anything, and a run's first event has
        # nothing before it.
        events: list[Event] = []
        prev = last
        for ev in todo:
            fresh = prev == 0 and ev.type == "RunStarted"
            if ev.seq != prev + 1 and not fresh and not (cached and self._placed(run, prev)):
                self.catchup_reads += 1
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
        if rev and not st.is_final and has_active_tasks(st):
            await self.execute(st, cmds)
            # a worker or a timer will speak next: write the snapshot behind (history has it)
            self.snapshots.put(run, (st, rev))
            self.behind.setdefault(run, time.monotonic())
            return True
        # the commands and the snapshot at once, one wait for both: all commands are on the
        # connection before the snapshot write (one connection keeps the order), so a crash
        # cannot leave a snapshot whose commands never reached the server
        acks = await self.send(st, cmds)
        write = asyncio.ensure_future(self._write_snapshot(st, rev))
        try:
            for f in acks:
                await f
        except BaseException:
            await self._undo_snapshot(run, write, before)
            raise
        try:
            new_rev = await write
        except Conflict:
            return False
        self.behind.pop(run, None)
        if st.is_final and any(ev.type == "RunFinished" for ev in events):
            # the run's last event: its final snapshot is stored, and the engine keeps nothing
            # of a finished run (a late event of it loads the snapshot), so that the engine's
            # memory follows the runs in flight, not the runs it has ever seen
            self.snapshots.pop(run, None)
            self.write_s.pop(run, None)
        else:
            self.snapshots.put(run, (st, new_rev))
        return True


    async def _undo_snapshot(self, run: str, write, before: RunState | None) -> None:
        """A command was refused while the snapshot that says it was carried out may be
        written: put the snapshot back to the state before the batch, so that the redelivered
        events are applied (and their commands sent) again."""
        self.snapshots.pop(run, None)
        self.behind.pop(run, None)
        try:
            rev = await write
        except BaseException:  # noqa: BLE001 - not written: nothing to undo
            return
        try:
            if before is None:
                await self.runs_kv.delete(run)
            else:
                await self.runs_kv.update(run, json.dumps(
                    before.to_dict(compact=True), separators=(",", ":")).encode(), last=rev)
        except Exception as e:  # noqa: BLE001
            log.error("run %s: a command failed after its snapshot was written and the "
                      "snapshot could not be put back (%s): the batch's commands may be lost",
                      run, e)


async def serve(url: str, namespace: str = "", replicas: int | None = None,
                ready: asyncio.Event | None = None) -> None:
    """`nbflow engine`: connect and serve until cancelled."""
    nc = await infra.connect(url, name="nbflow-engine")
    eng = Engine(nc, Layout(namespace))
    await eng.start(replicas)
    await infra.run_service(nc, eng, ready)
