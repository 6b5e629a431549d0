"""Which notebook this kernel runs, and the ``%%task`` cells it ran: shared by the %flow commands."""
from __future__ import annotations

import os
import weakref
from typing import Any

from nbflow.compiler.cells import TaskSpec
from nbflow.core.ir import Workflow
from nbflow.errors import WorkflowError

NO_NOTEBOOK = "can't tell which notebook this kernel runs; use `%flow {cmd} path.ipynb`"

_REGISTRIES: "weakref.WeakKeyDictionary[Any, dict[str, TaskSpec]]" = weakref.WeakKeyDictionary()


def registered_tasks(shell: Any) -> dict[str, TaskSpec]:
    """The ``%%task`` cells run (or registered with --no-run) in this kernel, by name."""
    try:
        return _REGISTRIES.setdefault(shell, {})
    except TypeError:            # not weak-referenceable: keep it on the shell
        return shell.__dict__.setdefault("_nbflow_tasks", {})


def gated_names(shell: Any) -> dict[str, tuple[str, str]]:
    """Names that tasks not run in this kernel (approval, signal) would assign: name ->
    (task, why)."""
    return shell.__dict__.setdefault("_nbflow_gated", {})


def executed_cells(shell: Any) -> dict[str, tuple[str, str]]:
    """The %%task cells this kernel executed, as the analyst last ran them: task name ->
    (first line, body)."""
    return shell.__dict__.setdefault("_nbflow_cells", {})


def record_cell(shell: Any, name: str, first_line: str, body: str) -> None:
    cells = executed_cells(shell)
    cell_id = shell.__dict__.get("_nbflow_cell_id")
    if cell_id:                 # the same cell renamed: its old name is gone from the notebook
        by_cell = shell.__dict__.setdefault("_nbflow_task_by_cell", {})
        old = by_cell.get(cell_id)
        if old and old != name:
            cells.pop(old, None)
        by_cell[cell_id] = name
    cells[name] = (first_line.strip(), body)


def _notebook_file(candidate: Any) -> str | None:
    if not candidate or not isinstance(candidate, str) or not candidate.endswith(".ipynb"):
        return None
    for p in (candidate, os.path.join(os.getcwd(), os.path.basename(candidate))):
        if os.path.isfile(p):
            return os.path.abspath(p)
    return None


def current_notebook_path(shell: Any, cmd: str = "show") -> str:
    """The .ipynb this kernel runs: ``$JPY_SESSION_NAME`` (Jupyter server), else ``__session__``
    (ipykernel >= 6.19) or ``__vsc_ipynb_file__`` (VS Code) in the user namespace.
    Note: the file on disk is what was last *saved*."""
    ns = getattr(shell, "user_ns", {}) or {}
    for candidate in (os.environ.get("JPY_SESSION_NAME"), ns.get("__session__"),
                      ns.get("__vsc_ipynb_file__")):
        path = _notebook_file(candidate)
        if path:
            return path
    raise WorkflowError(NO_NOTEBOOK.format(cmd=cmd))


def compile_current(shell: Any, path: str | None = None, cmd: str = "show") -> Workflow:
    """Compile ``path``, or the notebook this kernel runs (see ``current_notebook_path``)."""
    from nbflow.compiler import compile_notebook

    wf = compile_notebook(path or current_notebook_path(shell, cmd))
    for n in getattr(wf, "notes", []):
        print(f"nbflow: note: {n}")
    for w in getattr(wf, "warnings", []):
        print(f"nbflow: warning: {w}")
    return wf
