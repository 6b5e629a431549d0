"""Running the instances of a --map chunk one after another in one held kernel.

A chunk's kernel runs the task's setup cells once (one execute, with the reset its last task
left, see :mod:`nbflow.worker.kernels.onecall`); then per instance ONE execute runs its
parameters, the injected run parameters (its own ``__nbflow__``) and the input loading (and
``--when``) as one cell, the task cell, the cell saving its outputs, and then forgets its names
(:func:`nbflow.io.forget`: the next instance starts from the namespace the setup made, as a
task in a fresh kernel would) — each cell's outputs recorded in its place, and the cells one
execute each only where one execute cannot be equivalent (top-level ``await``). Each instance gets its own executed notebook (the setup cells
carry the outputs of their one run) and its own :class:`~nbflow.worker.runner.TaskResult`.
What differs from one task per kernel: instances of one chunk share the objects the setup made
(a task that mutates them shows the next instance the change) and the task's folder.
Runs in a worker thread, like ``runner.run_task``.
"""
from __future__ import annotations

import copy
import os
import time

from nbformat.v4 import nbjson
from papermill.translators import translate_parameters

from nbflow import io as nbio
from nbflow.compiler.tasknb import code_cell
from nbflow.core.tracebacks import strip_ansi, user_cells
from nbflow.worker.kernels.cellrun import CellRun, RunControl, interruption_message
from nbflow.worker.kernels.onecall import run_all
from nbflow.worker.kernels.pool import setup_hash
from nbflow.worker.kernels.registry import get_pool
from nbflow.worker.runner import EXECUTED_NB, TaskResult, _one_line

KEEP = "import nbflow.io as __nbflow_io\n__nbflow_keep = None\n__nbflow_keep = set(globals())"
FORGET = "__nbflow_io.forget(globals(), __nbflow_keep)"


def _tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


class ChunkKernel:
    """One kernel held for the instances of a chunk (``nb``: the task notebook)."""

    def __init__(self, nb, cwd: str | None, scope: str, isolation: str | None,
                 kernel_name: str = "python3"):
        self.nb, self.cwd, self.scope = nb, cwd, scope
        self.pool = get_pool(kernel_name, isolation)
        self.kernel_name = kernel_name
        cells = list(nb.cells)
        at = next((i for i, c in enumerate(cells) if "parameters" in _tags(c)), None)
        task_at = next((i for i, c in enumerate(cells) if "nbflow-task" in _tags(c)), None)
        if at is None or task_at is None:
            raise ValueError("not a task notebook: no parameters or task cell")
        self.setup = [i for i in range(at) if cells[i].cell_type == "code"]
        self.params_at, self.task_at = at, task_at
        self.prelude = list(range(at, task_at))        # parameters, env, load, when
        self.after = list(range(task_at + 1, len(cells)))   # save
        self.hash = setup_hash(nb)
        self.k = None
        self.setup_outputs: dict[int, list] = {}

    # --- the kernel -----------------------------------------------------------------------------
    def _ready(self, control: RunControl, run: CellRun, cells) -> str:
        """A kernel with the setup run: "" or why not ("failed": a setup cell failed, its
        outputs are in ``cells``; "interrupted": cancelled or timed out waiting)."""
        if self.k is not None and not self.k.dead and self.k.alive():
            for i in self.setup:
                cells[i].outputs = copy.deepcopy(self.setup_outputs.get(i, []))
            return ""
        self.drop()
        k = self.pool.acquire(setup_hash=self.hash, cwd=self.cwd, control=control,
                              scope=self.scope, timeout=60.0, prepare=False)
        if k is None:
            return "interrupted"
        self.k = k
        control.kernel_id, control.kernel_pid = k.id, k.pid
        # the reset the kernel's last task left, the folder, the setup cells and the names to
        # keep: one execute
        keep = code_cell(KEEP)
        items = [(i, cells[i]) for i in self.setup if cells[i].source.strip()] + [(-1, keep)]
        try:
            res = run_all(k, items, run, control, cwd=self.cwd, pool=self.pool)
        except Exception:
            self.drop()
            raise
        if res.status != "ok":
            self.drop()
            return "failed"
        for i in self.setup:
            self.setup_outputs[i] = copy.deepcopy(cells[i].outputs)
        return ""

    def drop(self) -> None:
        """Give the kernel back to the pool (reset there; discarded when it was killed)."""
        k, self.k = self.k, None
        if k is not None:
            self.pool.release(k, reuse=not k.dead and k.alive())

    # --- one instance ---------------------------------------------------------------------------
    def run_one(self, io: dict, params: dict, timeout: float | None, cancel) -> TaskResult:
        t0 = time.monotonic()
        workdir = io["dir"]
        os.makedirs(workdir, exist_ok=True)
        control = RunControl(deadline=t0 + timeout if timeout else None, timeout=timeout,
                             cancel=cancel, cwd=self.cwd, scope=self.scope)
        nb = copy.deepcopy(self.nb)
        injected = code_cell(
            translate_parameters(self.kernel_name, "python", {**params, "__nbflow__": io},
                                 "Parameters"), metadata={"tags": ["injected-parameters"]},
            cell_id="injected-parameters")
        nb.cells.insert(self.params_at + 1, injected)
        shift = lambda i: i + 1 if i > self.params_at else i  # noqa: E731 - after the insert
        run = CellRun(nb)
        res = TaskResult("succeeded")
        why = self._ready(control, run, nb.cells)
        failed_cell = None
        if why == "interrupted":
            res.status, res.reason = "failed", control.interrupted() or "cancelled"
            res.error = control.message or res.reason
        elif why == "failed":
            failed_cell = next((c for c in (nb.cells[i] for i in self.setup)
                                if any(o.get("output_type") == "error" for o in c.outputs)),
                               None)
            # the chunk's own step (reset, folder, names to keep) failed or was stopped: no
            # cell of the task holds it. Stopped: the instance's attempt ends so; else the chunk
            # path gives up and the instance runs alone (Chunks._execute), never "succeeded"
            stopped = control.reason or control.interrupted()
            if failed_cell is None and stopped in ("timeout", "cancelled"):
                res.status, res.reason = "failed", stopped
                res.error = control.message or "{}: {}".format(
                    *interruption_message(stopped, timeout))
            elif failed_cell is None:
                self.drop()
                raise RuntimeError("the chunk's kernel could not be prepared for this instance "
                                   "(its reset, folder or keep step failed)")
        else:
            # one execute: the parameters, the injected parameters, env warnings, loading and
            # --when (as one cell, shown in the last of them); the task; saving the outputs
            # (shown in the save cell); then the kernel forgets this instance's names
            pre = [nb.cells[self.params_at], injected] + [nb.cells[shift(i)]
                                                          for i in self.prelude[1:]]
            shown = pre[-1]
            step = code_cell("\n".join(c.source for c in pre))
            task = nb.cells[shift(self.task_at)]
            after = [nb.cells[shift(i)] for i in self.after]
            items = [(shift(self.prelude[-1]), step), (shift(self.task_at), task)]
            save = None
            if after:
                save = code_cell("\n".join(c.source for c in after))
                items.append((shift(self.after[-1]), save))
            # (the kernel stays in the chunk's folder: cwd None, as one cell after another)
            out = run_all(self.k, items, run, control, cwd=None, pool=self.pool,
                          forget_code=FORGET)
            shown.outputs, shown.execution_count = step.outputs, step.get("execution_count")
            t_at = shift(self.task_at)
            if t_at in out.started and t_at in out.ended:
                res.exec_s = out.ended[t_at] - out.started[t_at]
            if save is not None and save.get("execution_count"):
                after[-1].outputs = save.outputs
                after[-1].execution_count = save.get("execution_count")
            if out.status != "ok":
                cell_at = {items[0][0]: shown, t_at: task}
                if save is not None:
                    cell_at[items[-1][0]] = after[-1]
                failed_cell = cell_at.get(out.index, task)
        if self.k is not None and (control.reason or self.k.dead):
            self.drop()                                # killed: the next instance gets another
        if self.k is not None and self.k.language_info:
            nb.metadata["language_info"] = self.k.language_info
        out_path = os.path.join(workdir, EXECUTED_NB)
        with open(out_path, "w", encoding="utf-8") as f:     # built from a valid notebook:
            f.write(nbjson.writes(nb))                      # no schema validation per instance
        res.notebook_path = out_path
        out_dir = os.path.join(workdir, nbio.OUT_DIR)
        if os.path.isdir(out_dir):
            res.outputs_dir = out_dir
        if failed_cell is not None and res.status == "succeeded":
            err = next((o for o in failed_cell.outputs if o.get("output_type") == "error"), {})
            ename, evalue = err.get("ename", "Error"), err.get("evalue", "")
            if ename == "Skip" or os.path.exists(os.path.join(workdir, nbio.SKIP_MARKER)):
                res.status, res.reason = "skipped", "when"
                res.error = _one_line(ename, evalue)
            else:
                res.status = "failed"
                res.reason = control.reason if control.reason in ("timeout", "cancelled") \
                    else "error"
                res.error = control.message if control.reason else _one_line(ename, evalue)
                tb = strip_ansi("\n".join(err.get("traceback") or []))
                res.traceback = (user_cells(nb, tb) or tb or res.error) if not control.reason \
                    else ""
                res.cell = failed_cell.source
        elif res.status == "succeeded":
            exits = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "error" and o.get("ename") == "SystemExit"]
            if exits:       # sys.exit() stopped the cell before its end: a failure, as in runner
                res.status, res.reason = "failed", "error"
                res.error = (f"SystemExit: {exits[0].get('evalue') or '0'} (sys.exit() stopped "
                             f"the cell before its end; raise an exception to fail a task, or "
                             f"use --when to skip it)")
                res.cell = nb.cells[shift(self.task_at)].source
        res.duration = time.monotonic() - t0
        return res
