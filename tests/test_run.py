"""A notebook goes in, a run comes out, the history proves it: the engine end to end on a real
nats-server with real papermill workers."""
from __future__ import annotations

import pytest

from support import DATA, finish, success_counts
from nbhelpers import write_notebook

from nbflow.errors import AlreadyDecided, NbflowError


def test_linear_chain(client):
    run = client.submit(str(DATA / "chain.ipynb"), {})
    st = finish(client, run)
    assert st.state == "succeeded"
    assert [st.nodes[t].state for t in ("one", "two", "three", "four")] == ["succeeded"] * 4
    assert success_counts(client, run) == {"one": 1, "two": 1, "three": 1, "four": 1}
    assert "6.28" in client.logs(run, "four")


def test_diamond_joins_and_passes_values(client):
    run = client.submit(str(DATA / "diamond.ipynb"), {"n": 6})
    st = finish(client, run)
    assert st.state == "succeeded"
    assert client.load_output(run, "b", "evens") == [0, 2, 4]
    assert client.load_output(run, "c", "odds") == [1, 3, 5]
    assert "-3" in client.logs(run, "d")            # sum(evens) - sum(odds), printed
    # the join ran after both branches
    t = st.tasks
    assert t["d"].started >= max(t["b"].finished, t["c"].finished)


def test_map_fans_out_and_in_in_element_order(client, tmp_path):
    nb = write_notebook(tmp_path / "fan.ipynb", [
        "%%task listing\nitems = [w * 2 for w in words]",
        "%%task per_item --map w in items\nlength = len(w)",
        "%%task total\nsummary = list(length)\nprint(summary)",
        "%%task report\nprint(summary)",
    ], params='words = ["a", "bb", "ccc"]')
    run = client.submit(str(nb), {"words": ["x", "yyyy", "zz", "q"]})
    st = finish(client, run)
    assert st.state == "succeeded", st.error
    assert st.nodes["per_item"].count == 4
    assert client.load_output(run, "per_item", "length") == [2, 8, 4, 2]
    assert client.load_output(run, "total", "summary") == [2, 8, 4, 2]
    assert set(success_counts(client, run)) == {"listing", "per_item#0", "per_item#1",
                                                "per_item#2", "per_item#3", "total", "report"}


def test_map_instances_get_the_run_element_and_the_params_their_code_reads(client, tmp_path):
    # a task message carries only the parameters a task reads, and a map instance its element;
    # a setup cell's function reading a parameter counts as reading it
    nb = write_notebook(tmp_path / "reads.ipynb", [
        "def how_many():\n    return len(regions)",
        "%%task per --map r in regions\nlabel = f'{r}:{scale}:{how_many()}'",
        "%%task doubled --map r in regions\ntwice = r * 2",
        "%%task solo\nprint(('solo', scale))",
        "%%task gather\nprint(list(label), list(twice))",
    ], params='regions = ["a", "b"]\nscale = 1')
    run = client.submit(str(nb), {"regions": ["x", "y", "z"], "scale": 7})
    st = finish(client, run)
    assert st.state == "succeeded", st.error
    assert client.load_output(run, "per", "label") == ["x:7:3", "y:7:3", "z:7:3"]
    assert client.load_output(run, "doubled", "twice") == ["xx", "yy", "zz"]
    assert "('solo', 7)" in client.logs(run, "solo")


def test_when_skips_and_skip_propagates(client):
    run = client.submit(str(DATA / "conditions.ipynb"), {"threshold": 100})
    st = finish(client, run)
    assert st.state == "succeeded"
    assert st.nodes["alert"].state == "skipped"
    assert st.nodes["ok"].state == "succeeded"


def test_skip_propagates_to_what_only_it_feeds(client, tmp_path):
    nb = write_notebook(tmp_path / "skip.ipynb", [
        "%%task gate --when 'flag'\nx = 1",
        "%%task after_gate\ny = x + 1",
        "%%task independent\nz = 3",
    ], params="flag = False")
    st = finish(client, client.submit(str(nb), {}))
    assert st.state == "succeeded"
    assert (st.nodes["gate"].state, st.nodes["after_gate"].state,
            st.nodes["independent"].state) == ("skipped", "skipped", "succeeded")


def test_parameters_reach_every_task(client, tmp_path):
    nb = write_notebook(tmp_path / "params.ipynb", [
        "%%task a\nprint((day, n))",
        "%%task b\nprint((day, n * 2))",
    ], params='day = "2026-11-20"\nn = 1')
    run = client.submit(str(nb), {"day": "2026-12-24", "n": 5})
    finish(client, run)
    assert "('2026-12-24', 5)" in client.logs(run, "a")
    assert "('2026-12-24', 10)" in client.logs(run, "b")
    with pytest.raises(NbflowError, match="unknown parameter 'nope'"):
        client.submit(str(nb), {"nope": 1})


def test_retries_then_success(client, tmp_path):
    # the counter lives outside the notebook's folder: a task's relative writes land in its own
    # copy of the run's bundle (see the README on bundles), so each attempt starts afresh
    counter = tmp_path / "state" / "attempts.txt"
    counter.parent.mkdir()
    nb = write_notebook(tmp_path / "nb" / "flaky.ipynb", [
        f"import pathlib\ncounter = pathlib.Path({str(counter)!r})",
        "%%task flaky --retries 3 --retry-delay 1s\n"
        "n = int(counter.read_text()) + 1 if counter.exists() else 1\n"
        "counter.write_text(str(n))\n"
        "if n < 3:\n    raise RuntimeError(f'flaky failure {n}')\n"
        "result = n",
        "%%task show\nprint('result', result)",
    ])
    run = client.submit(str(nb), {})
    st = finish(client, run)
    assert st.state == "succeeded"
    assert st.tasks["flaky"].attempt == 3
    assert client.load_output(run, "flaky", "result") == 3
    fails = [e for e in client.history(run) if e.type == "TaskFailed"]
    assert [e["attempt"] for e in fails] == [1, 2]
    # backoff went through durable timers, not a sleeping process
    assert [e["kind"] for e in client.history(run) if e.type == "TimerFired"] == ["retry"] * 2


def test_retries_exhausted_fails_with_traceback_and_cell(client, tmp_path):
    nb = write_notebook(tmp_path / "broken.ipynb", [
        "%%task fine\nx = 1",
        "%%task broken --retries 1\ny = x / 0",
        "%%task never\nz = y",
    ])
    st = finish(client, client.submit(str(nb), {}))
    assert st.state == "failed"
    assert st.tasks["broken"].attempt == 2
    assert st.nodes["never"].state == "pending"
    assert "ZeroDivisionError" in st.error["error"]
    assert "y = x / 0" in st.error["cell"]
    assert "ZeroDivisionError" in st.error["traceback"]


def test_timeout_kills_the_attempt(client, tmp_path):
    nb = write_notebook(tmp_path / "slow.ipynb", [
        "%%task slow --timeout 2s\nimport time\ntime.sleep(120)\nx = 1",
    ])
    st = finish(client, client.submit(str(nb), {}))
    assert st.state == "failed"
    assert st.tasks["slow"].reason == "timeout"
    assert "timeout" in st.error["error"].lower()


def test_cancel_stops_running_and_queued_tasks(client, tmp_path):
    nb = write_notebook(tmp_path / "long.ipynb", [
        "%%task long\nimport time\ntime.sleep(120)\nx = 1",
        "%%task later\ny = x",
    ])
    run = client.submit(str(nb), {})
    for _, st in client_watch_until(client, run, lambda s: s.tasks.get("long") and
                                    s.tasks["long"].state == "running"):
        pass
    client.cancel(run)
    st = finish(client, run)
    assert st.state == "cancelled"
    assert st.nodes["later"].state == "cancelled"
    assert "later" not in st.tasks                     # never started
    with pytest.raises(NbflowError, match="already cancelled"):
        client.cancel(run)


def client_watch_until(client, run, cond, timeout=60.0):
    """Yield nothing; return once cond(state) holds (an awaited event, not a sleep)."""
    import asyncio

    async def go():
        async for _, st in client.aclient.watch(run):
            if cond(st):
                return st
    client._call(asyncio.wait_for(go(), timeout))
    return []


def test_retry_reuses_what_succeeded(client, tmp_path):
    flag = tmp_path / "fixed.txt"     # outside the notebook's folder (its bundle is fingerprinted)
    nb = write_notebook(tmp_path / "project" / "retry.ipynb", [
        "%%task expensive\nvalue = 41",
        f"%%task fragile\nimport os\nassert os.path.exists({str(flag)!r}), 'input missing'\n"
        "answer = value + 1",
        "%%task show\nprint(answer)",
    ])
    run = client.submit(str(nb), {})
    assert finish(client, run).state == "failed"
    flag.write_text("ok")
    new = client.retry(run)
    st = finish(client, new)
    assert st.state == "succeeded" and st.retry_of == run
    assert st.tasks["expensive"].reused
    assert success_counts(client, new) == {"fragile": 1, "show": 1}  # expensive: not again
    assert client.load_output(new, "fragile", "answer") == 42


def test_approval_through_the_client(client, tmp_path):
    nb = write_notebook(tmp_path / "approve.ipynb", [
        "%%task draft\nreport = 'numbers'",
        '%%task publish --approval "Publish?"\npublished = report.upper()',
        "%%task show\nprint(published)",
    ])
    run = client.submit(str(nb), {})
    client_watch_until(client, run, lambda s: s.nodes["publish"].state == "awaiting_approval")
    with pytest.raises(NbflowError, match="not awaiting approval"):
        client.approve(run, "draft", True, by="ann")
    client.approve(run, "publish", True, by="ann", comment="looks right")
    with pytest.raises(AlreadyDecided, match="already approved by ann"):
        client.approve(run, "publish", False, by="bob")
    st = finish(client, run)
    assert st.state == "succeeded"
    assert st.nodes["publish"].approval["by"] == "ann"
    assert client.load_output(run, "publish", "published") == "NUMBERS"
    decided = [e for e in client.history(run) if e.type == "ApprovalDecided"]
    assert len(decided) == 1 and decided[0]["comment"] == "looks right"


def test_rejection_skips_dependents_and_rejects_run(client, tmp_path):
    nb = write_notebook(tmp_path / "reject.ipynb", [
        '%%task gate --approval "Go?"',
        "%%task after --after gate\nx = 1",
        "%%task other\ny = 2",
    ])
    run = client.submit(str(nb), {})
    client_watch_until(client, run, lambda s: s.nodes["gate"].state == "awaiting_approval")
    client.approve(run, "gate", False, by="carol", comment="not today")
    st = finish(client, run)
    assert st.state == "rejected"
    assert st.nodes["gate"].state == "rejected"
    assert st.nodes["after"].state == "skipped"
    assert st.nodes["other"].state == "succeeded"


def test_signal_through_the_client(client, tmp_path):
    nb = write_notebook(tmp_path / "signal.ipynb", [
        "%%task ask\nquestion = 'ship?'",
        "%%task act --wait-signal answer\ndecision = (question, answer)",
        "%%task show\nprint(decision)",
    ])
    run = client.submit(str(nb), {})
    client_watch_until(client, run, lambda s: s.nodes["act"].state == "waiting_signal")
    client.signal(run, "answer", {"go": True})
    st = finish(client, run)
    assert st.state == "succeeded"
    assert client.load_output(run, "act", "decision") == ("ship?", {"go": True})
    with pytest.raises(NbflowError, match="already succeeded"):
        client.signal(run, "answer", 1)


def test_unpicklable_output_names_variable_and_task(client, tmp_path):
    nb = write_notebook(tmp_path / "unpick.ipynb", [
        "%%task make\nimport threading\nlock = threading.Lock()",
        "%%task use\nprint(lock)",
    ])
    st = finish(client, client.submit(str(nb), {}))
    assert st.state == "failed"
    assert "'lock'" in st.error["error"] and "'make'" in st.error["error"]


def test_large_output_travels_through_the_object_store(client, tmp_path):
    nb = write_notebook(tmp_path / "big.ipynb", [
        "%%task produce\nblob = bytes(range(256)) * (300 * 1024 * 1024 // 256)",
        "%%task consume\nsize = len(blob)\nchecksum = sum(blob[::4096])",
        "%%task show\nprint(size, checksum)",
    ])
    run = client.submit(str(nb), {})
    st = finish(client, run, timeout=300)
    assert st.state == "succeeded", st.error
    assert client.load_output(run, "consume", "size") == 300 * 1024 * 1024


def test_relative_paths_and_local_modules_work_as_in_jupyter(client, tmp_path):
    (tmp_path / "helpers_mod.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "input.txt").write_text("21")
    nb = write_notebook(tmp_path / "local.ipynb", [
        "from helpers_mod import double",
        "%%task read\nvalue = double(int(open('input.txt').read()))",
        "%%task show\nprint(value)",
    ])
    run = client.submit(str(nb), {})
    assert finish(client, run).state == "succeeded"
    assert client.load_output(run, "read", "value") == 42


def test_unknown_run_is_a_clear_error(client):
    with pytest.raises(NbflowError, match="no run 'zzzzzzzz'"):
        client.status("zzzzzzzz")


def test_output_over_the_size_limit_fails_clearly(nats_server, tmp_path):
    from nbflow.client import SyncClient
    from nbflow.stack import Supervisor

    sup = Supervisor(nats_server.url, workers=1, namespace="limits",
                     env={"NBFLOW_MAX_OUTPUT_MB": "1"}, log_file=tmp_path / "log").start()
    try:
        with SyncClient(nats_server.url, namespace="limits") as c:
            nb = write_notebook(tmp_path / "huge.ipynb", [
                "%%task produce --retries 2\nblob = b'x' * (3 * 1024 * 1024)",
                "%%task consume\nprint(len(blob))",
            ])
            st = finish(c, c.submit(str(nb), {}))
            assert st.state == "failed"
            err = st.error["error"]
            assert "'blob'" in err and "'produce'" in err and "NBFLOW_MAX_OUTPUT_MB" in err
            assert st.tasks["produce"].attempt == 1       # retrying would not shrink it
    finally:
        sup.stop()


def test_cancel_removes_queued_tasks_from_the_work_queue(client, tmp_path):
    nb = write_notebook(tmp_path / "wide.ipynb", [
        f"%%task t{i}\nimport time\ntime.sleep(120)\nx{i} = 1" for i in range(4)])
    run = client.submit(str(nb), {})
    # two workers: two tasks run, two wait in the queue
    client_watch_until(client, run, lambda s: sum(t.state == "running"
                                                  for t in s.tasks.values()) == 2)
    client.cancel(run)
    st = finish(client, run)
    assert st.state == "cancelled"
    started = {e["key"] for e in client.history(run) if e.type == "TaskStarted"}
    assert len(started) == 2                       # the queued two never started
    assert all(t.state == "cancelled" for t in st.tasks.values())
    # and the workers are free again: a new run goes through
    assert finish(client, client.submit(str(DATA / "chain.ipynb"), {})).state == "succeeded"


def test_a_decision_recorded_but_never_published_is_completed_by_the_next_approve(client,
                                                                                   tmp_path):
    """The decider (the engine's decide service) died between taking the approval (KV
    compare-and-set, with its fresh decision id) and publishing it."""
    import asyncio
    import json as _json

    nb = write_notebook(tmp_path / "half.ipynb", ['%%task gate --approval "Go?"',
                                                   "%%task after --after gate\nx = 1"])
    run = client.submit(str(nb), {})
    client_watch_until(client, run, lambda s: s.nodes["gate"].state == "awaiting_approval")

    async def take_it_and_die():
        kv = await client.aclient.kv(client.aclient.L.approvals_bucket)
        for _ in range(200):       # the engine writes the request right after the snapshot
            try:
                e = await kv.get(f"{run}.gate")
                break
            except Exception:  # noqa: BLE001 - not written yet
                await asyncio.sleep(0.05)
        rec = {**_json.loads(e.value), "state": "approved", "by": "ghost", "comment": "",
               "decision": "d1ed"}
        rec.pop("token")
        await kv.update(f"{run}.gate", _json.dumps(rec).encode(), last=e.revision)
    client._call(take_it_and_die())
    with pytest.raises(AlreadyDecided, match="already approved by ghost"):
        client.approve(run, "gate", False, by="eve")
    st = finish(client, run)
    assert st.state == "succeeded" and st.nodes["gate"].approval["by"] == "ghost"
    assert len([e for e in client.history(run) if e.type == "ApprovalDecided"]) == 1
