"""The records of a run's state — ``RunState`` with its ``NodeState`` and ``TaskState``
records, their states and (de)serialisation, what a person is shown of them — and the index of
a workflow they are read with (built once per workflow object). ``core.state`` computes new
records from events; everything that only reads a state needs this module alone."""
from __future__ import annotations

import weakref
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from nbflow.core.ir import Node, Workflow
from nbflow.core.events import task_key

RUN_FINAL = ("succeeded", "failed", "rejected", "cancelled")
NODE_FINAL = ("succeeded", "failed", "skipped", "rejected", "cancelled")
NODE_ACTIVE = ("sleeping", "waiting_signal", "awaiting_approval", "running")
_GATED = ("sleeping", "waiting_signal", "awaiting_approval")   # waiting before its code runs
_NOT_NEEDED = "not needed: upstream rejected"
TASK_FINAL = ("succeeded", "failed", "skipped", "cancelled")
TASK_ACTIVE = ("queued", "running", "retry_wait")
NODE_STATES = ("pending",) + NODE_ACTIVE + NODE_FINAL
TASK_STATES = TASK_ACTIVE + TASK_FINAL


@dataclass
class TaskState:
    key: str
    node: str
    instance: int | None = None
    state: str = "queued"
    attempt: int = 1
    queued: float | None = None
    started: float | None = None
    finished: float | None = None
    worker: str = ""
    outputs: dict[str, str] = field(default_factory=dict)   # name -> object store key
    lens: dict[str, int] = field(default_factory=dict)
    notebook: str = ""                                       # executed notebook's store key
    error: str = ""
    traceback: str = ""
    cell: str = ""
    reason: str = ""
    exec_s: float | None = None
    reused: bool = False
    reused_from: str = ""                                    # the run that executed it


@dataclass
class NodeState:
    state: str = "pending"
    count: int | None = None          # --map instances
    started: float | None = None
    finished: float | None = None
    reason: str = ""
    signal: Any = None                # --wait-signal value once received
    approval: dict[str, Any] | None = None   # {prompt, state, by, comment, at, reason}


@dataclass
class RunState:
    run: str
    wf: str
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    state: str = "running"
    started: float = 0.0
    finished: float | None = None
    by: str = ""
    source: str = ""
    retry_of: str = ""
    schedule: str = ""
    seq: int = 0                      # last history sequence applied (0: none)
    events: int = 0
    nodes: dict[str, NodeState] = field(default_factory=dict)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None   # the failure that ended the run: key, error, traceback
    reuse: dict[str, Any] = field(default_factory=dict)   # node -> results reused (retry, --reuse)
    fps: dict[str, Any] = field(default_factory=dict)     # node -> fingerprint (core/fingerprint)

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """Plain data. Shallow copies (not ``asdict``'s deep recursion): this runs on every event.
        ``compact`` leaves out fields at their defaults (the KV snapshot: ~half the bytes)."""
        d = {k: v for k, v in self.__dict__.items() if k[0] != "_"}
        if compact:
            d["nodes"] = {k: _compact(v) for k, v in self.nodes.items()}
            d["tasks"] = {k: _compact(v) for k, v in self.tasks.items()}
        else:
            d["nodes"] = {k: dict(v.__dict__) for k, v in self.nodes.items()}
            d["tasks"] = {k: dict(v.__dict__) for k, v in self.tasks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        d = dict(d)
        nodes = {k: NodeState(**v) for k, v in d.pop("nodes", {}).items()}
        tasks = {k: TaskState(**v) for k, v in d.pop("tasks", {}).items()}
        return cls(nodes=nodes, tasks=tasks, **d)

    @property
    def is_final(self) -> bool:
        return self.state in RUN_FINAL

    def node_tasks(self, node_id: str) -> list[TaskState]:
        ns = self.nodes[node_id]
        if ns.count is None:
            t = self.tasks.get(node_id)
            return [t] if t else []
        return [t for i in range(ns.count) if (t := self.tasks.get(task_key(node_id, i)))]

    def node_outputs(self, node_id: str, wf: Workflow) -> dict[str, Any]:
        """Output refs of a finished node: a ref per name, or a list of refs for --map."""
        ns = self.nodes[node_id]
        node = _graph(wf).node(node_id)
        if ns.count is None:
            t = self.tasks.get(node_id)
            return dict(t.outputs) if t else {}
        out: dict[str, Any] = {}
        for name in node.outputs:
            out[name] = [
                (t.outputs.get(name) if (t := self.tasks.get(task_key(node_id, i))) else None)
                for i in range(ns.count)
            ]
        return out


# field -> default, for the fields that have one (key and node of a task are required)
_DEFAULTS = {cls: {f.name: (f.default if f.default is not MISSING else f.default_factory())
                   for f in fields(cls)
                   if f.default is not MISSING or f.default_factory is not MISSING}
             for cls in (NodeState, TaskState)}


def _compact(obj) -> dict[str, Any]:
    defaults = _DEFAULTS[type(obj)]
    return {k: v for k, v in obj.__dict__.items() if k not in defaults or v != defaults[k]}


class _Graph:
    """Node index and neighbour lists of one workflow object, built once (``Workflow.node`` and
    ``predecessors`` scan every node / edge: per event that made a run O(N^2))."""

    __slots__ = ("nodes", "edges", "shape", "by_id", "preds", "succ", "__weakref__")

    def __init__(self, wf: Workflow):
        self.nodes, self.edges = wf.nodes, wf.edges
        self.shape = (len(wf.nodes), len(wf.edges))
        self.by_id: dict[str, Node] = {}
        for n in wf.nodes:
            self.by_id.setdefault(n.id, n)            # the first one, as Workflow.node finds it
        self.preds: dict[str, list[str]] = {}
        self.succ: dict[str, list[str]] = {}
        for e in wf.edges:
            self.succ.setdefault(e.source, []).append(e.target)
            self.preds.setdefault(e.target, []).append(e.source)

    def fits(self, wf: Workflow) -> bool:
        """Still this workflow (a workflow being built may grow between two applies)."""
        return (self.nodes is wf.nodes and self.edges is wf.edges
                and self.shape == (len(wf.nodes), len(wf.edges)))

    def node(self, node_id: str) -> Node:
        return self.by_id[node_id]


_GRAPHS: dict[int, _Graph] = {}


def _graph(wf: Workflow) -> _Graph:
    g = _GRAPHS.get(id(wf))
    if g is None or not g.fits(wf):
        if g is None:
            weakref.finalize(wf, _GRAPHS.pop, id(wf), None)
        g = _GRAPHS[id(wf)] = _Graph(wf)
    return g


def shown_state(st: RunState, node_id: str) -> str:
    """The state a person sees: ``reused`` for a task whose outputs came from an earlier run."""
    ns = st.nodes[node_id]
    if ns.state == "succeeded" and node_id in st.reuse:
        return "reused"
    return ns.state


def reused_from(st: RunState, node_id: str) -> str:
    """The run whose execution a reused task stands in for ("" when it ran here)."""
    saved = st.reuse.get(node_id) or {}
    for t in (saved.get("tasks") or {}).values():
        if t.get("reused_from"):
            return t["reused_from"]
    return saved.get("from") or (st.retry_of if node_id in st.reuse else "")


def states_by_node(st: RunState) -> dict[str, str]:
    """Node id -> state as shown, for pictures (render.to_dot colours)."""
    return {k: shown_state(st, k) for k in st.nodes}
