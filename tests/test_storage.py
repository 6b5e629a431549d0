"""Bounded storage: `nbflow gc` removes orphaned artifacts, stale work dirs and finished runs past
retention (never a running run, never what a kept run names); a full store fails the task with
an error naming the limit and how to raise it, not 'worker lost'."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from support import check_replay, wait_for
from nbhelpers import write_notebook

from nbflow.client import SyncClient
from nbflow.stack import Supervisor


@pytest.fixture
def private(nats_server, tmp_path):
    ns = f"st-{uuid.uuid4().hex[:6]}"
    made = []

    def make(**kw):
        sup = Supervisor(nats_server.url, namespace=ns, workers=1,
                         log_file=tmp_path / "stack.log", **kw).start()
        made.append(sup)
        return SyncClient(nats_server.url, namespace=ns)
    yield ns, make
    for s in made:
        s.stop()


def objects(c) -> set[str]:
    """Names of the task artifacts (notebook-folder bundles left aside)."""
    return {i.name for i in c._call(c.aclient.artifacts.list())
            if not i.name.startswith("bundles/")}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def bundles(c) -> set[str]:
    """Names of the notebook-folder bundles in the object store."""
    return {i.name for i in c._call(c.aclient.artifacts.list()) if i.name.startswith("bundles/")}


def gc_cli(nats_server, ns, *args, env: dict | None = None) -> str:
    res = subprocess.run([sys.executable, "-m", "nbflow", "gc", "--nats", nats_server.url,
                          "--namespace", ns, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_gc_removes_orphans_and_expired_runs_only(nats_server, private, tmp_path):
    ns, make = private
    with make() as c:
        nb = write_notebook(tmp_path / "two.ipynb", ["%%task a\nx = [1, 2, 3]",
                                                     "%%task b\nprint(sum(x))"])
        run = c.submit(str(nb), {})
        assert c.wait(run, timeout=120).state == "succeeded"
        kept = objects(c)
        assert any(n.startswith(run + "/") for n in kept)
        # garbage: an attempt's output no completion names, objects of a run that never was,
        # and the work dir of a worker killed mid-task
        c._call(c.aclient.artifacts.put_bytes(f"{run}/a/7/out/x.pkl", b"lost upload"))
        c._call(c.aclient.artifacts.put_bytes("zzghost9/a/1/notebook.ipynb", b"{}"))
        # (in a temp dir of its own: any worker starting on this machine sweeps /tmp's)
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        stale = tempfile.mkdtemp(prefix=f"nbflow-w{dead_pid()}-{run}-a-", dir=tmp)
        approval_nb = write_notebook(tmp_path / "wait.ipynb", [
            '%%task ask --approval "go?"\nok = 1'])
        waiting = c.submit(str(approval_nb), {})
        wait_for(lambda: c.status(waiting).nodes["ask"].state == "awaiting_approval", 60,
                 "the approval to be requested")

        out = gc_cli(nats_server, ns, "--dry-run", env={"TMPDIR": str(tmp)})
        assert "would remove 0 finished run(s)" in out and "would remove 2 artifact(s)" in out
        assert objects(c) >= kept | {f"{run}/a/7/out/x.pkl"} and os.path.isdir(stale)

        out = gc_cli(nats_server, ns, env={"TMPDIR": str(tmp)})   # default retention: 30 days
        assert "removed 2 artifact(s)" in out and "removed 0 finished run(s)" in out
        assert objects(c) == kept                            # the run's own artifacts stay
        assert not os.path.exists(stale)
        check_replay(c, run)
        assert c.load_output(run, "a", "x") == [1, 2, 3]

        out = gc_cli(nats_server, ns, "--days", "0")          # everything finished is expired
        assert "removed 1 finished run(s)" in out
        assert not c.has_run(run) and c.snapshot(run) is None
        assert not any(n.startswith(run + "/") for n in objects(c))
        assert c.has_run(waiting) and c.snapshot(waiting).state == "running"   # untouched
        c.cancel(waiting)


def test_gc_collects_bundles_no_kept_run_names_after_a_grace_period(nats_server, private,
                                                                   tmp_path):
    ns, make = private
    with make() as c:
        def project(name, n):
            (tmp_path / name).mkdir()
            (tmp_path / name / "helper.py").write_text(f"N = {n}\n")
            return write_notebook(tmp_path / name / "nb.ipynb", [
                "from helper import N", "%%task a\nx = N * 2", "%%task b\nprint(x)"])
        kept_nb, waiting_nb = project("kept", 1), project("waiting", 2)
        # a bundle no run names (its runs were removed)
        h_gone = "d" * 32
        c._call(c.aclient.artifacts.put_bytes(f"bundles/{h_gone}.zip", b"stale"))
        kept = c.submit(str(kept_nb), {})
        assert c.wait(kept, timeout=120).state == "succeeded"
        h_kept = c.workflow(c.status(kept).wf).bundle
        waiting_nb = write_notebook(tmp_path / "waiting" / "nb.ipynb", [
            "from helper import N", '%%task ask --approval "go?"\nok = N', "%%task b\nprint(ok)"])
        waiting = c.submit(str(waiting_nb), {})
        wait_for(lambda: c.status(waiting).nodes["ask"].state == "awaiting_approval", 60,
                 "the approval to be requested")
        h_wait = c.workflow(c.status(waiting).wf).bundle
        # a bundle uploaded by a submit that has not recorded its run yet
        c._call(c.aclient.artifacts.put_bytes("bundles/" + "e" * 32 + ".zip", b"in flight"))
        before = bundles(c)
        assert {f"bundles/{h}.zip" for h in (h_kept, h_wait, h_gone, "e" * 32)} <= before

        # within the grace period nothing unnamed goes (a submit may be naming it right now)
        out = gc_cli(nats_server, ns)
        assert "removed 0 unused notebook-folder bundle(s)" in out, out
        assert bundles(c) == before

        # past it: the two no run names go, the kept run's and the running run's stay
        out = gc_cli(nats_server, ns, "--dry-run", env={"NBFLOW_BUNDLE_GRACE_S": "0"})
        assert "would remove 2 unused notebook-folder bundle(s)" in out, out
        assert bundles(c) == before
        out = gc_cli(nats_server, ns, env={"NBFLOW_BUNDLE_GRACE_S": "0"})
        assert "removed 2 unused notebook-folder bundle(s)" in out, out
        assert bundles(c) == before - {f"bundles/{h_gone}.zip", "bundles/" + "e" * 32 + ".zip"}
        # the kept run still loads and runs again (its folder's bundle is reused, not re-sent)
        assert c.load_output(kept, "a", "x") == 2
        again = c.submit(str(kept_nb), {})
        assert c.wait(again, timeout=120).state == "succeeded"
        assert c.load_output(again, "a", "x") == 2
        assert c.workflow(c.status(again).wf).bundle == h_kept

        # the running run keeps its bundle even when every finished run expires
        out = gc_cli(nats_server, ns, "--days", "0", env={"NBFLOW_BUNDLE_GRACE_S": "0"})
        assert "removed 1 unused notebook-folder bundle(s)" in out, out
        assert bundles(c) == {f"bundles/{h_wait}.zip"}
        c.approve(waiting, "ask")
        assert c.wait(waiting, timeout=120).state == "succeeded"
        assert c.load_output(waiting, "ask", "ok") == 2


def test_a_full_artifact_store_says_which_limit_and_how_to_raise_it(nats_server, private,
                                                                     tmp_path):
    ns, make = private
    from nbflow.nats.layout import Layout

    async def small_store():
        import nats
        from nats.js.api import ObjectStoreConfig

        nc = await nats.connect(nats_server.url)
        await nc.jetstream().create_object_store(
            Layout(ns).artifacts_store, config=ObjectStoreConfig(max_bytes=256 * 1024))
        await nc.close()
    import asyncio

    asyncio.run(small_store())
    with make() as c:
        nb = write_notebook(tmp_path / "big.ipynb", [
            "%%task make\nblob = b'x' * (2 * 1024 * 1024)", "%%task use\nprint(len(blob))"])
        run = c.submit(str(nb), {})
        st = c.wait(run, timeout=180)
        assert st.state == "failed"
        err = st.tasks["make"].error
        assert "storage is full" in err and "nbflow gc" in err and "max_bytes" in err, err
        assert "WorkerLost" not in err
        check_replay(c, run)
    res = subprocess.run([sys.executable, "-m", "nbflow", "status", run, "--nats",
                          nats_server.url, "--namespace", ns], capture_output=True, text=True,
                         timeout=60)
    assert "storage is full" in res.stdout + res.stderr


POOL_SCRIPT = """
import sys, time
from nbflow.worker.kernels.pool import KernelPool
pool = KernelPool(size=1)
k = pool.acquire()
print(k.pid, flush=True)
if sys.argv[1] == "shutdown":
    pool.release(k)
    pool.shutdown()
    print("done", flush=True)
else:
    time.sleep(600)
"""


def test_what_kernels_leave_in_the_temp_dir_is_removed_at_shutdown_or_after_a_kill(tmp_path):
    """A kernel pool keeps its kernels' connection files and ipc sockets in one dir named after
    its process: gone at shutdown; after a SIGKILL, the next worker start (workdirs.clean_stale)
    removes it, and connection files older versions left in the temp dir itself."""
    import pathlib
    import shutil

    # a short path: unix socket paths are limited to 107 bytes
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="nbt-", dir="/tmp"))
    try:
        _kernel_leftovers(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kernel_leftovers(tmp):
    import json
    import signal

    from nbflow.worker import workdirs

    env = {**os.environ, "TMPDIR": str(tmp)}

    def pool(how):
        p = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, how], env=env,
                             stdout=subprocess.PIPE, text=True)
        kernel = int(p.stdout.readline())
        return p, kernel

    p, _ = pool("shutdown")
    assert p.stdout.readline().strip() == "done"
    p.wait(30)
    assert os.listdir(tmp) == []                        # nothing left behind

    p, kernel = pool("kill")
    entries = os.listdir(tmp)
    assert len(entries) == 1 and entries[0].startswith(f"nbflow-kernels-{p.pid}-"), entries
    inside = os.listdir(tmp / entries[0])
    assert any(n.startswith("kernel-") and n.endswith(".json") for n in inside), inside
    assert workdirs.clean_stale(str(tmp)) == []          # its worker lives: kept
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    os.kill(kernel, signal.SIGKILL)                      # (its kernel, in a session of its own)
    # what older versions left: a connection file in the temp dir naming a pool dir now gone,
    # and one of another program (kept)
    old = tmp / "tmpab12cd34.json"
    old.write_text(json.dumps({"transport": "ipc", "ip": str(tmp / "nbflow-kernels-x1y2z3w4/k-1")}))
    other = tmp / "tmpzz99yy88.json"
    other.write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1"}))
    for f in (old, other):
        os.utime(f, (1, 1))
    removed = workdirs.clean_stale(str(tmp))
    assert sorted(os.path.basename(r) for r in removed) == sorted([entries[0], old.name])
    assert os.listdir(tmp) == [other.name]


def test_an_older_workers_young_pool_dir_is_never_swept(tmp_path):
    """An older version's pool dir has no pid in its name; a kernel still starting in it has
    bound no socket yet. Sweeping it then killed that kernel ("died before replying to
    kernel_info"), so only a pool dir that is old and has no live socket is removed."""
    from nbflow.worker import workdirs

    young = tmp_path / "nbflow-kernels-ab12cd34"
    old = tmp_path / "nbflow-kernels-zz99yy88"
    young.mkdir()
    old.mkdir()
    os.utime(old, (1, 1))
    removed = workdirs.clean_stale(str(tmp_path))
    assert removed == [str(old)]
    assert sorted(os.listdir(tmp_path)) == [young.name]
