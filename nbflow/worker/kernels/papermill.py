"""The papermill engine ``nbflow`` (entry point ``papermill.engine``): a notebook in a warm kernel.

The engine never starts a kernel or a client on the critical path: a :class:`KernelPool`
starts kernels (manager + started, ready blocking client) ahead of demand in background threads,
and :class:`WarmEngine` runs the cells itself with ``kc.execute`` and iopub collection (the same
bookkeeping as nbclient: ``output_from_msg``, ``clear_output(wait)``, display ids), calling the
papermill ``nb_man`` hooks so the executed notebook looks as papermill writes it.
"""
from __future__ import annotations

import os
import time

from nbclient.exceptions import CellTimeoutError
from papermill.engines import Engine, papermill_engines
from papermill.log import logger

from nbflow.worker.kernels.cellrun import (CellRun, RunControl, error_output, interruption_message,
                                          run_cell)
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
        # passes the folder in control.cwd instead and only the kernel changes directory
        try:
            k = pool.acquire(setup_hash=setup_hash(nb), cwd=control.cwd or os.getcwd(),
                             control=control, scope=control.scope,
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
        run_deadline = control.deadline
        try:
            run = CellRun(nb, on_message=nb_man.autosave_cell, on_output=on_output)
            for index, cell in enumerate(nb.cells):
                nb_man.cell_start(cell, index)          # every cell, as papermill's client does
                ok, cell_timeout = True, False
                try:
                    if cell.cell_type == "code" and cell.source.strip():
                        if execution_timeout:
                            limit = time.monotonic() + float(execution_timeout)
                            control.deadline = limit if run_deadline is None else min(
                                limit, run_deadline)
                        ok = run_cell(k, cell, index, run, control)
                        control.deadline = run_deadline
                        cell_timeout = (not ok and control.reason == "timeout"
                                        and not (run_deadline and time.monotonic() >= run_deadline))
                    if cell_timeout:                    # the cell's limit, not the task's
                        control.reason = control.message = ""
                        raise CellTimeoutError.error_from_timeout_and_cell(
                            "Cell execution timed out", float(execution_timeout), cell)
                    if not ok:
                        nb_man.cell_exception(cell, cell_index=index)
                finally:
                    control.deadline = run_deadline
                    nb_man.cell_complete(cell, cell_index=index)
                if not ok:
                    break
            if k.language_info:
                nb.metadata["language_info"] = k.language_info
        finally:
            control.marks["cells"] = time.monotonic()
            pool.release(k, reuse=reuse and not k.dead)
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
