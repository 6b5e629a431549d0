"""The pure state machine of a run: ``apply(state, event, wf) -> (state', commands)``.

No NATS, no clock, no randomness: the same history always gives the same state, so the run
snapshot in KV can be rebuilt by replay, and widgets/CLI can replay history themselves.
Times come from the events' own timestamps.

Node lifecycle (one node of the IR)::

    pending ─▶ [sleeping] ─▶ [waiting_signal] ─▶ [awaiting_approval] ─▶ running ─▶ succeeded
       │                                               │                   │  └──▶ failed
       └─▶ skipped (all predecessors skipped,          └─▶ rejected         └──▶ skipped (--when)
                    or an upstream was rejected)

A task node that needs a worker runs as one or more *task keys* (``node`` or ``node#i`` for
``--map`` instances); each key has its own attempts: queued ─▶ running ─▶ succeeded | failed |
skipped, with retry_wait between failed attempts.

Idempotent by construction: a repeated or stale event (an old attempt, a second decision, a
completion of a task already final) changes nothing and yields no command.

Values, not mutation: ``apply`` and ``fold`` never change the state they are given; they return a
new one that shares every node and task the events left alone (copy-on-write: an event copies
only the node and task records it changes, a fold copies the two indexes once). Per event the
cost is O(what the event changes): neighbour lists are cached per workflow object and ``settle``
reads counters kept beside the state instead of scanning every node and task.

The records themselves (``RunState``, ``NodeState``, ``TaskState``), their (de)serialisation and
what a person is shown of them are in ``core.records``.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from nbflow.core.fingerprint import reusable_across_runs
from nbflow.core.ir import Node, Workflow
from nbflow.core.events import Command, Event, split_key, task_key
from nbflow.core.reads import param_reads
# the records and what a person is shown of them live in core.records; they are named here too,
# as every reader of a state has always imported them from core.state
from nbflow.core.records import (  # noqa: F401 - re-exported
    _GATED, _NOT_NEEDED, NODE_ACTIVE, NODE_FINAL, NODE_STATES, RUN_FINAL, TASK_ACTIVE, TASK_FINAL,
    TASK_STATES, NodeState, RunState, TaskState, _graph, reused_from, shown_state,
    states_by_node)


def has_active_tasks(st: RunState) -> bool:
    """Some task is queued, running or waiting to retry (O(1): from the counters): the run will
    hear from a worker or a timer without anyone acting. False while it waits only on a person
    (an approval, a signal) or has ended."""
    return _counts(st).any_task(TASK_ACTIVE)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_at(text: str) -> float:
    t = text.strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


class _Counts:
    """How many nodes / tasks are in each state, and per node how many of its tasks are final:
    what ``settle`` and a map's join ask after every event, without scanning the run."""

    __slots__ = ("nodes", "tasks", "final")

    def __init__(self, st: RunState | None = None):
        self.nodes: dict[str, int] = {}
        self.tasks: dict[str, int] = {}
        self.final: dict[str, int] = {}
        if st is not None:
            for ns in st.nodes.values():
                self.nodes[ns.state] = self.nodes.get(ns.state, 0) + 1
            for t in st.tasks.values():
                self.task(t.node, None, t.state)

    def copy(self) -> "_Counts":
        c = _Counts()
        c.nodes, c.tasks, c.final = dict(self.nodes), dict(self.tasks), dict(self.final)
        return c

    def node(self, old: str | None, new: str | None) -> None:
        if old != new:
            if old is not None:
                self.nodes[old] -= 1
            if new is not None:
                self.nodes[new] = self.nodes.get(new, 0) + 1

    def task(self, node: str, old: str | None, new: str | None) -> None:
        if old == new:
            return
        if old is not None:
            self.tasks[old] -= 1
        if new is not None:
            self.tasks[new] = self.tasks.get(new, 0) + 1
        delta = (new in TASK_FINAL) - (old in TASK_FINAL)
        if delta:
            self.final[node] = self.final.get(node, 0) + delta

    def any_node(self, states: Iterable[str]) -> bool:
        return any(self.nodes.get(s) for s in states)

    def any_task(self, states: Iterable[str]) -> bool:
        return any(self.tasks.get(s) for s in states)


def _counts(st: RunState) -> _Counts:
    c = st.__dict__.get("_counts")
    if c is None:
        c = st.__dict__["_counts"] = _Counts(st)
    return c


def _fork(st: RunState) -> RunState:
    """A new state sharing every node and task record with ``st`` (copy-on-write: a step copies
    a record before changing it). Only the two indexes are copied."""
    new = RunState.__new__(RunState)
    new.__dict__.update(st.__dict__)
    new.nodes, new.tasks = dict(st.nodes), dict(st.tasks)
    c = st.__dict__.get("_counts")
    new.__dict__["_counts"] = c.copy() if c is not None else None
    return new


_NEW = object()      # "this record did not exist before the step"


def _copy(rec):
    new = rec.__class__.__new__(rec.__class__)
    new.__dict__.update(rec.__dict__)
    return new


class _Step:
    """One application of one event to a state the caller owns (a fork): records are copied
    before they change (the old ones may be shared with the caller's input), every change is
    remembered so a failing event can be undone, and the counters follow the changes."""

    def __init__(self, st: RunState, wf: Workflow, ev: Event):
        self.st, self.wf, self.ev = st, wf, ev
        self.g = _graph(wf)
        self.cmds: list[Command] = []
        _counts(st)                                     # counted before anything changes
        self._fields = dict(st.__dict__)                # scalars, signals, error: for undo
        self._nodes: dict[str, Any] = {}               # id -> record before the step (undo)
        self._tasks: dict[str, Any] = {}
        self._nstate: dict[str, str | None] = {}       # id -> state when last counted
        self._tstate: dict[str, str | None] = {}
        self._seqs: dict[str, list] = {}                # a --map's parameter, as a list

    # --- graph helpers ------------------------------------------------------------------------
    def succ(self, node_id: str) -> list[str]:
        return self.g.succ.get(node_id, [])

    def preds(self, node_id: str) -> list[str]:
        return self.g.preds.get(node_id, [])

    # --- copy-on-write access -----------------------------------------------------------------
    def N(self, node_id: str) -> NodeState:
        """The node's record, writable (copied on the step's first write)."""
        if node_id not in self._nodes:
            old = self.st.nodes[node_id]
            self._nodes[node_id] = old
            self._nstate[node_id] = old.state
            self.st.nodes[node_id] = _copy(old)
        return self.st.nodes[node_id]

    def new_node(self, node_id: str) -> NodeState:
        if node_id not in self._nodes:
            self._nodes[node_id] = self.st.nodes.get(node_id, _NEW)
            old = self._nodes[node_id]
            self._nstate[node_id] = None if old is _NEW else old.state
        ns = self.st.nodes[node_id] = NodeState()
        return ns

    def T(self, key: str) -> TaskState:
        """The task's record, writable (copied on the step's first write)."""
        if key not in self._tasks:
            old = self.st.tasks[key]
            self._tasks[key] = old
            self._tstate[key] = old.state
            self.st.tasks[key] = _copy(old)
        return self.st.tasks[key]

    def new_task(self, ts: TaskState) -> TaskState:
        if ts.key not in self._tasks:
            old = self.st.tasks.get(ts.key, _NEW)
            self._tasks[ts.key] = old
            self._tstate[ts.key] = None if old is _NEW else old.state
        self.st.tasks[ts.key] = ts
        return ts

    def counts(self) -> _Counts:
        """The counters, brought up to date with this step's changes so far."""
        c = _counts(self.st)
        for k, was in self._nstate.items():
            now = self.st.nodes[k].state
            if now != was:
                c.node(was, now)
                self._nstate[k] = now
        for k, was in self._tstate.items():
            t = self.st.tasks[k]
            if t.state != was:
                c.task(t.node, was, t.state)
                self._tstate[k] = t.state
        return c

    def undo(self) -> None:
        """Put back every record and field this step changed (the event could not apply)."""
        for k, old in self._nodes.items():
            if old is _NEW:
                self.st.nodes.pop(k, None)
            else:
                self.st.nodes[k] = old
        for k, old in self._tasks.items():
            if old is _NEW:
                self.st.tasks.pop(k, None)
            else:
                self.st.tasks[k] = old
        nodes, tasks = self.st.nodes, self.st.tasks
        self.st.__dict__.clear()
        self.st.__dict__.update(self._fields)
        self.st.nodes, self.st.tasks = nodes, tasks
        self.st.__dict__["_counts"] = None         # rebuilt from the records when next needed

    # --- node transitions ---------------------------------------------------------------------
    def resolve(self, node_id: str, state: str, reason: str = "") -> None:
        if self.st.nodes[node_id].state in NODE_FINAL:
            return
        ns = self.N(node_id)
        ns.state, ns.reason = state, reason or ns.reason
        ns.finished = self.ev.ts
        if ns.started is None:
            ns.started = self.ev.ts
        if state == "failed":
            return                      # downstream stays pending: the run fails when idle
        if state == "succeeded":
            self.remember(node_id)
        for s in self.succ(node_id):
            self.consider(s)

    def consider(self, node_id: str) -> None:
        """A predecessor resolved: start the node if all predecessors are done."""
        ns = self.st.nodes[node_id]
        if ns.state != "pending" or self.st.is_final:
            return
        states = [self.st.nodes[p].state for p in self.preds(node_id)]
        if any(s in ("rejected",) for s in states):
            return self.resolve(node_id, "skipped", "upstream rejected")
        if any(s in ("skipped",) and self._skip_is_rejection(p) for p, s in
               zip(self.preds(node_id), states)):
            return self.resolve(node_id, "skipped", "upstream rejected")
        if not all(s in ("succeeded", "skipped") for s in states):
            return
        if states and all(s == "skipped" for s in states):
            return self.resolve(node_id, "skipped", "all upstream tasks skipped")
        self.begin(node_id)

    def _skip_is_rejection(self, node_id: str) -> bool:
        return self.st.nodes[node_id].reason == "upstream rejected"

    def begin(self, node_id: str) -> None:
        node = self.g.node(node_id)
        ns = self.N(node_id)
        ns.started = self.ev.ts
        if node.is_instant:
            return self.resolve(node_id, "succeeded")
        if node_id in self.st.reuse:
            return self._reuse(node_id)
        self.gate(node, "start")

    def _reuse(self, node_id: str) -> None:
        saved = self.st.reuse[node_id]
        ns = self.N(node_id)
        ns.count = saved.get("count")
        origin = saved.get("from") or self.st.retry_of
        for key, t in saved.get("tasks", {}).items():
            ts = TaskState(**t)
            ts.reused = True
            ts.reused_from = ts.reused_from or origin
            self.new_task(ts)
        self.resolve(node_id, saved.get("state", "succeeded"), "reused from " + origin)

    def remember(self, node_id: str) -> None:
        """A task executed and succeeded: tell the engine to index its outputs under its
        fingerprint, so later runs with ``--reuse`` can stand them in."""
        fp = self.st.fps.get(node_id)
        if not fp or node_id in self.st.reuse:
            return
        node = self.g.node(node_id)
        if not reusable_across_runs(node):
            return
        tasks = {t.key: {k: v for k, v in t.__dict__.items()}
                 for t in self.st.node_tasks(node_id)}
        if any(t.get("reused") for t in tasks.values()):
            return
        self.cmds.append(Command("remember", {
            "fp": fp, "node": node_id, "run": self.st.run, "at": self.ev.ts,
            "count": self.st.nodes[node_id].count, "tasks": tasks}))

    # Gates, in order: timer (--sleep/--at) -> signal -> approval -> run.
    def gate(self, node: Node, after: str) -> None:
        ns = self.N(node.id)
        order = ["start", "sleep", "signal", "approval", "run"]
        for g in order[order.index(after) + 1:]:
            if g == "sleep" and (node.sleep or node.at):
                at = self.ev.ts + node.sleep if node.sleep else _parse_at(node.at)
                if at > self.ev.ts:
                    ns.state = "sleeping"
                    self.timer("sleep", node.id, at)
                    return
            elif g == "signal" and node.wait_signal:
                if node.wait_signal in self.st.signals:
                    ns.signal = self.st.signals[node.wait_signal]
                else:
                    ns.state = "waiting_signal"
                    return
            elif g == "approval" and node.approval is not None:
                ns.state = "awaiting_approval"
                ns.approval = {"prompt": node.approval, "state": "pending",
                               "requested": self.ev.ts}
                timeout_at = (self.ev.ts + node.approval_timeout) if node.approval_timeout else None
                if timeout_at:
                    ns.approval["expires"] = timeout_at
                    self.timer("approval_timeout", node.id, timeout_at)
                self.cmds.append(Command("approval", {
                    "node": node.id, "prompt": node.approval, "expires": timeout_at}))
                return
            elif g == "run":
                return self.run(node)

    def run(self, node: Node) -> None:
        ns = self.N(node.id)
        ns.state = "running"
        if not node.needs_worker:
            return self.resolve(node.id, "succeeded")
        if node.map_var:
            count, err = self.map_count(node)
            if err:
                self.new_task(TaskState(node.id, node.id, state="failed", error=err,
                                        finished=self.ev.ts))
                return self.fail_node(node.id, node.id, err)
            ns.count = count
            if count == 0:
                return self.resolve(node.id, "succeeded")
            for i in range(count):
                self.dispatch(node, task_key(node.id, i), 1)
        else:
            self.dispatch(node, node.id, 1)

    def map_count(self, node: Node) -> tuple[int, str]:
        over = node.map_over or ""
        producer = node.sources.get(over)
        if producer:
            pn = self.st.nodes[producer]
            if pn.count is not None:
                return pn.count, ""
            t = self.st.tasks.get(producer)
            if t and over in t.lens:
                return int(t.lens[over]), ""
            return 0, (f"task {node.id!r}: --map {node.map_var} in {over}: the value of "
                       f"{over!r} produced by {producer!r} has no length (is it a list?)")
        if over in self.st.params:
            v = self.st.params[over]
            if isinstance(v, (list, tuple, str, dict)):
                return len(v), ""
            return 0, (f"task {node.id!r}: --map {node.map_var} in {over}: parameter {over!r} "
                       f"is {type(v).__name__}, not a list")
        return 0, (f"task {node.id!r}: --map {node.map_var} in {over}: nbflow cannot see the "
                   f"value of {over!r}; make it a literal list in the parameters cell")

    def inputs_for(self, node: Node) -> dict[str, Any]:
        refs: dict[str, Any] = {}
        cache: dict[str, dict[str, Any]] = {}
        for name, producer in sorted(node.sources.items()):
            if producer not in cache:
                cache[producer] = self.st.node_outputs(producer, self.wf)
            if name in cache[producer]:
                refs[name] = cache[producer][name]
        return refs

    def dispatch(self, node: Node, key: str, attempt: int) -> None:
        inst = split_key(key)[1]
        if key in self.st.tasks:
            t = self.T(key)
        else:
            t = self.new_task(TaskState(key, node.id, inst))
        t.state, t.attempt, t.queued = "queued", attempt, self.ev.ts
        t.started = t.finished = None
        t.error = t.traceback = t.cell = t.reason = ""
        ns = self.st.nodes[node.id]
        data: dict[str, Any] = {
            "key": key, "node": node.id, "attempt": attempt, "queue": node.queue or "default",
            "wf": self.st.wf, "inputs": self.inputs_for(node), "timeout": node.timeout,
            "isolation": node.isolation,
        }
        if inst is not None:
            data["map"] = {"var": node.map_var, "over": node.map_over, "index": inst}
            seq = self._map_seq(node)
            if seq is not None and inst < len(seq):
                data["map"]["value"] = seq[inst]      # its element, not the whole list
        # the message carries only the parameters the task's code reads (None: all of them)
        data["reads"] = param_reads(self.wf, node)
        if node.wait_signal:
            data["signal"] = {"var": node.wait_signal, "value": ns.signal}
        self.cmds.append(Command("dispatch", data))

    def _map_seq(self, node: Node) -> Any:
        """The run parameter a --map over a parameter walks (indexable; None when the list is a
        task's output, which instances read from the artifacts store)."""
        over = node.map_over or ""
        if node.sources.get(over) or over not in self.st.params:
            return None
        v = self.st.params[over]
        if isinstance(v, list):
            return v
        if not isinstance(v, (tuple, str, dict)):
            return None
        if over not in self._seqs:                   # list(dict) once per step, not per instance
            self._seqs[over] = list(v)
        return self._seqs[over]

    def timer(self, kind: str, key: str, at: float, attempt: int | None = None) -> None:
        # '~' cannot occur in a node name (unlike '-'), so map instances never collide with tasks
        tid = f"{self.st.run}.{kind}.{key.replace('#', '~')}" + (f".{attempt}" if attempt else "")
        self.cmds.append(Command("timer", {"id": tid, "kind": kind, "key": key, "at": at,
                                           "at_iso": _iso(at), "attempt": attempt}))

    def fail_node(self, node_id: str, key: str, error: str) -> None:
        if self.st.error is None:
            t = self.st.tasks.get(key)
            self.st.error = {"key": key, "node": node_id, "error": error,
                             "traceback": t.traceback if t else "", "cell": t.cell if t else ""}
        self.resolve(node_id, "failed")

    # --- after every event: is the run over? --------------------------------------------------
    def drop_needless_gates(self) -> None:
        """After a rejection: a node still waiting for a signal, a timer or an approval (a pure
        gate, or a task with code that has not started) whose every successor is already skipped
        or rejected only fed the rejected branch; skip it, so the run ends instead of waiting for
        a signal or a person only the skipped branch needed. A skipped approval is closed (its
        record stops being pending). A leaf (its successor is ``end``) still runs."""
        changed = self.counts().any_node(_GATED)
        while changed:
            changed = False
            for n in self.wf.nodes:
                ns = self.st.nodes.get(n.id)
                if ns is None or ns.state not in _GATED:
                    continue
                succ = self.succ(n.id)
                if n.needs_worker and any(self.g.node(s).kind == "end" for s in succ):
                    continue            # a leaf with code: its own effect is the point
                if succ and all(self.st.nodes[s].state in ("skipped", "rejected") for s in succ):
                    if ns.state == "awaiting_approval":
                        self.N(n.id).approval = {**(ns.approval or {}), "state": "cancelled",
                                                 "by": "", "at": self.ev.ts,
                                                 "reason": _NOT_NEEDED}
                        self.cmds.append(Command("approval_closed", {
                            "node": n.id, "state": "cancelled", "by": "", "reason": _NOT_NEEDED}))
                    self.resolve(n.id, "skipped", _NOT_NEEDED)
                    changed = True

    def settle(self) -> None:
        st = self.st
        if st.is_final:
            return
        if self.counts().nodes.get("rejected"):
            self.drop_needless_gates()
        c = self.counts()
        if c.any_node(NODE_ACTIVE) or c.any_task(TASK_ACTIVE):
            return
        states = {s for s, n in c.nodes.items() if n}
        if "failed" in states:
            final = "failed"
        elif "rejected" in states:
            final = "rejected"
        elif st.nodes.get("end") and st.nodes["end"].state in ("succeeded", "skipped"):
            final = "succeeded"
        elif all(s in NODE_FINAL for s in states):
            final = "succeeded"
        else:
            return                     # e.g. waiting on something not modelled: stay running
        st.state, st.finished = final, self.ev.ts
        self.cmds.append(Command("finished", {"state": final}))


# --- event handlers ----------------------------------------------------------------------------

def _on_run_started(step: _Step) -> None:
    for n in step.wf.nodes:
        step.new_node(n.id)
    for n in step.wf.nodes:
        if not step.preds(n.id):
            step.begin(n.id)


def _task_event_applies(step: _Step) -> TaskState | None:
    ev, st = step.ev, step.st
    t = st.tasks.get(ev["key"])
    if t is None or st.is_final or t.state in TASK_FINAL or ev["attempt"] != t.attempt:
        return None
    if t.state not in ("queued", "running"):
        return None
    return step.T(t.key)


def _on_task_started(step: _Step) -> None:
    t = _task_event_applies(step)
    if t is None:
        return
    t.state, t.worker = "running", step.ev.get("worker", "")
    t.started = step.ev.ts


def _node_done_if_all(step: _Step, node_id: str) -> None:
    ns = step.st.nodes[node_id]
    expected = 1 if ns.count is None else ns.count
    if step.counts().final.get(node_id, 0) < expected:
        return                          # O(1) per instance: the scan below runs once per node
    tasks = step.st.node_tasks(node_id)
    if len(tasks) < expected or any(t.state not in TASK_FINAL for t in tasks):
        return
    if any(t.state == "failed" for t in tasks):
        bad = next(t for t in tasks if t.state == "failed")
        return step.fail_node(node_id, bad.key, bad.error)
    if all(t.state == "skipped" for t in tasks):
        return step.resolve(node_id, "skipped", "--when was false")
    step.resolve(node_id, "succeeded")


def _on_task_succeeded(step: _Step) -> None:
    t = _task_event_applies(step)
    if t is None:
        return
    ev = step.ev
    t.state, t.finished = "succeeded", ev.ts
    if t.started is None:
        t.started = ev.ts
    t.outputs = dict(ev.get("outputs") or {})
    t.lens = dict(ev.get("lens") or {})
    t.notebook = ev.get("notebook", "")
    t.worker = ev.get("worker", t.worker)
    t.exec_s = ev.get("exec_s")
    _node_done_if_all(step, t.node)


def _on_task_skipped(step: _Step) -> None:
    t = _task_event_applies(step)
    if t is None:
        return
    t.state, t.finished, t.reason = "skipped", step.ev.ts, step.ev.get("reason", "when")
    t.notebook = step.ev.get("notebook", "")
    _node_done_if_all(step, t.node)


_NAME_ERROR = re.compile(r"NameError: name '([A-Za-z_][A-Za-z0-9_]*)' is not defined")


def _explain_missing(step: _Step, node: Node, error: str) -> str:
    """A NameError for an input whose producer was skipped says so (a bare NameError hides
    that the name would come from another task)."""
    m = _NAME_ERROR.match(error or "")
    producer = node.sources.get(m.group(1)) if m else None
    ns = step.st.nodes.get(producer) if producer else None
    if ns is None or ns.state != "skipped":
        return error
    why = "its --when was false" if ns.reason == "--when was false" else ns.reason or "skipped"
    return (f"NameError: `{m.group(1)}` comes from task `{producer}`, which was skipped ({why}); "
            f"give `{m.group(1)}` a default in a setup cell or guard this task with --when")


def _on_task_failed(step: _Step) -> None:
    t = _task_event_applies(step)
    if t is None:
        return
    ev = step.ev
    node = step.g.node(t.node)
    t.error, t.traceback, t.cell = (_explain_missing(step, node, ev["error"]),
                                    ev.get("traceback", ""), ev.get("cell", ""))
    t.notebook, t.reason = ev.get("notebook", ""), ev.get("reason", "error")
    t.worker = ev.get("worker", t.worker)
    if t.started is None:
        t.started = ev.ts
    # retrying cannot help these: the same code makes the same unpicklable or oversized value
    retriable = t.reason not in ("cancelled", "unpicklable", "config", "too_big")
    if retriable and t.attempt <= node.retries:
        t.state, t.finished = "retry_wait", ev.ts
        delay = (node.retry_delay or 0.0) * (2 ** (t.attempt - 1))
        if delay > 0:
            step.timer("retry", t.key, ev.ts + delay, t.attempt + 1)
        else:
            step.dispatch(node, t.key, t.attempt + 1)
        return
    t.state, t.finished = "failed", ev.ts
    _node_done_if_all(step, t.node)


def _on_timer_fired(step: _Step) -> None:
    ev, st = step.ev, step.st
    if st.is_final:
        return
    kind, key = ev["kind"], ev["key"]
    if kind == "retry":
        t = st.tasks.get(key)
        if t and t.state == "retry_wait" and ev.get("attempt") == t.attempt + 1:
            step.dispatch(step.g.node(t.node), key, t.attempt + 1)
    elif kind == "sleep":
        if key in st.nodes and st.nodes[key].state == "sleeping":
            step.gate(step.g.node(key), "sleep")
    elif kind == "approval_timeout":
        ns = st.nodes.get(key)
        if ns and ns.state == "awaiting_approval":
            ns = step.N(key)
            ns.approval = {**(ns.approval or {}), "state": "rejected", "by": "timeout",
                           "reason": "timeout", "at": ev.ts}
            step.cmds.append(Command("approval_closed", {"node": key, "state": "rejected",
                                                         "by": "timeout", "reason": "timeout"}))
            step.resolve(key, "rejected", "approval timed out")


def _on_approval(step: _Step) -> None:
    ev, st = step.ev, step.st
    ns = st.nodes.get(ev["node"])
    if st.is_final or ns is None or ns.state != "awaiting_approval":
        return                          # first decision wins; later ones change nothing
    approved = ev["approved"]
    ns = step.N(ev["node"])
    ns.approval = {**(ns.approval or {}), "state": "approved" if approved else "rejected",
                   "by": ev["by"], "comment": ev.get("comment", ""), "at": ev.ts,
                   "reason": ev.get("reason", "")}
    if approved:
        step.gate(step.g.node(ev["node"]), "approval")
    else:
        step.resolve(ev["node"], "rejected", f"rejected by {ev['by']}")


def _on_signal(step: _Step) -> None:
    ev, st = step.ev, step.st
    if st.is_final:
        return
    name = ev["name"]
    if name in st.signals:
        return                          # a signal is taken once: the first value stands
    st.signals = {**st.signals, name: ev.get("value")}   # a new dict: the input shares the old
    for n in step.wf.nodes:
        ns = st.nodes[n.id]
        if n.wait_signal == name and ns.state == "waiting_signal":
            step.N(n.id).signal = ev.get("value")
            step.gate(n, "signal")


def _on_cancel(step: _Step) -> None:
    st = step.st
    if st.is_final:
        return
    active = [t.key for t in st.tasks.values() if t.state in TASK_ACTIVE]
    for node_id, ns in st.nodes.items():
        if ns.state == "awaiting_approval":        # its pending approval can no longer be given
            step.cmds.append(Command("approval_closed", {"node": node_id, "state": "cancelled",
                                                         "by": step.ev.get("by", ""),
                                                         "reason": "run cancelled"}))
    for key in active:
        t = step.T(key)
        t.state, t.finished, t.reason = "cancelled", step.ev.ts, "run cancelled"
    for node_id in [k for k, ns in st.nodes.items() if ns.state not in NODE_FINAL]:
        ns = step.N(node_id)
        ns.state, ns.finished = "cancelled", step.ev.ts
    st.state, st.finished = "cancelled", step.ev.ts
    if active:
        step.cmds.append(Command("cancel_tasks", {"keys": active}))
    step.cmds.append(Command("finished", {"state": "cancelled"}))


def _on_run_finished(step: _Step) -> None:
    """A record of what the state machine already decided: changes nothing."""


_HANDLERS = {
    "TaskStarted": _on_task_started,
    "TaskSucceeded": _on_task_succeeded,
    "TaskSkipped": _on_task_skipped,
    "TaskFailed": _on_task_failed,
    "TimerFired": _on_timer_fired,
    "ApprovalDecided": _on_approval,
    "SignalSent": _on_signal,
    "CancelRequested": _on_cancel,
    "RunFinished": _on_run_finished,
}


def new_state(ev: Event, wf: Workflow) -> RunState:
    return RunState(
        run=ev.run, wf=ev["wf"], name=ev.get("name") or wf.name,
        params={**wf.params, **(ev.get("params") or {})}, started=ev.ts,
        by=ev.get("by", ""), source=ev.get("source") or (wf.source or ""),
        retry_of=ev.get("retry_of", ""), schedule=ev.get("schedule", ""),
        reuse=dict(ev.get("reuse") or {}), fps=dict(ev.get("fps") or {}),
    )


def _apply_owned(state: RunState | None, ev: Event, wf: Workflow
                 ) -> tuple[RunState, list[Command]]:
    """Apply one event to a state this call may change (a fork, or None): the work of
    :func:`apply` and :func:`fold`. A failing event leaves ``state`` as it was."""
    if ev.type == "RunStarted":
        if state is not None:          # a duplicate start changes nothing but the last seq seen
            if ev.seq is not None:
                state.seq = max(state.seq, ev.seq)
            return state, []
        state = new_state(ev, wf)
        state.__dict__["_counts"] = _Counts()
        step = _Step(state, wf, ev)
        handler = _on_run_started
    else:
        if state is None:
            raise ValueError(f"{ev.type} for run {ev.run} before its RunStarted")
        step = _Step(state, wf, ev)
        handler = _HANDLERS[ev.type]
    try:
        handler(step)
        if ev.seq is not None:
            state.seq = max(state.seq, ev.seq)
        state.events += 1
        step.settle()
        step.counts()
    except BaseException:
        step.undo()
        raise
    return state, step.cmds


def apply(state: RunState | None, ev: Event, wf: Workflow) -> tuple[RunState, list[Command]]:
    """Apply one event: a new state (sharing what the event left alone) and the commands.
    ``state`` itself is never changed; a duplicate start that changes nothing returns it."""
    if state is not None and ev.type == "RunStarted" and (ev.seq is None or ev.seq <= state.seq):
        return state, []
    return _apply_owned(_fork(state) if state is not None else None, ev, wf)


def refusal(state: RunState | None, ev: Event, verified: bool = True) -> str:
    """Why ``ev`` must not be applied to ``state``, or "" when it may: a decision not made
    through the approvals bucket or a start its submitter did not record (``verified`` False),
    or any event of a run before its ``RunStarted``."""
    if ev.type == "ApprovalDecided" and not verified:
        return "decision not recorded in the approvals bucket"
    if ev.type == "RunStarted" and state is None and not verified:
        return "RunStarted without a matching start record"
    if state is None and ev.type != "RunStarted":
        return f"{ev.type} before RunStarted"
    return ""


def fold(events: Iterable[Event], wf: Workflow, state: RunState | None = None, *,
         verified: Callable[[Event], bool] = lambda ev: True,
         skipped: list[tuple[Event, str]] | None = None) -> tuple[RunState | None, list[Command]]:
    """The one replay: apply ``events`` in order to ``state`` (None: from the start), with the
    engine's filters (:func:`refusal`); an event that cannot apply is skipped (nothing of it
    kept), its sequence still counted. Returns a new state (``state`` is not changed) and the
    commands; ``skipped`` collects (event, why)."""
    cmds: list[Command] = []
    owned = False                       # forked once, then changed in place event by event
    for ev in events:
        why = refusal(state, ev, verified(ev))
        if not why:
            if state is not None and not owned:
                state, owned = _fork(state), True
            try:
                state, c = _apply_owned(state, ev, wf)
                owned = True
                cmds.extend(c)
                continue
            except (KeyError, ValueError, TypeError) as e:
                why = f"cannot apply: {e!r}"       # undone: the state is as before the event
                if state is not None:
                    state.seq = max(state.seq, ev.seq or 0)
        if skipped is not None:
            skipped.append((ev, why))
    return state, cmds


def replay(events: Iterable[Event], wf: Workflow) -> RunState | None:
    """A run's whole history folded: what the snapshot must equal."""
    return fold(events, wf)[0]
