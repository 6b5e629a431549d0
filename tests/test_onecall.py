"""A task notebook's cells in one execute_request (nbflow.kernelside + worker/kernels/onecall):
real kernels, real papermill. Outputs land in their cells, counts and statuses are per cell, the
failing cell is the one reported and later cells never run; a chain in ``run`` isolation costs
one execute per task (the reset folded in) and stays isolated; top-level ``await`` falls back to
one execute per cell; timeouts stop and report the right cell."""
from __future__ import annotations

import contextlib
import threading

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nbflow.worker.kernels.pool import KernelPool
from nbflow.worker.runner import run_task
from tests.test_runner import io_spec


def nb_of(*cells):
    return new_notebook(cells=list(cells), metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})


def code(src, *tags):
    return new_code_cell(src, metadata={"tags": list(tags)})


class Counter:
    """Counts the execute_requests sent to the pool's kernels (wraps each client's execute)."""

    def __init__(self, pool: KernelPool):
        self.n = 0
        self.codes: list[str] = []
        self.lock = threading.Lock()
        self.pool = pool
        self.wrapped: set[int] = set()

    def wrap_idle(self) -> None:
        with self.pool._cond:
            ks = list(self.pool._idle)
        for k in ks:
            if id(k.kc) in self.wrapped:
                continue
            self.wrapped.add(id(k.kc))
            orig = k.kc.execute

            def counted(code, *a, _orig=orig, **kw):
                with self.lock:
                    self.n += 1
                    self.codes.append(code)
                return _orig(code, *a, **kw)
            k.kc.execute = counted


@contextlib.contextmanager
def _run_pool(idle_reset_s: float):
    """A one-kernel pool in run isolation, ready, with this idle reset delay."""
    p = KernelPool(size=1, isolation="run", idle_reset_s=idle_reset_s)
    try:
        p.wait_ready(1)
        yield p
    finally:
        p.shutdown()


@pytest.fixture
def runpool():
    # no background reset of an idle kernel during a test (a slow machine would count it)
    with _run_pool(600) as p:
        yield p


@pytest.fixture
def freshpool():
    p = KernelPool(size=1, isolation="fresh")
    p.wait_ready(1)
    yield p
    p.shutdown()


def outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts.append(f"<{o.output_type}:{o.data.get('text/plain')}>")
        elif o.output_type == "error":
            parts.append(f"<error:{o.ename}>")
    return "".join(parts)


def test_a_multi_cell_task_records_each_cells_outputs_and_stops_at_the_failing_one(
        runpool, tmp_path):
    marker = tmp_path / "later-ran"
    nb = nb_of(
        new_markdown_cell("# a task"),
        code("print('setup says hi')\nimport sys\nprint('to stderr', file=sys.stderr)",
             "nbflow-setup"),
        code("n = 0\n__nbflow__ = None", "parameters"),
        code("print('n is', n)\nfrom IPython.display import display\n"
             "display({'text/plain': 'shown'}, raw=True)\nn * 10", "nbflow-task"),
        code(""),
        code("%time m = n + 1\nprint('m is', m)"),
        code("print('before the error')\nraise ValueError(f'bad n {n}')"),
        code(f"open({str(marker)!r}, 'w').write('ran')"),
    )
    counter = Counter(runpool)
    counter.wrap_idle()
    res = run_task(nb, params={"n": 4}, io=io_spec(tmp_path), cwd=str(tmp_path), pool=runpool,
                   scope="r1")
    assert res.status == "failed" and res.reason == "error"
    assert res.error == "ValueError: bad n 4"
    assert res.cell == "print('before the error')\nraise ValueError(f'bad n {n}')"
    assert "bad n 4" in res.traceback
    assert not marker.exists()                    # the cell after the failing one never ran
    assert counter.n == 1                         # the whole notebook: one execute
    import nbformat
    out = nbformat.read(res.notebook_path, as_version=4)
    # (papermill puts markdown cells pointing at the error before the first and failing cell)
    cells = [c for c in out.cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    # papermill inserted its injected-parameters cell after ours, and it ran
    assert "injected-parameters" in cells[3].metadata.tags
    texts = [outputs_text(c) for c in cells]
    assert texts[1] == "setup says hi\nto stderr\n"
    assert texts[2] == "" and texts[3] == ""
    assert texts[4] == "n is 4\n<display_data:shown><execute_result:40>"
    assert texts[5] == ""
    assert texts[6].startswith("CPU times") and texts[6].endswith("m is 5\n")
    assert texts[7].startswith("before the error\n<error:ValueError>")
    assert texts[8] == ""
    counts = [c.get("execution_count") for c in cells if c.cell_type == "code"]
    assert counts == [1, 2, 3, 4, None, 5, 6, None]
    status = [c.metadata.papermill.status for c in cells]
    assert status == ["completed"] * 7 + ["failed", "pending"]
    assert all(cells[i].metadata.papermill.duration is not None for i in range(8))


def test_a_chain_in_run_isolation_costs_one_execute_per_task_and_stays_isolated(
        runpool, tmp_path):
    counter = Counter(runpool)
    counter.wrap_idle()
    import os
    pids, seen = set(), []
    for i in range(4):
        probe = ("import os, sys\n"
                 "print('leak' in globals(), os.environ.get('NBFLOW_T_LEAK'), "
                 "sys.path.count('/elsewhere'), os.getcwd() == here, "
                 f"os.environ.get('HOME') == {os.environ['HOME']!r}, "
                 f"os.environ.get('PATH') == {os.environ['PATH']!r})\n"
                 "leak = 1\nos.environ['NBFLOW_T_LEAK'] = 'x'\nsys.path.insert(0, '/elsewhere')\n"
                 "os.environ['HOME'] = '/nowhere'\ndel os.environ['PATH']\nos.chdir('/')")
        nb = nb_of(code("import os", "nbflow-setup"),
                   code(f"here = {str(tmp_path)!r}\n__nbflow__ = None", "parameters"),
                   code(probe, "nbflow-task"))
        before = counter.n
        res = run_task(nb, params={}, io=io_spec(tmp_path / f"t{i}"), cwd=str(tmp_path),
                       pool=runpool, scope="run-A")
        assert res.status == "succeeded", res
        assert counter.n - before == 1            # reset + enter + cells: one execute
        import nbformat
        out = nbformat.read(res.notebook_path, as_version=4)
        seen.append(outputs_text(out.cells[-1]))
        with runpool._cond:
            pids |= {k.pid for k in runpool._idle}
    assert seen == ["False None 0 True True True\n"] * 4    # nothing of the last task is left
    assert len(pids) == 1                          # one kernel served the whole chain
    assert os.environ.get("NBFLOW_T_LEAK") is None


def test_top_level_await_falls_back_to_one_execute_per_cell(runpool, tmp_path):
    counter = Counter(runpool)
    counter.wrap_idle()
    nb = nb_of(code("import asyncio", "nbflow-setup"),
               code("__nbflow__ = None", "parameters"),
               code("print('before')"),
               code("await asyncio.sleep(0)\nx = 7\nprint('awaited')", "nbflow-task"),
               code("print('after', x)"))
    res = run_task(nb, params={}, io=io_spec(tmp_path), cwd=str(tmp_path), pool=runpool,
                   scope="r1")
    assert res.status == "succeeded", res
    import nbformat
    out = nbformat.read(res.notebook_path, as_version=4)
    texts = [outputs_text(c) for c in out.cells]
    assert texts[3:] == ["before\n", "awaited\n", "after 7\n"]
    counts = [c.get("execution_count") for c in out.cells]
    assert counts == [1, 2, 3, 4, 5, 6]
    # one execute up to the await cell, then that cell and the next one each
    assert counter.n == 3


def test_the_task_timeout_kills_and_reports_the_running_cell(freshpool, tmp_path):
    marker = tmp_path / "after-ran"
    slow = "import time\nprint('sleeping')\ntime.sleep(60)"
    nb = nb_of(code("import os", "nbflow-setup"), code("__nbflow__ = None", "parameters"),
               code("print('first')"), code(slow, "nbflow-task"),
               code(f"open({str(marker)!r}, 'w').write('ran')"))
    res = run_task(nb, params={}, io=io_spec(tmp_path), cwd=str(tmp_path), pool=freshpool,
                   timeout=3)
    assert res.status == "failed" and res.reason == "timeout"
    assert res.cell == slow
    assert not marker.exists()
    import nbformat
    out = nbformat.read(res.notebook_path, as_version=4)
    cells = [c for c in out.cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    assert outputs_text(cells[3]) == "first\n"
    assert outputs_text(cells[4]) == "sleeping\n<error:TimeoutError>"
    assert cells[4].metadata.papermill.status == "failed"


def test_a_cell_timeout_stops_the_cell_that_runs_too_long(freshpool, tmp_path):
    import nbformat
    import papermill
    from nbclient.exceptions import CellTimeoutError

    marker = tmp_path / "after-ran"
    slow = "import time\ntime.sleep(60)"
    # each of the first two cells stays under the cell limit, together they are over it
    nb = nb_of(code("import time\ntime.sleep(2)\nprint('one')"),
               code("time.sleep(2)\nprint('two')"), code(slow),
               code(f"open({str(marker)!r}, 'w').write('ran')"))
    nbformat.write(nb, tmp_path / "in.ipynb")
    with pytest.raises(CellTimeoutError) as e:
        papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                                   engine_name="nbflow", nbflow_pool=freshpool,
                                   execution_timeout=3, progress_bar=False)
    assert slow in str(e.value)
    assert not marker.exists()
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert [outputs_text(c) for c in out.cells[:2]] == ["one\n", "two\n"]
    assert out.cells[2].outputs[-1].ename == "TimeoutError"


def test_a_map_chunk_costs_one_execute_per_instance_with_outputs_in_their_cells(tmp_path,
                                                                                monkeypatch):
    import os
    import pickle

    import nbformat
    from jupyter_client.blocking.client import BlockingKernelClient

    from nbflow.worker.chunkrun import ChunkKernel
    from nbflow.worker.kernels import registry
    from tests.test_runner import task_nb

    sent = []
    orig = BlockingKernelClient.execute

    def counted(self, code, *a, **kw):
        sent.append(self)             # which kernel's client (spares start in the background)
        return orig(self, code, *a, **kw)
    monkeypatch.setattr(BlockingKernelClient, "execute", counted)
    code_ = ("seen = 'leftover' in globals()\nleftover = r\nprint('instance', r, seen)\n"
             "if r == 2:\n    raise RuntimeError(f'bad element {r}')\ny = r * 10\ny")
    nb = task_nb(code_, setup="print('setup ran')")
    registry.get_pool("python3", "run").wait_ready()      # kernel starts execute too
    ck = ChunkKernel(nb, cwd=str(tmp_path), scope="chunk-run", isolation="run")
    try:
        results, per = [], []
        for r in range(4):
            io = io_spec(tmp_path / f"i{r}", task="m", outputs=["y"],
                         map_={"var": "r", "value": r})
            before = len(sent)
            results.append(ck.run_one(io, {}, None, None))
            per.append(sum(1 for c in sent[before:] if c is ck.k.kc))
        ck.drop()
    finally:
        registry.shutdown_pool()
    # the first instance also runs the setup cells (one execute); then one execute each
    assert per == [2, 1, 1, 1]
    assert [x.status for x in results] == ["succeeded", "succeeded", "failed", "succeeded"]
    bad = results[2]
    assert bad.error == "RuntimeError: bad element 2" and bad.cell == code_
    assert not os.path.exists(os.path.join(tmp_path / "i2" / "out", "y.pkl"))  # save never ran
    for r in (0, 1, 3):
        res = results[r]
        with open(os.path.join(res.outputs_dir, "y.pkl"), "rb") as f:
            assert pickle.load(f) == r * 10
        out = nbformat.read(res.notebook_path, as_version=4)
        task = next(c for c in out.cells if "nbflow-task" in c.metadata.get("tags", []))
        assert outputs_text(task) == f"instance {r} False\n<execute_result:{r * 10}>"
        assert outputs_text(out.cells[0]) == "setup ran\n"      # the chunk's one setup run
        assert res.exec_s > 0
        counts = [c.get("execution_count") for c in out.cells if c.get("execution_count")]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)


@pytest.fixture
def quickreset():
    with _run_pool(0.5) as p:
        yield p


def test_a_kernel_left_dirty_and_idle_is_reset_in_the_background(quickreset, tmp_path):
    """The reset is left to the next task only while one may come soon: a kernel idle longer
    than IDLE_RESET_S is reset anyway (its last task's objects are not kept while it idles)."""
    from support import wait_for

    marker = tmp_path / "deleted"
    nb = nb_of(code("import os", "nbflow-setup"), code("__nbflow__ = None", "parameters"),
               code("class Holder:\n    def __del__(self):\n"
                    f"        open({str(marker)!r}, 'w').write('gone')\nheld = Holder()",
                    "nbflow-task"))
    res = run_task(nb, params={}, io=io_spec(tmp_path), cwd=str(tmp_path), pool=quickreset,
                   scope="r1")
    assert res.status == "succeeded", res
    k = wait_for(lambda: next(iter(quickreset._idle), None), what="the kernel back idle")
    wait_for(lambda: marker.exists() and not k.dirty, timeout=30,
             what="the idle kernel's namespace reset (the task's object deleted)")
    counter = Counter(quickreset)
    counter.wrap_idle()
    probe = nb_of(code("import os", "nbflow-setup"), code("__nbflow__ = None", "parameters"),
                  code("print('held' in globals())", "nbflow-task"))
    res = run_task(probe, params={}, io=io_spec(tmp_path / "2"), cwd=str(tmp_path),
                   pool=quickreset, scope="r1")
    import nbformat
    assert outputs_text(nbformat.read(res.notebook_path, as_version=4).cells[-1]) == "False\n"
    assert counter.n == 1


def test_a_kernel_without_the_driver_runs_the_cells_one_execute_each(runpool, tmp_path):
    """The driver's install failed or is gone (a kernel that cannot run it): the first execute
    fails before any marker, and the task runs as before, one execute per cell."""
    with runpool._cond:
        k = runpool._idle[0]
    k.run_quiet("del __import__('sys').modules['_nbflow_pool'].run")
    counter = Counter(runpool)
    counter.wrap_idle()
    nb = nb_of(code("import os", "nbflow-setup"), code("n = 0\n__nbflow__ = None", "parameters"),
               code("print('n is', n)\nn + 1", "nbflow-task"))
    res = run_task(nb, params={"n": 2}, io=io_spec(tmp_path), cwd=str(tmp_path), pool=runpool,
                   scope="r1")
    assert res.status == "succeeded", res
    import nbformat
    out = nbformat.read(res.notebook_path, as_version=4)
    assert outputs_text(out.cells[-1]) == "n is 2\n<execute_result:3>"
    assert [c.execution_count for c in out.cells] == [1, 2, 3, 4]
    assert k.driver is False
    # the failed driver call, entering the folder, then the four cells one each (then the
    # reset after the task, in the background as before)
    codes = counter.codes
    assert codes[0].startswith("__import__('sys').modules['_nbflow_pool'].run(")
    assert codes[2:6:3] == ["import os", "print('n is', n)\nn + 1"]
    assert codes[3] == "n = 0\n__nbflow__ = None" and "n = 2" in codes[4]
