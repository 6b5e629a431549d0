"""Task fingerprints: a hash of everything that determines a task's result.

A task's fingerprint covers its cell source, the setup cells' source, the values of the
parameters it can see, its result-changing options (``--map``, ``--when``, the names it hands
on) and the fingerprints of everything upstream of it (so a change upstream invalidates what is
downstream). Two executions with the same fingerprint compute the same values, so the outputs of
one can stand in for the other: ``nbflow retry`` and ``nbflow run --reuse`` rely on that.

Volatile inputs have no fingerprint across runs: a ``--wait-signal`` value (sent while a run
runs) and a parameter whose default nbflow cannot see (``day = date.today()``) and that the run
did not set. Such a task, and everything downstream of it, is never reused from another run;
within a retry of the same run they count as unchanged (the retry is of that run).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from nbflow.core.ir import Node, Workflow

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _names(*texts: str | None) -> set[str]:
    """Identifiers a piece of code mentions (over-approximates reads: a false hit only costs a
    re-execution, never a wrong reuse)."""
    out: set[str] = set()
    for t in texts:
        if t:
            out.update(_IDENT.findall(t))
    return out


def _h(obj: Any) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                       default=repr)
    return hashlib.sha256(canon.encode()).hexdigest()[:24]


def fingerprints(wf: Workflow, params: dict[str, Any], *, across_runs: bool = True
                 ) -> dict[str, str | None]:
    """Node id -> fingerprint (None: not reusable from another run; see the module doc).

    ``params``: the run's parameter values (defaults merged with what the run set).
    ``across_runs=False`` (a retry of one run): signal values and invisible parameter defaults
    count as unchanged."""
    known = wf.param_names()
    setup_src = list(wf.setup)
    setup_reads = _names(*setup_src) & known
    fps: dict[str, str | None] = {}
    incoming: dict[str, list] = {}
    for e in wf.edges:
        incoming.setdefault(e.target, []).append(e)

    def visible(node: Node) -> tuple[dict[str, Any], bool]:
        reads = (_names(node.code, node.when, node.map_over) | setup_reads) & known
        for e in incoming.get(node.id, []):
            reads |= _names(e.condition) & known
        vals, volatile = {}, False
        for name in sorted(reads):
            if name in params:
                vals[name] = params[name]
            else:                             # computed in the parameters cell at run time
                vals[name] = {"params_cell": wf.params_source}
                volatile = True
        return vals, volatile

    def fp(node_id: str, trail: tuple = ()) -> str | None:
        if node_id in fps:
            return fps[node_id]
        if node_id in trail:                  # a cycle: validate() reports it; be total here
            return None
        node = wf.node(node_id)
        ups, poisoned = [], False
        for e in sorted(incoming.get(node_id, []), key=lambda e: e.source):
            up = fp(e.source, trail + (node_id,))
            poisoned = poisoned or up is None
            ups.append([up, e.condition, e.default, sorted(e.data)])
        body: dict[str, Any] = {"kind": node.kind, "ups": ups}
        volatile = False
        if node.kind == "task":
            vals, volatile = visible(node)
            body.update(code=node.code, setup=setup_src, params=vals, map=[node.map_var,
                        node.map_over], when=node.when, outputs=sorted(node.outputs),
                        inputs=sorted(node.sources), notebook=[node.notebook, node.notebook_task],
                        signal=node.wait_signal)
            volatile = volatile or bool(node.wait_signal)
            if wf.bundle:                     # the notebook's folder: local modules, data files
                body["bundle"] = wf.bundle
        if across_runs and (poisoned or volatile):
            fps[node_id] = None
        else:
            fps[node_id] = _h(body)
        return fps[node_id]

    for n in wf.nodes:
        fp(n.id)
    return fps


def reusable_across_runs(node: Node) -> bool:
    """Whether another run's outputs may stand in for this task: it runs code on a worker and
    no person has to approve it again (an approval is asked for anew in every run)."""
    return node.needs_worker and node.approval is None and not node.wait_signal
