"""Helpers for the state-machine tests: hand-built workflow IRs and a tiny simulated
"engine + workers" driver around ``state.apply`` (no NATS, no clock, no I/O).

The driver checks, after every event, what must hold for any history: the snapshot survives
``to_dict`` -> JSON -> ``from_dict`` unchanged, a re-delivered copy of the event changes nothing
and commands nothing, no (key, attempt) is dispatched twice and ``finished`` comes at most once.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from nbflow.core.ir import Edge, Node, Workflow
from nbflow.core.events import Command, Event, make
from nbflow.core.state import RunState, apply

WF_HASH = "wfhash0000000000"

# --- workflow IRs ------------------------------------------------------------------------------


def task(id_: str, code: str = "x = 1", **kw: Any) -> Node:
    return Node(id=id_, kind="task", code=code, **kw)


def gate(id_: str, **kw: Any) -> Node:
    """A task without code: a pure approval / signal / timer gate (never reaches a worker)."""
    return Node(id=id_, kind="task", code="", **kw)


def build(nodes: list[Node], deps: dict[str, list[str]] | None = None,
          params: dict[str, Any] | None = None, name: str = "wf") -> Workflow:
    """start -> roots, inner edges ``deps[target] = [sources]`` (plus every ``sources`` producer),
    leaves -> end: the shape the compiler emits."""
    deps = {k: list(v) for k, v in (deps or {}).items()}
    for n in nodes:
        for prod in n.sources.values():
            if prod not in deps.setdefault(n.id, []):
                deps[n.id].append(prod)
    for n in nodes:                        # outputs: every name some other node reads from n
        names = {x for m in nodes for x, p in m.sources.items() if p == n.id}
        n.outputs = sorted(set(n.outputs) | names)
        n.inputs = sorted(n.sources)
    inner: list[Edge] = []
    for n in nodes:
        for s in deps.get(n.id, []):
            names = sorted(x for x, p in n.sources.items() if p == s)
            inner.append(Edge(s, n.id, names))
    has_pred = {e.target for e in inner}
    has_succ = {e.source for e in inner}
    edges = ([Edge("start", n.id) for n in nodes if n.id not in has_pred] + inner
             + [Edge(n.id, "end") for n in nodes if n.id not in has_succ])
    wf = Workflow(name=name, nodes=[Node("start", "start"), *nodes, Node("end", "end")],
                  edges=edges, params=dict(params or {}))
    return wf.validate()


def chain(n: int, **kw: Any) -> Workflow:
    """t0 -> t1 -> ... ; t_i reads v_{i-1} from t_{i-1}."""
    nodes = [task(f"t{i}", f"v{i} = {i}",
                  sources=({f"v{i - 1}": f"t{i - 1}"} if i else {}), **kw) for i in range(n)]
    return build(nodes)


def diamond() -> Workflow:
    """a -> (b, c) -> d; b and c read va, d reads vb and vc."""
    return build([
        task("a", "va = 1"),
        task("b", "vb = va", sources={"va": "a"}),
        task("c", "vc = va", sources={"va": "a"}),
        task("d", "vd = vb + vc", sources={"vb": "b", "vc": "c"}),
    ])


def fanout_params(items: Any = ("x", "y", "z"), **mkw: Any) -> Workflow:
    """m --map item in items (a parameter) -> j reads res (a list of refs)."""
    return build([
        task("m", "res = item", map_var="item", map_over="items", **mkw),
        task("j", "total = res", sources={"res": "m"}),
    ], params={"items": list(items) if isinstance(items, tuple) else items})


def fanout_upstream(**mkw: Any) -> Workflow:
    """p makes parts -> m --map part in parts -> j reads res."""
    return build([
        task("p", "parts = [1, 2]"),
        task("m", "res = part", map_var="part", map_over="parts", sources={"parts": "p"}, **mkw),
        task("j", "total = res", sources={"res": "m"}),
    ])


# --- the simulated engine + workers ------------------------------------------------------------

def norm(d: dict[str, Any], drop: tuple[str, ...] = ("events", "seq")) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in drop}


def ref(key: str, name: str, attempt: int = 1) -> str:
    return f"store/{key}/{attempt}/{name}"


class Sim:
    """Feeds events with increasing ts and seq, records history and commands, checks invariants."""

    def __init__(self, wf: Workflow, run: str = "r1", t0: float = 1_000.0,
                 check_dup: bool = True):
        # check_dup: also check, after every event, the JSON round trip of the snapshot and
        # that a re-delivered copy of the event changes nothing (off: cheaper, for properties)
        self.wf, self.run, self.ts, self.seq = wf, run, t0, 0
        self.st: RunState | None = None
        self.history: list[Event] = []
        self.commands: list[Command] = []
        self.last: list[Command] = []
        self.check_dup = check_dup
        self.dispatched: dict[tuple[str, int], Command] = {}

    # --- events ---------------------------------------------------------------------------------
    def send(self, type_: str, **fields: Any) -> list[Command]:
        self.ts += 1.0
        self.seq += 1
        ev = make(type_, self.run, ts=self.ts, **fields)
        ev.seq = self.seq
        return self.feed(ev)

    def feed(self, ev: Event) -> list[Command]:
        was_final = self.st is not None and self.st.is_final
        self.st, cmds = apply(self.st, ev, self.wf)
        self.history.append(ev)
        self._check(ev, was_final, cmds)
        self.last = cmds
        self.commands.extend(cmds)
        return cmds

    def _check(self, ev: Event, was_final: bool, cmds: list[Command]) -> None:
        finished = [c for c in cmds if c.kind == "finished"]
        assert len(finished) <= 1
        if finished:
            assert not any(c.kind == "finished" for c in self.commands), "second finished"
            assert self.st.is_final and finished[0]["state"] == self.st.state
        if was_final:
            assert cmds == [], f"{ev.type} after the run ended commanded {cmds}"
        for c in cmds:
            if c.kind == "dispatch":
                k = (c["key"], c["attempt"])
                assert k not in self.dispatched, f"{k} dispatched twice"
                self.dispatched[k] = c
        if not self.check_dup:
            return
        d = self.st.to_dict()
        text = json.dumps(d)                                        # JSON-serialisable
        assert RunState.from_dict(json.loads(text)).to_dict() == d  # and back, unchanged
        twin = RunState.from_dict(json.loads(text))                 # re-delivery of the event
        twin, again = apply(twin, ev, self.wf)
        assert again == [], f"duplicate {ev.type} commanded {again}"
        assert norm(twin.to_dict()) == norm(d), f"duplicate {ev.type} changed the state"

    def start(self, params: dict | None = None, **kw: Any) -> list[Command]:
        return self.send("RunStarted", wf=WF_HASH, params=params or {}, **kw)

    def started(self, key: str, attempt: int | None = None, worker: str = "w1") -> list[Command]:
        return self.send("TaskStarted", key=key, attempt=attempt or self.attempt(key),
                         worker=worker)

    def succeed(self, key: str, outputs: dict | None = None, lens: dict | None = None,
                attempt: int | None = None, start: bool = True) -> list[Command]:
        attempt = attempt or self.attempt(key)
        if start:
            self.started(key, attempt)
        if outputs is None:
            node = self.wf.node(key.partition("#")[0])
            outputs = {name: ref(key, name, attempt) for name in node.outputs}
        return self.send("TaskSucceeded", key=key, attempt=attempt, outputs=outputs,
                         lens=lens or {})

    def fail(self, key: str, error: str = "boom", reason: str | None = None,
             attempt: int | None = None, start: bool = True) -> list[Command]:
        attempt = attempt or self.attempt(key)
        if start:
            self.started(key, attempt)
        return self.send("TaskFailed", key=key, attempt=attempt, error=error, reason=reason)

    def skip(self, key: str, attempt: int | None = None) -> list[Command]:
        return self.send("TaskSkipped", key=key, attempt=attempt or self.attempt(key))

    def approve(self, node: str, approved: bool = True, by: str = "ann") -> list[Command]:
        return self.send("ApprovalDecided", node=node, approved=approved, by=by)

    def signal(self, name: str, value: Any = None) -> list[Command]:
        return self.send("SignalSent", name=name, value=value)

    def fire(self, timer: Command) -> list[Command]:
        return self.send("TimerFired", timer=timer["id"], kind=timer["kind"], key=timer["key"],
                         attempt=timer["attempt"])

    def cancel(self) -> list[Command]:
        return self.send("CancelRequested", by="ann")

    # --- looking at what happened -----------------------------------------------------------------
    def attempt(self, key: str) -> int:
        return self.st.tasks[key].attempt

    def active(self) -> list[str]:
        """Keys queued or running on (simulated) workers, in dispatch order."""
        return [k for k, t in self.st.tasks.items() if t.state in ("queued", "running")]

    @staticmethod
    def of(cmds: list[Command], kind: str) -> list[Command]:
        return [c for c in cmds if c.kind == kind]

    def dispatches(self, cmds: list[Command] | None = None) -> list[Command]:
        return self.of(self.commands if cmds is None else cmds, "dispatch")

    def keys(self, cmds: list[Command]) -> list[str]:
        return [c["key"] for c in self.of(cmds, "dispatch")]

    def run_workers(self, outcome: Callable[[str, int], tuple] | None = None,
                    pick: Callable[[list[str]], int] = lambda keys: 0) -> None:
        """Complete active tasks until none is left. ``outcome(key, attempt)`` returns
        ("ok", outputs|None, lens|None) | ("fail", error, reason) | ("skip",)."""
        outcome = outcome or (lambda k, a: ("ok", None, None))
        while True:
            keys = self.active()
            if not keys or self.st.is_final:
                return
            key = keys[pick(keys) % len(keys)]
            a = self.attempt(key)
            o = outcome(key, a)
            if o[0] == "ok":
                self.succeed(key, o[1], o[2])
            elif o[0] == "fail":
                self.fail(key, o[1], o[2])
            else:
                self.started(key)
                self.skip(key)

    def node_states(self) -> dict[str, str]:
        return {k: v.state for k, v in self.st.nodes.items()}

    def finished(self) -> list[str]:
        return [c["state"] for c in self.commands if c.kind == "finished"]


def essence(st: RunState) -> dict[str, Any]:
    """The state without timestamps and bookkeeping: what must not depend on event order."""
    d = st.to_dict()
    out = {
        "state": d["state"], "params": d["params"], "signals": d["signals"],
        "nodes": {k: {f: v[f] for f in ("state", "count", "reason", "signal")}
                  for k, v in d["nodes"].items()},
        "tasks": {k: {f: v[f] for f in ("node", "instance", "state", "attempt", "outputs", "lens",
                                        "error", "reason", "reused")}
                  for k, v in sorted(d["tasks"].items())},
        "approvals": {k: ({f: x for f, x in v["approval"].items()
                           if f not in ("at", "requested", "expires")} if v["approval"] else None)
                      for k, v in d["nodes"].items()},
    }
    return out
