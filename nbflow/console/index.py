"""What the console shows, kept live in memory: every run's snapshot (from the client's KV watch),
the workflows they run, and worker heartbeats. Pages render from here, so a page costs the same
with ten or ten thousand runs in history; changes fan out to the browsers' event streams.

Reaches NATS only through :mod:`nbflow.client` (the layer rule).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from nbflow.client import Client, NbflowError
from nbflow.stack import nats_url
from nbflow.core.ir import Workflow
from nbflow.core.state import RunState

log = logging.getLogger("nbflow.console")

# a worker whose last heartbeat is older than this is shown as gone (it beats every 5 s)
WORKER_STALE_S = 35.0
RECENT = 50          # decisions the inbox can show


def parse_approvers(value: Any) -> frozenset[str] | None:
    """``None`` (or empty / ``*``): everyone who can sign in may decide. Else the set of names."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.replace(";", ",").split(",")]
    names = frozenset(v for v in value if v)
    return None if not names or "*" in names else names


class Console:
    """One per server process: one client connection, one index, many browsers."""

    def __init__(self, url: str | None = None, namespace: str | None = None,
                 approvers: Any = None):
        self.url, self.namespace = url, namespace
        env = os.environ.get("NBFLOW_APPROVERS")
        self.approvers = parse_approvers(approvers if approvers is not None else env)
        self.client: Client | None = None
        self.runs: dict[str, RunState] = {}
        self.workflows: dict[str, Workflow] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.ready = asyncio.Event()            # the runs that existed at start are loaded
        self._subs: set[asyncio.Queue] = set()
        self._tasks: list[asyncio.Task] = []
        self._connecting: asyncio.Future | None = None
        self._svg: dict[tuple, str] = {}
        self._awaiting: dict[str, int] = {}     # run -> approvals waiting (kept per change)
        self._decided: dict[str, float] = {}    # run -> time of its latest decision
        self.version = 0                        # bumped on every change (caches key on it)
        self._sorted: tuple[int, list[RunState]] = (-1, [])
        self._recent: list[tuple[float, str]] = []   # newest decisions (time, run), newest first
        from nbflow.console.stats import Tally

        self.tally = Tally()                     # metrics, kept per change
        self.error = ""

    # --- lifecycle ----------------------------------------------------------------------------
    async def connect(self) -> Client:
        """Connect on first use (a Jupyter server starts even when NATS is not there yet)."""
        if self.client is not None:
            return self.client
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        except Exception:
            self._connecting = None
            raise

    async def _connect(self) -> Client:
        loop = asyncio.get_running_loop()
        url = await loop.run_in_executor(None, nats_url, self.url)   # may start a stack
        c = await Client.connect(url, self.namespace, reconnect=True)
        c.delegate = True          # decisions are recorded as the user this host signed in
        self.client = c
        self._tasks = [asyncio.ensure_future(self._follow_runs()),
                       asyncio.ensure_future(self._follow_workers())]
        return c

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.client = None

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.connect()
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def _follow_runs(self) -> None:
        while True:
            try:
                async for run, st in self.client.watch_runs():
                    if not run:
                        import heapq

                        self.error = ""

                        self._recent = sorted(
                            ((at, r) for r, at in heapq.nlargest(
                                RECENT, self._decided.items(), key=lambda kv: kv[1])),
                            reverse=True)
                        self.ready.set()
                        self.publish({"kind": "ready"})
                        continue
                    waiting = 0 if st is None or st.state != "running" else sum(
                        1 for n in st.nodes.values() if n.state == "awaiting_approval")
                    if waiting:
                        self._awaiting[run] = waiting
                    else:
                        self._awaiting.pop(run, None)
                    decided = 0.0 if st is None else max(
                        ((n.approval.get("at") or n.finished or 0.0) for n in st.nodes.values()
                         if n.approval and n.approval.get("state") not in (None, "pending")),
                        default=0.0)
                    if decided:
                        if decided != self._decided.get(run):
                            self._decided[run] = decided
                            if self.ready.is_set():
                                self._recent_decided(run, decided)
                    else:
                        self._decided.pop(run, None)
                    self.version += 1
                    self.tally.update(run, st)
                    if st is None:
                        self.runs.pop(run, None)
                    else:
                        self.runs[run] = st
                        if st.wf not in self.workflows:
                            await self._load_workflow(st.wf)
                    if self.ready.is_set():
                        self.publish(self.run_event(run, st))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - connection trouble: watch again
                if getattr(self, "_closing", False):
                    return
                self.error = f"lost the runs watch ({type(e).__name__}: {e}); retrying"
                log.warning("nbflow console: %s", self.error)
                await asyncio.sleep(2)

    async def _load_workflow(self, wf_hash: str) -> None:
        try:
            self.workflows[wf_hash] = await self.client.workflow(wf_hash)
        except Exception:  # noqa: BLE001 - a definition we cannot read: shown without a DAG
            pass

    async def _follow_workers(self) -> None:
        while True:
            try:
                async for key, hb in self.client.watch_workers():
                    if not key:
                        continue
                    if hb is None:
                        self.workers.pop(key, None)
                    else:
                        self.workers[key] = hb
                    self.publish({"kind": "workers"})
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - retry
                await asyncio.sleep(2)

    # --- fan-out to browsers ------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subs.discard(q)

    def publish(self, msg: dict[str, Any]) -> None:
        for q in list(self._subs):
            try:
                q.put_nowait(msg)
            except asyncio.QueueFull:     # a stalled browser: it reloads when it comes back
                pass

    def run_event(self, run: str, st: RunState | None) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "run", "run": run}
        if st is not None:
            d.update(state=st.state, seq=st.seq, schedule=st.schedule,
                     approvals=sum(1 for n in st.nodes.values()
                                   if n.state == "awaiting_approval"),
                     decided=sum(1 for n in st.nodes.values()
                                 if n.approval and n.approval.get("state") in
                                 ("approved", "rejected")),
                     pending=self.pending_count)
        return d

    @property
    def pending_count(self) -> int:
        return sum(self._awaiting.values())

    # --- questions pages ask ------------------------------------------------------------------
    def may_approve(self, user: str) -> bool:
        return self.approvers is None or user in self.approvers

    def pending_approvals(self) -> list[tuple[RunState, str]]:
        """(run, node) awaiting a decision, newest first."""
        out = [(st, nid) for run in list(self._awaiting) if (st := self.runs.get(run))
               for nid, ns in st.nodes.items() if ns.state == "awaiting_approval"]
        out.sort(key=lambda p: p[0].nodes[p[1]].started or p[0].started, reverse=True)
        return out

    def _recent_decided(self, run: str, at: float) -> None:
        self._recent = [p for p in self._recent if p[1] != run]
        self._recent.append((at, run))
        self._recent.sort(reverse=True)
        del self._recent[RECENT:]

    def decided_approvals(self, limit: int = 20) -> list[tuple[RunState, str]]:
        """The latest decisions, newest first."""
        out = []
        for _, run in self._recent:
            st = self.runs.get(run)
            if st is None or run not in self._decided:
                continue
            out += [(st, nid) for nid, ns in st.nodes.items()
                    if ns.approval and ns.approval.get("state") not in (None, "pending")]
            if len(out) >= limit:
                break
        out.sort(key=lambda p: p[0].nodes[p[1]].approval.get("at") or
                 p[0].nodes[p[1]].finished or 0, reverse=True)
        return out[:limit]

    def sorted_runs(self) -> list[RunState]:
        """Every run, newest first (cached until the next change)."""
        if self._sorted[0] != self.version:
            self._sorted = (self.version, sorted(self.runs.values(), key=lambda s: s.started,
                                                 reverse=True))
        return self._sorted[1]

    def in_flight(self) -> dict[str, list[tuple[str, str]]]:
        """worker name -> [(run, task key)] of tasks running there now."""
        out: dict[str, list[tuple[str, str]]] = {}
        for st in self.runs.values():
            if st.state != "running":
                continue
            for t in st.tasks.values():
                if t.state == "running" and t.worker:
                    out.setdefault(t.worker, []).append((st.run, t.key))
        return out

    def queued_by_queue(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self.runs.values():
            if st.state != "running":
                continue
            wf = self.workflows.get(st.wf)
            for t in st.tasks.values():
                if t.state == "queued":
                    q = "default"
                    if wf is not None:
                        try:
                            q = wf.node(t.node).queue
                        except Exception:  # noqa: BLE001 - unknown node
                            pass
                    out[q] = out.get(q, 0) + 1
        return out

    def live_workers(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        rows = []
        for hb in self.workers.values():
            age = now - float(hb.get("ts") or 0)
            rows.append({**hb, "age": age, "alive": age < WORKER_STALE_S})
        rows.sort(key=lambda r: (not r["alive"], r.get("queue", ""), r.get("name", "")))
        return rows

    async def run(self, run: str) -> RunState:
        """A run from the index, else from the client (a run the watch has not delivered yet)."""
        st = self.runs.get(run)
        if st is None:
            st = await self.client.status(run)
        if st.wf not in self.workflows:
            await self._load_workflow(st.wf)
        return st

    async def decide(self, run: str, task: str, approved: bool, user: str,
                     comment: str = "") -> dict[str, Any]:
        """Record a decision as the signed-in user. The console's own NATS credential writes it;
        ``user`` is who the host (Jupyter, or `nbflow ui`'s token) authenticated."""
        # through the engine's decide service as ``user``: nats-server lets this process do
        # that only when its NATS user has the delegate role (decide.*.approve)
        return await self.client.approve(run, task, approved, by=user, comment=comment)

    async def settled(self, run: str, node: str, timeout: float = 5.0) -> bool:
        """Wait (briefly) until the index sees ``node`` of ``run`` leave awaiting_approval: the
        engine applies the decision a moment after it is recorded."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            st = self.runs.get(run)
            if st is None or node not in st.nodes or st.nodes[node].state != "awaiting_approval":
                return True
            await asyncio.sleep(0.05)
        return False

    async def schedule_rows(self) -> list[dict[str, Any]]:
        """Schedules with next fire, last run (and its state, from the index) and lag."""
        from nbflow.schedules.api import Schedules

        rows = await Schedules(self.client).list()
        for r in rows:
            st = self.runs.get(r.get("last_run") or "")
            if st is not None:
                r["last_run_state"] = st.state
            fire = r.get("last_fire") if st is None else (st.schedule or "").partition("@")[2]
            r["lag_s"] = None
            if st is not None and fire:
                try:
                    from datetime import datetime, timezone

                    t = datetime.fromisoformat(fire.replace("Z", "+00:00"))
                    if t.tzinfo is None:
                        t = t.replace(tzinfo=timezone.utc)
                    r["lag_s"] = max(0.0, st.started - t.timestamp())
                except ValueError:
                    pass
        return rows

    @property
    def collector(self):
        if getattr(self, "_collector", None) is None:
            from nbflow.console.stats import ConsoleCollector

            self._collector = ConsoleCollector(self)
        return self._collector

    async def svg(self, st: RunState) -> str:
        """The DAG coloured by state (the same SVG as `nbflow show`), cached per state change."""
        from nbflow.compiler import render
        from nbflow.core.state import states_by_node

        wf = self.workflows.get(st.wf)
        if wf is None:
            return ""
        states = states_by_node(st)
        # runs of one notebook that ended alike share a picture: key on workflow + states
        key = (st.wf, tuple(sorted(states.items())))
        hit = self._svg.get(key)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        try:
            svg = await loop.run_in_executor(None, lambda: render.to_svg(wf, states))
        except render.DotMissing:
            svg = ""
        if len(self._svg) > 500:
            self._svg.pop(next(iter(self._svg)))      # oldest first (dicts keep order)
        self._svg[key] = svg
        return svg


def dumps(d: Any) -> str:
    return json.dumps(d, default=str)


__all__ = ["Console", "NbflowError", "parse_approvers", "WORKER_STALE_S", "dumps"]
