"""The wire contracts of core/events.py: the task message (engine -> worker) decodes strictly and
by version; message ids are built in one place."""
from __future__ import annotations

import json

import pytest

from nbflow.core import events
from nbflow.core.events import TaskMessage
from nbflow.errors import BadMessage

DISPATCH = {"key": "b#2", "node": "b", "attempt": 3, "queue": "gpu", "wf": "abc123",
            "inputs": {"x": "out/r1/a/x.pkl"}, "timeout": 60.0, "isolation": None,
            "map": {"var": "r", "over": "regions", "index": 2}}


def test_a_dispatched_task_round_trips():
    t = TaskMessage.for_dispatch("r1", {"day": "2026-11-20"}, DISPATCH)
    wire = json.loads(t.encode())
    assert wire["v"] == 2 and wire["run"] == "r1" and wire["params"] == {"day": "2026-11-20"}
    assert "signal" not in wire                      # absent, as the engine always sent it
    back = TaskMessage.decode(t.encode())
    assert back == t and (back.queue, back.attempt, back.map["index"]) == ("gpu", 3, 2)
    # the engine encodes a run's parameters once for all instances of a map: the same message
    once = t.encode(TaskMessage.encode_params(t.params))
    assert json.loads(once) == wire and TaskMessage.decode(once) == t


def test_a_version_1_message_still_decodes():
    # sent by an engine before version 2 (all the run's params, no map element): still run
    old = (b'{"v": 1, "run": "r", "key": "m#1", "node": "m", "attempt": 1, "wf": "w", '
           b'"params": {"items": ["a", "b"]}, "map": {"var": "i", "over": "items", "index": 1}}')
    t = TaskMessage.decode(old)
    assert t.params == {"items": ["a", "b"]} and "value" not in t.map


@pytest.mark.parametrize("body, why", [
    (b"{", "not JSON"),
    (b"[1]", "JSON object"),
    (b'{"run": "r", "key": "a", "node": "a", "attempt": 1, "wf": "w"}', "task message version None"),
    (b'{"v": 3, "run": "r", "key": "a", "node": "a", "attempt": 1, "wf": "w"}', "task message version 3"),
    (b'{"v": true, "run": "r", "key": "a", "node": "a", "attempt": 1, "wf": "w"}', "task message version True"),
    (b'{"v": 1, "run": "r", "key": "a", "node": "a", "wf": "w"}', "missing field 'attempt'"),
    (b'{"v": 1, "run": "r", "key": "a", "node": "a", "attempt": true, "wf": "w"}',
     "'attempt' must be int"),
    (b'{"v": 1, "run": "r", "key": "a", "node": "a", "attempt": 1, "wf": "w", "inputs": []}',
     "'inputs' must be dict"),
])
def test_a_bad_task_message_says_what_is_wrong(body, why):
    with pytest.raises(BadMessage, match=why):
        TaskMessage.decode(body)


def test_message_ids():
    assert events.task_msg_id("r1", "b#2", 3) == "task.r1.b#2.3"
    # a task picked up again after its worker died is started again: the id has the delivery
    assert events.started_msg_id("r1", "a", 1, 1) != events.started_msg_id("r1", "a", 1, 2)
    assert events.done_msg_id("r1", "a", 1) == "done.r1.a.1"
    assert events.fire_msg_id("daily", "2026-11-20T06:00:00Z") == "sched.daily.2026-11-20T06:00:00Z"
