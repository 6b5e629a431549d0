"""Event and command types: typed, versioned, strictly decoded.

Events are what happened (appended to the history stream, one subject per run); commands are
what the engine must do next (returned by ``state.apply``). Both are plain JSON on the wire:
``{"v": 1, "type": ..., "run": ..., "ts": <unix seconds>, ...fields}``.

A message that does not decode raises ``BadMessage`` with a sentence saying what is wrong; the
engine dead-letters it and carries on.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from nbflow.errors import BadMessage

SCHEMA_VERSION = 1


# field name -> (type(s), required)
_ANY = object
_SPEC: dict[str, dict[str, tuple[Any, bool]]] = {
    # a run begins. wf = workflow content hash (in the defs KV); reuse = succeeded task results
    # carried over from an earlier run by `retry` or `run --reuse` ({node: {state, count, tasks,
    # from}}); fps = node -> fingerprint (core/fingerprint), indexed when a task succeeds
    "RunStarted": {
        "wf": (str, True), "params": (dict, True), "by": (str, False), "source": (str, False),
        "retry_of": (str, False), "reuse": (dict, False), "schedule": (str, False),
        "name": (str, False), "fps": (dict, False),
    },
    "TaskStarted": {"key": (str, True), "attempt": (int, True), "worker": (str, False)},
    "TaskSucceeded": {
        "key": (str, True), "attempt": (int, True), "outputs": (dict, False),
        "lens": (dict, False), "notebook": (str, False), "duration": ((int, float), False),
        "worker": (str, False), "exec_s": ((int, float), False),
    },
    "TaskFailed": {
        "key": (str, True), "attempt": (int, True), "error": (str, True),
        "traceback": (str, False), "cell": (str, False), "notebook": (str, False),
        "duration": ((int, float), False), "worker": (str, False), "reason": (str, False),
    },
    # the task's --when condition was false in its kernel
    "TaskSkipped": {
        "key": (str, True), "attempt": (int, True), "reason": (str, False),
        "notebook": (str, False), "worker": (str, False),
    },
    "ApprovalDecided": {
        "node": (str, True), "approved": (bool, True), "by": (str, True),
        "comment": (str, False), "reason": (str, False),
        "decision": (str, False),    # the decide service's id of this decision (engine/decide.py)
    },
    "SignalSent": {"name": (str, True), "value": (_ANY, False), "by": (str, False)},
    # a durable timer (retry backoff, --sleep/--at, approval timeout) went off
    "TimerFired": {"timer": (str, True), "kind": (str, True), "key": (str, True),
                   "attempt": (int, False)},
    "CancelRequested": {"by": (str, False), "reason": (str, False)},
    # the run reached its final state (recorded by the engine; the history's last event)
    "RunFinished": {"state": (str, True)},
}

EVENT_TYPES = tuple(_SPEC)


@dataclass
class Event:
    type: str
    run: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    seq: int | None = None            # stream sequence, set when read from the history stream

    def __getitem__(self, k: str) -> Any:
        return self.data[k]

    def get(self, k: str, default: Any = None) -> Any:
        return self.data.get(k, default)

    def to_dict(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, "type": self.type, "run": self.run, "ts": self.ts,
                **self.data}

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str).encode()


def make(type_: str, run: str, ts: float | None = None, **data: Any) -> Event:
    ev = Event(type_, run, {k: v for k, v in data.items() if v is not None},
               time.time() if ts is None else ts)
    validate(ev)
    return ev


def validate(ev: Event) -> None:
    spec = _SPEC.get(ev.type)
    if spec is None:
        raise BadMessage(f"unknown event type {ev.type!r} (known: {', '.join(EVENT_TYPES)})")
    if not isinstance(ev.run, str) or not ev.run:
        raise BadMessage(f"{ev.type}: 'run' must be a non-empty string")
    for name, (typ, required) in spec.items():
        if name not in ev.data:
            if required:
                raise BadMessage(f"{ev.type} for run {ev.run}: missing field {name!r}")
            continue
        if typ is _ANY:
            continue
        v = ev.data[name]
        if isinstance(v, bool) and typ in (int, (int, float)):
            raise BadMessage(f"{ev.type}: field {name!r} must be a number, not a bool")
        if not isinstance(v, typ):
            tname = typ.__name__ if isinstance(typ, type) else "number"
            raise BadMessage(f"{ev.type}: field {name!r} must be {tname}, got {type(v).__name__}")


def decode(raw: bytes, seq: int | None = None) -> Event:
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise BadMessage("an event must be a JSON object")
    if d.get("v") != SCHEMA_VERSION:
        raise BadMessage(f"unsupported event schema version {d.get('v')!r} (expected 1)")
    ts = d.pop("ts", 0.0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise BadMessage("field 'ts' must be a number")
    ev = Event(str(d.pop("type", "")), d.pop("run", ""), {k: v for k, v in d.items() if k != "v"},
               float(ts), seq)
    validate(ev)
    return ev


# --- commands (state.apply -> engine) ----------------------------------------------------------

@dataclass
class Command:
    kind: str    # "dispatch" | "timer" | "approval" | "approval_closed" | "cancel_tasks" |
                 # "remember" (index a success by fingerprint) | "finished"
    data: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, k: str) -> Any:
        return self.data[k]


def task_key(node: str, instance: int | None = None) -> str:
    """The key of one executable unit: the node id, or ``node#i`` for a --map instance."""
    return node if instance is None else f"{node}#{instance}"


def split_key(key: str) -> tuple[str, int | None]:
    node, sep, inst = key.partition("#")
    return node, (int(inst) if sep else None)


def start_record(wf: str, params: dict) -> dict:
    """What a submitter writes at ``start.<run>`` in the definitions bucket before publishing
    RunStarted: the engine starts a run only when the event matches it."""
    import hashlib

    canon = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return {"wf": wf, "params": hashlib.sha256(canon.encode()).hexdigest()}
