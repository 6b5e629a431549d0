"""A task notebook goes in, a TaskResult comes out: real kernels, real papermill, no NATS."""
from __future__ import annotations

import os
import pickle
import select
import threading
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nbflow.worker.kernels.pool import KernelPool
from nbflow.worker.runner import notebook_logs, run_task, strip_ansi

PROJ = Path(__file__).parent / "data" / "runner" / "proj"


def task_nb(code: str, *, setup: str = "import os", when: str | None = None,
            params: str = "") -> nbformat.NotebookNode:
    """The shape nbflow.compiler.tasknb.task_notebook produces."""
    def cell(src, tag):
        return new_code_cell(src, metadata={"tags": [tag]})
    cells = [cell(setup, "nbflow-setup"), cell(params + "__nbflow__ = None", "parameters"),
             cell("import nbflow.io as __nbflow_io\n__nbflow_io.load_inputs(globals(), __nbflow__)",
                  "nbflow-load")]
    if when:
        cells.append(cell(f"__nbflow_io.check_when(({when}), __nbflow__, {when!r})", "nbflow-when"))
    cells += [cell(code, "nbflow-task"), cell("__nbflow_io.save_outputs(globals(), __nbflow__)",
                                               "nbflow-save")]
    return new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})


def io_spec(tmp_path, task="t", outputs=(), inputs=None, map_=None) -> dict:
    d = tmp_path / "io"
    d.mkdir(parents=True, exist_ok=True)
    return {"task": task, "key": task, "run": "r1", "dir": str(d), "inputs": inputs or {},
            "map": map_, "signal": None, "outputs": list(outputs)}


def read_out(res, name):
    with open(os.path.join(res.outputs_dir, f"{name}.pkl"), "rb") as f:
        return pickle.load(f)


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once process ``pid`` has terminated (a pidfd becomes readable: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def pool():
    p = KernelPool(size=2, isolation="fresh")
    yield p
    p.shutdown()


def run(pool, nb, tmp_path, **kw):
    io = kw.pop("io", None) or io_spec(tmp_path, outputs=kw.pop("outputs", ()))
    return run_task(nb, params=kw.pop("params", {}), io=io, cwd=kw.pop("cwd", None), pool=pool, **kw)


def test_success_pickles_outputs_and_params_reach_the_task(pool, tmp_path):
    res = run(pool, task_nb("total = x * 2\nnames = [who] * 3\nprint('total is', total)",
                            params="x = 0\nwho = ''\n"),
              tmp_path, params={"x": 21, "who": "ann"}, outputs=["total", "names"])
    assert res.status == "succeeded", res
    assert (res.error, res.reason) == ("", "")
    assert read_out(res, "total") == 42
    assert read_out(res, "names") == ["ann"] * 3
    meta = (Path(res.outputs_dir) / "_meta.json").read_text()
    assert '"names": 3' in meta
    assert res.notebook_path == os.path.join(tmp_path / "io", "executed.ipynb")
    assert os.path.exists(res.notebook_path)
    assert res.exec_s > 0 and res.duration >= res.exec_s


def test_the_run_says_where_its_time_went(pool, tmp_path):
    """The phase split (ms) covers the run's steps, the task cell inside ``cells``, and adds up
    to no more than the run's duration (the bench's task_overhead split is built on it)."""
    res = run(pool, task_nb("import time\ntime.sleep(0.05)"), tmp_path)
    assert res.status == "succeeded", res
    assert list(res.phases) == ["nb_write", "parameterize", "kernel", "cells", "release",
                                "nb_save"]
    assert all(v >= 0 for v in res.phases.values())
    assert res.phases["cells"] >= res.exec_s * 1000 > 0
    assert sum(res.phases.values()) <= res.duration * 1000 + 0.1


def test_inputs_from_pickles_with_fan_in_list_and_map_element(pool, tmp_path):
    io = io_spec(tmp_path, outputs=["summary"], map_={"var": "region", "over": "regions", "index": 1},
                 inputs={"regions": "in/regions.pkl",
                         "parts": ["in/parts.0.pkl", None, "in/parts.2.pkl"]})
    (Path(io["dir"]) / "in").mkdir()
    for rel, value in (("in/regions.pkl", ["north", "south", "east"]),
                       ("in/parts.0.pkl", 10), ("in/parts.2.pkl", 32)):
        (Path(io["dir"]) / rel).write_bytes(pickle.dumps(value))
    res = run(pool, task_nb("summary = (region, [p for p in parts])"), tmp_path, io=io)
    assert res.status == "succeeded", res
    assert read_out(res, "summary") == ("south", [10, None, 32])


def test_failing_cell_gives_error_line_traceback_and_cell(pool, tmp_path):
    code = "print('about to fail')\nratio = 1 / 0"
    res = run(pool, task_nb(code), tmp_path, outputs=["ratio"])
    assert res.status == "failed" and res.reason == "error"
    assert res.error == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in res.traceback and "1 / 0" in res.traceback
    assert "\x1b[" not in res.traceback
    assert res.cell == code
    assert res.outputs_dir == ""              # the save cell never ran
    nb = nbformat.read(res.notebook_path, as_version=4)
    task = next(c for c in nb.cells if "nbflow-task" in c.metadata.get("tags", []))
    assert task.metadata.papermill.status == "failed"
    assert any(o.output_type == "error" for o in task.outputs)
    logs = notebook_logs(nb)
    assert "about to fail" in logs and "ZeroDivisionError: division by zero" in logs


def test_traceback_lines_are_numbered_as_the_users_cell(pool, tmp_path):
    """Header and listing agree with Jupyter's numbering of the user's cell, where the %%task
    line is line 1: the body's line 9 is line 10 (and the listing stays aligned)."""
    nb = task_nb("\n".join(f"v{i} = {i}" for i in range(1, 9)) + "\nratio = 1 / 0\nafter = 1")
    task = next(c for c in nb.cells if "nbflow-task" in c.metadata["tags"])
    task.metadata["nbflow"] = {"task": "boom", "cell": 4}
    res = run(pool, nb, tmp_path, outputs=["ratio"])
    assert res.status == "failed"
    assert "cell 4 (task boom), line 10\n" in res.traceback, res.traceback
    assert "      9 v8 = 8\n----> 10 ratio = 1 / 0\n     11 after = 1" in res.traceback, \
        res.traceback
    assert "Cell In[" not in res.traceback
    # the RunView's outputs panel shows the failed task's error output numbered the same way
    from nbflow.widgets.htmlparts import task_cell_outputs
    err = next(o for o in task_cell_outputs(nbformat.read(res.notebook_path, as_version=4))
               if o["output_type"] == "error")
    assert "cell 4 (task boom), line 10\n" in err["traceback"][0]
    assert "----> 10 ratio = 1 / 0" in err["traceback"][0] and "Cell In[" not in err["traceback"][0]
    # and so does the console's page of the executed notebook
    from nbflow.console.handlers import _notebook_html
    page = _notebook_html(open(res.notebook_path, "rb").read())
    assert "cell 4 (task boom), line 10" in page and "Cell In[" not in page


def test_when_false_skips_the_task(pool, tmp_path):
    res = run(pool, task_nb("ran = True", when="x > 5", params="x = 0\n"), tmp_path,
              params={"x": 1}, outputs=["ran"])
    assert res.status == "skipped" and res.reason == "when"
    assert res.outputs_dir == ""
    res = run(pool, task_nb("ran = True", when="x > 5", params="x = 0\n"), tmp_path,
              io=io_spec(tmp_path / "second", task="t2", outputs=["ran"]), params={"x": 9})
    assert res.status == "succeeded" and read_out(res, "ran") is True


def test_unpicklable_output_fails_naming_the_variable(pool, tmp_path):
    res = run(pool, task_nb("import threading\nlock = threading.Lock()"), tmp_path,
              outputs=["lock"])
    assert res.status == "failed" and res.reason == "error"
    assert res.error.startswith("OutputError: ")
    assert "'lock'" in res.error and "'t'" in res.error and "cannot be pickled" in res.error


def test_timeout_kills_the_kernel_and_the_pool_still_works(pool, tmp_path):
    code = "import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(60)"
    # the timeout must leave room for the setup cells on a loaded machine: at 1.5 s it sometimes
    # fired during the setup cell, so the failure named that cell instead of the task's
    res = run(pool, task_nb(code), tmp_path, timeout=6)
    assert res.status == "failed" and res.reason == "timeout"
    assert res.error == "TimeoutError: task exceeded its --timeout of 6s (6 s)"
    assert res.cell == code
    pid = int((tmp_path / "io" / "pid").read_text())
    assert wait_gone(pid), "the kernel was not killed"
    nb = nbformat.read(res.notebook_path, as_version=4)
    assert "TimeoutError" in notebook_logs(nb)
    again = run(pool, task_nb("y = 1"), tmp_path, io=io_spec(tmp_path / "again", outputs=["y"]))
    assert again.status == "succeeded" and read_out(again, "y") == 1


def test_cancel_event_stops_a_running_task(pool, tmp_path):
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    cancel = threading.Event()

    def cancel_once_started():
        with open(fifo) as f:             # blocks until the task cell opens it for writing
            f.read()
        cancel.set()

    t = threading.Thread(target=cancel_once_started)
    t.start()
    code = f"import time\nwith open({str(fifo)!r}, 'w') as f:\n    f.write('go')\ntime.sleep(60)"
    res = run(pool, task_nb(code), tmp_path, cancel=cancel)
    t.join()
    assert res.status == "failed" and res.reason == "cancelled"
    assert res.error.startswith("CancelledError: ")


def test_cancel_before_start_does_not_run(pool, tmp_path):
    cancel = threading.Event()
    cancel.set()
    res = run(pool, task_nb("open('ran', 'w')"), tmp_path, cancel=cancel)
    assert res.status == "failed" and res.reason == "cancelled"
    assert not (tmp_path / "io" / "ran").exists()


def test_cwd_resolves_relative_files_and_local_modules(pool, tmp_path):
    code = ("import localmod\nwith open('greeting.txt') as f:\n    text = localmod.shout(f.read().strip())\n"
            "here = os.getcwd()")
    res = run(pool, task_nb(code), tmp_path, cwd=str(PROJ), outputs=["text", "here"])
    assert res.status == "succeeded", res
    assert read_out(res, "text") == "HELLO FROM A RELATIVE FILE!"
    assert read_out(res, "here") == str(PROJ)
    # a missing folder falls back to the task's io dir
    res = run(pool, task_nb("here = os.getcwd()"), tmp_path, io=io_spec(tmp_path / "x", outputs=["here"]),
              cwd=str(tmp_path / "nowhere"))
    assert read_out(res, "here") == str(tmp_path / "x" / "io")


def test_executed_notebook_is_as_papermill_writes_it(pool, tmp_path):
    nb = task_nb("print('hello from the task')\nvalue = 3\nvalue")
    nb.cells.insert(0, new_markdown_cell("# a task"))
    res = run(pool, nb, tmp_path, params={"unused": 1})
    assert res.status == "succeeded"
    out = nbformat.read(res.notebook_path, as_version=4)
    pm = out.metadata.papermill
    assert pm.exception is None and pm.duration > 0 and pm.start_time and pm.end_time
    assert pm.parameters["__nbflow__"]["task"] == "t"
    assert out.metadata.language_info.name == "python"
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in out.cells)
    assert all(c.metadata.papermill.status == "completed" for c in out.cells)
    code = [c for c in out.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    task = next(c for c in code if "nbflow-task" in c.metadata.get("tags", []))
    assert task.outputs[0].output_type == "stream" and task.outputs[0].text == "hello from the task\n"
    assert task.outputs[1].output_type == "execute_result" and task.outputs[1].data["text/plain"] == "3"
    assert task.metadata.papermill.duration is not None
    assert "--- cell" in notebook_logs(res.notebook_path)


def test_notebook_logs_has_prints_stderr_and_tracebacks(pool, tmp_path):
    code = "import sys\nprint('out line')\nprint('err line', file=sys.stderr)\nraise ValueError('bad \\x1b[31mred')"
    res = run(pool, task_nb(code), tmp_path)
    assert res.error == "ValueError: bad red"
    logs = notebook_logs(res.notebook_path)
    assert "out line" in logs and "err line" in logs and "ValueError" in logs
    assert "\x1b[" not in logs
    assert strip_ansi("\x1b[0;31mx\x1b[0m") == "x"


def test_papermill_engine_baseline_runs_the_same_notebook(tmp_path):
    res = run_task(task_nb("y = x + 1", params="x = 0\n"), params={"x": 1},
                   io=io_spec(tmp_path, outputs=["y"]), cwd=str(PROJ), engine="papermill")
    assert res.status == "succeeded", res
    assert read_out(res, "y") == 2
    res = run_task(task_nb("1/0"), params={}, io=io_spec(tmp_path / "b"), cwd=None, engine="papermill")
    assert res.status == "failed" and res.error == "ZeroDivisionError: division by zero"
