"""Does this worker's Python have what a task imports? Checked before the task runs.

The submit records the submitter's version of each third-party module the notebook imports
(``Workflow.requires``). A module the worker cannot import fails the task at once, naming the
module and the worker; a version that differs from the submitter's is a warning at the top of
the task's log. The check looks at the worker's own interpreter (the one its kernels run).
"""
from __future__ import annotations

import importlib.util
import sys

import nbformat

from nbflow.compiler.bundle import local_module, module_versions, workflow_modules
from nbflow.core.ir import Workflow

_found: dict[str, bool] = {}


def importable(mod: str) -> bool:
    if mod not in _found:
        try:
            _found[mod] = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            _found[mod] = False
    return _found[mod]


def check(wf: Workflow, node_id: str, folder: str | None) -> tuple[list[str], list[str]]:
    """(modules this worker cannot import, version warnings) for task ``node_id``."""
    mods = sorted(m for m in workflow_modules(wf, node_id)
                  if not (folder and local_module(folder, m)))
    missing = [m for m in mods if not importable(m)]
    ours = module_versions({m for m in mods if m not in missing})
    warnings = []
    for m, v in ours.items():
        theirs = wf.requires.get(m, "")
        if theirs and v and theirs != v:
            warnings.append(f"module {m!r} is {v} on this worker but {theirs} where the run was "
                            f"submitted; results may differ")
    return missing, warnings


def missing_error(missing: list[str], node_id: str, worker: str, wf: Workflow) -> str:
    mods = ", ".join(repr(m) for m in missing)
    had = [f"{m} {wf.requires[m]}" for m in missing if wf.requires.get(m)]
    where = f" (the submitter has {', '.join(had)})" if had else ""
    return (f"ModuleNotFoundError: task {node_id!r} imports {mods}, which worker {worker} cannot "
            f"import (python {sys.version.split()[0]} at {sys.executable}){where}; install it "
            f"on that worker, or send the task to workers that have it with %%task --queue")


def with_warnings(nb, warnings: list[str]):
    """A copy of the task notebook that prints ``warnings`` to stderr before the task's inputs
    load (after the parameters cell, so the kernel's setup hash is unchanged)."""
    if not warnings:
        return nb
    nb = nbformat.from_dict(nb)
    lines = "".join(f"nbflow: warning: {w}\n" for w in warnings)
    cell = nbformat.v4.new_code_cell(
        source=f"import sys as __nbflow_sys\n__nbflow_sys.stderr.write({lines!r})\n"
               f"del __nbflow_sys", metadata={"tags": ["nbflow-env"]})
    cell.id = "env"
    at = next((i + 1 for i, c in enumerate(nb.cells)
               if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    nb.cells.insert(at, cell)
    return nb
