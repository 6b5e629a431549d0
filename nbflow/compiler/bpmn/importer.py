"""BPMN 2.0 XML into the workflow IR: nbflow's own files exactly, other tools' models when their
meaning survives, else one error that names every element it refuses (grouped by element type).

What imports, what runs and what is refused, element by element: ``docs/bpmn.md``. This module
assembles the workflow; the parts: ``reading`` (safe parsing, the vocabulary, the refusals),
``rewrite`` (call activities and sub-processes flattened), ``elements`` (one foreign element
into a node; conditions), ``tokens`` (the token game).

Files nbflow wrote
------------------
Their ``<nbflow:node>`` / ``<nbflow:part>`` / ``<nbflow:workflow>`` extensions are authoritative
and fold back into exactly the IR they came from (``from_bpmn(to_bpmn(wf)).to_dict() ==
wf.to_dict()``).

Models from other tools
-----------------------
* node ids are the BPMN ids, sanitized to ``[A-Za-z_][A-Za-z0-9_-]*`` (made unique with ``_2``…),
  names are the BPMN names (whitespace collapsed);
* ``task``/``serviceTask`` become task nodes with empty ``code``: a modelled step with nothing to
  run. A ``serviceTask`` can point at a notebook with ``nbflow:notebook``/``nbflow:task``
  attributes or ``implementation="etl.ipynb#load"`` (relative paths resolve against ``base_dir``,
  default the BPMN file's folder); ``userTask`` → an approval gate; timer / signal catch events →
  timer / signal gates; several end events become one ``end`` node;
* **conditions keep their meaning.** The engine evaluates a condition as the ``when`` of a task
  (in that task's kernel), so each conditional flow becomes a ``when``: on its target when that is
  a task the flow alone enters, else on a *guard* node (a task without code, id ``<flow id>``)
  put on the flow. An exclusive gateway takes the *first* true flow in its ``outgoing`` order, so
  flow *i* gets ``c_i and not (c_1 or … c_{i-1})`` and the default flow ``not (c_1 or … c_n)``;
  without a default, a node ``<gateway>__no_branch`` fails the run when no condition holds (BPMN
  raises an error there). Inclusive gateways and activities take every true flow;
* **only Python conditions.** The language is the condition's ``language``, else the model's
  ``definitions/@expressionLanguage``, else XPath (BPMN's default). nbflow's language URI is
  :data:`PYTHON_LANGUAGE` (``python``, ``text/x-python`` and ``application/x-python`` are accepted
  too); every condition is parsed when the model is imported;
* **Camunda / Zeebe expressions** (``${…}``, ``#{…}``, FEEL ``=…``) are translated by one rule: an
  expression that is a single name (``${items}``, ``=items``) becomes that name; anything else is
  refused. Timer values must be ISO-8601 (``timeDuration`` ``PT2H``, ``timeDate``
  ``2026-11-20T12:00:00Z``);
* **tokens are checked**, on every combination of branch choices: a node that BPMN would run more
  than once (an uncontrolled merge after a parallel split) and a parallel join that some paths
  reach only partly (BPMN would wait forever) are refused, since the engine runs each node once
  and joins by "all predecessors resolved". An uncontrolled merge of flows of which at most one
  can carry a token is accepted: it means what BPMN says.

Ignored rather than refused (they do not change what runs): diagrams, documentation (except on
user tasks), other tools' extension elements and attributes not listed above,
collaboration/participant (pools), laneSet/lane, textAnnotation/association/group, data
objects/stores and their associations, ioSpecification, properties, message/signal/error/item
definitions, and empty processes (black-box pools). Parsing never resolves entities, never loads
DTDs or touches the network, and refuses DOCTYPEs (no XXE, no billion laughs).
"""
from __future__ import annotations

import ast
import json
import os
from collections import defaultdict
from pathlib import Path

from nbflow.compiler.bpmn.common import BPMN_NS, _b, _get_text, _local, _n, _node_from_ext
from nbflow.compiler.bpmn.elements import _condition, _foreign_node, _sanitize_id
from nbflow.compiler.bpmn.reading import (_EVENTS, _GATEWAYS, _IGNORED, _TASKS, _ext,
                                          _listing, _parse, _Problems, _short, _text)
from nbflow.compiler.bpmn.rewrite import _flatten_subprocesses, _inline_call_activities
from nbflow.compiler.bpmn.tokens import _check_tokens, _Flow
from nbflow.core.ir import Edge, Node, Workflow, WorkflowError

def from_bpmn(source: str | bytes | os.PathLike, base_dir: str | os.PathLike | None = None
              ) -> Workflow:
    """Read a BPMN 2.0 model (a path, or the XML text) into the workflow IR (see module doc)."""
    root, path = _parse(source)
    if base_dir is None and path is not None:
        base_dir = path.resolve().parent
    problems = _Problems()
    proc = _the_process(root, problems)
    _inline_call_activities(proc, root, base_dir, problems)
    _flatten_subprocesses(proc, problems)
    signal_names = {s.get("id"): s.get("name") or s.get("id") for s in root.iter(_b("signal"))}

    # 1. classify the process's elements
    flow_nodes, seq_flows, kinds = _classify(proc, problems)
    all_ids = {el.get("id") for el in proc.iter() if isinstance(el.tag, str)}
    # 2. flow nodes -> IR nodes (nbflow's own main elements first: their ids are reserved)
    ids = _Ids()
    nodes, owner, foreign = _nodes(flow_nodes, ids, signal_names, problems)
    start_ids = [n.id for n in nodes if n.kind == "start"]
    end_ids = [n.id for n in nodes if n.kind == "end"]
    for extra in start_ids[1:]:
        el = next(e for e in flow_nodes if owner.get(e.get("id")) == extra)
        problems.refuse(el, "a second start event; nbflow workflows have one")
    # 3. sequence flows: well-formed, their conditions Python and where BPMN allows them
    flows = _sequence_flows(seq_flows, flow_nodes, kinds, foreign, all_ids, root, problems)
    # 4. conditions -> guards (the `when` that carries each conditional flow's meaning)
    no_branch = _guards(flows, flow_nodes, kinds, foreign, problems)
    # 5. tokens: refuse what the engine's "run once, join on all resolved" cannot mean
    # (on a graph with refused elements the check would guess; those are named already)
    if foreign and all(b in owner for b in kinds):
        _check_tokens(kinds, [f for f in flows if f.s in foreign or f.t in foreign], problems)
    problems.raise_if_any()
    # 6. edges, with guard nodes where a condition cannot sit on the target itself
    edges = _edges(flows, nodes, owner, foreign, kinds, ids)
    # 7. one start, one end
    nodes, edges = _one_start_one_end(nodes, edges, start_ids, end_ids, no_branch, owner, ids)
    _check_acyclic(nodes, edges)
    wf = _workflow(proc, root, path, nodes, edges)
    if base_dir is not None:
        for n in wf.nodes:
            if n.notebook and not os.path.isabs(n.notebook):
                n.notebook = str((Path(base_dir) / n.notebook).resolve())
    return wf.validate()


def _the_process(root, problems: _Problems):
    """The one process to import (pools without flow and called processes do not count); a
    second one is refused with everything it holds named."""
    called = {c.get("calledElement") for c in root.iter(_b("callActivity"))}
    processes = [p for p in root.iter(_b("process"))
                 if any(_local(c) not in _IGNORED for c in p if isinstance(c.tag, str))
                 and p.get("id") not in called]
    if not processes:
        raise WorkflowError("the BPMN model has no process with flow elements to import")
    for extra in processes[1:]:
        problems.refuse(extra, "a second pool with its own flow; nbflow imports one process")
        for el in extra:  # name what else it holds, so one error message says it all
            if isinstance(el.tag, str) and el.tag.startswith(f"{{{BPMN_NS}}}") \
                    and _local(el) not in _IGNORED | _TASKS | set(_GATEWAYS) | _EVENTS | {
                        "sequenceFlow"}:
                problems.refuse(el)
    for mf in root.iter(_b("messageFlow")):
        problems.refuse(mf)
    return processes[0]


def _classify(proc, problems: _Problems) -> tuple[list, list, dict[str, str]]:
    """(flow nodes, sequence flows, BPMN id -> element type of every flow node, refused too)."""
    flow_nodes: list = []
    seq_flows: list = []
    kinds: dict[str, str] = {}
    for el in proc:
        if not isinstance(el.tag, str) or not el.tag.startswith(f"{{{BPMN_NS}}}"):
            continue  # another vendor's element outside extensionElements: not ours to judge
        kind = _local(el)
        if kind in _IGNORED:
            continue
        if kind == "sequenceFlow":
            seq_flows.append(el)
            continue
        kinds[el.get("id") or "?"] = kind
        if kind in _EVENTS or kind in _TASKS or kind in _GATEWAYS:
            flow_nodes.append(el)
        elif (kind, el.get("id") or "?") not in problems:
            problems.refuse(el)
    return flow_nodes, seq_flows, kinds


class _Ids:
    """IR node ids in use; new ones sanitized from BPMN ids and made unique (``_2``, ...)."""

    def __init__(self):
        self.used: set[str] = set()

    def new(self, raw: str) -> str:
        base, cand, i = _sanitize_id(raw), _sanitize_id(raw), 2
        while cand in self.used:
            cand, i = f"{base}_{i}", i + 1
        self.used.add(cand)
        return cand


def _nodes(flow_nodes: list, ids: _Ids, signal_names, problems: _Problems
           ) -> tuple[list[Node], dict[str, str], set[str]]:
    """(IR nodes, BPMN id -> IR node id, BPMN ids of flow nodes not written by nbflow)."""
    owner: dict[str, str] = {}
    nodes: list[Node] = []
    foreign: set[str] = set()
    for el in flow_nodes:
        ext = _ext(el, "node")
        if ext is not None:
            node = _node_from_ext(ext)
            if node.id in ids.used:
                raise WorkflowError(f"two BPMN elements claim nbflow node {node.id!r}")
            ids.used.add(node.id)
            owner[el.get("id")] = node.id
            nodes.append(node)
    parts = []
    for el in flow_nodes:
        bid, kind = el.get("id"), _local(el)
        if bid in owner:
            continue
        part = _ext(el, "part")
        if part is not None:
            parts.append((el, part.get("node")))
            continue
        foreign.add(bid)
        node = _foreign_node(el, kind, ids.new(bid or kind), signal_names, problems)
        if node is None:
            continue
        owner[bid] = node.id
        nodes.append(node)
    for el, node_id in parts:
        if node_id not in ids.used:
            raise WorkflowError(f"{_local(el)} {el.get('id')!r} is part of nbflow node "
                                f"{node_id!r}, which the file does not have")
        owner[el.get("id")] = node_id
    return nodes, owner, foreign


def _sequence_flows(seq_flows: list, flow_nodes: list, kinds: dict[str, str], foreign: set[str],
                    all_ids: set, root, problems: _Problems) -> list[_Flow]:
    defaults = {el.get("default") for el in flow_nodes if el.get("default")}
    flows: list[_Flow] = []
    for sf in seq_flows:
        fid, ok = sf.get("id"), True
        for attr in ("sourceRef", "targetRef"):
            ref = sf.get(attr)
            if not ref:
                problems.add("sequenceFlow", fid, f"it has no {attr}")
                ok = False
            elif ref not in all_ids:
                problems.add("sequenceFlow", fid, f"its {attr} {ref!r} is not a flow node of "
                                                  "the process")
                ok = False
        cond = _condition(sf, root, problems)
        if not ok:
            continue
        fx = _ext(sf, "flow")
        default = (fx is not None and fx.get("default") == "true") or fid in defaults
        f = _Flow(sf, sf.get("sourceRef"), sf.get("targetRef"), cond, default)
        skind = kinds.get(f.s, "")
        if f.has_ce and f.s in foreign:
            if skind in _EVENTS:
                problems.add("sequenceFlow", fid, f"a condition on a flow out of a {skind}; BPMN "
                             "allows conditions only out of gateways and activities")
            elif skind == "parallelGateway":
                problems.add("sequenceFlow", fid, "a condition on a flow out of a "
                             "parallelGateway, which takes every flow; use an inclusiveGateway")
        flows.append(f)
    return flows


def _guards(flows: list[_Flow], flow_nodes: list, kinds: dict[str, str], foreign: set[str],
            problems: _Problems) -> list[tuple[str, str]]:
    """Set each conditional flow's ``guard``; returns (gateway BPMN id, "no flow is taken"
    condition) for the choices BPMN would raise on."""
    out_flows: dict[str, list[_Flow]] = defaultdict(list)
    for f in flows:
        out_flows[f.s].append(f)
    no_branch: list[tuple[str, str]] = []
    by_bid = {el.get("id"): el for el in flow_nodes}
    for bid, outs in out_flows.items():
        kind = kinds.get(bid, "")
        if bid not in foreign or kind in ("parallelGateway",) or kind in _EVENTS:
            continue
        if kind == "exclusiveGateway" and (len(outs) > 1 or any(f.has_ce for f in outs)):
            order = [_text(o) for o in by_bid[bid].findall(_b("outgoing"))]
            outs = sorted(outs, key=lambda f: order.index(f.id) if f.id in order else len(order))
            bare = [f.id for f in outs if not f.default and not f.has_ce]
            if bare:
                problems.add(kind, bid, "an exclusive gateway takes exactly one flow, so "
                             "each flow out of it but the default needs a Python condition; "
                             "these have none:" + _listing(bare))
                continue
            prev: list[str] = []
            for f in outs:
                if f.default or not f.cond:
                    continue
                f.guard = f"({f.cond}) and not ({_any(prev)})" if prev else f.cond
                prev.append(f.cond)
            for f in outs:
                if f.default:
                    f.guard = f"not ({_any(prev)})" if prev else None
            if prev and not any(f.default for f in outs):
                no_branch.append((bid, f"not ({_any(prev)})"))
        elif kind == "inclusiveGateway" or (any(f.has_ce for f in outs)
                                            and kind in _TASKS | {"callActivity", "subProcess"}):
            conds = [f.cond for f in outs if f.cond and not f.default]
            for f in outs:
                if f.default:
                    f.guard = f"not ({_any(conds)})" if conds else None
                elif f.cond:
                    f.guard = f.cond
            if kind == "inclusiveGateway" and conds and all(f.has_ce for f in outs):
                no_branch.append((bid, f"not ({_any(conds)})"))
    return no_branch


def _edges(flows: list[_Flow], nodes: list[Node], owner: dict[str, str], foreign: set[str],
           kinds: dict[str, str], ids: _Ids) -> list[Edge]:
    """The IR edges; a guard that cannot sit on its target as its ``when`` becomes a guard node
    (a task without code) on the flow, appended to ``nodes``."""
    in_count: dict[str, int] = defaultdict(int)
    for f in flows:
        in_count[f.t] += 1
    by_id = {n.id: n for n in nodes}
    edges: list[Edge] = []
    by_pair: dict[tuple[str, str], Edge] = {}

    def connect(s: str, t: str, data=(), condition=None, default=False) -> None:
        if (s, t) in by_pair:  # two flows between the same pair: one edge carries both
            e = by_pair[(s, t)]
            e.data += [d for d in data if d not in e.data]
            return
        e = by_pair[(s, t)] = Edge(s, t, data=list(data), condition=condition, default=default)
        edges.append(e)

    for f in flows:
        if f.s not in owner or f.t not in owner:
            continue
        s, t = owner[f.s], owner[f.t]
        if s == t:
            continue  # inside one nbflow node (its when/signal/timer/join/fork parts)
        fx = _ext(f.el, "flow")
        data = [d.get("name") for d in fx.findall(_n("data"))] if fx is not None else []
        on_edge = f.cond if kinds.get(f.s) == "exclusiveGateway" else None
        if f.s not in foreign:
            on_edge = f.cond
        if not f.guard:
            connect(s, t, data, on_edge, f.default)
            continue
        target = by_id[t]
        if (f.t in foreign and target.kind == "task" and in_count[f.t] == 1 and not target.when
                and target.approval is None and not target.wait_signal
                and target.sleep is None and not target.at):
            target.when = f.guard
            connect(s, t, data, on_edge, f.default)
        else:  # a guard node on the flow: a task without code whose `when` is the condition
            g = Node(ids.new(f.id), "task", name=f.name or f"if {_short(f.guard, 40)[1:-1]}",
                     when=f.guard)
            nodes.append(g)
            by_id[g.id] = g
            connect(s, g.id, data, on_edge, f.default)
            connect(g.id, t, data)
    return edges


def _one_start_one_end(nodes: list[Node], edges: list[Edge], start_ids: list[str],
                       end_ids: list[str], no_branch: list[tuple[str, str]],
                       owner: dict[str, str], ids: _Ids) -> tuple[list[Node], list[Edge]]:
    """Several end events become one; a missing start or end is added; a choice no flow of
    which can be taken gets a node that fails the run (BPMN raises there)."""
    if len(end_ids) > 1:
        keep = end_ids[0]
        nodes = [n for n in nodes if n.kind != "end" or n.id == keep]
        merged: list[Edge] = []
        seen_pairs = set()
        for e in edges:
            if e.target in end_ids:
                e.target = keep
            if (e.source, e.target) not in seen_pairs:
                seen_pairs.add((e.source, e.target))
                merged.append(e)
        edges = merged
    has_in = {e.target for e in edges}
    has_out = {e.source for e in edges}
    if not start_ids:
        sid = ids.new("start")
        heads = [n.id for n in nodes if n.id not in has_in]
        nodes.insert(0, Node(sid, "start"))
        edges[:0] = [Edge(sid, h) for h in heads]
    if not end_ids:
        eid = ids.new("end")
        tails = [n.id for n in nodes if n.id not in has_out and n.kind != "start"]
        nodes.append(Node(eid, "end"))
        edges += [Edge(t, eid) for t in tails]
        end_ids = [eid]
    by_id = {n.id: n for n in nodes}
    for gw, cond in no_branch:  # BPMN raises when an exclusive choice has no way out: so do we
        label = by_id[owner[gw]].label
        msg = f"no condition out of gateway {label!r} is true and it has no default flow"
        n = Node(ids.new(f"{owner[gw]}__no_branch"), "task", name=f"no branch of {label}",
                 when=cond, code=f"raise RuntimeError({msg!r})")
        nodes.append(n)
        edges += [Edge(owner[gw], n.id), Edge(n.id, end_ids[0])]
    return nodes, edges


def _workflow(proc, root, path: Path | None, nodes: list[Node], edges: list[Edge]) -> Workflow:
    """The Workflow: name, parameters and setup from nbflow's extension when the file has it,
    else the process's name and the free names of the conditions as parameters."""
    wf_ext = _ext(proc, "workflow")
    if wf_ext is None:
        name = (proc.get("name") or root.get("name") or (path.stem if path else "")
                or proc.get("id") or "workflow")
        return Workflow(name=" ".join(name.split()), nodes=nodes, edges=edges,
                        params={p: None for p in _free_names(nodes)},
                        source=str(path.resolve()) if path else None)
    params_el = wf_ext.find(_n("params"))
    ps_el = wf_ext.find(_n("paramsSource"))
    try:
        params = json.loads(_get_text(params_el)) if params_el is not None else {}
    except json.JSONDecodeError:
        raise WorkflowError("nbflow:workflow params are not valid JSON") from None
    return Workflow(
        name=wf_ext.get("name") or "", nodes=nodes, edges=edges, params=params,
        params_source=_get_text(ps_el) if ps_el is not None else "",
        setup=[_get_text(s) for s in wf_ext.findall(_n("setup"))],
        source=wf_ext.get("source"),
        version=int(wf_ext.get("version") or 1))


def _any(conds: list[str]) -> str:
    return " or ".join(f"({c})" for c in conds)


def _free_names(nodes: list[Node]) -> list[str]:
    """The names a foreign model's conditions and multi-instance collections read: they become
    the workflow's parameters (default None), so a run can set them (``-p amount 5000``)."""
    import builtins

    names: list[str] = []
    for n in nodes:
        used = [n.map_over] if n.map_over else []
        if n.when and not n.code:
            used += [x.id for x in ast.walk(ast.parse(n.when, mode="eval"))
                     if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)]
        names += [u for u in used if u not in names and not hasattr(builtins, u)]
    return sorted(names)


def _check_acyclic(nodes: list[Node], edges: list[Edge]) -> None:
    cycle = Workflow("check", nodes=nodes, edges=edges).find_cycle()
    if cycle:
        raise WorkflowError("the BPMN process loops (" + " -> ".join(cycle)
                            + "); nbflow workflows are acyclic")
