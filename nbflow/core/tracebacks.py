"""Tracebacks as the user sees their notebook: IPython's ``Cell In[5], line 2`` (the task
notebook's execution count, the task body numbered from 1) becomes ``cell 7 (task report),
line 3`` with the source listing numbered the same way (the cell's first line is line 1: the
%%task line, unless blank lines are above it). Pure text:
used by the worker (task errors, ``nbflow logs``) and by the widgets (a failed task's output)."""
from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(s: str) -> str:
    return _ANSI.sub("", s)


def cell_label(cell, n: int) -> str:
    """How a person finds the cell: its number in their notebook for the task's own cell."""
    meta = cell.get("metadata", {})
    user = (meta.get("nbflow") or {}).get("cell")
    if user:
        return f"cell {user}"
    tags = meta.get("tags") or []
    kind = next((t[len("nbflow-"):] for t in tags if t.startswith("nbflow-")), "")
    if "parameters" in tags or "injected-parameters" in tags:
        kind = "parameters"
    return f"cell {n} of the task notebook" + (f" ({kind})" if kind else "")


_CELL_IN = re.compile(r"Cell In\[(\d+)\](, line (\d+))?")
_LISTING = re.compile(r"(---->\s*|\s+)(\d+)(?= |$)")      # "      2 code" / "----> 3 code"


def user_cells(nb, text: str) -> str:
    """IPython names cells by execution count (``Cell In[5], line 2``); say the notebook's own
    cell number and line instead (``cell 7 (task report), line 3``: the %%task line is line 1)."""
    if not text or "Cell In[" not in text:
        return text
    labels: dict[str, tuple[str, int]] = {}
    for i, cell in enumerate(nb.get("cells", []), 1):
        if cell.get("cell_type") == "code" and cell.get("execution_count"):
            meta = cell.get("metadata", {}).get("nbflow") or {}
            task = meta.get("task")
            # the body's line 1 is the user's line 2 (the %%task line), more if blank lines are
            # above it (``offset``: recorded by the compiler; absent in older task notebooks)
            labels[str(cell["execution_count"])] = (
                cell_label(cell, i) + (f" (task {task})" if task else ""),
                1 + int(meta.get("offset") or 0) if task else 0)

    def sub(m: re.Match) -> str:
        if m.group(1) not in labels:
            return m.group(0)
        label, shift = labels[m.group(1)]
        return label + (f", line {int(m.group(3)) + shift}" if m.group(3) else "")

    out: list[str] = []
    shift = 0                       # of the source listing under the last "Cell In[..]" header
    for line in text.split("\n"):
        m = _CELL_IN.match(line)
        if m:
            shift = labels[m.group(1)][1] if m.group(1) in labels else 0
            out.append(_CELL_IN.sub(sub, line))
            continue
        n = _LISTING.match(line) if shift else None
        if n is None:
            shift = 0 if not line.strip() else shift
            out.append(_CELL_IN.sub(sub, line))
            continue
        # the listing numbers the task body from 1: number it as the user's cell (%%task = 1)
        head, num = n.group(1), str(int(n.group(2)) + shift)
        width = len(head) + len(n.group(2))
        pre = (("---->" + num.rjust(max(width - 5, len(num) + 1))) if head.startswith("-")
               else num.rjust(width))
        out.append(pre + line[n.end(2):])
    return "\n".join(out)
