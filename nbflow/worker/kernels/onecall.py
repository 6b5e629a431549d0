"""A task notebook's code cells in ONE execute_request, each cell's outputs recorded in it.

Each execute costs an ipykernel ~15-20 ms of its own work (shell and iopub threads, not
latency), whatever the code: a trivial task used to make six (its cells one by one, plus the
reset between tasks). Here one execute runs :func:`nbflow.kernelside.run` in the kernel, which
runs the cells one after another with IPython's ``run_cell`` and publishes an end marker after
each on iopub (the next cell starts there). This side reads iopub in order: the markers say which cell the
outputs in between belong to (recorded as nbclient records them, :class:`CellRun`) and drive the
caller's per-cell hooks (papermill's ``cell_start``/``cell_exception``/``cell_complete``) as the
cells run, so per-cell times, statuses, execution counts, live logs and the failing cell stay as
with one execute per cell. Deadline, cancel and a dead kernel are checked in the same poll
loop as :func:`~nbflow.worker.kernels.cellrun.run_cell`; a per-cell timeout applies to the cell
running (from the previous cell's end marker).

Where one execute cannot be equivalent, :func:`run_cells` returns ``fallback`` and the caller
runs the rest one execute per cell: a cell with top-level ``await`` (IPython would run it as a
coroutine on the kernel's event loop, which is busy running this execute; the kernel decides,
with IPython's own ``should_run_async``), and a kernel without the driver (not Python, or its
install at warm-up failed: then from the first cell).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from nbflow.worker.kernels.cellrun import (CellRun, RunControl, cell_deadline, error_output,
                                          interrupt, next_message, next_reply, run_cell)

MSG_TYPE = "nbflow_cell"        # nbflow.kernelside.MSG_TYPE (not imported: it runs in kernels)


@dataclass
class Outcome:
    """How :func:`run_cells` ended. ``status``: ``ok`` (every cell ran), ``error`` (cell
    ``index`` failed; its error output is recorded), ``interrupted`` (the kernel was killed:
    ``control.reason`` says why; the error output is in cell ``index``), ``fallback`` (the cells
    from ``index`` on need one execute each; those before it ran), ``nodriver`` (nothing ran:
    the kernel has no driver; the caller prepares the kernel and runs every cell itself)."""
    status: str
    index: int | None = None
    started: dict | None = None     # index -> time.monotonic() it started (see run_cells)
    ended: dict | None = None       # index -> time.monotonic() its end marker arrived


def driver_code(k: Any, items: list[tuple[int, str]], cwd: str | None,
                forget: bool = False) -> str:
    """The one execute's code: reset (when ``k`` is dirty), enter ``cwd``, run ``items``."""
    args = {"reset": bool(k.dirty), "home": k.home, "prev": k.path0, "cwd": cwd or "",
            "forget": forget}
    return ("__import__('sys').modules['_nbflow_pool'].run("
            f"{[(i, s) for i, s in items]!r}, **{args!r})")


def run_cells(k: Any, items: list[tuple[int, Any]], run: CellRun, control: RunControl, *,
              cwd: str | None, on_start: Callable[[int], None] | None = None,
              on_end: Callable[[int, bool], None] | None = None,
              cell_timeout: float | None = None, forget: bool = False) -> Outcome:
    """Run the code cells ``items`` (``[(index, cell)]``, in order) of ``run.nb`` in kernel
    ``k`` in one execute; record their outputs; call ``on_start(index)`` before a cell's outputs
    and ``on_end(index, ok)`` after them. ``cell_timeout``: seconds per cell (the kernel is
    killed, ``control.reason == "timeout"``, the caller tells it from the task's deadline).
    ``forget``: the kernel drops the names the cells made afterwards (a map chunk's instance).
    On return the kernel is prepared (reset, in ``cwd``) unless the status is ``nodriver``.

    One marker per cell: a cell starts when the execute is sent (the first; its time includes
    the reset) or when the previous cell's end marker arrives."""
    cells = dict(items)
    order = [i for i, _ in items]
    code = driver_code(k, [(i, c.source) for i, c in items], cwd, forget)
    if cwd and cwd == k.path0 and cwd != k.home:
        k.entered += 1                 # it was there already (entered again after the reset)
    run_deadline = control.deadline
    out = Outcome("ok", started={}, ended={})
    current: int | None = None
    failed_output = False            # the current cell has an error output
    marked = False                   # any marker came: the driver ran

    def start(pos: int) -> None:
        nonlocal current, failed_output
        current = order[pos] if pos < len(order) else None
        failed_output = False
        if current is None:
            return
        out.started[current] = time.monotonic()
        if cell_timeout:
            control.deadline = cell_deadline(run_deadline, cell_timeout)
        cells[current].outputs = []
        if on_start is not None:
            on_start(current)

    def killed(why: str) -> Outcome:
        cell = cells.get(current) if current is not None else None
        if cell is not None:
            interrupt(k, cell, control, why)
            if on_end is not None:
                on_end(current, False)
        else:
            k.kill()
            control.reason = why
        out.status, out.index = "interrupted", current
        return out

    msg_id = k.kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                          stop_on_error=False)
    try:
        start(0)
        idle = False
        while not idle:
            msg, why = next_message(k, msg_id, control)
            if msg is None:
                return killed(why)
            mtype = msg["msg_type"]
            if mtype == MSG_TYPE:
                marked = True
                c = msg["content"]
                ev = c.get("event")
                if ev == "end" and c.get("index") == current:
                    i, cell = current, cells[current]
                    out.ended[i] = time.monotonic()
                    control.deadline = run_deadline
                    if c.get("execution_count"):
                        cell["execution_count"] = c["execution_count"]
                    ok = bool(c.get("ok"))
                    if not ok and not failed_output:
                        cell.outputs.append(error_output(c.get("ename") or "Error",
                                                         c.get("evalue") or ""))
                    current = None
                    if on_end is not None:
                        on_end(i, ok)
                    if ok:
                        start(order.index(i) + 1)
                    else:
                        out.status, out.index = "error", i
                elif ev == "fallback":
                    out.status, out.index = "fallback", c["index"]
                    current = None             # it has not run: the caller runs it
                    control.deadline = run_deadline
                elif ev == "prep_failed":
                    k.kill()
                    raise RuntimeError(f"kernel {k.id} could not be reset for the next task: "
                                       f"{c.get('ename')}: {c.get('evalue')}")
                continue
            if mtype == "status":
                if msg["content"]["execution_state"] == "idle":
                    idle = True
                continue
            if current is None:
                continue                       # not inside a cell (none of ours prints)
            if mtype == "error":
                failed_output = True
            run.handle(msg, cells[current], current)
        reply, why = next_reply(k, msg_id, control)
        if reply is None:
            return killed(why)
        content = reply["content"]
        if not marked and content.get("status") == "error":
            k.driver = False                   # the driver is missing: never again
            out.status = "nodriver"
            return out
        if current is not None and current not in out.ended and out.status == "ok" \
                and content.get("status") == "error":
            cell = cells[current]              # the driver stopped inside a cell: a failure
            if not failed_output:
                cell.outputs.append(error_output(content.get("ename", "Error"),
                                                 content.get("evalue", "")))
            if on_end is not None:
                on_end(current, False)
            out.status, out.index = "error", current
        elif out.status == "ok":               # the driver stopped early (a bug of ours?):
            rest = [i for i in order if i not in out.ended]   # the rest one execute each
            if rest:
                out.status, out.index = "fallback", rest[0]
        if k.dirty:
            k.dirty = False
            k.path0 = k.home
        if cwd:
            k.path0 = cwd
        return out
    finally:
        control.deadline = run_deadline


def run_all(k: Any, items: list[tuple[int, Any]], run: CellRun, control: RunControl, *,
            cwd: str | None, pool: Any, forget_code: str = "") -> Outcome:
    """:func:`run_cells`, and where it falls back the rest one execute per cell (the kernel
    prepared by ``pool.prepare`` when the driver is missing). ``forget_code``: run afterwards
    in the kernel whatever happened (unless it was killed); in the one execute it is the
    driver's ``forget``. For callers without papermill's hooks (map chunks)."""
    start = 0
    if k.driver and items:
        res = run_cells(k, items, run, control, cwd=cwd, forget=bool(forget_code))
        if res.status not in ("fallback", "nodriver"):
            return res
        if res.status == "fallback":
            start = [i for i, _ in items].index(res.index)
        else:
            pool.prepare(k, cwd)
    else:
        res = Outcome("ok", started={}, ended={})
        pool.prepare(k, cwd)
    res.status, res.index = "ok", None
    try:
        for i, cell in items[start:]:
            res.started[i] = time.monotonic()
            ok = run_cell(k, cell, i, run, control)
            res.ended[i] = time.monotonic()
            if not ok:
                res.status = "interrupted" if control.reason else "error"
                res.index = i
                break
    finally:
        if forget_code and not control.reason and not k.dead:
            import nbformat

            step = nbformat.v4.new_code_cell(forget_code)
            run_cell(k, step, -1, CellRun(nbformat.v4.new_notebook(cells=[step])), control)
    return res
