"""Which run parameters a task can read: the names its kernel code mentions.

A task message carries only the parameters its task reads (a 10,000-instance ``--map`` over a
parameter list would otherwise send the whole list 10,000 times). The analysis is cheap and
conservative: every name the task's code, its ``--when`` expression and the notebook's setup
cells mention (loaded, stored, inside functions: any ``Name``) counts as read; code that can
reach variables by their name as a string (``globals()``, ``eval``, ``get_ipython()``,
``__main__``, ...) or that is not plain Python (IPython magics, ``!shell``), and tasks that run
another notebook, read *everything* (``None``).
"""
from __future__ import annotations

import ast
from functools import lru_cache

from nbflow.core.ir import Node, Workflow

# names through which code reaches variables without naming them
_DYNAMIC = frozenset({"globals", "locals", "vars", "eval", "exec", "get_ipython", "__import__",
                      "__builtins__", "__main__", "dir", "breakpoint"})
# attributes that lead to a namespace (a frame's, the IPython shell's)
_DYNAMIC_ATTRS = frozenset({"f_globals", "f_locals", "user_ns", "user_global_ns"})


def param_reads(wf: Workflow, node: Node) -> frozenset[str] | None:
    """The names ``node``'s kernel code may read, or None when that cannot be known (send all)."""
    if node.notebook:
        return None
    return _names(node.code or "", node.when or "", tuple(wf.setup or ()))


@lru_cache(maxsize=512)
def _names(code: str, when: str, setup: tuple[str, ...]) -> frozenset[str] | None:
    out: set[str] = set()
    for src in (code, when, *setup):
        if not src.strip():
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):        # magics, shell escapes: not plain Python
            return None
        for n in ast.walk(tree):
            if isinstance(n, ast.Name):
                out.add(n.id)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                out.update(n.names)
            elif isinstance(n, ast.Attribute) and n.attr in _DYNAMIC_ATTRS:
                return None
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in n.names] + ([n.module] if isinstance(
                    n, ast.ImportFrom) and n.module else [])
                if any(m.split(".")[0] in _DYNAMIC for m in mods):
                    return None
            elif isinstance(n, ast.Constant) and n.value == "__main__":
                return None
    if out & _DYNAMIC:
        return None
    return frozenset(out)


def task_params(params: dict, reads: frozenset[str] | None) -> dict:
    """The run's ``params`` a task reading ``reads`` needs (all of them for None)."""
    if reads is None:
        return params
    return {k: v for k, v in params.items() if k in reads}
