"""Reading runs: status (snapshot caught up with history), history, replay and watch (both
through core.state.fold, as the engine), wait, and the runs/workers buckets, live."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from nbflow.client.session import Session
from nbflow.core.events import Event, decode
from nbflow.core.state import RunState, fold, refusal
from nbflow.errors import NbflowError, NotFound


class Reading(Session):
    """What a face reads about runs; never changes one."""

    async def _resolve_run(self, run: str) -> str:
        """Accept a unique prefix of a run id."""
        if not isinstance(run, str) or not run or not all(ch.isalnum() or ch in "-_"
                                                          for ch in run):
            raise NbflowError(f"no run {run!r}: a run id is letters and digits "
                              f"(see `nbflow runs` for recent runs)")
        runs = await self.kv(self.L.runs_bucket)
        if await runs.get_or_none(run) is not None:
            return run
        if await self.has_run(run):          # not found: try history, then prefixes
            return run
        keys = await runs.keys()
        matches = [k for k in keys if k.startswith(run)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NbflowError(f"run id {run!r} is ambiguous: {', '.join(sorted(matches)[:5])}")
        raise NbflowError(f"no run {run!r} (see `nbflow runs` for recent runs)")

    async def status(self, run: str) -> RunState:
        """The run's state now: the engine's snapshot, caught up with the history after it (a
        busy run's snapshot is written behind, up to NBFLOW_SNAPSHOT_EVERY seconds late)."""
        run = await self._resolve_run(run)
        st = await self.snapshot(run)
        if st is not None and not st.is_final:
            st = await self._caught_up(st)
        st = st or await self.replay(run)   # no snapshot yet: replay
        if st is None:
            raise NbflowError(f"no run {run!r}")
        return st

    async def _caught_up(self, st: RunState, most: int = 500) -> RunState | None:
        """``st`` with the history events after its sequence folded in (None: too far behind
        for message-by-message reads; the caller replays)."""
        subj, newest = await self._history_last(st.run)
        if newest is None:
            return st
        last = newest.seq
        events: list[Event] = []
        seq = st.seq + 1
        while seq <= last:
            if len(events) >= most:
                return None
            try:
                raw = await self.streams.get_msg(self.L.history_stream, seq=seq, subject=subj,
                                                 next=True)
            except NotFound:
                break
            try:
                ev = decode(raw.data, seq=raw.seq)
                if self._sent_as(ev, raw.subject):
                    events.append(ev)
            except Exception:  # noqa: BLE001 - malformed messages are dead-lettered
                pass
            seq = raw.seq + 1
        if not events:
            return st
        return fold(events, await self.workflow(st.wf), st)[0]

    def _sent_as(self, ev: Event, subject: str | None) -> bool:
        """Whether ``ev`` was published on its own kind's subject: one sent on another kind's
        (a forgery the engine dead-letters and removes) is never shown or folded. A run
        recorded before subjects carried the kind has its events on its one legacy subject."""
        return subject is None or subject == self.L.history_legacy_subject(ev.run) or \
            self.L.history_kind(subject) == ev.type

    async def history(self, run: str) -> list[Event]:
        run = await self._resolve_run(run)
        return [ev async for ev in self._events(run, follow=False)]

    async def _events(self, run: str, follow: bool) -> AsyncIterator[Event]:
        subj, newest = await self._history_last(run)
        if newest is None and not follow:
            return
        last_seq = 0 if newest is None else newest.seq
        sub = await self.js.subscribe(subj, ordered_consumer=True, stream=self.L.history_stream)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None if follow else 10)
                except asyncio.TimeoutError:
                    return
                seq = msg.metadata.sequence.stream
                try:
                    ev = decode(msg.data, seq=seq)
                except Exception:  # noqa: BLE001 - malformed messages are dead-lettered
                    ev = None
                if ev is not None and self._sent_as(ev, msg.subject):
                    yield ev
                if not follow and seq >= last_seq:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass

    async def replay(self, run: str) -> RunState | None:
        """The run's history folded (core.state.fold, as the engine does)."""
        events = [ev async for ev in self._events(run, follow=False)]
        start = next((ev for ev in events if ev.type == "RunStarted"), None)
        if start is None:
            return None                     # stray events without a start are not a run
        return fold(events, await self.workflow(start["wf"]))[0]

    async def watch(self, run: str) -> AsyncIterator[tuple[Event, RunState]]:
        """Every event of the run from the start, live, with the state after it; ends when the
        run reaches a final state."""
        run = await self._resolve_run(run)
        st = None
        async for ev in self._events(run, follow=True):
            if refusal(st, ev):
                continue
            st, _ = fold([ev], await self.workflow(ev["wf"] if st is None else st.wf), st)
            yield ev, st
            if st.is_final:
                return

    async def wait(self, run: str, timeout: float | None = None) -> RunState:
        """The run's final state. When this returns, ``status`` and ``runs`` show it too."""
        async def _w():
            st = None
            async for _, st in self.watch(run):
                pass
            if st is not None:
                await self.settled(st)
            return st
        return await asyncio.wait_for(_w(), timeout)

    async def settled(self, st: RunState, timeout: float = 15.0) -> None:
        """Wait until the run snapshot (what ``status`` and ``runs`` read) has caught up with
        ``st`` — a state replayed from history — so a caller reads its own writes."""
        runs = await self.kv(self.L.runs_bucket)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                snap = json.loads((await runs.get(st.run)).value)
                if snap.get("seq", 0) >= st.seq or snap.get("state") == st.state:
                    return
            except Exception:  # noqa: BLE001 - not written yet
                pass
            await asyncio.sleep(0.02)

    async def runs(self, limit: int = 50) -> list[RunState]:
        runs = await self.kv(self.L.runs_bucket)
        out = []
        for k in await runs.keys():
            e = await runs.get_or_none(k)          # None: deleted meanwhile
            if e is not None:
                out.append(RunState.from_dict(json.loads(e.value)))
        out.sort(key=lambda s: s.started, reverse=True)
        return out[:limit]

    async def watch_runs(self) -> AsyncIterator[tuple[str, RunState | None]]:
        """Every run's snapshot, then each change as the engine records it, live. Yields
        ``("", None)`` once the snapshots that existed at the start are all delivered, and
        ``(run, None)`` when a snapshot is deleted. A console keeps an index from this
        instead of reading thousands of keys per page."""
        async for item in self._watch_bucket(self.L.runs_bucket,
                                             lambda v: RunState.from_dict(json.loads(v))):
            yield item

    async def workers(self) -> list[dict[str, Any]]:
        """Live workers (their last heartbeat, within the bucket's TTL), by name."""
        kv = await self.kv(self.L.workers_bucket)
        out = []
        for k in await kv.keys():
            e = await kv.get_or_none(k)            # None: expired between keys() and get()
            try:
                if e is not None:
                    out.append(json.loads(e.value))
            except ValueError:                     # garbage
                continue
        return sorted(out, key=lambda w: str(w.get("name", "")))

    async def watch_workers(self) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """Worker heartbeats (name, queue, concurrency, pid, ts, ...): those in the bucket,
        then each new one, live. ``("", None)`` marks the end of the initial ones."""
        async for item in self._watch_bucket(self.L.workers_bucket, json.loads):
            yield item

    async def _watch_bucket(self, bucket: str, parse) -> AsyncIterator[tuple[str, Any]]:
        """(key, parse(value)) for each entry, then live; ("", None) after the initial ones,
        (key, None) for a deletion; a value that does not parse (another version) is skipped."""
        kv = await self.kv(bucket)
        w = await kv.watchall()
        try:
            async for e in w:
                if e is None:
                    yield "", None
                elif e.operation in ("DEL", "PURGE"):
                    yield e.key, None
                else:
                    try:
                        yield e.key, parse(e.value)
                    except (ValueError, TypeError):
                        continue
        finally:
            await w.stop()
