"""Tenants: namespaces on one server never see each other's runs; NATS accounts isolate hard
(tenant A can neither read B's history nor approve B's tasks); approval tokens are unguessable,
single use and expire; a worker's credentials cannot approve."""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

import pytest

from support import check_replay, wait_for
from nbhelpers import write_notebook

from nbflow.client import SyncClient

from nbflow.errors import AlreadyDecided, NbflowError
from nbflow.core.events import make
from nbflow.nats.layout import MSG_ID
from nbflow.stack import NatsServer, Supervisor

FAST = {"NBFLOW_TASK_ACK_WAIT": "3", "NBFLOW_ENGINE_ACK_WAIT": "3"}



def awaiting(c, run, node):
    return wait_for(lambda: c.status(run).nodes[node].state == "awaiting_approval", 90,
                    f"{node} of {run} to await approval")


def approval_notebook(path, timeout: str | None = None):
    opt = f" --approval-timeout {timeout}" if timeout else ""
    return write_notebook(path, [
        "%%task draft\nreport = 'numbers'",
        f'%%task publish --approval "Publish?"{opt}\npublished = report.upper()',
        "%%task show\nprint(published)",
    ])


# --- namespaces ---------------------------------------------------------------------------------

def test_namespaces_never_see_each_others_runs(client, nats_server, tmp_path):
    nb = approval_notebook(tmp_path / "ns.ipynb")
    mine = client.submit(str(nb), {})                          # namespace "itest", with a stack
    awaiting(client, mine, "publish")
    with SyncClient(nats_server.url, namespace="tenant-other") as other:
        theirs = other.submit(str(nb), {})                     # recorded in the other namespace
        assert mine not in [s.run for s in other.runs()]
        for call in (lambda: other.status(mine), lambda: other.history(mine),
                     lambda: other.approve(mine, "publish", True, by="mallory"),
                     lambda: other.cancel(mine), lambda: other.signal(mine, "x", 1)):
            with pytest.raises(NbflowError, match=f"no run '{mine}'"):
                call()
        assert other.history(theirs)[0].type == "RunStarted"
    assert theirs not in [s.run for s in client.runs(limit=1000)]
    with pytest.raises(NbflowError, match=f"no run '{theirs}'"):
        client.status(theirs)
    # nothing the other namespace tried changed this run
    assert client.status(mine).nodes["publish"].state == "awaiting_approval"
    assert not [e for e in client.history(mine) if e.type == "ApprovalDecided"]
    client.approve(mine, "publish", True, by="ann")
    assert client.wait(mine, timeout=90).state == "succeeded"


# --- NATS accounts: hard isolation --------------------------------------------------------------

PW = {u: secrets.token_hex(8) for u in ("a", "aworker", "b")}
ACCOUNTS_CONF = """
accounts {
  TENANT_A: {
    jetstream: enabled
    users: [
      { user: a, password: "%(a)s" }
      # the worker of tenant A may do everything a worker does, but neither write approval
      # records nor ask the engine's decide service (the README's recommended set-up)
      { user: aworker, password: "%(aworker)s",
        permissions: { publish: { deny: ["$KV.nbflow_approvals.>", "nbflow.decide.>"] } } }
    ]
  }
  TENANT_B: {
    jetstream: enabled
    users: [ { user: b, password: "%(b)s" } ]
  }
}
""" % PW


def creds(user):
    return {"NBFLOW_NATS_USER": user, "NBFLOW_NATS_PASSWORD": PW[user]}


@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    """One server, two accounts, one stack per account (both in the default namespace: the
    isolation comes from the accounts, not from name prefixes)."""
    d = tmp_path_factory.mktemp("accounts")
    srv = NatsServer(d / "nats", extra_conf=ACCOUNTS_CONF).start()
    sups = [
        Supervisor(srv.url, workers=0, engines=1, namespace="", env={**FAST, **creds("a")},
                   log_file=d / "a.log"),
        Supervisor(srv.url, workers=1, engines=0, namespace="", env={**FAST, **creds("aworker")},
                   log_file=d / "a.log"),
        Supervisor(srv.url, workers=1, engines=1, namespace="", env={**FAST, **creds("b")},
                   log_file=d / "b.log"),
    ]
    for s in sups:
        s.start().supervise()
    clients = {u: SyncClient(srv.url, namespace="", user=u, password=PW[u])
               for u in ("a", "aworker", "b")}
    nb = approval_notebook(d / "acct.ipynb")
    runs = {"a": clients["a"].submit(str(nb), {}), "b": clients["b"].submit(str(nb), {})}
    awaiting(clients["a"], runs["a"], "publish")
    awaiting(clients["b"], runs["b"], "publish")
    yield clients, runs, srv
    for c in clients.values():
        c.close()
    for s in sups:
        s.stop()
    srv.stop()


def test_accounts_tenant_a_cannot_read_or_approve_b(accounts):
    clients, runs, _ = accounts
    a, b = clients["a"], clients["b"]
    before = [e.to_dict() for e in b.history(runs["b"])]
    assert runs["b"] not in [s.run for s in a.runs()]
    assert [s.run for s in a.runs()] == [runs["a"]]
    for call in (lambda: a.status(runs["b"]), lambda: a.history(runs["b"]),
                 lambda: a.approve(runs["b"], "publish", True, by="mallory"),
                 lambda: a.cancel(runs["b"])):
        with pytest.raises(NbflowError, match=f"no run '{runs['b']}'"):
            call()
    # B's run is untouched, and B's own approval works
    assert [e.to_dict() for e in b.history(runs["b"])] == before
    b.approve(runs["b"], "publish", True)          # recorded as the authenticated user
    st = b.wait(runs["b"], timeout=90)
    assert st.state == "succeeded" and st.nodes["publish"].approval["by"] == "b"
    check_replay(b, runs["b"])


def test_a_worker_user_cannot_approve(accounts):
    clients, runs, _ = accounts
    w, a = clients["aworker"], clients["a"]
    run = runs["a"]
    with pytest.raises(Exception) as e:          # noqa: PT011 - see the xfail below for the type
        w.approve(run, "publish", True)
    assert "Traceback" not in str(e.value)
    st = a.status(run)
    assert st.nodes["publish"].state == "awaiting_approval"
    assert not [ev for ev in a.history(run) if ev.type == "ApprovalDecided"]
    rec = _approval_record(a, f"{run}.publish")
    assert rec["state"] == "pending" and rec.get("token")


def test_a_worker_users_approve_says_permission_denied(accounts):
    clients, runs, _ = accounts
    with pytest.raises(NbflowError, match="(?i)permission") as e:
        clients["aworker"].approve(runs["a"], "publish", True)
    assert not isinstance(e.value, AlreadyDecided)


def test_a_worker_user_cannot_forge_an_approval_on_history(accounts):
    clients, runs, _ = accounts
    w, a = clients["aworker"], clients["a"]
    run = runs["a"]
    ev = make("ApprovalDecided", run, node="publish", approved=True, by="forged")

    async def publish():
        return await w.aclient.js.publish(w.aclient.L.history_subject(run, ev.type), ev.encode(),
                                          headers={MSG_ID: f"forged.{run}"})
    ack = w._call(publish())

    async def still_in_history():
        try:
            await a.aclient.js.get_msg(a.aclient.L.history_stream, ack.seq)
            return True
        except Exception:  # noqa: BLE001 - deleted
            return False
    # the engine removes the forged decision from the history (it is dead-lettered instead)
    wait_for(lambda: not a._call(still_in_history()), 60, "the engine to reject the forgery")
    assert a.status(run).nodes["publish"].state == "awaiting_approval"
    assert not [e for e in a.history(run) if e.type == "ApprovalDecided"]
    check_replay(a, run)


def test_a_forged_decision_with_the_genuine_message_id_neither_decides_nor_blocks(
        tmp_path, accounts):
    """The reproduced attack (issue 13): the worker user — denied on the approvals bucket, still
    allowed to publish history — publishes ApprovalDecided with the id the genuine decision
    used to have (approval.RUN.TASK). Then the real approval via `nbflow approve` succeeds and
    the run continues."""
    from click.testing import CliRunner

    from nbflow.cli.main import main as cli

    clients, _, srv = accounts
    w, a = clients["aworker"], clients["a"]
    run = a.submit(str(approval_notebook(tmp_path / "forge.ipynb")), {})
    awaiting(a, run, "publish")
    ev = make("ApprovalDecided", run, node="publish", approved=True, by="ceo@corp")

    async def publish():
        return await w.aclient.js.publish(w.aclient.L.history_subject(run, ev.type), ev.encode(),
                                          headers={MSG_ID: f"approval.{run}.publish"})
    ack = w._call(publish())
    assert not ack.duplicate
    wait_for(lambda: [d for d in _dead_letters(a) if f'"run":"{run}"' in d.get("data", "")],
             60, "the engine to dead-letter the forgery")
    assert a.status(run).nodes["publish"].state == "awaiting_approval"
    r = CliRunner().invoke(cli, ["approve", run, "publish", "--nats", srv.url,
                                 "--namespace", ""],
                           env={"NBFLOW_NATS_USER": "a", "NBFLOW_NATS_PASSWORD": PW["a"]})
    assert r.exit_code == 0, r.output
    st = a.wait(run, timeout=90)
    assert st.state == "succeeded"
    assert st.nodes["publish"].approval["by"] == "a"
    decided = [e for e in a.history(run) if e.type == "ApprovalDecided"]
    assert len(decided) == 1 and decided[0]["by"] == "a"
    check_replay(a, run)


def _dead_letters(c) -> list[dict]:
    async def read():
        out, seq = [], 1
        L = c.aclient.L
        while True:
            try:
                m = await c.aclient.js.get_msg(L.deadletter_stream, seq=seq, next=True)
            except Exception:  # noqa: BLE001 - no more
                return out
            out.append(json.loads(m.data))
            seq = m.seq + 1
    return c._call(read())


def test_the_recorded_decider_is_the_authenticated_user(tmp_path, accounts):
    """Decisions go through the engine's decide service on decide.<user>.approve: the decider
    is the authenticated NATS user, and --as cannot claim anyone else."""
    clients, _, srv = accounts
    a = clients["a"]
    nb = approval_notebook(tmp_path / "who.ipynb")
    run = a.submit(str(nb), {})
    awaiting(a, run, "publish")
    with pytest.raises(NbflowError, match="cannot claim another identity"):
        a.approve(run, "publish", True, by="the-ceo")
    assert a.status(run).nodes["publish"].state == "awaiting_approval"
    a.approve(run, "publish", True)
    decided = next(e for e in a.history(run) if e.type == "ApprovalDecided")
    assert decided["by"] == "a"
    assert a.wait(run, timeout=90).nodes["publish"].approval["by"] == "a"


def _approval_record(c, key):
    """The approval's KV record, or None while the engine has not written it (the client's
    status folds history itself, so it can say 'awaiting approval' a moment before)."""
    async def get():
        kv = await c.aclient.kv(c.aclient.L.approvals_bucket)
        entry = await kv.get_or_none(key)
        return None if entry is None else json.loads(entry.value)
    return c._call(get())


# --- approval tokens ----------------------------------------------------------------------------

def test_approval_tokens_are_unguessable_single_use_and_record_the_decider(client, tmp_path):
    nb = approval_notebook(tmp_path / "tok.ipynb")
    runs = [client.submit(str(nb), {}) for _ in range(2)]
    tokens = []
    for run in runs:
        awaiting(client, run, "publish")
        rec = wait_for(lambda: _approval_record(client, f"{run}.publish"), 30, "the record")
        assert rec["state"] == "pending"
        raw = base64.urlsafe_b64decode(rec["token"] + "=" * (-len(rec["token"]) % 4))
        assert len(raw) * 8 >= 128
        tokens.append(rec["token"])
    assert tokens[0] != tokens[1]
    run = runs[0]
    client.approve(run, "publish", True, by="ann", comment="ok")
    rec = _approval_record(client, f"{run}.publish")
    assert rec["state"] == "approved" and rec["by"] == "ann" and "token" not in rec  # consumed
    with pytest.raises(AlreadyDecided, match="already approved by ann"):
        client.approve(run, "publish", False, by="bob")
    assert client.wait(run, timeout=90).state == "succeeded"
    decided = [e for e in client.history(run) if e.type == "ApprovalDecided"]
    assert len(decided) == 1 and decided[0]["by"] == "ann" and decided[0]["comment"] == "ok"
    client.approve(runs[1], "publish", False, by="carol")
    assert client.wait(runs[1], timeout=90).state == "rejected"


def test_an_expired_approval_cannot_be_decided(client, tmp_path):
    nb = approval_notebook(tmp_path / "exp.ipynb", timeout="1s")
    run = client.submit(str(nb), {})
    st = client.wait(run, timeout=90)
    assert st.state == "rejected"
    assert st.nodes["publish"].approval["reason"] == "timeout"
    before = [e.to_dict() for e in client.history(run)]
    with pytest.raises(AlreadyDecided, match="already rejected by timeout"):
        client.approve(run, "publish", True, by="late-larry")
    assert [e.to_dict() for e in client.history(run)] == before
    check_replay(client, run)


def test_an_expired_approvals_record_is_no_longer_pending(client, tmp_path):
    nb = approval_notebook(tmp_path / "exp2.ipynb", timeout="1s")
    run = client.submit(str(nb), {})
    assert client.wait(run, timeout=90).state == "rejected"
    # the client sees the timeout in history first; the engine closes the record as it applies it
    rec = wait_for(lambda: (r := _approval_record(client, f"{run}.publish")) and
                   r["state"] != "pending" and r, 30, "the engine to close the approval record")
    assert rec["state"] == "rejected" and rec["by"] == "timeout" and "token" not in rec
