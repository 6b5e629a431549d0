"""The analyst's loop with the CLI as a user types it, on a real stack: a run fails, the cell is
fixed in the file, `nbflow retry` runs the fix without re-executing what succeeded; `--reuse`
re-executes exactly what changed and what depends on it. Executions are counted by a side
effect (each task appends its name to a file), never read back from nbflow's bookkeeping."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbhelpers import write_notebook


def nbflow(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "nbflow", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def on_stack(nats_server, stack):
    return {"NBFLOW_NATS_URL": nats_server.url, "NBFLOW_NAMESPACE": "itest"}


def pipeline(path: Path, log: Path, report: str, clean: str = "[r * 2 for r in rows]",
             title: str = "'daily'") -> Path:
    def cell(name, body):
        return f"%%task {name}\nopen({str(log)!r}, 'a').write({name + chr(10)!r})\n{body}"
    return write_notebook(path, [
        cell("extract", "rows = list(range(n))"),
        cell("clean", f"cleaned = {clean}"),
        cell("report", report),
    ], params=f"n = 3\ntitle = {title}")


def executed(log: Path) -> list[str]:
    """Tasks executed since the last call (and forget them)."""
    names = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return sorted(names)


def run_id(out: str) -> str:
    return re.search(r"run (\w{8})", out).group(1)


def test_fail_fix_retry_then_reuse(on_stack, tmp_path):
    log = tmp_path / "executions.log"      # outside the notebook's folder (which is bundled)
    nb = tmp_path / "project" / "daily.ipynb"
    pipeline(nb, log, "raise ValueError(f'no title yet for {cleaned}')")

    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 1
    failed = run_id(r.stderr + r.stdout)
    assert f"after fixing: nbflow retry {failed}" in r.stdout
    assert executed(log) == ["clean", "extract", "report"]

    # --same-code reruns what the failed run ran: the same error
    r = nbflow("retry", failed, "--same-code", env=on_stack)
    assert r.returncode == 1 and "no title yet" in r.stdout
    assert executed(log) == ["report"]

    # fix the cell, save, retry: the fix runs; extract and clean are not executed again
    pipeline(nb, log, "summary = f'{title}: {sum(cleaned)}'\nprint(summary)")
    r = nbflow("retry", failed, env=on_stack)
    assert r.returncode == 0, r.stdout + r.stderr
    retried = run_id(r.stderr)
    assert executed(log) == ["report"]
    assert re.search(rf"extract\s+reused\s.*from run {failed}", r.stdout), r.stdout
    assert "daily: 6" in nbflow("logs", retried, "report", env=on_stack).stdout

    # unchanged notebook + --reuse: nothing executes
    r = nbflow("run", str(nb), "--reuse", env=on_stack)
    assert r.returncode == 0, r.stdout + r.stderr
    assert executed(log) == []
    assert r.stdout.count("reused") == 3

    # edit one task: exactly it and what depends on it run again
    pipeline(nb, log, "summary = f'{title}: {sum(cleaned)}'\nprint(summary)",
             clean="[r * 3 for r in rows]")
    r = nbflow("run", str(nb), "--reuse", env=on_stack)
    assert r.returncode == 0, r.stdout + r.stderr
    assert executed(log) == ["clean", "report"]
    again = run_id(r.stderr)
    assert "daily: 9" in nbflow("logs", again, "report", env=on_stack).stdout
    st = nbflow("status", again, env=on_stack).stdout
    assert re.search(r"extract\s+reused from run \w{8}", st), st

    # a changed parameter value re-executes what reads it (only report reads title)
    r = nbflow("run", str(nb), "--reuse", "-p", "title", "weekly", env=on_stack)
    assert r.returncode == 0, r.stdout + r.stderr
    assert executed(log) == ["report"]
    r = nbflow("run", str(nb), "--reuse", "-p", "n", "4", env=on_stack)
    assert executed(log) == ["clean", "extract", "report"]

    # default `nbflow run` executes everything
    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 0
    assert executed(log) == ["clean", "extract", "report"]


def test_retry_says_when_the_file_is_gone_or_broken(on_stack, tmp_path):
    log = tmp_path / "x.log"
    nb = pipeline(tmp_path / "gone.ipynb", log, "raise RuntimeError('x')")
    r = nbflow("run", str(nb), env=on_stack)
    failed = run_id(r.stderr + r.stdout)
    write_notebook(nb, ["%%task a --bogus\nx = 1"])
    r = nbflow("retry", failed, env=on_stack)
    assert r.returncode == 2 and "no longer compiles" in r.stderr
    assert f"nbflow retry {failed} --same-code" in r.stderr
    nb.unlink()
    r = nbflow("retry", failed, env=on_stack)
    assert r.returncode == 2 and "which is gone" in r.stderr and "--same-code" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_file_handed_from_task_to_task(on_stack, tmp_path):
    """An absolute path one task writes and another reads orders them (the reader is above the
    writer in the notebook, so without the inferred edge it would run first and find no file);
    a relative one cannot work across tasks, and the warning says so before the run."""
    shared, log = tmp_path / "shared", tmp_path / "got.log"
    shared.mkdir()
    hand = str(shared / "hand.txt")
    nb = write_notebook(tmp_path / "project" / "files.ipynb", [
        f"%%task read\ngot = open({hand!r}).read()\nopen({str(log)!r}, 'a').write(got)",
        f"%%task write\nopen({hand!r}, 'w').write(str(n))",
    ], params="n = 3")
    r = nbflow("run", str(nb), "-p", "n", "7", env=on_stack)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: task 'read' (cell 2 `%%task read`) runs after task 'write'" in r.stderr
    assert "warning" not in r.stderr
    assert log.read_text() == "7"                    # read what write wrote in this run

    rel = write_notebook(tmp_path / "project2" / "rel.ipynb", [
        "%%task write\nopen('hand.txt', 'w').write('1')",
        f"%%task read --after write\ngot = open('hand.txt').read()\nopen({str(log)!r}, 'a').write(got)",
    ])
    r = nbflow("run", str(rel), env=on_stack)
    assert "relative path cannot hand a file from one task to another" in r.stderr, r.stderr
    # and indeed: the write landed in write's own copy of the folder, gone when it ended
    assert r.returncode == 1 and "FileNotFoundError" in r.stdout, r.stdout
    assert log.read_text() == "7" and not (rel.parent / "hand.txt").exists()
