"""Transient NATS faults never fail or drop a run.

Faults are injected at the NATS boundary (NBFLOW_FAULTS, read by every process): the Nth call
of a kind (kv.get, kv.put, publish, obj.put, ...) made by the engine, a worker, the client or
the scheduler raises a transient error or hangs. A diamond-with-map workflow must still
succeed, each task must run once (counted by the lines it appends to a file) and complete once
(counted in the history), and the history must replay to the engine's stored snapshot.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest

from support import check_replay, success_counts, wait_for
from nbhelpers import write_notebook

from nbflow.client import SyncClient
from nbflow.errors import Conflict, NotFound, Transient
from nbflow.nats import faults
from nbflow.stack import Supervisor

FAST = {"NBFLOW_TASK_ACK_WAIT": "5", "NBFLOW_ENGINE_ACK_WAIT": "5", "NBFLOW_FAULT_HANG_S": "2"}
WORDS = ["x", "yyyy", "zz"]
KEYS = {"top", "per_item#0", "per_item#1", "per_item#2", "left", "right", "join"}


def diamond_map(tmp_path, trail):
    """top -> per_item (--map) -> left, right -> join; every task appends its key to ``trail``."""
    mark = f"open({str(trail)!r}, 'a').write(__nbflow__['key'] + '\\n')"
    return write_notebook(tmp_path / "diamond_map.ipynb", [
        f"%%task top\nitems = [w * 2 for w in words]\n{mark}",
        f"%%task per_item --map w in items\nlength = len(w)\n{mark}",
        f"%%task left\nsmall = [n for n in length if n < 5]\n{mark}",
        f"%%task right\nbig = [n for n in length if n >= 5]\n{mark}",
        f"%%task join\ntotal = sum(small) + sum(big)\nprint('total=' + str(total))\n{mark}",
    ], params='words = ["a"]')


def injected(log_text: str, spec: str) -> int:
    """How many times the stack's processes logged injecting the faults of ``spec``."""
    n = 0
    for f in faults.parse(spec):
        n += sum(1 for line in log_text.splitlines()
                 if "injected fault" in line and f"{f.role or '-'}/{f.op} " in line)
    return n


def check_run(c, run, trail):
    st = c.wait(run, timeout=180)
    assert st.state == "succeeded", [(k, t.state, t.error) for k, t in st.tasks.items()]
    check_replay(c, run)
    assert success_counts(c, run) == {k: 1 for k in KEYS}      # each completion recorded once
    assert Counter(trail.read_text().split()) == {k: 1 for k in KEYS}   # each task ran once
    assert f"total={sum(len(w * 2) for w in WORDS)}" in c.logs(run, "join")


# (who, faults): every call kind each part makes, one transient fault each, at distinct points
MATRIX = [
    ("engine", "engine/kv.get:3:transient,engine/kv.put:4:transient,"
               "engine/publish:5:transient,engine/publish:9:hang"),
    ("worker", "worker/kv.get:1:transient:6,worker/publish:3:transient,"
               "worker/obj.put:2:transient,worker/obj.get:2:hang"),
    ("scheduler", "scheduler/kv.get:1:transient:8,scheduler/kv.put:1:transient,"
                  "scheduler/publish:1:transient,scheduler/stream.get:1:transient"),
    ("client", "client/kv.put:1:transient,client/publish:1:hang,client/stream.get:1:transient,"
               "client/kv.get:2:transient"),
]


@pytest.mark.parametrize("who,spec", MATRIX, ids=[m[0] for m in MATRIX])
def test_transient_fault_at_each_call_site_kind(nats_server, tmp_path, who, spec):
    ns = f"faults-{who}"
    trail = tmp_path / "trail.txt"
    trail.touch()
    nb = diamond_map(tmp_path, trail)
    env = dict(FAST)
    if who != "client":
        env["NBFLOW_FAULTS"] = spec
    log = tmp_path / "stack.log"
    sup = Supervisor(nats_server.url, namespace=ns, workers=2, log_file=log, env=env).start()
    try:
        with SyncClient(nats_server.url, namespace=ns) as c:
            if who == "client":
                faults.configure(spec)
            try:
                if who == "scheduler":
                    run = _start_by_trigger(c, nb, tmp_path)
                else:
                    run = c.submit(str(nb), {"words": WORDS})
                check_run(c, run, trail)
                if who == "client":
                    assert faults.injected() == len(faults.parse(spec))
            finally:
                faults.configure("")
        wait_for(lambda: injected(log.read_text(), spec) >= len(faults.parse(spec)) or
                 who == "client", 20, "the stack to log every injected fault")
    finally:
        sup.stop()


def _start_by_trigger(c, nb, tmp_path) -> str:
    """A run started by the scheduler (inside the engine) from a message on a trigger subject."""
    from nbflow.schedules.api import Schedules

    subject = f"faults.{uuid.uuid4().hex[:6]}"
    api = Schedules(c.aclient)
    c._call(api.trigger_add(str(nb), subject, name="fx", param="words"))

    async def pub():
        await c.aclient.nc.publish(subject, json.dumps(WORDS).encode(),
                                   headers={"Nats-Msg-Id": "fx-1"})
        await c.aclient.nc.flush()
    c._call(pub())
    return wait_for(lambda: next((r.run for r in c.runs() if r.run.startswith("t-")), None),
                    90, "the trigger's run")


def test_check_replay_fails_without_a_snapshot(client, tmp_path):
    """The replay check is real: a finished run whose snapshot is gone fails it."""
    trail = tmp_path / "trail.txt"
    run = client.submit(str(diamond_map(tmp_path, trail)), {"words": WORDS})
    st = client.wait(run, timeout=120)
    assert st.state == "succeeded"
    check_replay(client, run)

    async def drop():
        kv = await client.aclient.kv(client.aclient.L.runs_bucket)
        await kv.purge(run)
    client._call(drop())
    with pytest.raises(AssertionError, match="no snapshot"):
        check_replay(client, run, timeout=1)


def test_errors_are_typed_not_matched(client):
    """The boundary raises nbflow's errors: NotFound for a missing key, Conflict for a lost CAS."""
    async def go():
        kv = await client.aclient.kv(client.aclient.L.signals_bucket)
        with pytest.raises(NotFound):
            await kv.get(f"nope-{uuid.uuid4().hex}")
        key = f"k-{uuid.uuid4().hex[:8]}"
        rev = await kv.create(key, b"1")
        with pytest.raises(Conflict):
            await kv.create(key, b"2")
        with pytest.raises(Conflict):
            await kv.update(key, b"3", last=rev + 5)
    client._call(go())


def test_client_reports_retry_later_when_nats_keeps_failing(client, tmp_path):
    """A client call that keeps failing transiently gives up after bounded retries with a
    Transient error (a clear 'retry later'), never a wrong answer such as 'no run'."""
    faults.configure("client/stream.get:1:transient:50,client/kv.get:1:transient:50")
    try:
        with pytest.raises(Transient, match="retry later|no responders"):
            client.status("zzzzzzzz")
    finally:
        faults.configure("")


def test_a_huge_error_message_fails_the_task_once_with_a_bounded_error(client, tmp_path):
    """A task raising an exception with a 9 MB message: the failure is published (truncated;
    the full text stays in the executed notebook) and the task runs once, not on every
    redelivery."""
    trail = tmp_path / "trail.txt"
    nb = write_notebook(tmp_path / "huge.ipynb", [
        f"%%task boom\nopen({str(trail)!r}, 'a').write('ran\\n')\n"
        "raise ValueError('x' * (9 * 1024 * 1024))",
    ])
    run = client.submit(str(nb), {})
    st = client.wait(run, timeout=180)
    assert st.state == "failed"
    err = st.tasks["boom"].error
    assert err.startswith("ValueError: xxx") and "characters cut" in err and len(err) < 10_000
    assert trail.read_text().split() == ["ran"]                  # executed once
    assert [e.type for e in client.history(run)].count("TaskFailed") == 1
    check_replay(client, run)


def test_a_refused_kv_write_is_permanent_and_names_user_role_and_subject(tmp_path, monkeypatch):
    """nats-server refuses a write the user's role does not allow with an asynchronous error;
    the request itself only times out. The boundary must not take that timeout for a transient
    fault (retried forever): it is a Permission error naming who, which role and what."""
    import asyncio

    from nbflow.errors import Permission
    from nbflow.nats import auth, infra
    from nbflow.nats.calls import Retrying
    from nbflow.nats.kv import KV
    from nbflow.nats.layout import Layout
    from nbflow.stack import NatsServer

    home = tmp_path / "home"
    home.mkdir()
    creds = auth.ensure_credentials(home, "owner")
    L = Layout(f"perm{uuid.uuid4().hex[:4]}")
    srv = NatsServer(tmp_path / "nats", extra_conf=auth.authorization_conf(creds, [L])).start()
    try:
        (home / auth.STACK_FILE).write_text(json.dumps({"url": srv.url}))
        monkeypatch.setenv("NBFLOW_STACK_CREDENTIALS", str(home / auth.CREDENTIALS_FILE))

        def as_user(name):
            return infra.ConnectOptions(url=srv.url, user=name,
                                        password=creds["users"][name]["password"])

        async def go():
            engine = await infra.connect(as_user("engine"))      # the role that creates them
            await infra.ensure(engine.jetstream(), L)
            await engine.close()
            nc = await infra.connect(as_user("worker"))
            try:
                # a generous retry policy: a transient error would be retried 6 times
                kv = await KV.open(nc.jetstream(), L.defs_bucket, role="worker",
                                   retrying=Retrying(6, 0.2, 1.0, budget=120.0))
                with pytest.raises(Permission) as e:
                    await kv.put("somedefinition", b'{"evil": true}')
                assert (await kv.get_or_none("somedefinition")) is None   # reads are allowed
                return e.value
            finally:
                await nc.close()
        err = asyncio.run(go())
        assert not isinstance(err, Transient)
        msg = str(err)
        assert "permission denied" in msg and "'worker' (role worker)" in msg, msg
        assert f"$kv.{L.defs_bucket}.somedefinition" in msg.lower(), msg
        # the server refused the write once: the boundary did not retry it
        refusals = [line for line in srv.log_file.read_text().splitlines()
                    if "violation" in line.lower() and "somedefinition" in line.lower()]
        assert len(refusals) == 1, refusals
    finally:
        srv.stop()


def test_a_bucket_listed_too_early_as_empty_is_asked_again(nats_server):
    """nats-py's KV keys() can report no keys when its watcher reads its pending count after
    the server sent every key but before its callback saw one (CI: `runs()` returned [] once
    with 5 runs stored). An empty answer from a bucket whose stream holds messages is asked
    again; a bucket that is really empty is [] at once."""
    import asyncio

    import nats
    from nats.js.errors import NoKeysError

    from nbflow.nats.kv import KV

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        name = f"keys{uuid.uuid4().hex[:8]}"
        await js.create_key_value(bucket=name)
        kv = await KV.open(js, name)
        calls = {"n": 0}
        real = kv.raw.keys

        async def early(*a, **k):           # the race, on the first listing only
            calls["n"] += 1
            if calls["n"] == 1:
                raise NoKeysError
            return await real(*a, **k)
        kv.raw.keys = early
        assert await kv.keys() == []           # really empty: one listing, no retry
        assert calls["n"] == 1
        calls["n"] = 0
        await kv.put("a", b"1")
        await kv.put("b", b"2")
        assert sorted(await kv.keys()) == ["a", "b"]
        assert calls["n"] == 2
        await js.delete_key_value(name)
        await nc.close()
    asyncio.run(go())
