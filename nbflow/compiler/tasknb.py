"""Per-task papermill notebooks: setup cells + parameters + load + (when) + task + save.

The worker executes ``task_notebook(wf, node_id)`` with papermill, passing one parameter,
``__nbflow__`` (see ``nbflow/io.py``); papermill inserts its injected-parameters cell right after
our ``parameters`` cell, so the workflow's parameter defaults are overridden by the run's.
Nothing is cached here: callers cache (the notebook only depends on the workflow version).
"""
from __future__ import annotations

import os

import nbformat
from nbformat import NotebookNode, from_dict
from nbformat.v4 import nbformat_minor as NBFORMAT_MINOR

from nbflow.core.ir import Node, Workflow

from nbflow.errors import WorkflowError

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

LOAD_SOURCE = "import nbflow.io as __nbflow_io\n__nbflow_io.load_inputs(globals(), __nbflow__)"
SAVE_SOURCE = "__nbflow_io.save_outputs(globals(), __nbflow__)"


def code_cell(source: str, metadata: dict | None = None,
              cell_id: str | None = None) -> nbformat.NotebookNode:
    """A code cell as nbformat's new_code_cell builds it, without its JSON-schema validation
    of every cell (~1-3 ms each: a worker builds the notebook of each task of a workflow
    version once, on its event loop, and a map chunk three cells per instance); what is built
    here is valid by construction (test_tasknb: every task notebook is valid)."""
    cell = NotebookNode(cell_type="code", metadata=from_dict(metadata or {}),
                        execution_count=None, source=source, outputs=[])
    if cell_id is not None:
        cell.id = cell_id
    return cell


def _cell(source: str, tag: str, cell_id: str, **metadata) -> nbformat.NotebookNode:
    # deterministic ids: same workflow version, same notebook
    return code_cell(source, {"tags": [tag], **metadata}, cell_id)


def when_source(expr: str) -> str:
    return f"__nbflow_io.check_when(({expr}), __nbflow__, {expr!r})"


def _resolve(wf: Workflow, node: Node) -> tuple[list[str], str, str, Node]:
    """(setup, params_source, task code, node) — from ``node.notebook`` if it names another one."""
    if not node.notebook:
        return wf.setup, wf.params_source, node.code, node
    from nbflow.compiler import compile_notebook, load_notebook
    from nbflow.compiler.cells import parse_notebook_cells

    path = node.notebook
    if not os.path.isabs(path) and wf.source:
        path = os.path.join(os.path.dirname(wf.source), path)
    try:
        if node.notebook_task:
            other = compile_notebook(path)
            try:
                target = other.node(node.notebook_task)
            except KeyError:
                tasks = ", ".join(t.id for t in other.tasks)
                raise WorkflowError(f"task {node.id!r}: notebook {node.notebook!r} has no task "
                                    f"{node.notebook_task!r} (it has: {tasks})") from None
            return other.setup, other.params_source, target.code, node
        parsed = parse_notebook_cells(load_notebook(path).cells)
    except WorkflowError as e:
        raise WorkflowError(f"task {node.id!r} runs notebook {node.notebook!r}: {e}") from None
    # the whole notebook is the task: its setup and task bodies, in notebook order
    return [], parsed.params_source, "\n\n".join(c for c in parsed.code if c.strip()), node


def task_notebook(wf: Workflow, node_id: str, version: str | None = None
                  ) -> nbformat.NotebookNode:
    """The papermill notebook that runs task ``node_id`` of ``wf`` (valid nbformat v4).
    ``version``: the definition's content hash when the caller knows it (a worker does: hashing
    a whole workflow again for each of its tasks cost more than running a trivial task)."""
    try:
        node = wf.node(node_id)
    except KeyError:
        raise WorkflowError(f"workflow {wf.name!r} has no node {node_id!r}") from None
    if node.kind != "task":
        raise WorkflowError(f"node {node_id!r} is a {node.kind} node, not a task")
    setup, params_source, code, node = _resolve(wf, node)
    cells = [_cell(src, "nbflow-setup", f"setup-{i}") for i, src in enumerate(setup, start=1)]
    params = (params_source.rstrip("\n") + "\n" if params_source.strip() else "")
    cells.append(_cell(params + "__nbflow__ = None", "parameters", "parameters"))
    cells.append(_cell(LOAD_SOURCE, "nbflow-load", "load"))
    if node.when:
        cells.append(_cell(when_source(node.when), "nbflow-when", "when"))
    cells.append(_cell(code, "nbflow-task", "task", nbflow={"task": node.id, "cell": node.cell,
                                                       **({"offset": node.line_offset}
                                                          if node.line_offset else {})}))
    cells.append(_cell(SAVE_SOURCE, "nbflow-save", "save"))
    nb = NotebookNode(nbformat=4, nbformat_minor=NBFORMAT_MINOR, cells=cells, metadata=from_dict({
        "kernelspec": dict(KERNELSPEC),
        "language_info": {"name": "python"},
        "nbflow": {"workflow": wf.name, "version": version or wf.content_hash(), "task": node.id,
                   "source": wf.source},
    }))
    return nb
