"""The papermill engine ``nbflow`` (entry point ``papermill.engine``): a notebook in a warm kernel.

The engine never starts a kernel or a client on the critical path: a :class:`KernelPool`
starts kernels (manager + started, ready blocking client) ahead of demand in background threads,
and :class:`WarmEngine` runs the cells itself with ``kc.execute`` and iopub collection (the same
bookkeeping as nbclient: ``output_from_msg``, ``clear_output(wait)``, display ids), calling the
papermill ``nb_man`` hooks so the executed notebook looks as papermill writes it.
"""
from __future__ import annotations

import os

from papermill.engines import Engine, papermill_engines

from nbflow.worker.kernels.cellrun import (CellRun, RunControl, error_output, interruption_message,
                                          run_cell)
from nbflow.worker.kernels.pool import REUSING, KernelPool, get_pool, setup_hash


class WarmEngine(Engine):
    """papermill engine ``nbflow``: runs the notebook in a pooled, already-started kernel.

    Extra engine kwargs (papermill forwards unknown ``execute_notebook`` kwargs here):
    ``nbflow_control`` (:class:`RunControl`: deadline, cancel, isolation; filled with the kernel
    used and why it was stopped) and ``nbflow_pool`` (a :class:`KernelPool` instead of the
    process-global one)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, nbflow_control: RunControl | None = None,
                                 nbflow_pool: KernelPool | None = None, **kwargs):
        control = nbflow_control or RunControl()
        pool = nbflow_pool or get_pool(kernel_name, control.isolation)
        nb = nb_man.nb
        # papermill's own cwd= chdirs the whole process (racy with concurrent tasks): the runner
        # passes the folder in control.cwd instead and only the kernel changes directory
        k = pool.acquire(setup_hash=setup_hash(nb), cwd=control.cwd or os.getcwd(), control=control,
                         scope=control.scope)
        if k is None:                                   # cancelled/timed out waiting for a kernel
            cls._stop_before_start(nb_man, control)
            return nb
        control.kernel_id, control.kernel_pid = k.id, k.pid
        control.kernel_ready_at, control.kernel_uses = k.ready_at, k.uses
        reuse = pool.isolation in REUSING
        try:
            run = CellRun(nb)
            for index, cell in enumerate(nb.cells):
                nb_man.cell_start(cell, index)          # every cell, as papermill's client does
                ok = True
                try:
                    if cell.cell_type == "code" and cell.source.strip():
                        ok = run_cell(k, cell, index, run, control)
                    if not ok:
                        nb_man.cell_exception(cell, cell_index=index)
                finally:
                    nb_man.cell_complete(cell, cell_index=index)
                if not ok:
                    break
            if k.language_info:
                nb.metadata["language_info"] = k.language_info
        finally:
            pool.release(k, reuse=reuse and not k.dead)
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


papermill_engines.register("nbflow", WarmEngine)
