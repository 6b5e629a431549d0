"""`nbflow run` starts fast: compiling a notebook of plain Python cells imports neither IPython
nor nbformat's JSON-schema validator (each costs 0.3 s to seconds of imports); cells with IPython
syntax still compile as before."""
from __future__ import annotations

import subprocess
import sys

from nbhelpers import write_notebook
from support import REPO


def test_compiling_plain_cells_imports_no_ipython_and_no_jsonschema(tmp_path):
    nb = write_notebook(tmp_path / "plain.ipynb", [
        "%load_ext nbflow", "%%task a --retries 2 --timeout 10s\nx = (1\n     / 2)",
        "%%task b --after a\ny = x + 1"], params="n = 3")
    code = ("import sys\nfrom nbflow.compiler import compile_file\n"
            f"wf = compile_file({str(nb)!r})\n"
            "print(sorted(t.id for t in wf.tasks))\n"
            "print(sorted(m for m in ('IPython', 'jsonschema', 'nbformat') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), check=True).stdout.split("\n")
    assert out[0] == "['a', 'b']"
    assert out[1] == "[]"


def test_cells_with_ipython_syntax_still_compile(tmp_path):
    from nbflow.compiler import compile_file

    nb = write_notebook(tmp_path / "ipy.ipynb", [
        "%%task a\nfiles = !ls\n%time z = 1\nx = len(files)",
        "%%task b\ny = x + 1"])
    wf = compile_file(str(nb))
    b = next(t for t in wf.tasks if t.id == "b")
    assert b.inputs == ["x"]


def test_bad_task_options_are_still_named(tmp_path):
    import pytest

    from nbflow.compiler import compile_file
    from nbflow.errors import WorkflowError

    nb = write_notebook(tmp_path / "bad.ipynb", ["%%task a --retries many\nx = 1"])
    with pytest.raises(WorkflowError, match="invalid int value: 'many'"):
        compile_file(str(nb))
    nb = write_notebook(tmp_path / "bad2.ipynb", ["%%task a --retr 1\nx = 1"])
    with pytest.raises(WorkflowError, match="unrecognized arguments: --retr"):
        compile_file(str(nb))


def _kernel_children(pid: int) -> int:
    from nbflow.worker.autoscale import _children

    n = 0
    for c in _children(pid):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                n += b"ipykernel" in f.read()
        except OSError:
            continue
    return n


def test_a_worker_starts_its_warm_kernels_before_its_first_task(nats_server, tmp_path):
    """The kernels a worker keeps warm (one per slot + a spare) start with the worker, while it
    connects, not when its first task comes: a cold `nbflow run` does not wait for them."""
    from support import wait_for

    from nbflow.stack import Supervisor

    sup = Supervisor(nats_server.url, workers=1, namespace="eager",
                     log_file=tmp_path / "stack.log").start()
    try:
        pid = sup.pids("worker")[0]
        wait_for(lambda: _kernel_children(pid) >= 2, timeout=120,
                 what="the worker's 2 warm kernels, with no task submitted")
    finally:
        sup.stop()
