"""The papermill engine ``nbflow`` is a drop-in for papermill's default engine: its options do what
they do there, and two notebooks run in one process share nothing (issue 16's reproductions)."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import nbflow.worker.kernels.papermill  # noqa: F401 - registers the engine
import papermill as pm
from nbclient.exceptions import CellTimeoutError
from nbflow.worker.kernels.registry import shutdown_pool

REPO = Path(__file__).resolve().parent.parent


def notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def _pool():
    yield
    shutdown_pool()


def run(src: Path, out: Path, **kw):
    return pm.execute_notebook(str(src), str(out), engine_name="nbflow", progress_bar=False, **kw)


def test_cli_execution_timeout_interrupts_the_cell(tmp_path):
    src = notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(30)\nprint('finished')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "papermill", str(src), str(tmp_path / "out.ipynb"),
                           "--engine", "nbflow", "--execution-timeout", "2", "--no-progress-bar"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1                           # the issue: rc 0, cell completed
    assert "CellTimeoutError" in proc.stderr or "timed out" in proc.stderr
    out = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    assert "finished" not in str(out.cells[-1].outputs)


def test_execution_timeout_raises_like_the_default_engine(tmp_path):
    src = notebook(tmp_path / "slow.ipynb", "x = 1", "import time\ntime.sleep(30)", "y = 2")
    with pytest.raises(CellTimeoutError):
        run(src, tmp_path / "out.ipynb", execution_timeout=1)
    # a fast notebook under the same limit is untouched
    ok = run(notebook(tmp_path / "fast.ipynb", "print(1 + 1)"), tmp_path / "o2.ipynb",
             execution_timeout=5)
    assert ok.cells[-1].outputs[0].text == "2\n"


def test_two_notebooks_in_one_process_share_nothing(tmp_path):
    run(notebook(tmp_path / "a.ipynb", "import json\njson.LEAK = 'a'\nleaked = 42"), tmp_path / "ao.ipynb")
    out = run(notebook(tmp_path / "b.ipynb",
                       "import json\nprint('leaked' in globals(), hasattr(json, 'LEAK'))"),
              tmp_path / "bo.ipynb")
    assert out.cells[-1].outputs[0].text == "False False\n"


def test_log_output_and_stdout_stderr_files(tmp_path, caplog):
    src = notebook(tmp_path / "talk.ipynb",
                   "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n6 * 7")
    stdout, stderr = io.StringIO(), io.StringIO()
    with caplog.at_level(logging.INFO, logger="papermill"):
        run(src, tmp_path / "out.ipynb", log_output=True, stdout_file=stdout, stderr_file=stderr)
    assert stdout.getvalue() == "to stdout\n" and stderr.getvalue() == "to stderr\n"
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "papermill"]
    assert ("INFO", "to stdout\n") in logged and ("WARNING", "to stderr\n") in logged
    assert ("INFO", "42") in logged
    caplog.clear()
    run(src, tmp_path / "quiet.ipynb")                     # without log_output: nothing logged
    assert not [r for r in caplog.records if r.getMessage().startswith("to std")]


def test_autosave_saves_while_a_cell_runs(tmp_path, monkeypatch):
    from papermill import engines

    saves = []
    monkeypatch.setattr(engines, "write_ipynb", lambda nb, path: saves.append(path))
    src = notebook(tmp_path / "slow.ipynb",
                   "import time\nfor i in range(25):\n    time.sleep(0.1)\n    print(i)")
    run(src, tmp_path / "a.ipynb", autosave_cell_every=0)
    base = len(saves)
    saves.clear()
    run(src, tmp_path / "b.ipynb", autosave_cell_every=1)
    assert len(saves) >= base + 2


def test_start_timeout_is_honoured(tmp_path, monkeypatch):
    from nbflow.worker.kernels import pool as pool_mod

    # a pool that never gets a kernel (patched before it is made: its constructor starts one)
    monkeypatch.setattr(pool_mod.KernelPool, "_fill", lambda self, urgent=False: None)
    p = pool_mod.KernelPool(size=1, isolation="fresh")
    with pytest.raises(RuntimeError, match="Kernel didn't respond in 1 seconds"):
        run(notebook(tmp_path / "n.ipynb", "x = 1"), tmp_path / "o.ipynb", start_timeout=1,
            nbflow_pool=p)
    p.shutdown()
