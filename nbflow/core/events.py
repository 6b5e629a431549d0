"""Event and command types: typed, versioned, strictly decoded.

Events are what happened (appended to the history stream, one subject per run); commands are
what the engine must do next (returned by ``state.apply``). Both are plain JSON on the wire:
``{"v": 1, "type": ..., "run": ..., "ts": <unix seconds>, ...fields}``.

A message that does not decode raises ``BadMessage`` with a sentence saying what is wrong; the
engine dead-letters it and carries on. The task message (engine -> worker) is :class:`TaskMessage`,
decoded as strictly; every ``Nats-Msg-Id`` nbflow publishes is built by a ``*_msg_id`` function.
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
        # the worker's time by step, ms (nbflow.worker.execute.Phases; a few fixed keys), and
        # its previous task's result publish, ack and cleanup: optional, for the bench
        "phases": (dict, False), "phases_prev_tail": ((int, float), False),
    },
    "TaskFailed": {
        "key": (str, True), "attempt": (int, True), "error": (str, True),
        "traceback": (str, False), "cell": (str, False), "notebook": (str, False),
        "duration": ((int, float), False), "worker": (str, False), "reason": (str, False),
        "phases": (dict, False), "phases_prev_tail": ((int, float), False),
    },
    # the task's --when condition was false in its kernel
    "TaskSkipped": {
        "key": (str, True), "attempt": (int, True), "reason": (str, False),
        "notebook": (str, False), "worker": (str, False),
        "phases": (dict, False), "phases_prev_tail": ((int, float), False),
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
# who may publish which kinds to history (the subject carries the kind; nats/auth.py turns this
# into nats-server permissions); every other kind is the engine's alone
WORKER_EVENTS = ("TaskStarted", "TaskSucceeded", "TaskFailed", "TaskSkipped")
AUTHOR_EVENTS = ("RunStarted",)


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


def _versioned_object(raw: bytes, version: int | tuple[int, ...], noun: str, kind: str) -> dict[str, Any]:
    """``raw`` as a JSON object of ``version`` (its ``v`` field), else BadMessage saying why;
    ``noun`` names one ("an event"), ``kind`` the schema ("event schema")."""
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise BadMessage(f"{noun} must be a JSON object")
    ok = version if isinstance(version, tuple) else (version,)
    if d.get("v") not in ok or isinstance(d.get("v"), bool):
        raise BadMessage(f"unsupported {kind} version {d.get('v')!r} (expected "
                         f"{' or '.join(map(str, ok))})")
    return d


def decode(raw: bytes, seq: int | None = None) -> Event:
    d = _versioned_object(raw, SCHEMA_VERSION, "an event", "event schema")
    ts = d.pop("ts", 0.0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise BadMessage("field 'ts' must be a number")
    ev = Event(str(d.pop("type", "")), d.pop("run", ""), {k: v for k, v in d.items() if k != "v"},
               float(ts), seq)
    validate(ev)
    return ev


# --- the task message (engine -> tasks stream -> worker) ----------------------------------------

# 2: ``params`` holds only the parameters the task reads, and a --map instance over a run
# parameter gets its element as ``map.value`` (a worker of version 1 would take the element from
# the parameter's default: it refuses these messages instead). Version 1 messages still decode.
TASK_VERSION = 2
TASK_VERSIONS = (1, 2)
# field -> (type(s), required); a task message is one attempt of one task
_TASK_FIELDS: dict[str, tuple[Any, bool]] = {
    "run": (str, True), "key": (str, True), "node": (str, True), "attempt": (int, True),
    "wf": (str, True), "queue": (str, False), "params": (dict, False), "inputs": (dict, False),
    "timeout": ((int, float), False), "isolation": (str, False), "map": (dict, False),
    "signal": (dict, False),
}


@dataclass
class TaskMessage:
    """What the engine publishes on ``tasks.<queue>.<run>`` for a worker to run. ``inputs`` maps
    a name to the artifact key(s) of its value; ``map`` is ``{var, over, index}`` for a --map
    instance (plus ``value``, its element, when ``over`` is a run parameter); ``params`` are the
    run parameters the task reads (:mod:`nbflow.core.reads`); ``signal`` is ``{var, value}``
    for a task that waited for a signal."""
    run: str
    key: str
    node: str
    attempt: int
    wf: str                                  # workflow content hash (defs KV)
    queue: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    isolation: str | None = None
    map: dict[str, Any] | None = None
    signal: dict[str, Any] | None = None
    delivery: str = ""                       # the worker's, per delivery (artifact keys): not sent

    @classmethod
    def for_dispatch(cls, run: str, params: dict[str, Any], data: dict[str, Any]) -> "TaskMessage":
        """From a ``dispatch`` command of ``state.apply`` (its data holds the task fields)."""
        return cls(run=run, params=params, **{k: v for k, v in data.items() if k in _TASK_FIELDS})

    def encode(self, params_json: str | None = None) -> bytes:
        """``params_json``: the run's parameters already encoded (``encode_params``), so the
        engine encodes them once for a thousand instances of a map instead of once each."""
        d: dict[str, Any] = {"v": TASK_VERSION}
        for name in _TASK_FIELDS:
            if name == "params" and params_json is not None:
                continue
            v = getattr(self, name)
            if v is not None or name in ("timeout", "isolation"):
                d[name] = v
        text = json.dumps(d, separators=(",", ":"), default=str)
        if params_json is not None:
            text = f'{text[:-1]},"params":{params_json}}}'
        return text.encode()

    @staticmethod
    def encode_params(params: dict[str, Any]) -> str:
        return json.dumps(params, separators=(",", ":"), default=str)

    @classmethod
    def decode(cls, raw: bytes) -> "TaskMessage":
        """Strict: a JSON object of a known version with every required field of the right
        type."""
        d = _versioned_object(raw, TASK_VERSIONS, "a task message", "task message")
        for name, (typ, required) in _TASK_FIELDS.items():
            v = d.get(name)
            if v is None:
                if required:
                    raise BadMessage(f"task message: missing field {name!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, typ):
                tname = typ.__name__ if isinstance(typ, type) else "number"
                raise BadMessage(f"task message: field {name!r} must be {tname}, "
                                 f"got {type(v).__name__}")
        return cls(**{k: v for k, v in d.items() if k in _TASK_FIELDS and v is not None})


# --- Nats-Msg-Id: the stream drops a second message with the same id (idempotent publishing) ---

def start_msg_id(run: str) -> str:
    return f"start.{run}"


def task_msg_id(run: str, key: str, attempt: int) -> str:
    return f"task.{run}.{key}.{attempt}"


def started_msg_id(run: str, key: str, attempt: int, delivered: int) -> str:
    """Per delivery: a task picked up again after its worker died is started again."""
    return f"started.{run}.{key}.{attempt}.{delivered}"


def done_msg_id(run: str, key: str, attempt: int) -> str:
    return f"done.{run}.{key}.{attempt}"


def finished_msg_id(run: str) -> str:
    return f"finished.{run}"


def timer_msg_id(timer: str) -> str:
    return f"timer.{timer}"


def timer_schedule_msg_id(timer: str) -> str:
    return f"sched.{timer}"


def cancel_msg_id(run: str) -> str:
    return f"cancel.{run}"


def approval_msg_id(run: str, node: str, decision: str) -> str:
    return f"approval.{run}.{node}.{decision}"


def signal_msg_id(run: str, name: str) -> str:
    return f"signal.{run}.{name}"


def fire_msg_id(schedule: str, fire_iso: str) -> str:
    return f"sched.{schedule}.{fire_iso}"


def trigger_msg_id(trigger: str, seq: int) -> str:
    return f"trig.{trigger}.{seq}"


def schedule_log_msg_id(schedule: str, fire: str, what: str) -> str:
    return f"log.{schedule}.{fire}.{what}"


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
