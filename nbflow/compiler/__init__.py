"""Notebook -> Workflow IR (see ``notebook.py``): compile_notebook, compile_file, load_notebook,
parse_duration, and the IR types.

Imported lazily: the IR (``graph``) is needed everywhere (engine, client, CLI), while compiling
a notebook pulls in IPython (~1.5 s), which `nbflow status` and friends should not pay for.
"""
from __future__ import annotations

from nbflow.core.ir import Edge, Node, Workflow

from nbflow.errors import WorkflowError

__all__ = ["compile_notebook", "compile_file", "load_notebook", "parse_duration", "Workflow",
           "Node", "Edge", "WorkflowError", "TaskSpec", "build_workflow"]

_LAZY = {"compile_notebook", "compile_file", "load_notebook", "parse_duration", "TaskSpec",
         "build_workflow", "NO_TASKS"}


def __getattr__(name: str):
    if name in _LAZY:
        from nbflow.compiler import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'nbflow.compiler' has no attribute {name!r}")
