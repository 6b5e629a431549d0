"""The IR copes with workflows of thousands of nodes (validation used to recurse once per node)."""
import time

import pytest

from nbflow.core.ir import Edge, Node, Workflow, WorkflowError


def chain(n: int, *, back_edge: bool = False) -> Workflow:
    ids = [f"t{i}" for i in range(n)]
    nodes = [Node("start", "start"), *(Node(i, "task", code="x = 1") for i in ids), Node("end", "end")]
    order = ["start", *ids, "end"]
    edges = [Edge(a, b) for a, b in zip(order, order[1:])]
    if back_edge:
        edges.append(Edge(ids[-1], ids[0]))
    return Workflow("big", nodes=nodes, edges=edges)


def test_a_5000_task_chain_validates():
    wf = chain(5000).validate()
    assert len(wf.tasks) == 5000


def test_a_cycle_deep_in_a_long_chain_is_found_and_named():
    wf = chain(3000, back_edge=True)
    cycle = wf.find_cycle()
    assert cycle is not None and cycle[0] == cycle[-1] == "t0" and len(cycle) == 3001
    with pytest.raises(WorkflowError, match="cycle"):
        wf.validate()
