"""The papermill engine ``nbflow`` (entry point ``papermill.engine``): a notebook in a warm kernel.

The engine never starts a kernel or a client on the critical path: a :class:`KernelPool`
starts kernels (manager + started, ready blocking client) ahead of demand in background threads,
and :class:`WarmEngine` runs the cells itself: all of them in ONE execute request
(:mod:`nbflow.worker.kernels.onecall`: the kernel runs them one by one and marks each cell's end
on iopub), one request per cell only where that cannot be equivalent (top-level ``await``, a
kernel without the driver); iopub is collected with the same bookkeeping as nbclient
(``output_from_msg``, ``clear_output(wait)``, display ids), calling the papermill ``nb_man``
hooks per cell so the executed notebook looks as papermill writes it.
"""
from __future__ import annotations

import os
import time

from nbclient.exceptions import CellTimeoutError
from papermill.engines import Engine, papermill_engines
from papermill.log import logger

from nbflow.worker.kernels.cellrun import (CellRun, RunControl, cell_deadline, error_output,
                                          interruption_message, run_cell)
from nbflow.worker.kernels.onecall import run_cells
from nbflow.worker.kernels.pool import REUSING, KernelPool, setup_hash
from nbflow.worker.kernels.registry import get_pool


class WarmEngine(Engine):
    """papermill engine ``nbflow``: runs the notebook in a pooled, already-started kernel.

    papermill's engine options mean what they mean for its default engine: ``execution_timeout``
    (seconds per cell: the cell is stopped, its kernel killed, and ``CellTimeoutError`` raised as
    nbclient raises it), ``start_timeout`` (seconds to wait for a kernel: ``RuntimeError`` after),
    ``log_output`` (outputs to papermill's logger as they come: stdout at INFO, stderr at
    WARNING), ``stdout_file``/``stderr_file`` (stream outputs written there as they come) and
    ``autosave_cell_every`` (papermill's manager saves the notebook on output, throttled).

    Isolation: a plain ``papermill.execute_notebook(..., engine_name="nbflow")`` call has no run,
    so it gets a *fresh* kernel (a warm one from the pool, never reused): nothing leaks between two
    notebooks of one process, as with papermill's default engine. ``NBFLOW_PAPERMILL_ISOLATION``
    (``fresh``, ``reuse``: reset namespace, modules shared; ``run``) changes that. nbflow's worker
    passes its own isolation (``--isolation``, default per run) in ``nbflow_control``.

    Extra engine kwargs (papermill forwards unknown ``execute_notebook`` kwargs here):
    ``nbflow_control`` (:class:`RunControl`: deadline, cancel, isolation; filled with the kernel
    used and why it was stopped) and ``nbflow_pool`` (a :class:`KernelPool` instead of the
    process-global one)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                 stderr_file=None, start_timeout=60, execution_timeout=None,
                                 nbflow_control: RunControl | None = None,
                                 nbflow_pool: KernelPool | None = None, **kwargs):
        control = nbflow_control or RunControl(
            isolation=os.environ.get("NBFLOW_PAPERMILL_ISOLATION") or "fresh")
        control.marks["engine"] = time.monotonic()
        pool = nbflow_pool or get_pool(kernel_name, control.isolation)
        nb = nb_man.nb
        # papermill's own cwd= chdirs the whole process (racy with concurrent tasks): the runner
        # passes the folder in control.cwd instead and only the kernel changes directory (in the
        # one execute that runs the cells, see onecall)
        cwd = control.cwd or os.getcwd()
        try:
            k = pool.acquire(setup_hash=setup_hash(nb), cwd=cwd, control=control,
                             scope=control.scope, prepare=False,
                             timeout=float(start_timeout) if start_timeout else None)
        except TimeoutError:
            raise RuntimeError(f"Kernel didn't respond in {start_timeout} seconds") from None
        if k is None:                                   # cancelled/timed out waiting for a kernel
            cls._stop_before_start(nb_man, control)
            return nb
        control.marks["kernel"] = time.monotonic()
        control.kernel_id, control.kernel_pid = k.id, k.pid
        control.kernel_ready_at, control.kernel_uses = k.ready_at, k.uses
        reuse = pool.isolation in REUSING
        on_output = _output_logger(log_output, stdout_file, stderr_file)
        try:
            run = CellRun(nb, on_message=nb_man.autosave_cell, on_output=on_output)
            cells = _Cells(nb_man, nb, control, execution_timeout)
            rest = 0                                    # cells from here: one execute each
            items = [(i, c) for i, c in enumerate(nb.cells)
                     if c.cell_type == "code" and c.source.strip()]
            if k.driver and items:
                res = run_cells(k, items, run, control, cwd=cwd, on_start=cells.start,
                                on_end=cells.end, cell_timeout=execution_timeout)
                control.marks["onecall"] = res.status
                if res.status == "fallback":
                    rest = res.index
                elif res.status == "nodriver":
                    pool.prepare(k, cwd)
                elif res.status == "interrupted":
                    cells.raise_cell_timeout(res.index)
                    rest = None
                else:
                    rest = None
                    if res.status == "ok":
                        cells.finish(len(nb.cells))
            else:
                pool.prepare(k, cwd)
            if rest is not None:
                cells.finish(rest)
                for index in range(rest, len(nb.cells)):
                    if not cells.one(k, run, index):
                        break
            if k.language_info:
                nb.metadata["language_info"] = k.language_info
        finally:
            control.marks["cells"] = time.monotonic()
            # run/reuse: the next task resets it in its own first execute (no round trip here)
            pool.release(k, reuse=reuse and not k.dead, defer=k.driver)
            control.marks["released"] = time.monotonic()
        return nb

    @classmethod
    def _stop_before_start(cls, nb_man, control: RunControl) -> None:
        why = control.interrupted()
        ename, evalue = interruption_message(why, control.timeout)
        control.reason, control.message = why, f"{ename}: {evalue}"
        cell = next((c for c in nb_man.nb.cells if c.cell_type == "code"), None)
        if cell is not None:
            index = nb_man.nb.cells.index(cell)
            nb_man.cell_start(cell, index)
            cell.outputs = [error_output(ename, evalue)]
            nb_man.cell_exception(cell, cell_index=index)
            nb_man.cell_complete(cell, cell_index=index)



class _Cells:
    """papermill's per-cell hooks, in notebook order, for every cell (as papermill's client
    calls them: markdown and empty cells too), whether the cells run in one execute (driven by
    its markers) or one execute each."""

    def __init__(self, nb_man, nb, control: RunControl, execution_timeout):
        self.nb_man, self.nb, self.control = nb_man, nb, control
        self.execution_timeout = execution_timeout
        self.run_deadline = control.deadline
        self.next = 0                           # the first cell not started yet

    def finish(self, upto: int) -> None:
        """Start and complete the cells before ``upto`` not started yet (nothing to run)."""
        while self.next < upto:
            cell = self.nb.cells[self.next]
            self.nb_man.cell_start(cell, self.next)
            self.nb_man.cell_complete(cell, cell_index=self.next)
            self.next += 1

    def start(self, index: int) -> None:
        self.finish(index)
        self.nb_man.cell_start(self.nb.cells[index], index)
        self.next = index + 1

    def end(self, index: int, ok: bool) -> None:
        cell = self.nb.cells[index]
        if not ok and not self.cell_timed_out():
            self.nb_man.cell_exception(cell, cell_index=index)
        if ok or not self.cell_timed_out():
            self.nb_man.cell_complete(cell, cell_index=index)

    def cell_timed_out(self) -> bool:
        """The kernel was stopped for the cell's own ``execution_timeout``, not the task's."""
        return bool(self.execution_timeout and self.control.reason == "timeout"
                    and not (self.run_deadline and time.monotonic() >= self.run_deadline))

    def raise_cell_timeout(self, index: int | None) -> None:
        """After an interruption: a cell's own timeout raises ``CellTimeoutError`` as nbclient
        does (its cell completed first)."""
        if index is None or not self.cell_timed_out():
            return
        cell = self.nb.cells[index]
        self.control.reason = self.control.message = ""
        try:
            raise CellTimeoutError.error_from_timeout_and_cell(
                "Cell execution timed out", float(self.execution_timeout), cell)
        finally:
            self.nb_man.cell_complete(cell, cell_index=index)

    def one(self, k, run: CellRun, index: int) -> bool:
        """Cell ``index`` in its own execute (the per-cell path); False: stop here."""
        control, cell = self.control, self.nb.cells[index]
        self.nb_man.cell_start(cell, index)     # every cell, as papermill's client does
        self.next = index + 1
        ok, cell_timeout = True, False
        try:
            if cell.cell_type == "code" and cell.source.strip():
                if self.execution_timeout:
                    control.deadline = cell_deadline(self.run_deadline, self.execution_timeout)
                ok = run_cell(k, cell, index, run, control)
                control.deadline = self.run_deadline
                cell_timeout = not ok and self.cell_timed_out()
            if cell_timeout:                    # the cell's limit, not the task's
                control.reason = control.message = ""
                raise CellTimeoutError.error_from_timeout_and_cell(
                    "Cell execution timed out", float(self.execution_timeout), cell)
            if not ok:
                self.nb_man.cell_exception(cell, cell_index=index)
        finally:
            control.deadline = self.run_deadline
            self.nb_man.cell_complete(cell, cell_index=index)
        return ok


def _output_logger(log_output: bool, stdout_file, stderr_file):
    """papermill's ``log_output_message``: each new output to its logger and/or files."""
    if not (log_output or stdout_file or stderr_file):
        return None

    streams = {"stdout": (logger.info, stdout_file), "stderr": (logger.warning, stderr_file)}

    def on_output(output) -> None:
        if output.output_type == "stream":
            if output.name not in streams:
                return
            log, file = streams[output.name]
            content = "".join(output.text)
            if log_output:
                log(content)
            if file:
                file.write(content)
                file.flush()
        elif log_output and "data" in output and "text/plain" in output.data:
            logger.info("".join(output.data["text/plain"]))
    return on_output


papermill_engines.register("nbflow", WarmEngine)
