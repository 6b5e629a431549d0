"""Secure by default: the embedded stack (as `nbflow run` starts it) requires credentials, keeps
them private, and nats-server enforces each role's permissions — tried with real connections."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from support import check_replay, environ, wait_for
from nbhelpers import write_notebook

from nbflow import stack
from nbflow.client import NbflowError, SyncClient
from nbflow.core.events import make
from nbflow.nats import infra
from nbflow.nats.layout import MSG_ID


def approval_notebook(path):
    return write_notebook(path, [
        "%%task draft\nreport = 'numbers'",
        '%%task publish --approval "Publish?"\npublished = report.upper()',
        "%%task show --wait-signal go\nprint(published, go)",
    ])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded stack in a fresh data dir, found the way users find it (NBFLOW_HOME)."""
    d = tmp_path_factory.mktemp("secure-home")
    # NBFLOW_TASK_ACK_WAIT: the frozen-worker test wants a quick redelivery
    with environ(NBFLOW_HOME=str(d), NBFLOW_TASK_ACK_WAIT="3"):
        try:
            url = stack.ensure_background()
            yield d, url
        finally:
            stack.down(str(d))


@pytest.fixture(scope="module")
def owner(embedded):
    with SyncClient(embedded[1]) as c:
        yield c


@pytest.fixture(scope="module")
def awaiting_run(owner, tmp_path_factory):
    nb = approval_notebook(tmp_path_factory.mktemp("nb") / "secure.ipynb")
    run = owner.submit(str(nb), {})
    wait_for(lambda: owner.status(run).nodes["publish"].state == "awaiting_approval", 120,
             "the run to await approval")
    return run, nb


def _raw(url, **kw):
    async def go():
        nc = await infra.connect(infra.ConnectOptions(url=url, **kw), reconnect=False)
        await nc.close()
    asyncio.run(go())


def test_the_data_dir_and_credentials_are_private(embedded):
    d, _ = embedded
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("credentials.json", "nats-server.conf", "stack.log", "stack.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    users = json.loads((d / "credentials.json").read_text())["users"]
    assert {"engine", "worker", "viewer"} <= set(users)


def test_connecting_without_or_with_wrong_credentials_is_refused(embedded):
    _, url = embedded
    with pytest.raises(infra.ConnectError, match="(?i)authorization violation"):
        _raw(url)
    with pytest.raises(infra.ConnectError, match="(?i)authorization violation"):
        _raw(url, user="worker", password="guessed")


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to act as another OS user")
def test_another_os_user_cannot_read_the_credentials(embedded):
    d, _ = embedded
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "cat", str(d / "credentials.json")], capture_output=True)
    assert r.returncode != 0 and b"password" not in r.stdout
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "ls", str(d)], capture_output=True)
    assert r.returncode != 0


def test_a_worker_cannot_submit_approve_overwrite_or_start(embedded, owner, awaiting_run):
    _, url = embedded
    run, nb = awaiting_run
    with SyncClient(url, user="worker") as w:
        with pytest.raises(infra.PermissionDenied) as e:          # writes a definition
            w.submit(str(nb), {})
        assert e.value.user == "worker" and e.value.roles == ["worker"]
        assert e.value.subject.lower().startswith("$kv.nbflow_defs.")
        assert "permission denied" in str(e.value) and "'worker' (role worker)" in str(e.value)
        with pytest.raises(NbflowError, match="permission denied.*worker"):
            w.approve(run, "publish", True)

        st = owner.status(run)

        async def overwrite_definition():
            kv = await w.aclient.kv(w.aclient.L.defs_bucket)
            await kv.put(st.wf, b'{"evil": true}')
        with pytest.raises(infra.PermissionDenied, match="nbflow_defs"):
            w._call(infra.guarded(w.aclient.nc, overwrite_definition()))

        async def overwrite_snapshot():
            kv = await w.aclient.kv(w.aclient.L.runs_bucket)
            await kv.put(run, b"{}")
        with pytest.raises(infra.PermissionDenied, match="nbflow_runs"):
            w._call(infra.guarded(w.aclient.nc, overwrite_snapshot()))

        async def ask_the_decide_service():
            return await w.aclient.nc.request(w.aclient.L.decide_subject("worker", "approve"),
                                              json.dumps({"run": run, "node": "publish",
                                                          "approved": True}).encode(), timeout=5)
        with pytest.raises(infra.PermissionDenied, match="decide"):
            w._call(infra.guarded(w.aclient.nc, ask_the_decide_service()))

        # workers publish only their tasks' result kinds: RunStarted is refused by nats-server,
        # and a RunStarted sent on a subject workers may use is not a run either
        fake = "fakerun1"
        ev = make("RunStarted", fake, wf=st.wf, params={}, by="worker")

        async def start_directly(kind):
            return await w.aclient.js.publish(w.aclient.L.history_subject(fake, kind),
                                              ev.encode(), headers={MSG_ID: f"start.{fake}"})
        with pytest.raises(infra.PermissionDenied, match="history"):
            w._call(infra.guarded(w.aclient.nc, start_directly("RunStarted")))
        assert w._call(start_directly("TaskStarted")).seq > 0
    wait_for(lambda: _dead_lettered(owner, fake), 60, "the engine to refuse the forged start")
    with pytest.raises(NbflowError, match="no run"):
        owner.status(fake)
    assert owner.status(run).nodes["publish"].state == "awaiting_approval"


def _dead_lettered(c, run) -> bool:
    async def read():
        L, seq = c.aclient.L, 1
        while True:
            try:
                m = await c.aclient.js.get_msg(L.deadletter_stream, seq=seq, next=True)
            except Exception:  # noqa: BLE001 - no more
                return False
            if f'"run":"{run}"' in json.loads(m.data).get("data", ""):
                return True
            seq = m.seq + 1
    return c._call(read())


def _dead_letters_of(c, run) -> list[dict]:
    async def read():
        L, seq, out = c.aclient.L, 1, []
        while True:
            try:
                m = await c.aclient.js.get_msg(L.deadletter_stream, seq=seq, next=True)
            except Exception:  # noqa: BLE001 - no more
                return out
            rec = json.loads(m.data)
            if f'"run":"{run}"' in rec.get("data", ""):
                out.append(rec)
            seq = m.seq + 1
    return c._call(read())


def _forge(w, run, ev, kind, msg_id):
    async def go():
        return await w.aclient.js.publish(w.aclient.L.history_subject(run, kind), ev.encode(),
                                          headers={MSG_ID: msg_id})
    return w._call(infra.guarded(w.aclient.nc, go()))


def test_a_worker_publishes_only_its_result_kinds_and_cannot_block_the_engines_events(
        embedded, owner, tmp_path):
    """A worker-role connection sends RunFinished, TimerFired, RunStarted, CancelRequested,
    ApprovalDecided and SignalSent: on their own subjects nats-server refuses them; on a subject
    workers may use (TaskStarted), with the message id the genuine event would have had, each
    is dead-lettered and removed — and every genuine event still lands: the sleep's timer
    fires, the approval and signal count, the run finishes once."""
    _, url = embedded
    nb = write_notebook(tmp_path / "kinds.ipynb", [
        "%%task nap --sleep 4s\nx = 1",
        '%%task publish --approval "Publish?"\ny = x + 1',
        "%%task show --wait-signal go\nprint(y, go)",
    ])
    with SyncClient(url, user="worker") as w:
        run = owner.submit(str(nb), {})
        wf = owner.history(run)[0]["wf"]
        forged = [
            (make("RunFinished", run, state="failed"), f"finished.{run}"),
            (make("TimerFired", run, timer=f"{run}.sleep.nap", kind="sleep", key="nap"),
             f"timer.{run}.sleep.nap"),
            (make("RunStarted", run, wf=wf, params={"evil": 1}, by="mallory"), f"again.{run}"),
            (make("CancelRequested", run, by="mallory"), f"cancel.{run}"),
            (make("ApprovalDecided", run, node="publish", approved=True, by="mallory"),
             f"approval.{run}.publish"),
            (make("SignalSent", run, name="go", value=666, by="mallory"), f"signal.{run}.go"),
        ]
        for ev, mid in forged:
            with pytest.raises(infra.PermissionDenied, match="history"):
                _forge(w, run, ev, ev.type, mid)
            assert not _forge(w, run, ev, "TaskStarted", mid).duplicate
    wait_for(lambda: len(_dead_letters_of(owner, run)) >= len(forged), 60,
             "the engine to dead-letter every forgery")
    assert {json.loads(d["data"])["type"] for d in _dead_letters_of(owner, run)} == \
        {ev.type for ev, _ in forged}
    # the genuine events were not dropped as duplicates of the forgeries
    wait_for(lambda: owner.status(run).nodes["publish"].state == "awaiting_approval", 120,
             "the sleep's timer to fire and the run to await approval")
    owner.approve(run, "publish", True)
    wait_for(lambda: owner.status(run).nodes["show"].state == "waiting_signal", 120,
             "the run to wait for its signal")
    owner.signal(run, "go", 7)
    st = owner.wait(run, timeout=120)
    assert st.state == "succeeded"
    hist = owner.history(run)
    assert [e["state"] for e in hist if e.type == "RunFinished"] == ["succeeded"]
    assert [e.get("value") for e in hist if e.type == "SignalSent"] == [7]
    assert "mallory" not in json.dumps([e.to_dict() for e in hist])
    assert sum(e.type == "RunStarted" for e in hist) == 1
    check_replay(owner, run)


def test_a_worker_squatting_a_scheduled_starts_message_id_does_not_stop_the_run(
        embedded, owner, tmp_path):
    """Scheduled and triggered runs start with predictable message ids (sched.NAME.FIRE): a
    worker publishing first with that id (on a subject it may use) does not make the start look
    recorded; the run starts anyway."""
    _, url = embedded
    nb = approval_notebook(tmp_path / "squat.ipynb")
    rid, mid = "squatted1", "sched.nightly.2026-12-02T00:00:00Z"
    with SyncClient(url, user="worker") as w:
        ev = make("TaskStarted", rid, key="draft", attempt=1, worker="mallory")
        assert not _forge(w, rid, ev, "TaskStarted", mid).duplicate
    assert owner._call(owner.aclient.submit(str(nb), {}, run_id=rid, msg_id=mid)) == rid
    wait_for(lambda: owner.status(rid).nodes["publish"].state == "awaiting_approval", 120,
             "the squatted run to start and await approval")
    assert [e.type for e in owner.history(rid)].count("RunStarted") == 1
    # the runs console cancels as the signed-in user it authenticated (the delegate role)
    with SyncClient(url) as console:
        console.aclient.delegate = True
        console.cancel(rid, by="ann")
    assert owner.wait(rid, timeout=120).state == "cancelled"
    assert [e["by"] for e in owner.history(rid) if e.type == "CancelRequested"] == ["ann"]


def test_cancel_records_the_authenticated_user_and_a_forged_cancel_neither_cancels_nor_blocks(
        embedded, owner, tmp_path):
    """Cancel goes through the engine's decide service: the CLI, as the stack's owner, cancels;
    the CancelRequested event names the NATS user; a worker's forged cancel (with the id the
    genuine one would have had) changes nothing; --as cannot claim another user; a viewer may
    not cancel."""
    d, url = embedded
    stack.add_user("carol", ["author"])
    nb = approval_notebook(tmp_path / "cancel.ipynb")
    with SyncClient(url, user="carol") as carol, SyncClient(url, user="worker") as w, \
            SyncClient(url, user="viewer") as v:
        run = carol.submit(str(nb), {})
        wait_for(lambda: carol.status(run).nodes["publish"].state == "awaiting_approval", 120,
                 "the run to await approval")
        ev = make("CancelRequested", run, by="mallory")
        with pytest.raises(infra.PermissionDenied, match="history"):
            _forge(w, run, ev, "CancelRequested", f"cancel.{run}")
        assert not _forge(w, run, ev, "TaskStarted", f"cancel.{run}").duplicate
        wait_for(lambda: _dead_letters_of(owner, run), 60, "the forged cancel's dead letter")
        assert carol.status(run).state == "running"
        with pytest.raises(NbflowError, match="permission denied.*viewer"):
            v.cancel(run)
        with pytest.raises(NbflowError, match="cannot claim another identity"):
            carol.cancel(run, by="the-ceo")
        assert carol.status(run).state == "running"
        r = subprocess.run([sys.executable, "-m", "nbflow", "cancel", run], capture_output=True,
                           text=True, env={**os.environ, "NBFLOW_HOME": str(d)}, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        st = carol.wait(run, timeout=120)
        assert st.state == "cancelled"
        cancels = [e for e in carol.history(run) if e.type == "CancelRequested"]
        owner_name = json.loads((d / "credentials.json").read_text())["owner"]
        assert [e["by"] for e in cancels] == [owner_name]
        with pytest.raises(NbflowError, match="already cancelled"):
            carol.cancel(run)
        check_replay(carol, run)


def test_another_namespace_on_the_embedded_stack_is_served_with_the_same_roles(
        embedded, tmp_path):
    """`nbflow run --namespace team2` against the running embedded stack (started for the
    default namespace): the stack starts serving team2 — its users' permissions, streams, an
    engine and workers — and the run succeeds; the roles hold there too, and the namespaces
    stay apart."""
    d, url = embedded
    nb = write_notebook(tmp_path / "team.ipynb", ["%%task a\nx = 20",
                                                  "%%task b\ny = x + 1\nprint('y is', y)"])
    r = subprocess.run([sys.executable, "-m", "nbflow", "run", "--namespace", "team2", str(nb)],
                       env={**os.environ, "NBFLOW_HOME": str(d)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((d / "stack.json").read_text())["namespaces"] == ["", "team2"]
    with SyncClient(url, namespace="team2", user="viewer") as v:
        (only,) = v.runs()
        assert only.state == "succeeded"
        assert v.load_output(only.run, "a", "x") == 20
        with pytest.raises(infra.PermissionDenied):
            v.submit(str(nb), {})
    with SyncClient(url, namespace="team2", user="worker") as w:
        with pytest.raises(infra.PermissionDenied):
            w.submit(str(nb), {})
    with SyncClient(url, user="viewer") as v0:
        assert only.run not in [s.run for s in v0.runs(limit=1000)]


def test_a_viewer_reads_but_cannot_submit_approve_or_signal(embedded, awaiting_run):
    _, url = embedded
    run, nb = awaiting_run
    with SyncClient(url, user="viewer") as v:
        assert v.status(run).nodes["publish"].state == "awaiting_approval"
        assert v.history(run)[0].type == "RunStarted"
        with pytest.raises(infra.PermissionDenied):
            v.submit(str(nb), {})
        with pytest.raises(NbflowError, match="permission denied"):
            v.approve(run, "publish", True)
        with pytest.raises(NbflowError, match="permission denied"):
            v.signal(run, "go", 1)


def test_roles_added_later_author_submits_approver_decides(embedded, tmp_path):
    d, url = embedded
    stack.add_user("alice", ["author"])
    stack.add_user("bob", ["approver"])
    nb = approval_notebook(tmp_path / "roles.ipynb")
    with SyncClient(url, user="alice") as alice, SyncClient(url, user="bob") as bob:
        run = alice.submit(str(nb), {})
        wait_for(lambda: alice.status(run).nodes["publish"].state == "awaiting_approval", 120,
                 "the run to await approval")
        with pytest.raises(NbflowError, match="permission denied.*alice.*role author"):
            alice.approve(run, "publish", True)               # authors do not approve
        with pytest.raises(NbflowError, match="cannot claim another identity"):
            bob.approve(run, "publish", True, by="the-ceo")
        bob.approve(run, "publish", True, comment="ok")
        wait_for(lambda: alice.status(run).nodes["show"].state == "waiting_signal", 120,
                 "the run to wait for its signal")
        alice.signal(run, "go", 7)
        st = alice.wait(run, timeout=120)
        assert st.state == "succeeded"
        assert st.nodes["publish"].approval["by"] == "bob"
        assert alice.load_output(run, "publish", "published") == "NUMBERS"
        sig = [e for e in alice.history(run) if e.type == "SignalSent"]
        assert [(e["name"], e["by"]) for e in sig] == [("go", "alice")]
        # cancel and retry are the author's
        run2 = alice.submit(str(nb), {})
        wait_for(lambda: alice.status(run2).nodes["publish"].state == "awaiting_approval", 120,
                 "the second run to await approval")
        alice.cancel(run2)
        assert alice.wait(run2, timeout=120).state == "cancelled"
        wait_for(lambda: alice.status(run2).state == "cancelled", 60, "the snapshot")
        run3 = alice.retry(run2)
        wait_for(lambda: alice.status(run3).nodes["publish"].state == "awaiting_approval", 120,
                 "the retry to await approval")
        alice.cancel(run3)


def _objects(c, run) -> dict[str, bool]:
    """name -> deleted, for every object of the run in the artifacts store."""
    from nbflow.worker.artifacts import Artifacts

    async def go():
        st = await Artifacts(c.aclient.js, c.aclient.L.artifacts_store).store()
        return {i.name: bool(i.deleted) for i in await st.list(ignore_deletes=False)
                if i.name.startswith(f"{run}/")}
    return c._call(go())


def test_a_frozen_worker_cannot_replace_an_output_downstream_read(owner, tmp_path):
    """Issue 13's reproduction: a worker SIGSTOPped past the ack wait, its task redelivered
    and completed by another worker, downstream reads x; on SIGCONT the late worker finishes
    too — and neither replaces x nor leaves its objects behind."""
    from nbflow.worker.artifacts import written_keys

    nb = write_notebook(tmp_path / "frozen.ipynb", [
        "%%task a\nimport random, time\ntime.sleep(6)\nx = random.random()",
        "%%task b\ny = x",
        "%%task c\nprint(y)",
    ])
    run = owner.submit(str(nb), {})
    started = wait_for(lambda: [e for e in owner.history(run) if e.type == "TaskStarted"], 120,
                       "task a to start")
    pid = int(started[0]["worker"].rsplit("-", 1)[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        st = owner.wait(run, timeout=240)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert st.state == "succeeded"
    hist = owner.history(run)
    assert len([e for e in hist if e.type == "TaskStarted" and e["key"] == "a"]) == 2
    y = owner.load_output(run, "b", "y")                   # what downstream read
    # the late worker wakes, finishes, finds the result recorded and removes what it wrote
    wait_for(lambda: any(_objects(owner, run).values()), 180,
             "the late worker to write and remove its result")
    assert owner.load_output(run, "a", "x") == y
    named = {k for e in hist if e.type in ("TaskSucceeded", "TaskFailed", "TaskSkipped")
             for k in written_keys(e)}
    live = {k for k, deleted in _objects(owner, run).items() if not deleted}
    assert live == named
    assert len([e for e in owner.history(run) if e.type == "TaskSucceeded"]) == 3   # a, b, c


# --- small items: secrets in URLs, bad URLs, odd names -------------------------------------------

def test_credentials_are_redacted_in_every_url_form():
    from click.testing import CliRunner

    from nbflow.cli.main import main as cli

    for url in ("bob:S3CRETPW@127.0.0.1:1", "nats://bob:S3CRETPW@127.0.0.1:1",
                "tls://S3CRETPW@h1:4222,nats://h2:4223", "S3CRETPW@127.0.0.1:1"):
        out = infra.redact(url)
        assert "S3CRETPW" not in out and "bob" not in out and "***@" in out, out
    r = CliRunner().invoke(cli, ["runs", "--nats", "bob:S3CRETPW@127.0.0.1:1"])
    assert r.exit_code == 2 and "S3CRETPW" not in r.output and "***@127.0.0.1:1" in r.output


def test_bad_ports_and_hosts_are_one_clear_error():
    from click.testing import CliRunner

    from nbflow.cli.main import main as cli

    for url in ("nats://127.0.0.1:99999", "nats://127.0.0.1:abc", "nats://::1:4222"):
        with pytest.raises(infra.ConnectError, match="port must be a number"):
            _raw(url)
    with pytest.raises(infra.ConnectError, match="(?i)connect call failed"):
        _raw("nats://[::1]:1")                          # IPv6 in brackets is understood
    r = CliRunner().invoke(cli, ["runs", "--nats", "nats://127.0.0.1:99999"])
    assert r.exit_code == 2 and "port must be a number" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["up", "--port", "99999"])
    assert r.exit_code == 2 and "99999" in r.output


def test_reserved_namespace_names_are_refused():
    from nbflow.nats.layout import Layout

    for ns in ("tasks", "timers", "history", "decide", "Tasks"):
        with pytest.raises(ValueError, match="reserved"):
            Layout(ns)
    Layout("tasks2")                                     # only the exact names


def test_odd_signal_names_are_a_clear_error(owner, awaiting_run):
    run, _ = awaiting_run
    for name in ("a*b", "go>", "two words", "naïve", "a.b", ""):
        with pytest.raises(NbflowError, match="signal name .* is invalid"):
            owner.signal(run, name, 1)


# --- the same roles on your own server: the documented template ----------------------------------

def test_the_cluster_template_enforces_the_same_roles(tmp_path, monkeypatch):
    import secrets

    from support import REPO

    from nbflow.nats.auth import TEMPLATE_USERS, template_conf
    from nbflow.stack import NatsServer, Supervisor

    doc = REPO / "docs" / "nats-roles.conf"
    assert doc.read_text() == template_conf()        # the docs show what the code enforces
    assert (REPO / "deploy" / "nats" / "roles.conf").read_text() == template_conf()  # the recipe
    pw = {u: "pw-" + secrets.token_hex(8) for u in TEMPLATE_USERS}
    for u, p in pw.items():
        monkeypatch.setenv(f"NBFLOW_{u.upper()}_PASSWORD", p)
    store = tmp_path / "nats"
    store.mkdir()
    shutil.copy(doc, store / "nats-roles.conf")
    srv = NatsServer(store, extra_conf='include "nats-roles.conf"').start()

    def creds(u):
        return {"NBFLOW_NATS_USER": u, "NBFLOW_NATS_PASSWORD": pw[u]}
    sup = None
    try:
        with pytest.raises(infra.ConnectError, match="(?i)authorization violation"):
            _raw(srv.url)
        with SyncClient(srv.url, namespace="", user="engine", password=pw["engine"]):
            pass                                          # creates the streams
        sup = Supervisor(srv.url, workers=1, namespace="", log_file=tmp_path / "stack.log",
                         env={"NBFLOW_TASK_ACK_WAIT": "3"},
                         role_env={"engine": creds("engine"), "worker": creds("worker")})
        sup.start().supervise()
        nb = approval_notebook(tmp_path / "nb" / "cluster.ipynb")
        with SyncClient(srv.url, namespace="", user="alice", password=pw["alice"]) as alice, \
                SyncClient(srv.url, namespace="", user="bob", password=pw["bob"]) as bob, \
                SyncClient(srv.url, namespace="", user="worker", password=pw["worker"]) as w, \
                SyncClient(srv.url, namespace="", user="viewer", password=pw["viewer"]) as v:
            run = alice.submit(str(nb), {})
            wait_for(lambda: alice.status(run).nodes["publish"].state == "awaiting_approval",
                     120, "the run to await approval")
            with pytest.raises(NbflowError, match="permission denied.*alice"):
                alice.approve(run, "publish", True)
            with pytest.raises(NbflowError, match="permission denied.*viewer"):
                v.approve(run, "publish", True)
            with pytest.raises(infra.PermissionDenied):
                w.submit(str(nb), {})
            bob.approve(run, "publish", True)
            wait_for(lambda: alice.status(run).nodes["show"].state == "waiting_signal", 120,
                     "the run to wait for its signal")
            alice.signal(run, "go", 1)
            st = alice.wait(run, timeout=120)
            assert st.state == "succeeded" and st.nodes["publish"].approval["by"] == "bob"
            assert v.load_output(run, "publish", "published") == "NUMBERS"
    finally:
        if sup:
            sup.stop()
        srv.stop()


def _on_an_older_store(tmp_path, body):
    """Run ``body(nc, js, url)`` against a server whose history stream an older nbflow created
    (subjects nbflow.history.<run>, without the event kind)."""
    from nats.js.api import StreamConfig

    from nbflow.stack import NatsServer

    srv = NatsServer(tmp_path / "old").start()

    async def go():
        nc = await infra.connect(infra.ConnectOptions(url=srv.url), reconnect=False)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="NBFLOW_HISTORY", subjects=["nbflow.history.*"],
                                             allow_direct=True, duplicate_window=86400))
            await body(nc, js, srv.url)
        finally:
            await nc.close()
    try:
        asyncio.run(go())
    finally:
        srv.stop()


def test_an_engine_updates_a_history_consumer_an_older_version_created(tmp_path):
    """Before history subjects carried the event kind, the engine's durable consumer filtered
    nbflow.history.*: an engine of this version updates it (else it would receive nothing) and
    the stream's subjects, and an event published now reaches it."""
    from nats.js.api import ConsumerConfig

    from nbflow.engine.engine import Engine
    from nbflow.nats.layout import Layout

    async def body(nc, js, url):
        await js.add_consumer("NBFLOW_HISTORY", ConsumerConfig(
            durable_name="engine", filter_subject="nbflow.history.*", ack_wait=5))
        eng = Engine(nc, Layout(""))
        await eng.start()
        L = eng.L
        info = await js.consumer_info(L.history_stream, L.engine_consumer)
        assert info.config.filter_subject == L.history_wildcard
        assert (await js.stream_info(L.history_stream)).config.subjects == [L.history_wildcard]
        ev = make("CancelRequested", "somerun", by="x")
        await js.publish(L.history_subject("somerun", ev.type), ev.encode())
        (m,) = await eng.history_sub.fetch(1, timeout=10)
        assert m.subject == L.history_subject("somerun", "CancelRequested")
        eng.stop()
    _on_an_older_store(tmp_path, body)


def test_runs_an_older_version_recorded_keep_their_history_after_the_upgrade(tmp_path):
    """A store an older nbflow wrote holds each run's events on nbflow.history.<run> (no kind).
    After an engine of this version updated the stream, `history` and `status` of such a run
    still show its events (they predate the upgrade: no role may publish there now)."""
    from nbflow.client import Client
    from nbflow.engine.engine import Engine
    from nbflow.nats.layout import Layout

    async def body(nc, js, url):
        old = [make("CancelRequested", "oldrun", by="ann"),
               make("RunFinished", "oldrun", state="cancelled")]
        for ev in old:
            await js.publish("nbflow.history.oldrun", ev.encode())
        eng = Engine(nc, Layout(""))
        await eng.start()
        c = await Client.connect(url)
        try:
            got = await c.history("oldrun")
            assert [(e.type, e.run) for e in got] == [(e.type, e.run) for e in old]
            new = make("CancelRequested", "newrun", by="bob")
            await js.publish(eng.L.history_subject("newrun", new.type), new.encode())
            assert [e.type for e in await c.history("newrun")] == ["CancelRequested"]
        finally:
            await c.close()
            eng.stop()
    _on_an_older_store(tmp_path, body)
