"""Execute one task notebook through papermill and say what happened, in one TaskResult.

The NATS worker loop calls :func:`run_task` with the compiled task notebook, the run's parameters
and the ``__nbflow__`` io spec (see :mod:`nbflow.io`); it gets back the status, the one-line
error, the traceback and failing cell, the executed notebook and the outputs folder. Task errors
never raise; only worker bugs do (a kernel that cannot start, an unwritable dir).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import nbformat
import papermill
from papermill.exceptions import PapermillExecutionError

from nbflow import io as nbio
from nbflow.worker.kernels import papermill as _engine  # noqa: F401 - registers the engine "nbflow"
from nbflow.worker.kernels.cellrun import POLL_SLICE, RunControl, interruption_message
from nbflow.core.tracebacks import cell_label, strip_ansi, user_cells  # noqa: F401 (also here)
from nbflow.worker.kernels.pool import KernelPool

log = logging.getLogger("nbflow.worker.runner")

INPUT_NB = "task.ipynb"
EXECUTED_NB = "executed.ipynb"
TASK_TAG = "nbflow-task"            # the compiler may tag the task's own cell(s) for exec_s



@dataclass
class TaskResult:
    status: str                 # "succeeded" | "failed" | "skipped"
    error: str = ""             # one line: "ZeroDivisionError: division by zero"
    traceback: str = ""         # the notebook's traceback, ANSI colour codes stripped
    cell: str = ""              # the failing cell's source (the task cell, usually)
    notebook_path: str = ""     # the executed notebook, as papermill wrote it (inside workdir)
    outputs_dir: str = ""       # NAME.pkl files + _meta.json written by nbflow.io.save_outputs
    exec_s: float = 0.0         # time spent executing the task's own cell(s)
    duration: float = 0.0       # wall time of the whole run_task call
    reason: str = ""            # "timeout" | "cancelled" | "error" | "when" | ""
    # where the time went, ms (see :func:`phase_split`): nb_write, parameterize, kernel, cells,
    # release, nb_save
    phases: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_task(nb: nbformat.NotebookNode, *, params: dict, io: dict, cwd: str | None,
             timeout: float | None = None, cancel: threading.Event | None = None,
             engine: str = "nbflow", kernel_name: str = "python3", log=None,
             isolation: str | None = None, save_every_cell: bool = False,
             pool: KernelPool | None = None, scope: str | None = None) -> TaskResult:
    """Run a task notebook; never raises for the task's own failures.

    ``engine``: ``"nbflow"`` (warm kernel pool, :mod:`nbflow.worker.kernels.papermill`) or ``"papermill"``
    (papermill's own nbclient engine: a new kernel per task; the benchmark baseline).
    ``isolation``: ``"fresh"``/``"reuse"`` for the nbflow engine (None: the pool's default).
    ``save_every_cell``: let papermill rewrite the executed notebook at each cell's start and end
    (live progress on disk, a few ms per cell); else it is written once, at the end.
    ``pool``: a private :class:`~nbflow.worker.kernels.pool.KernelPool` instead of the process one.
    """
    say = _logger(log)
    t0 = time.monotonic()
    workdir = io["dir"]
    os.makedirs(workdir, exist_ok=True)
    in_path = os.path.join(workdir, INPUT_NB)
    out_path = os.path.join(workdir, EXECUTED_NB)
    nbformat.write(nb, in_path)
    t_written = time.monotonic()
    if not cwd or not os.path.isdir(cwd):
        cwd = workdir
    cwd = os.path.abspath(cwd)
    control = RunControl(deadline=t0 + timeout if timeout else None, timeout=timeout,
                                 cancel=cancel, isolation=isolation, cwd=cwd,
                                 scope=scope or io.get("run"))
    task = io.get("task", "?")
    if control.interrupted():
        return _finish(TaskResult("failed", reason=control.interrupted(),
                                  error="{}: {}".format(*interruption_message(
                                      control.interrupted(), timeout))), t0)

    args: dict[str, Any] = dict(parameters={**params, "__nbflow__": io}, kernel_name=kernel_name,
                                progress_bar=False, log_output=False)
    watchdog = None
    if engine == "nbflow":
        args.update(engine_name="nbflow", nbflow_control=control,
                    request_save_on_cell_execute=save_every_cell)
        if pool is not None:
            args["nbflow_pool"] = pool
    elif engine in ("papermill", "nbclient", None):
        from jupyter_client import KernelManager
        # its connection file in the task's work dir: removed with it, even if the worker dies
        km = KernelManager(kernel_name=kernel_name,
                           connection_file=os.path.join(workdir, "kernel.json"))
        args.update(engine_name=None, cwd=cwd, km=km, request_save_on_cell_execute=True)
        if control.deadline is not None or cancel is not None:
            watchdog = _Watchdog(km, control)
    else:
        raise ValueError(f"unknown engine {engine!r}: 'nbflow' or 'papermill'")

    say(f"nbflow: task {task!r}: running ({engine} engine)")
    err: PapermillExecutionError | None = None
    executed = None
    t_pm = time.monotonic()
    try:
        executed = papermill.execute_notebook(in_path, out_path, **args)
    except PapermillExecutionError as e:
        err = e
    except Exception:
        if not control.reason:          # not our kill: a worker bug
            raise
    finally:
        if watchdog is not None:
            watchdog.stop()
    t_done = time.monotonic()

    res = TaskResult("succeeded", notebook_path=out_path if os.path.exists(out_path) else "")
    res.phases = phase_split(t0, t_written, t_pm, t_done, control.marks)
    out_dir = os.path.join(workdir, nbio.OUT_DIR)
    if os.path.isdir(out_dir):
        res.outputs_dir = out_dir
    if executed is None and res.notebook_path:
        try:
            executed = nbformat.read(out_path, as_version=4)
        except Exception:  # noqa: BLE001 - a half-written notebook must not hide the task's error
            executed = None
    if executed is not None:
        res.exec_s = task_exec_seconds(executed)
        if err is None:
            err = _clean_exit(executed)

    if err is not None and (err.ename == "Skip" or os.path.exists(
            os.path.join(workdir, nbio.SKIP_MARKER))):
        res.status, res.reason = "skipped", "when"
        res.error = _one_line(err.ename, err.evalue)
    elif control.reason in ("timeout", "cancelled"):
        res.status, res.reason, res.error = "failed", control.reason, control.message
        if err is not None:
            res.cell = err.source
        elif executed is not None:
            res.cell = _running_cell(executed)
    elif err is not None:
        res.status, res.reason = "failed", "error"
        res.error = _one_line(err.ename, err.evalue)
        res.traceback = (user_cells(executed, strip_ansi("\n".join(err.traceback or [])))
                         if executed is not None else strip_ansi("\n".join(err.traceback or []))
                         ) or res.error
        res.cell = err.source
    elif control.reason:                 # the baseline engine's kernel died under us
        res.status, res.reason, res.error = "failed", "error", control.message
    say(f"nbflow: task {task!r}: {res.status}{' (' + res.reason + ')' if res.reason else ''}"
        f"{': ' + res.error if res.error else ''}")
    return _finish(res, t0)


def phase_split(t0: float, written: float, pm: float, done: float, marks: dict) -> dict:
    """The run's time in ms by step, summing to ``done - t0``: ``nb_write`` (the task notebook
    to disk), ``parameterize`` (papermill reads it, injects the parameters), ``kernel`` (a warm
    kernel acquired), ``cells`` (the one execute that resets the kernel when the last task left
    it dirty, enters the task's folder and runs every cell, the task's own included; see
    kernels/onecall.py), ``release`` (the kernel handed back; its reset waits for the next
    task), ``nb_save``
    (papermill writes the executed notebook). Steps the engine did not reach (the baseline
    engine, a task stopped early) are folded into the step before."""
    points = [("nb_write", written), ("papermill", pm)]
    for name in ("engine", "kernel", "cells", "released"):
        if name in marks:
            points.append((name, marks[name]))
    label = {"nb_write": "nb_write", "papermill": "nb_write", "engine": "parameterize",
             "kernel": "kernel", "cells": "cells", "released": "release"}
    out: dict = {}
    prev = t0
    for name, t in points:
        out[label[name]] = out.get(label[name], 0.0) + (t - prev) * 1000
        prev = t
    out["nb_save"] = (done - prev) * 1000
    return {k: round(v, 2) for k, v in out.items()}


def _clean_exit(nb) -> PapermillExecutionError | None:
    """papermill lets ``sys.exit(0)`` pass as a clean end; for a task it is a failure: the cell
    stopped before its end, so its outputs were never all assigned."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error" and out.get("ename") == "SystemExit":
                code = out.get("evalue") or "0"
                return PapermillExecutionError(
                    cell_index=i, exec_count=cell.get("execution_count"), source=cell.source,
                    ename="SystemExit", evalue=f"{code} (sys.exit() stopped the cell before its "
                    "end; raise an exception to fail a task, or use --when to skip it)",
                    traceback=out.get("traceback") or [])
    return None


def _finish(res: TaskResult, t0: float) -> TaskResult:
    res.duration = time.monotonic() - t0
    return res


def _one_line(ename: str, evalue: str) -> str:
    first = strip_ansi(evalue or "").strip().splitlines()
    return f"{ename}: {first[0]}" if first else ename


def _logger(log):
    if log is None:
        return globals()["log"].debug
    if hasattr(log, "info"):
        return log.info
    return log


def _running_cell(nb) -> str:
    for cell in nb.cells:
        if cell.get("metadata", {}).get("papermill", {}).get("status") in ("running", "failed"):
            return cell.source
    return ""


def _is_task_cell(cell) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    return TASK_TAG in tags


def task_exec_seconds(nb) -> float:
    """Seconds spent in the task's own cell(s): those tagged ``nbflow-task``; without tags, the
    code cells after the parameters that are not nbflow's load/when/save cells."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    mine = [c for c in cells if _is_task_cell(c)]
    if not mine:
        after = False
        for c in cells:
            tags = c.get("metadata", {}).get("tags", [])
            if "parameters" in tags or "injected-parameters" in tags:
                after = True
                continue
            if after and "__nbflow_io" not in c.source and "nbflow.io" not in c.source:
                mine.append(c)
    total = 0.0
    for c in mine:
        d = c.get("metadata", {}).get("papermill", {}).get("duration")
        if d:
            total += float(d)
    return total


def notebook_logs(nb) -> str:
    """The stdout/stderr text and error tracebacks (ANSI stripped) of every cell of an executed
    notebook (a NotebookNode or a path), each under a one-line header."""
    if isinstance(nb, (str, os.PathLike)):
        nb = nbformat.read(nb, as_version=4)
    parts: list[str] = []
    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        n += 1
        texts = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(strip_ansi(out.get("text", "")))
            elif out.get("output_type") == "error":
                tb = user_cells(nb, strip_ansi("\n".join(out.get("traceback") or [])))
                texts.append((tb or f"{out.get('ename')}: {out.get('evalue')}") + "\n")
        if not texts:
            continue
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        status = cell.get("metadata", {}).get("papermill", {}).get("status", "")
        head = f"--- {cell_label(cell, n)}" + (f" [{status}]" if status else "") + \
            f": {first[:60]}"
        body = "".join(texts)
        parts.append(head + "\n" + body + ("" if body.endswith("\n") else "\n"))
    return "".join(parts)


class _Watchdog:
    """For the papermill baseline engine: kill its kernel on the deadline or a cancel."""

    def __init__(self, km, control: RunControl):
        self.km, self.control = km, control
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="nbflow-watchdog")
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SLICE):
            why = self.control.interrupted()
            if why:
                ename, evalue = interruption_message(why, self.control.timeout)
                self.control.reason, self.control.message = why, f"{ename}: {evalue}"
                p = getattr(getattr(self.km, "provisioner", None), "process", None)
                if p is not None:         # else the kernel is still starting: kill it once up
                    p.kill()
                    return

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
