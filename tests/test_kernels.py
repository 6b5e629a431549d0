"""The warm kernel pool as papermill engine ``nbflow``: kernels started ahead of tasks, fresh vs
reuse isolation, kills that stick, outputs recorded as nbclient records them."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import nbformat
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from nbflow.worker.kernels import registry as kernels
from nbflow.core.durations import human as human_seconds
from nbflow.errors import KernelStartError
from nbflow.worker.kernels.cellrun import RunControl
from nbflow.worker.kernels.pool import KernelPool, setup_hash


def notebook(*sources: str, setup: str = "import os") -> nbformat.NotebookNode:
    cells = [new_code_cell(setup, metadata={"tags": ["nbflow-setup"]}),
             new_code_cell("__nbflow__ = None", metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(s) for s in sources]
    return new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})


def execute(pool, nb, tmp_path, control=None, **kw):
    """Run through papermill with our engine; return (executed nb, control, error or None)."""
    control = control or RunControl(cwd=str(tmp_path))
    out = tmp_path / f"out-{time.monotonic_ns()}.ipynb"
    try:
        papermill.execute_notebook(nb, str(out), engine_name="nbflow", progress_bar=False,
                                   nbflow_pool=pool, nbflow_control=control, **kw)
        err = None
    except papermill.PapermillExecutionError as e:
        err = e
    return nbformat.read(out, as_version=4), control, err


def text(nb, i=-1) -> str:
    return "".join(o.get("text", "") for o in nb.cells[i].outputs if o.output_type == "stream")


@pytest.fixture
def fresh():
    p = KernelPool(size=2, isolation="fresh")
    yield p
    p.shutdown()


@pytest.fixture
def reuse():
    p = KernelPool(size=1, isolation="reuse")
    yield p
    p.shutdown()


def test_fresh_tasks_run_in_kernels_started_before_them_one_kernel_each(fresh, tmp_path):
    fresh.wait_ready()
    seen = []
    for _ in range(3):
        began = time.time()
        nb, ctl, err = execute(fresh, notebook("import os; print(os.getpid())"), tmp_path)
        assert err is None
        assert ctl.kernel_ready_at < began          # warm: started ahead of the task
        assert int(text(nb)) == ctl.kernel_pid
        assert ctl.kernel_uses == 0
        seen.append(ctl.kernel_pid)
        fresh.wait_ready()
    assert len(set(seen)) == 3
    assert fresh.stats()["started"] >= 4


def test_reuse_runs_consecutive_tasks_in_one_kernel_with_a_cleared_namespace(reuse, tmp_path):
    nb1, c1, _ = execute(reuse, notebook(
        "secret = 42\nimport json, sys\nos.environ['NBFLOW_LEAK'] = '1'\nsys.path.append('/leak')"),
        tmp_path)
    nb2, c2, _ = execute(reuse, notebook(
        "import sys\nprint(os.getpid(), 'secret' in globals(), 'json' in globals(), len(Out),"
        " 'NBFLOW_LEAK' in os.environ, '/leak' in sys.path)"), tmp_path)
    assert c1.kernel_pid == c2.kernel_pid and c2.kernel_uses == 1
    assert text(nb2) == f"{c1.kernel_pid} False False 0 False False\n"
    assert nb2.cells[0].execution_count == 1        # a new session: counts restart


def test_a_kernel_whose_task_folder_is_gone_is_reset_and_kept(reuse, tmp_path):
    """The worker removes a task's folder when the task ends, maybe before the kernel is reset:
    the reset must not need it (it failed with FileNotFoundError, and every kernel was
    discarded, so each next task paid a kernel start)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    _, c1, err = execute(reuse, notebook("import shutil\nshutil.rmtree(os.getcwd())"), tmp_path,
                         control=RunControl(cwd=str(gone)))
    assert err is None and not gone.exists()
    nb2, c2, err = execute(reuse, notebook("print(os.getpid())"), tmp_path)
    assert err is None and text(nb2) == f"{c1.kernel_pid}\n"
    assert c2.kernel_uses == 1 and reuse.started == 1


def test_a_long_temp_dir_path_falls_back_to_loopback_tcp(tmp_path, monkeypatch):
    """Unix socket paths hold ~107 bytes: under a long TMPDIR the pool failed to start any
    kernel ("File name too long"); it now uses loopback TCP there."""
    import tempfile

    long = tmp_path / ("d" * 60) / ("e" * 60)
    long.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    p = KernelPool(size=1, isolation="reuse")
    try:
        nb, _, err = execute(p, notebook("print(6 * 7)"), tmp_path)
        assert err is None and text(nb) == "42\n"
    finally:
        p.shutdown()


def test_reuse_moves_cwd_and_sys_path_per_task(reuse, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "only_in_a.py").write_text("X = 1\n")
    probe = "import sys\nprint(os.getcwd(), sys.path[0], sys.path.count({!r}))"
    nb1, _, _ = execute(reuse, notebook("import only_in_a", probe.format(str(a))), tmp_path,
                        control=RunControl(cwd=str(a)))
    assert text(nb1) == f"{a} {a} 1\n"
    nb2, _, err = execute(reuse, notebook(probe.format(str(a))), tmp_path,
                          control=RunControl(cwd=str(b)))
    assert err is None and text(nb2) == f"{b} {b} 0\n"


def test_the_next_task_in_the_same_folder_finds_the_kernel_there_reset(reuse, tmp_path):
    """The reset goes back into the last task's folder (one round trip), so the next task in
    that folder needs no change of directory; a task moving away, a changed sys.path and the
    namespace are still undone, and a folder that is gone sends the kernel home."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "only_in_a.py").write_text("X = 1\n")
    probe = "import sys\nprint(os.getcwd(), sys.path[0], sys.path.count({a!r}), 'y' in globals())"
    _, c1, err = execute(reuse, notebook("import only_in_a\ny = 1\nos.chdir('/')\n"
                                         "import sys\nsys.path.insert(0, '/elsewhere')"),
                         tmp_path, control=RunControl(cwd=str(a)))
    assert err is None
    nb2, c2, err = execute(reuse, notebook("import only_in_a", probe.format(a=str(a))), tmp_path,
                           control=RunControl(cwd=str(a)))
    assert err is None and text(nb2) == f"{a} {a} 1 False\n"
    reuse.wait_ready(1)
    k = reuse._idle[0]
    assert k.entered >= 1 and c2.kernel_pid == c1.kernel_pid
    import shutil
    shutil.rmtree(a)
    b = tmp_path / "b"
    b.mkdir()
    nb3, _, err = execute(reuse, notebook(probe.format(a=str(a))), tmp_path,
                          control=RunControl(cwd=str(b)))
    assert err is None and text(nb3) == f"{b} {b} 0 False\n"


def test_a_killed_kernel_is_never_handed_out_again(reuse, tmp_path):
    reuse.wait_ready()                              # the deadline also covers getting a kernel
    ctl = RunControl(cwd=str(tmp_path), deadline=time.monotonic() + 1, timeout=1)
    nb, ctl, err = execute(reuse, notebook("import time; time.sleep(60)"), tmp_path, control=ctl)
    assert ctl.reason == "timeout" and err.ename == "TimeoutError"
    assert nb.cells[-1].metadata.papermill.status == "failed"
    _, c2, err2 = execute(reuse, notebook("x = 1"), tmp_path)
    assert err2 is None and c2.kernel_pid != ctl.kernel_pid


def test_a_dead_kernel_fails_the_cell(fresh, tmp_path):
    nb, ctl, err = execute(fresh, notebook("import os; os._exit(1)", "print('never')"), tmp_path)
    assert err.ename == "DeadKernelError" and ctl.reason == "died"
    assert nb.cells[-1].outputs == [] and nb.cells[-1].metadata.papermill.status == "pending"


def test_error_stops_the_notebook_and_is_recorded_like_nbclient(fresh, tmp_path):
    nb, _, err = execute(fresh, notebook("print('a')", "raise KeyError('k')", "print('b')"),
                         tmp_path)
    assert err.ename == "KeyError" and err.evalue == "'k'"
    cells = [c for c in nb.cells if c.cell_type == "code"]
    failing = next(c for c in cells if "KeyError" in c.source)
    assert failing.outputs[-1].output_type == "error" and failing.metadata.papermill.exception
    assert cells[-1].outputs == [] and cells[-1].execution_count is None
    assert nb.metadata.papermill.exception is True


def test_display_updates_and_clear_output_like_nbclient(fresh, tmp_path):
    nb, _, err = execute(fresh, notebook(
        "from IPython.display import display, clear_output\n"
        "h = display('first', display_id=True)\n"
        "h.update('updated')",
        "print('gone')\nclear_output(wait=True)\nprint('kept')"), tmp_path)
    assert err is None
    assert nb.cells[-2].outputs[0].data["text/plain"] == "'updated'"
    assert [o.text for o in nb.cells[-1].outputs] == ["kept\n"]


def test_pool_prefers_a_kernel_that_ran_the_same_setup(tmp_path):
    p = KernelPool(size=2, isolation="reuse")
    try:
        p.wait_ready()
        a, b = p.acquire(setup_hash="a"), p.acquire(setup_hash="b")
        p.release(a), p.release(b)
        p.wait_ready(2)
        k = p.acquire(setup_hash="b")
        assert k is b
        p.release(k)
    finally:
        p.shutdown()
    assert setup_hash(notebook("x", setup="import a")) == setup_hash(
        notebook("y", setup="import a")) != setup_hash(notebook("x", setup="import b"))


def test_a_kernel_that_cannot_start_is_reported_not_waited_for():
    p = KernelPool(size=1, kernel_name="no-such-kernel-nbflow")
    try:
        with pytest.raises(KernelStartError, match="no-such-kernel-nbflow"):
            p.acquire()
    finally:
        p.shutdown()


def test_process_global_pool_configured_by_env_and_configure(tmp_path, monkeypatch):
    from nbflow.worker.runner import run_task

    monkeypatch.setenv("NBFLOW_POOL_SIZE", "1")
    kernels.shutdown_pool()
    kernels._config.clear()
    try:
        assert kernels.configure(isolation="reuse")["size"] == 1
        io = {"task": "t", "dir": str(tmp_path), "outputs": []}
        r1 = run_task(notebook("print(os.getpid())"), params={}, io=io, cwd=None)
        r2 = run_task(notebook("print(os.getpid())"), params={}, io=io, cwd=None)
        assert r1.status == r2.status == "succeeded"
        pool = kernels.get_pool()
        assert (pool.size, pool.isolation, pool.started) == (1, "reuse", 1)
        assert kernels.configure(concurrency=2)["size"] == 3
    finally:
        kernels.shutdown_pool()
        kernels._config.clear()


def test_importing_the_engine_module_first_still_registers_it():
    code = ("import nbflow.worker.kernels.papermill as k\nfrom papermill.engines import papermill_engines\n"
            "print(papermill_engines.get_engine('nbflow') is k.WarmEngine)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip() == "True"


def test_human_seconds():
    assert [human_seconds(s) for s in (600, 90, 3600, 2.5, 3661)] == [
        "10m", "1m30s", "1h", "2.5s", "1h1m1s"]


def test_run_isolation_reuses_a_kernel_within_a_run_but_never_across_runs(tmp_path):
    pool = KernelPool(size=2, isolation="run")
    try:
        def task(scope, src="print(os.getpid())"):
            nb, c, err = execute(pool, notebook(src), tmp_path,
                                 control=RunControl(cwd=str(tmp_path), scope=scope))
            assert err is None
            return c.kernel_pid
        a1 = task("run-a")
        a2 = task("run-a")
        b1 = task("run-b")
        c1 = task("run-c")      # both idle kernels belong to other runs: one is retired
        a3 = task("run-a")
        assert a1 == a2                       # consecutive tasks of one run: one warm kernel
        assert b1 != a1 and c1 not in (a1, b1)
        assert a3 != c1
        assert pool.stats()["isolation"] == "run"
    finally:
        pool.shutdown()


def test_run_isolation_starts_the_next_runs_kernel_before_that_run_comes(tmp_path):
    """Back-to-back runs: once run b has taken the spare, run a's idle kernel is retired and a
    fresh one started in the background, so run c gets a kernel that was ready before it came
    (a kernel never serves two runs, and a variable or module attribute never crosses)."""
    pool = KernelPool(size=2, isolation="run")
    try:
        def task(scope):
            nb, c, err = execute(pool, notebook(
                "import sys\nprint(getattr(sys, '_leak', None), 'x' in globals())\n"
                f"sys._leak = {scope!r}\nx = 1\nprint(os.getpid())"), tmp_path,
                control=RunControl(cwd=str(tmp_path), scope=scope))
            assert err is None
            seen, pid = text(nb).split("\n")[:2]
            assert seen == "None False"                 # nothing of another run is visible
            return c.kernel_pid
        pids = []
        for scope in ("run-a", "run-b", "run-c", "run-d"):
            pool.wait_ready(2)                          # the run comes after the pool settled
            with pool._cond:
                ready = {k.pid for k in pool._idle if k.scope is None}
            assert ready, pool.stats()                  # a never-used kernel is waiting for it
            pids.append(task(scope))
            assert pids[-1] in ready                    # ... and it is the one the run got
        assert len(set(pids)) == 4                      # one kernel per run
        assert pool.retired_ahead >= 2
        # runs that interleave: run b (its kernel retired ahead) comes back and gets a kernel
        # (a fresh one); retiring ahead pauses, kernels of other runs are retired on demand only
        before = pool.retired_ahead
        assert task("run-b") not in pids
        assert pool.retired_ahead == before
    finally:
        pool.shutdown()


def test_a_new_pool_starts_its_first_kernel_alone_then_the_others():
    """A cold start waits for the first kernel: it starts alone (kernels starting together on
    few cores each take as long as all of them), the others once it is ready."""
    pool = KernelPool(size=3, isolation="run")
    try:
        assert pool.stats()["starting"] == 1
        pool.wait_ready(1)
        pool.wait_ready(3)                      # ... and the others follow by themselves
        assert pool.started == 3
    finally:
        pool.shutdown()
