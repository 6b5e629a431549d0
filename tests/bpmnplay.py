"""Play an imported workflow through the real state machine (``core.state.apply``) with a worker
that evaluates each task's ``when`` and code in plain Python over the run's parameters: which
steps ran, for a given set of parameter values. No NATS, no kernels: this checks what the IR
*means*; tests/test_bpmn_import.py also runs a few models on the real stack."""
from __future__ import annotations

from typing import Any

from statehelpers import Sim

from nbflow.core.ir import Workflow


def play(wf: Workflow, params: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    """(final run state, sorted ids of the task nodes that succeeded: BPMN tasks and events, and
    the guard nodes that carry conditions)."""
    params = dict(params or {})
    sim = Sim(wf, check_dup=False)
    cmds = list(sim.start(params))
    ran: list[str] = []
    for _ in range(10_000):
        if sim.st.is_final:
            break
        if not cmds:
            waiting = [n for n, ns in sim.st.nodes.items() if ns.state == "waiting_signal"]
            if not waiting:
                break
            cmds = list(sim.signal(wf.node(waiting[0]).wait_signal, True))
            continue
        c = cmds.pop(0)
        if c.kind == "timer":
            cmds += sim.fire(c)
        elif c.kind == "approval":
            cmds += sim.approve(c["node"])
        elif c.kind == "dispatch":
            node = wf.node(c["node"])
            scope = dict(params)
            if c.data.get("map"):
                scope[node.map_var] = c["map"]["index"]
            try:
                if node.when and not eval(node.when, {}, scope):  # noqa: S307 - test data
                    cmds += sim.skip(c["key"])
                    continue
                exec(node.code or "", {}, scope)  # noqa: S102 - test data
            except Exception as e:  # noqa: BLE001 - a failing task is an outcome
                cmds += sim.fail(c["key"], error=f"{type(e).__name__}: {e}")
                continue
            cmds += sim.succeed(c["key"], outputs={})
    for n in wf.nodes:
        if n.kind == "task" and sim.st.nodes[n.id].state == "succeeded":
            ran.append(n.id)
    return sim.st.state, sorted(ran)
