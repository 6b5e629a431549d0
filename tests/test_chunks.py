"""--map chunks: a worker takes several instances of a map node at once and runs them one after
another in one kernel (setup cells once per chunk), yet each instance stays its own task: its
own events, executed notebook, logs, retry — and a worker killed mid-chunk loses no instance and
records none twice. Real nats-server, engine and worker processes; side effects are counted in
files the instances write."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from support import check_replay, success_counts, wait_for
from nbhelpers import write_notebook

from nbflow.client import SyncClient
from nbflow.stack import Supervisor

FAST = {"NBFLOW_TASK_ACK_WAIT": "3", "NBFLOW_ENGINE_ACK_WAIT": "3"}
N = 12


@pytest.fixture
def one_worker(nats_server, tmp_path):
    started = []

    def make(namespace):
        sup = Supervisor(nats_server.url, namespace=namespace, workers=1,
                         log_file=tmp_path / "stack.log", env=FAST).start().supervise()
        started.append(sup)
        return sup
    yield make
    for s in started:
        s.stop()


def _files(d) -> dict[str, int]:
    """{name: times written} of the marker files in ``d``."""
    return {f: len(open(os.path.join(d, f)).read()) for f in os.listdir(d)}


def test_instances_of_a_chunk_share_the_setup_but_nothing_else(nats_server, one_worker,
                                                               tmp_path):
    one_worker("chunks-setup")
    setups, writes = tmp_path / "setups", tmp_path / "writes"
    setups.mkdir()
    writes.mkdir()
    nb = write_notebook(tmp_path / "chunks.ipynb", [
        # a setup cell: it writes one marker per run of it
        f"import os, uuid\nopen(os.path.join({str(setups)!r}, uuid.uuid4().hex), 'w').write('x')",
        "%%task per --map r in regions\n"
        "saw = 'leftover' in globals()       # a name an earlier instance made\n"
        "leftover = r\n"
        f"open(os.path.join({str(writes)!r}, str(r)), 'a').write('x')\n"
        "print('instance', r)",
        # an instance skipped by its --when leaves nothing behind either
        "%%task odd --map r in regions --when 'r % 2'\nsaw_odd = 'leftover_odd' in globals()\n"
        "leftover_odd = r",
        "%%task gather\nprint('saw', sorted(set(saw)))\n"
        "print('odd', [s for s in saw_odd if s is not None])",
    ], params=f"regions = {list(range(N))!r}")
    with SyncClient(nats_server.url, namespace="chunks-setup") as c:
        run = c.submit(str(nb), {})
        st = c.wait(run, timeout=180)
        check_replay(c, run)
        assert st.state == "succeeded", st.error
        assert success_counts(c, run) == {**{f"per#{i}": 1 for i in range(N)},
                                          **{f"odd#{i}": 1 for i in range(1, N, 2)},
                                          "gather": 1}
        assert {k for k, t in st.tasks.items() if t.state == "skipped"} == \
            {f"odd#{i}" for i in range(0, N, 2)}
        assert _files(writes) == {str(i): 1 for i in range(N)}       # each instance once
        # setup ran once per chunk, not once per task run (2 N + 1 of them)
        assert len(os.listdir(setups)) < 2 * N + 1
        text = c.logs(run, "gather")
        assert "saw [False]" in text                    # no instance saw another's names
        assert f"odd {[False] * (N // 2)}" in text
        # each instance has its own executed notebook: its logs are its own
        for i in (0, 5, N - 1):
            printed = re.findall(r"instance (\d+)", c.logs(run, f"per#{i}"))
            assert printed == [str(i)]


def test_a_failed_instance_of_a_chunk_retries_alone(nats_server, one_worker, tmp_path):
    one_worker("chunks-retry")
    marker = tmp_path / "failed-once"
    nb = write_notebook(tmp_path / "retry.ipynb", [
        "%%task per --map r in regions --retries 1\n"
        "import os\n"
        f"if r == 3 and not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').write('x')\n"
        "    raise ValueError('first attempt of 3 fails')\n"
        "out = r * 10",
        "%%task gather\nprint('got', list(out))",
    ], params=f"regions = {list(range(8))!r}")
    with SyncClient(nats_server.url, namespace="chunks-retry") as c:
        run = c.submit(str(nb), {})
        st = c.wait(run, timeout=180)
        check_replay(c, run)
        assert st.state == "succeeded", st.error
        failed = [e["key"] for e in c.history(run) if e.type == "TaskFailed"]
        assert failed == ["per#3"]
        assert {k: t.attempt for k, t in st.tasks.items() if k.startswith("per#")} == \
            {f"per#{i}": (2 if i == 3 else 1) for i in range(8)}
        assert f"got {[i * 10 for i in range(8)]}" in c.logs(run, "gather")
        assert "ValueError: first attempt of 3 fails" in c.logs(run, "per#3")


def test_a_worker_killed_mid_chunk_loses_no_instance_and_runs_none_twice(nats_server,
                                                                         one_worker, tmp_path):
    sup = one_worker("chunks-kill")
    writes = tmp_path / "writes"
    writes.mkdir()
    n = 10
    nb = write_notebook(tmp_path / "kill.ipynb", [
        "%%task per --map r in regions\n"
        "import os, time\n"
        "time.sleep(1.0)\n"
        f"open(os.path.join({str(writes)!r}, str(r)), 'a').write('x')",
    ], params=f"regions = {list(range(n))!r}")
    with SyncClient(nats_server.url, namespace="chunks-kill") as c:
        run = c.submit(str(nb), {})
        # mid-chunk and mid-cell: the third instance is running (two are recorded), more held
        wait_for(lambda: sum(e.type == "TaskStarted" for e in c.history(run)) >= 3,
                 timeout=120, what="the third instance to start")
        time.sleep(0.3)
        victim = next(e["worker"] for e in c.history(run) if e.type == "TaskStarted")
        pid = int(victim.rsplit("-", 1)[1])
        assert pid in sup.pids("worker")
        os.kill(pid, signal.SIGKILL)
        st = c.wait(run, timeout=180)
        check_replay(c, run)
        assert st.state == "succeeded", st.error
        assert sup.restarts >= 1
        hist = c.history(run)
        # recorded once each, whoever ran them
        assert success_counts(c, run) == {f"per#{i}": 1 for i in range(n)}
        done_by_victim = {e["key"] for e in hist if e.type == "TaskSucceeded"
                          and e["worker"] == victim}
        assert done_by_victim and len(done_by_victim) < n      # it died with work left
        files = _files(writes)
        assert set(files) == {str(i) for i in range(n)}        # no instance lost
        # an instance recorded (and acked) before the kill never runs again; the one in its cell
        # when the worker died runs again elsewhere. (A result published but not yet acked when
        # a worker dies is redelivered, recorded once, and re-run only if the engine's snapshot
        # lags behind the history: at least once, as for any task.)
        twice = [k for k in done_by_victim if files[k.split("#")[1]] != 1]
        assert not twice, [(e.type, e.get("key"), e.get("worker"), e.seq, e.ts) for e in hist]
        assert sum(files.values()) <= n + 1


def test_an_instance_whose_chunk_step_failed_is_never_reported_succeeded(monkeypatch, tmp_path):
    """The chunk's own step (reset, folder, the names to keep) can fail or be stopped with no
    cell of the task holding the error: a stopped instance is a failed attempt (cancelled), a
    failed step raises (the worker then runs the instance alone) — never a success of a task
    that did not run."""
    import threading

    from nbflow.compiler import compile_notebook
    from nbflow.compiler.tasknb import task_notebook
    from nbflow.worker import chunkrun

    monkeypatch.setattr(chunkrun, "get_pool", lambda *a, **k: None)
    nb = write_notebook(tmp_path / "m.ipynb", ["%%task make\nitems = [1, 2]",
                                                "%%task work --map i in items\ndone = i"])
    wf = compile_notebook(str(nb))
    ck = chunkrun.ChunkKernel(task_notebook(wf, "work", version="v"), str(tmp_path), "r1", None)
    monkeypatch.setattr(ck, "_ready", lambda control, run, cells: "failed")
    io = {"task": "work", "key": "work#0", "run": "r1", "dir": str(tmp_path / "w"),
          "inputs": {}, "map": {"index": 0, "value": 1, "var": "i"}, "signal": None,
          "outputs": ["done"]}
    with pytest.raises(RuntimeError, match="could not be prepared"):
        ck.run_one(io, {}, None, None)
    cancel = threading.Event()
    cancel.set()
    res = ck.run_one(io, {}, None, cancel)
    assert res.status == "failed" and res.reason == "cancelled", res
