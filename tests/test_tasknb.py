"""Every task of every example notebook becomes a valid papermill notebook with the right cells."""
from __future__ import annotations

import os

import nbformat
import pytest

from nbflow.compiler import compile_notebook

from nbflow.errors import WorkflowError
from nbflow.core.ir import Node
from nbflow.compiler.tasknb import task_notebook

DATA = os.path.join(os.path.dirname(__file__), "data")
GOOD = ["sales", "diamond", "chain", "fanout", "conditions", "approvals", "signals"]


def tags(nb):
    return [c.metadata["tags"][0] for c in nb.cells]


@pytest.mark.parametrize("name", GOOD)
def test_every_task_notebook_is_valid(name):
    wf = compile_notebook(os.path.join(DATA, name + ".ipynb"))
    for node in wf.tasks:
        nb = task_notebook(wf, node.id)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        assert nb.metadata.nbflow == {"workflow": wf.name, "version": wf.content_hash(),
                                      "task": node.id, "source": wf.source}
        assert task_notebook(wf, node.id) == nb          # deterministic


def test_a_task_notebook_is_built_without_validating_each_cell(monkeypatch):
    """A worker builds the notebook of each task it runs (once per workflow version): nbformat's
    builders validate every cell against the JSON schema (~3 ms each), so it is built without
    them; test_every_task_notebook_is_valid checks the result."""
    import nbformat.v4.nbbase as nbbase

    def refuse(*a, **k):
        raise AssertionError("nbformat's per-cell validation was called")

    monkeypatch.setattr(nbbase, "validate", refuse)
    wf = compile_notebook(os.path.join(DATA, "sales.ipynb"))
    for node in wf.tasks:
        nbformat.validate(task_notebook(wf, node.id, version="v"))


def test_cell_structure_of_a_conditional_mapped_task():
    wf = compile_notebook(os.path.join(DATA, "sales.ipynb"))
    nb = task_notebook(wf, "publish")
    assert tags(nb) == ["nbflow-setup", "nbflow-setup", "parameters", "nbflow-load",
                        "nbflow-when", "nbflow-task", "nbflow-save"]
    src = [c.source for c in nb.cells]
    assert src[0] == "import json\nfrom salesutil import load, write"
    assert src[2] == wf.params_source + "\n__nbflow__ = None"
    assert src[3] == "import nbflow.io as __nbflow_io\n__nbflow_io.load_inputs(globals(), __nbflow__)"
    assert src[4] == "__nbflow_io.check_when((sum(total) > 0), __nbflow__, 'sum(total) > 0')"
    assert src[5] == "write(total)"
    assert nb.cells[5].metadata.nbflow == {"task": "publish", "cell": wf.node("publish").cell}
    assert src[6] == "__nbflow_io.save_outputs(globals(), __nbflow__)"
    for c in nb.cells:
        compile(c.source.replace("%load_ext", "#"), "<cell>", "exec")   # plain Python


def test_without_when_or_params_or_setup():
    wf = compile_notebook(["%%task a\nx = 1", "%%task b\nprint(x)"])
    nb = task_notebook(wf, "b")
    assert tags(nb) == ["parameters", "nbflow-load", "nbflow-task", "nbflow-save"]
    assert nb.cells[0].source == "__nbflow__ = None"


def test_a_worker_builds_each_task_notebook_without_hashing_the_workflow_again(monkeypatch):
    """A worker knows the definition's hash (it checked the definition against it): building a
    task's notebook must not hash the whole workflow again (it cost more than a trivial task)."""
    from nbflow.core.ir import Workflow
    from nbflow.worker.execute import Execution

    wf = compile_notebook(["%%task a\nx = 1", "%%task b\nprint(x)"])
    version = wf.content_hash()

    def rehash(self):
        raise AssertionError("the workflow was hashed again")
    monkeypatch.setattr(Workflow, "content_hash", rehash)
    ex = Execution()
    ex._nbs = {}
    for node in ("a", "b", "a"):
        nb = ex.task_notebook(wf, version, node)
        assert nb.metadata.nbflow["version"] == version and nb.metadata.nbflow["task"] == node
    assert len(ex._nbs) == 2                                 # built once per task


def test_unknown_or_non_task_node():
    wf = compile_notebook(["%%task a\nx = 1"])
    with pytest.raises(WorkflowError, match="no node 'zz'"):
        task_notebook(wf, "zz")
    with pytest.raises(WorkflowError, match="is a start node"):
        task_notebook(wf, "start")


def test_node_naming_another_notebook(tmp_path):
    wf = compile_notebook(["%%task a\nx = 1"])
    wf.source = os.path.join(DATA, "flow.bpmn")                 # relative paths resolve here
    wf.nodes.insert(2, Node("ext", "task", notebook="sales.ipynb", notebook_task="by_region"))
    nb = task_notebook(wf, "ext")
    nbformat.validate(nb)
    assert tags(nb)[:3] == ["nbflow-setup", "nbflow-setup", "parameters"]
    assert "regions = [" in nb.cells[2].source
    assert nb.cells[-2].source.startswith("total = sum(")
    wf.node("ext").notebook_task = None                        # the whole notebook is the task
    whole = task_notebook(wf, "ext")
    assert tags(whole) == ["parameters", "nbflow-load", "nbflow-task", "nbflow-save"]
    assert "from salesutil import" in whole.cells[2].source and "write(total)" in whole.cells[2].source
    wf.node("ext").notebook_task = "nope"
    with pytest.raises(WorkflowError, match="has no task 'nope'"):
        task_notebook(wf, "ext")
    wf.node("ext").notebook = str(tmp_path / "missing.ipynb")
    with pytest.raises(WorkflowError, match="notebook not found"):
        task_notebook(wf, "ext")
