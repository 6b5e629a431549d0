"""Running a task notebook's cells in a pooled kernel, as nbclient does, under a deadline: the
run's control block, the output bookkeeping (:class:`CellRun`, also used by the one-execute path
:mod:`nbflow.worker.kernels.onecall`) and one cell per execute (:func:`run_cell`: its fallback).

Timeouts and cancellation: the engine owns the kernel, so :class:`RunControl` (passed by the
runner as the engine kwarg ``nbflow_control``) carries a monotonic deadline and a cancel event; the
cell loop polls in short slices, and on either it SIGKILLs the kernel, records an error output in
the running cell and stops, and papermill raises ``PapermillExecutionError`` as for any cell error.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import nbformat

from nbflow.core.durations import human

POLL_SLICE = 0.1          # seconds between deadline/cancel/liveness checks while a cell is quiet


# --------------------------------------------------------------------------------------------
# the run's control block: what the runner tells the engine, and what the engine tells back


@dataclass
class RunControl:
    """Passed as the papermill engine kwarg ``nbflow_control``; the engine fills the lower half."""
    deadline: float | None = None          # time.monotonic() when the attempt must be over
    timeout: float | None = None           # the --timeout in seconds (for the message only)
    cancel: threading.Event | None = None  # set -> the kernel is killed, the task cancelled
    isolation: str | None = None           # None -> the pool's default
    scope: str | None = None               # "run" isolation: kernels never cross runs
    cwd: str | None = None                 # the kernel's cwd and sys.path[0] (else the process's)
    # filled by the engine
    reason: str = ""                       # "timeout" | "cancelled" | "died" | ""
    message: str = ""                      # one line, e.g. "TimeoutError: task exceeded ..."
    kernel_id: str = ""
    kernel_pid: int = 0
    kernel_ready_at: float = 0.0           # time.time() when the kernel became ready
    kernel_uses: int = 0                   # tasks this kernel ran before this one
    # time.monotonic() marks of the engine's steps (the task's phase split): "engine" (papermill
    # handed over), "kernel" (a kernel acquired and entered), "cells" (the last cell done)
    marks: dict = field(default_factory=dict)

    def interrupted(self) -> str:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        return ""


def interruption_message(reason: str, timeout: float | None) -> tuple[str, str]:
    """(ename, evalue) recorded in the cell for a kill by the worker."""
    if reason == "timeout":
        t = timeout or 0
        return "TimeoutError", f"task exceeded its --timeout of {human(t)} ({t:g} s)"
    return "CancelledError", "task cancelled: its kernel was stopped"


def error_output(ename: str, evalue: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue,
                                  traceback=[f"{ename}: {evalue}"])


class CellRun:
    """Output bookkeeping for one notebook, as nbclient does it."""

    def __init__(self, nb, on_message=None, on_output=None):
        self.nb = nb
        self.display_ids: dict[str, dict[int, list[int]]] = {}
        self.clear_next = False
        # papermill's client hooks: after every iopub message (autosave), per new output (logs)
        self.on_message, self.on_output = on_message, on_output

    def handle(self, msg: dict, cell, index: int) -> None:
        self._handle(msg, cell, index)
        if self.on_message is not None:
            self.on_message()

    def _handle(self, msg: dict, cell, index: int) -> None:
        mtype = msg["msg_type"]
        content = msg["content"]
        transient = content.get("transient")
        display_id = transient.get("display_id") if transient else None
        if display_id and mtype in ("execute_result", "display_data", "update_display_data"):
            self._update_display(display_id, msg)
        if "execution_count" in content:
            cell["execution_count"] = content["execution_count"]
        if mtype == "clear_output":
            if content.get("wait"):
                self.clear_next = True
            else:
                cell.outputs[:] = []
                self._forget(index)
            return
        if mtype in ("status", "execute_input", "update_display_data") or mtype.startswith("comm"):
            return
        try:
            out = nbformat.v4.output_from_msg(msg)
        except ValueError:
            return
        if self.clear_next:
            cell.outputs[:] = []
            self._forget(index)
            self.clear_next = False
        if display_id:
            self.display_ids.setdefault(display_id, {}).setdefault(index, []).append(
                len(cell.outputs))
        cell.outputs.append(out)
        if self.on_output is not None:
            self.on_output(out)

    def _forget(self, index: int) -> None:
        for m in self.display_ids.values():
            if index in m:
                m[index] = []

    def _update_display(self, display_id: str, msg: dict) -> None:
        if display_id not in self.display_ids:
            return
        if msg["header"]["msg_type"] == "update_display_data":
            msg["header"]["msg_type"] = "display_data"
        try:
            out = nbformat.v4.output_from_msg(msg)
        except ValueError:
            return
        for ci, idxs in self.display_ids[display_id].items():
            outs = self.nb.cells[ci].outputs
            for oi in idxs:
                outs[oi]["data"] = out["data"]
                outs[oi]["metadata"] = out["metadata"]


def next_message(k: Any, msg_id: str, control: RunControl) -> tuple[dict | None, str]:
    """The next iopub message of request ``msg_id`` in kernel ``k`` (others are skipped: late
    output of earlier code), polled in POLL_SLICE slices: ``(msg, "")``, or ``(None, why)`` as
    soon as the task is cancelled or past its deadline (``control.interrupted()``) or the kernel
    died (``"died"``)."""
    iopub = k.kc.iopub_channel
    while True:
        why = control.interrupted()
        if why:
            return None, why
        wait = POLL_SLICE
        if control.deadline is not None:
            wait = max(0.0, min(wait, control.deadline - time.monotonic()))
        try:
            msg = iopub.get_msg(timeout=wait)
        except queue.Empty:
            if not k.alive():
                return None, "died"
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg, ""


def next_reply(k: Any, msg_id: str, control: RunControl) -> tuple[dict | None, str]:
    """The shell reply to request ``msg_id`` (it precedes the idle status on iopub: it is there
    or nearly), polled as :func:`next_message`: ``(reply, "")`` or ``(None, why)``."""
    shell = k.kc.shell_channel
    while True:
        try:
            reply = shell.get_msg(timeout=POLL_SLICE)
        except queue.Empty:
            if not k.alive():
                return None, "died"
            why = control.interrupted()
            if why:
                return None, why
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply, ""


def cell_deadline(run_deadline: float | None, seconds: float) -> float:
    """The deadline of a cell that starts now and may take ``seconds`` (a per-cell timeout),
    never past the task's own ``run_deadline``."""
    limit = time.monotonic() + float(seconds)
    return limit if run_deadline is None else min(limit, run_deadline)


def run_cell(k: Any, cell, index: int, run: CellRun, control: RunControl) -> bool:
    """Execute one code cell in ``k`` (a pooled kernel); record its outputs. True when it
    succeeded. On a deadline,
    a cancel or a dead kernel: kill it, record an error output, fill ``control`` and return False."""
    cell.outputs = []
    msg_id = k.kc.execute(cell.source, store_history=True, allow_stdin=False, stop_on_error=False)
    failed = False
    idle = False
    while not idle:
        msg, why = next_message(k, msg_id, control)
        if msg is None:
            return interrupt(k, cell, control, why)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
        elif msg["msg_type"] == "error":
            failed = True
        run.handle(msg, cell, index)
    reply, why = next_reply(k, msg_id, control)
    if reply is None:
        return interrupt(k, cell, control, why)
    content = reply["content"]
    if content.get("execution_count"):
        cell["execution_count"] = content["execution_count"]
    if content.get("status") == "error" and not failed:
        cell.outputs.append(error_output(content.get("ename", "Error"), content.get("evalue", "")))
        failed = True
    return not failed


def interrupt(k: Any, cell, control: RunControl, why: str) -> bool:
    k.kill()
    if why == "died":
        ename, evalue = "DeadKernelError", "the kernel died while executing this cell"
    else:
        ename, evalue = interruption_message(why, control.timeout)
    control.reason = why
    control.message = f"{ename}: {evalue}"
    cell.outputs.append(error_output(ename, evalue))
    return False
