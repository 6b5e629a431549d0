"""Event triggers: a message on a subject starts one run with its body as a parameter; the same
Nats-Msg-Id published twice starts one run; a validation hook can refuse a message."""
from __future__ import annotations

import json
import uuid

from click.testing import CliRunner

from _sched_helpers import SCHED, private_stack, until
from nbflow.schedules.cron import trigger_run_id

EVENT = str(SCHED / "event.ipynb")


def _publish(s, subject: str, body: dict, msg_id: str) -> None:
    async def go():
        nc = s.sc.aclient.nc
        await nc.publish(subject, json.dumps(body).encode(), headers={"Nats-Msg-Id": msg_id})
        await nc.flush()
    s.run(go())


def _stream_msgs(s) -> int:
    async def go():
        return (await s.js.stream_info(s.L.triggers_stream)).state.messages
    return s.run(go())


def _settled(s, name: str) -> bool:
    ci = s.consumer(s.L.triggers_stream, s.L.trigger_consumer(name))
    return ci is not None and ci.num_pending == 0 and ci.num_ack_pending == 0


def test_duplicate_msg_id_starts_one_run(nats_server, tmp_path):
    subject = f"orders.{uuid.uuid4().hex[:6]}.created"
    with private_stack(nats_server, tmp_path) as (s, sup, ns):
        d = s.trigger_add(EVENT, subject, name="orders", param="payload")
        assert d["subject"] == subject
        _publish(s, subject, {"order": 1}, "order-1")
        _publish(s, subject, {"order": 1}, "order-1")        # a re-publish: same msg id
        _publish(s, subject, {"order": 2}, "order-2")
        until(lambda: len(s.starts("trigger:orders#")) >= 2, 20, "two trigger runs")
        until(lambda: _settled(s, "orders"), 20, "every message handled")
        assert _stream_msgs(s) == 2                            # the server dropped the duplicate
        evs = sorted(s.starts("trigger:orders#"), key=lambda e: e["params"]["payload"]["order"])
        assert [e["params"]["payload"] for e in evs] == [{"order": 1}, {"order": 2}]
        assert len({e.run for e in evs}) == 2
        for e in evs:
            seq = int(e["schedule"].rpartition("#")[2])
            assert e.run == trigger_run_id("orders", seq)
        s.trigger_rm("orders")
        assert s.trigger_list() == []


def test_validation_hook_refuses_before_a_run(nats_server, tmp_path):
    subject = f"orders.{uuid.uuid4().hex[:6]}.created"
    validate = f"validate.{uuid.uuid4().hex[:6]}"
    with private_stack(nats_server, tmp_path) as (s, sup, ns):
        async def answer(msg):
            body = json.loads(msg.data)
            ok = body.get("amount", 0) > 0
            await msg.respond(json.dumps({"ok": ok, "reason": None if ok else
                                          "amount must be positive"}).encode())
        s.run(s.sc.aclient.nc.subscribe(validate, cb=answer))
        s.trigger_add(EVENT, subject, name="checked", param="payload", validate=validate)
        _publish(s, subject, {"amount": -5}, "bad-1")
        _publish(s, subject, {"amount": 10}, "good-1")
        until(lambda: _settled(s, "checked") and len(s.starts("trigger:checked#")) == 1, 20,
              "both messages handled")
        (ev,) = s.starts("trigger:checked#")
        assert ev["params"]["payload"] == {"amount": 10}
        refused = [e for e in s.log("checked") if e["type"] == "refused"]
        assert len(refused) == 1 and refused[0]["reason"] == "amount must be positive"
        assert not s.run(s.sc.aclient.has_run(refused[0]["run"]))
        s.trigger_rm("checked")


def test_trigger_cli_and_refusals(nats_server):
    from nbflow.cli.main import main

    ns = ["--nats", nats_server.url, "--namespace", "trig-cli"]
    subject = f"cli.{uuid.uuid4().hex[:6]}.events"
    run = CliRunner().invoke
    r = run(main, ["trigger", "add", EVENT, "--subject", subject, "--param-from-json", "payload",
                   "--name", "cli-trig", *ns])
    assert r.exit_code == 0, r.output
    r = run(main, ["trigger", "list", *ns])
    assert "cli-trig" in r.output and subject in r.output
    r = run(main, ["trigger", "add", EVENT, "--subject", "x.y", "--param-from-json", "nope", *ns])
    assert r.exit_code == 2 and "no parameter 'nope'" in r.output
    r = run(main, ["trigger", "add", EVENT, "--subject", "nbflow.history.x", *ns])
    assert r.exit_code == 2 and "invalid" in r.output
    assert run(main, ["trigger", "rm", "cli-trig", *ns]).exit_code == 0
    assert "no triggers" in run(main, ["trigger", "list", *ns]).output
