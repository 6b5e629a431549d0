"""``%flow run`` runs what the analyst sees, not silently the last saved file.

The kernel remembers the source of every cell it executed (by the cell id JupyterLab sends with
each execution, and every ``%%task`` cell by task name). Before a run, the saved notebook is
compared with that: a cell the kernel ran in another version than the saved one is taken in the
kernel's version, and the run says so ("using unsaved changes of cells 4, 7"). A task cell the
kernel ran that the saved file lacks cannot be placed (new and unsaved, or deleted on purpose):
the run goes without it and says so.
"""
from __future__ import annotations

from typing import Any

from nbflow.compiler.cells import split_task_cell
from nbflow.core.ir import Workflow


def install(shell: Any) -> None:
    """Record the source of each executed cell that carries a cell id (JupyterLab, VS Code)."""
    if shell.__dict__.get("_nbflow_seen_hook"):
        return

    def pre_run_cell(info) -> None:
        cell_id = getattr(info, "cell_id", None)
        shell.__dict__["_nbflow_cell_id"] = cell_id
        if cell_id and isinstance(getattr(info, "raw_cell", None), str):
            executed_by_id(shell)[cell_id] = info.raw_cell

    shell.events.register("pre_run_cell", pre_run_cell)
    shell.__dict__["_nbflow_seen_hook"] = pre_run_cell


def executed_by_id(shell: Any) -> dict[str, str]:
    return shell.__dict__.setdefault("_nbflow_by_id", {})


def _norm(src: str) -> str:
    return "\n".join(line.rstrip() for line in src.strip("\n").split("\n")).strip()


def _task_name(src: str) -> str | None:
    split = split_task_cell(src)
    if split is None:
        return None
    return (split[0].split() or [None])[0]


def compile_as_seen(shell: Any, path: str) -> tuple[Workflow, list[int], list[str]]:
    """The workflow of the notebook at ``path`` with the cells as this kernel last ran them,
    the (1-based) numbers of the cells taken from the kernel, and the first lines of task cells
    the kernel ran that the saved file lacks (left out)."""
    from nbflow.compiler import compile_notebook
    from nbflow.compiler.notebook import load_notebook
    from nbflow.magics.notebook import executed_cells

    nb = load_notebook(path)
    by_id = executed_by_id(shell)
    by_task = {name: f"{line}\n{body}" for name, (line, body) in executed_cells(shell).items()}
    cells, changed, placed = [], [], set()
    for i, c in enumerate(nb.cells, 1):
        src = c.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if c.get("cell_type") == "code":
            name = _task_name(src)
            seen = by_id.get(c.get("id") or "")
            if seen is None and name in by_task:
                seen = by_task[name]
            if name:
                placed.add(name)
            kernel_name = _task_name(seen) if seen is not None else None
            if kernel_name:
                placed.add(kernel_name)
            if seen is not None and _norm(seen) != _norm(src):
                src = seen
                changed.append(i)
        cells.append({**c, "source": src})
    missing = [by_task[n].split("\n", 1)[0] for n in sorted(set(by_task) - placed)]
    import os

    wf = compile_notebook({"cells": cells}, name=os.path.splitext(os.path.basename(path))[0])
    wf.source = path
    for n in getattr(wf, "notes", []):
        print(f"nbflow: note: {n}")
    for w in getattr(wf, "warnings", []):
        print(f"nbflow: warning: {w}")
    return wf, changed, missing


def describe_changes(changed: list[int], missing: list[str]) -> str:
    """What the run uses that differs from the saved file, in one or two sentences."""
    parts = []
    if changed:
        parts.append("using unsaved changes of cell" + ("s " if len(changed) > 1 else " ")
                     + ", ".join(map(str, changed)) + " (as this kernel ran them; save the "
                     "notebook to keep them)")
    if missing:
        parts.append("not in the saved file, so not in this run: "
                     + ", ".join(f"`{m}`" for m in missing) + " (save the notebook first if you "
                     "added it)")
    return "; ".join(parts)
