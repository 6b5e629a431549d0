"""The pure side of the run widgets: ``RunModel.apply(event, state)`` -> traitlet values.

No kernel, no browser, no NATS: a RunModel is fed the (event, RunState) pairs of
``Client.watch`` and exposes what a view draws (table rows, progress, approvals, signals, the
SVG). The view (``runview.py``) only renders these values, so the logic is unit-testable.
"""
from __future__ import annotations

import html
import time
from typing import Any, Callable

from traitlets import Dict, Float, HasTraits, Int, List, Unicode

from nbflow.core.durations import elapsed
from nbflow.core.ir import Workflow
from nbflow.core.state import (
    NODE_FINAL,
    TASK_FINAL,
    RunState,
    reused_from,
    shown_state,
    states_by_node,
)

BOOKKEEPING = ("start", "end")


def local_time(ts: float | None) -> str:
    return "" if not ts else time.strftime("%H:%M:%S", time.localtime(ts))


def local_datetime(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(start: float | None, end: float | None, now: float | None) -> float | None:
    if start is None:
        return None
    stop = end if end is not None else now
    return None if stop is None else stop - start


def task_nodes(wf: Workflow) -> list[str]:
    """Nodes a person thinks of as tasks (not start/end/gateways), in workflow order."""
    return [n.id for n in wf.tasks if n.id not in BOOKKEEPING]


def table_rows(st: RunState, wf: Workflow, now: float | None = None) -> list[dict[str, Any]]:
    """One row per task node; a --map node is a group row ``name done/count`` followed by one
    indented row per instance (``level`` 1)."""
    rows: list[dict[str, Any]] = []
    for nid in task_nodes(wf):
        ns = st.nodes.get(nid)
        if ns is None:
            continue
        tasks = st.node_tasks(nid)
        if ns.count is not None:
            done = sum(1 for t in tasks if t.state in TASK_FINAL)
            starts = [t.started for t in tasks if t.started]
            rows.append({
                "key": nid, "node": nid, "task": f"{nid} {done}/{ns.count}", "state": ns.state,
                "attempt": max((t.attempt for t in tasks), default=""),
                "started": local_time(min(starts) if starts else ns.started),
                "duration": elapsed(_duration(ns.started, ns.finished, now)),
                "worker": ", ".join(sorted({t.worker for t in tasks if t.worker})),
                "level": 0, "done": done, "count": ns.count,
            })
            for t in tasks:
                rows.append(_task_row(t, t.key, now, level=1))
            continue
        t = tasks[0] if tasks else None
        if t is None:
            rows.append({"key": nid, "node": nid, "task": nid, "state": ns.state, "attempt": "",
                         "started": local_time(ns.started),
                         "duration": elapsed(_duration(ns.started, ns.finished, now)
                                                    if ns.state != "pending" else None),
                         "worker": "", "level": 0})
        else:
            row = _task_row(t, nid, now, level=0)
            # the node's state is the one a person cares about (e.g. awaiting_approval, failed)
            row["state"] = ns.state if ns.state in NODE_FINAL or t.state in TASK_FINAL \
                else t.state
            rows.append(row)
    for row in rows:
        if shown_state(st, row["node"]) == "reused":
            row.update(state="reused", duration="", worker=f"from run {reused_from(st, row['node'])}")
    return rows


def _task_row(t, label: str, now: float | None, level: int) -> dict[str, Any]:
    return {"key": t.key, "node": t.node, "task": label, "state": t.state,
            "attempt": t.attempt, "started": local_time(t.started),
            "duration": elapsed(_duration(t.started, t.finished, now)),
            "worker": t.worker, "level": level}


def progress(st: RunState, wf: Workflow) -> tuple[int, int]:
    """(done, total) in task units: a plain task is one unit, a --map task one per instance."""
    done = total = 0
    for nid in task_nodes(wf):
        ns = st.nodes.get(nid)
        if ns is None:
            continue
        if ns.count:
            total += ns.count
            done += ns.count if ns.state in NODE_FINAL else \
                sum(1 for t in st.node_tasks(nid) if t.state in TASK_FINAL)
        else:
            total += 1
            done += 1 if ns.state in NODE_FINAL else 0
    return done, total


WAITING_FOR_OTHERS = {"awaiting_approval": "an approval", "waiting_signal": "a signal",
                      "sleeping": "a timer"}


def eta(st: RunState, wf: Workflow, medians: dict[str, float],
        now: float) -> tuple[float | None, str]:
    """(seconds of work left until the run ends, what else it waits for) from ``medians`` (task
    node -> median seconds of its earlier executions), along the longest remaining path of the
    DAG (independent tasks run side by side; a ``--map`` node counts one instance's median).
    A wait for a person, a signal or a timer cannot be told: the seconds exclude it and the
    text names it. ``(None, why)`` when a task left has never executed before."""
    if st.is_final:
        return None, ""
    memo: dict[str, float] = {}
    waits: list[str] = []
    missing: list[str] = []

    def left(nid: str) -> float:            # seconds of work until nid is done, from now
        if nid in memo:
            return memo[nid]
        memo[nid] = 0.0                     # (a cycle cannot happen: validated)
        ns, node = st.nodes.get(nid), wf.node(nid)
        after = max((left(p) for p in wf.predecessors(nid)), default=0.0)
        own = 0.0
        if ns is not None and ns.state not in NODE_FINAL and node.kind == "task":
            if ns.state in WAITING_FOR_OTHERS:
                waits.append(f"{WAITING_FOR_OTHERS[ns.state]} ({nid})")
            elif ns.state == "pending":
                waits.extend(f"{w} ({nid})" for w, on in (
                    ("an approval", node.approval is not None), ("a signal", node.wait_signal),
                    ("a timer", node.sleep or node.at)) if on)
            if node.needs_worker:
                if nid not in medians:
                    missing.append(nid)
                else:
                    m = medians[nid]
                    runs = [t.started for t in st.node_tasks(nid)
                            if t.started and t.state == "running"]
                    own = max(0.0, m - (now - min(runs))) if runs else m
        memo[nid] = after + own
        return memo[nid]

    total = max((left(n.id) for n in wf.nodes), default=0.0)
    if missing:
        return None, f"task {missing[0]} has no earlier execution to go by"
    return total, (" + waiting for " + ", ".join(waits[:2]) + (" …" if len(waits) > 2 else "")
                   if waits else "")


def eta_text(st: RunState, wf: Workflow, medians: dict[str, float] | None, now: float) -> str:
    """What the view shows next to the elapsed time ("" before earlier runs are read)."""
    if medians is None or st.is_final:
        return ""
    secs, more = eta(st, wf, medians, now)
    if secs is None:
        return f"no ETA: {more}"
    return f"ETA ~{elapsed(secs)}{more}"


def approvals(st: RunState, wf: Workflow) -> list[dict[str, Any]]:
    """Every approval the run asked for: pending ones first get buttons; decided ones say who
    decided, when and why."""
    out = []
    for nid in task_nodes(wf):
        ns = st.nodes.get(nid)
        if ns is None or not ns.approval:
            continue
        ap = ns.approval
        node = wf.node(nid)
        out.append({
            "node": nid, "prompt": ap.get("prompt") or node.approval or "",
            "state": ap.get("state", "pending"), "by": ap.get("by", ""),
            "at": ap.get("at"), "at_text": local_datetime(ap.get("at")),
            "comment": ap.get("comment") or "", "reason": ap.get("reason") or "",
            "expires": ap.get("expires"), "expires_text": local_datetime(ap.get("expires")),
            "inputs": dict(sorted(node.sources.items())),      # name -> producing task
        })
    return out


def signals(st: RunState, wf: Workflow) -> list[dict[str, Any]]:
    """The signals the run waits for now (nodes in ``waiting_signal``)."""
    return [{"node": nid, "name": wf.node(nid).wait_signal}
            for nid in task_nodes(wf)
            if (ns := st.nodes.get(nid)) is not None and ns.state == "waiting_signal"]


def decision_text(ap: dict[str, Any]) -> str:
    if ap["state"] == "pending":
        return "awaiting approval" + (f" (expires {ap['expires_text']})"
                                      if ap.get("expires_text") else "")
    if ap.get("reason") == "timeout":
        return f"rejected: no decision before the timeout ({ap['at_text']})"
    if not ap.get("by") and ap.get("reason"):       # closed by the run, not by a person
        return f"{ap['state']}: {ap['reason']} ({ap['at_text']})"
    text = f"{ap['state']} by {ap['by']} at {ap['at_text']}"
    return text + (f": {ap['comment']}" if ap.get("comment") else "")


class RunModel(HasTraits):
    """What a RunView shows, as traitlets. Feed it ``apply(event, state)``; observe the traits."""

    run = Unicode("")
    name = Unicode("")
    run_state = Unicode("")
    started = Float(0.0)
    finished = Float(0.0)               # 0: still running
    elapsed = Unicode("")
    eta = Unicode("")                   # from the median task durations of earlier runs
    progress_value = Int(0)
    progress_max = Int(1)
    rows = List()
    node_states = Dict()
    svg = Unicode("")
    approvals = List()
    signals = List()
    task_keys = List()                  # selectable tasks: executed task keys (node or node#i)
    error = Unicode("")
    last_event = Unicode("")
    events = Int(0)

    def __init__(self, wf: Workflow | None = None,
                 render_svg: Callable[[Workflow, dict[str, str]], str] | None = None, **kw):
        super().__init__(**kw)
        self.wf = wf
        self.state: RunState | None = None
        self.medians: dict[str, float] | None = None    # set once earlier runs are read
        self._render_svg = render_svg if render_svg is not None else _default_svg

    def apply(self, event, state: RunState, wf: Workflow | None = None,
              now: float | None = None) -> "RunModel":
        """One (event, state after it) pair, as ``Client.watch`` yields them."""
        if wf is not None:
            self.wf = wf
        if self.wf is None:
            raise ValueError("RunModel.apply needs the run's workflow")
        wf = self.wf
        self.state = state
        now = now if now is not None else (event.ts if event is not None else None)
        with self.hold_trait_notifications():
            self.run, self.name, self.run_state = state.run, state.name or wf.name, state.state
            self.started, self.finished = state.started, state.finished or 0.0
            self.elapsed = elapsed(_duration(state.started, state.finished, now))
            self.eta = eta_text(state, wf, self.medians, now if now is not None else time.time())
            done, total = progress(st=state, wf=wf)
            self.progress_max, self.progress_value = max(total, 1), done
            self.rows = table_rows(state, wf, now)
            states = states_by_node(state)
            if states != self.node_states or not self.svg:
                self.node_states = states
                self.svg = self._render_svg(wf, states)
            self.approvals = approvals(state, wf)
            self.signals = signals(state, wf)
            self.task_keys = [t.key for t in state.tasks.values()]
            err = state.error or {}
            self.error = f"{err.get('key')}: {err.get('error')}" if err else ""
            if event is not None:
                self.last_event = event.type
            self.events = state.events
        return self

    def tick(self, now: float) -> None:
        """Refresh the elapsed time of a running run (the view calls it every second)."""
        if self.state is not None and not self.state.is_final:
            self.elapsed = elapsed(_duration(self.state.started, None, now))
            self.eta = eta_text(self.state, self.wf, self.medians, now)

    def set_medians(self, medians: dict[str, float], now: float) -> None:
        """The median seconds per task node of earlier runs of this notebook (for the ETA)."""
        self.medians = dict(medians)
        if self.state is not None and self.wf is not None:
            self.eta = eta_text(self.state, self.wf, self.medians, now)


def _default_svg(wf: Workflow, states: dict[str, str]) -> str:
    from nbflow.compiler import render

    try:
        return render.to_svg(wf, states)
    except Exception as e:  # noqa: BLE001 - no `dot`: the table still tells the story
        return f"<pre>{html.escape(str(e).splitlines()[0] if str(e) else type(e).__name__)}</pre>"


def runs_rows(states: list[RunState], now: float | None = None) -> list[dict[str, Any]]:
    """Rows of the ``%flow runs`` list, newest first."""
    now = now if now is not None else time.time()
    return [{"run": s.run, "name": s.name, "state": s.state,
             "started": local_datetime(s.started),
             "duration": elapsed(_duration(s.started, s.finished, now)),
             "notebook": s.source, "by": s.by}
            for s in sorted(states, key=lambda s: s.started, reverse=True)]
