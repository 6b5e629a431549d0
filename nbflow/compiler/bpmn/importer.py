"""BPMN 2.0 XML into the workflow IR.

Import (:func:`from_bpmn`)
--------------------------
Reads one process made of: ``startEvent`` / ``endEvent`` (no event definitions), ``task`` /
``serviceTask`` / ``userTask``, ``exclusiveGateway`` / ``parallelGateway``, ``sequenceFlow`` (with a
``conditionExpression`` only out of an exclusive gateway, Python), ``intermediateCatchEvent`` with
a timer (``timeDuration`` without years/months, or ``timeDate``) or a signal, and
``multiInstanceLoopCharacteristics`` that name a collection (``nbflow:map`` or Camunda's
``collection``/``elementVariable``). Elements written by nbflow fold back into exactly the IR they
came from (``from_bpmn(to_bpmn(wf)).to_dict() == wf.to_dict()``).

Models from other tools:

* node ids are the BPMN ids, sanitized to ``[A-Za-z_][A-Za-z0-9_-]*`` (made unique with ``_2``…),
  names are the BPMN names (whitespace collapsed);
* ``task``/``serviceTask`` become task nodes with empty ``code``: a modelled step with nothing to
  run, which the engine passes as an instant gate. A ``serviceTask`` can point at a notebook to run
  with ``nbflow:notebook``/``nbflow:task`` attributes (``<serviceTask nbflow:notebook="etl.ipynb"
  nbflow:task="load">``) or ``implementation="etl.ipynb#load"``; relative notebook paths resolve
  against ``base_dir`` (default: the BPMN file's folder; XML text without ``base_dir`` keeps them);
* ``userTask`` → an approval gate (prompt: its documentation, else "Approve <name>?");
* timer / signal catch events → pure timer / signal gates (signal names made identifiers);
* gateways stay gateway nodes (kind ``exclusive``/``parallel``); a condition is kept on
  ``Edge.condition`` (the gateway's ``default`` flow on ``Edge.default``) *and*, when the flow is
  the only way into a task, copied to that task's ``when`` (the default flow's task gets
  ``not (c1 or c2 …)``), since conditions are evaluated in the target task's kernel;
* several end events become one ``end`` node; a process without start/end events gets them.

Ignored rather than refused (they do not change what runs): diagrams, documentation (except on
user tasks), other tools' extension elements, collaboration/participant (pools), laneSet/lane,
textAnnotation/association/group, data objects/stores and their associations, ioSpecification,
properties, message/signal/error/item definitions, and empty processes (black-box pools).
Everything else is refused with one :class:`~nbflow.core.ir.WorkflowError` naming each
unsupported element by type and id. Parsing never resolves entities, never loads DTDs or touches
the network, and refuses DOCTYPEs (no XXE, no billion laughs).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

from lxml import etree

from nbflow.compiler.bpmn.common import (
    BPMN_NS, CAMUNDA_NS, NBFLOW_NS, SUPPORTED, _b, _get_text, _local, _n, _node_from_ext,
    parse_duration)
from nbflow.core.ir import Edge, Node, Workflow, WorkflowError

# --- import ----------------------------------------------------------------------------------

_IGNORED = {
    "documentation", "extensionElements", "laneSet", "textAnnotation", "association", "group",
    "dataObject", "dataObjectReference", "dataStoreReference", "ioSpecification", "property",
    "auditing", "monitoring", "supports", "ioBinding", "correlationSubscription", "performer",
    "potentialOwner", "humanPerformer", "resourceRole",
}
_ACTIVITY_IGNORED = _IGNORED | {
    "incoming", "outgoing", "dataInputAssociation", "dataOutputAssociation", "rendering",
}
_TASKS = {"task", "serviceTask", "userTask"}
_GATEWAYS = {"exclusiveGateway": "exclusive", "parallelGateway": "parallel"}
_EVENT_DEFS = {"timerEventDefinition", "signalEventDefinition", "messageEventDefinition",
               "errorEventDefinition", "escalationEventDefinition", "conditionalEventDefinition",
               "compensateEventDefinition", "linkEventDefinition", "terminateEventDefinition",
               "cancelEventDefinition"}
_PYTHON_LANGS = {"", "python", "text/x-python", "application/x-python", "py",
                 "https://www.python.org/", "http://www.python.org/", "https://python.org"}


def _parse(source: str | bytes | os.PathLike) -> tuple[etree._Element, Path | None]:
    path = None
    if isinstance(source, bytes):
        data: str | bytes = source
    elif isinstance(source, str) and source.lstrip().startswith("<"):
        data = re.sub(r"^\s*<\?xml[^>]*\?>", "", source)  # str input: its declared encoding lies
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise WorkflowError(f"cannot read BPMN file {str(path)!r}: {e.strerror or e}") from None
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False, remove_comments=True,
                             remove_pis=True)
    where = f" {str(path)!r}" if path else ""
    try:
        root = etree.fromstring(data, parser)
    except (etree.XMLSyntaxError, ValueError) as e:
        raise WorkflowError(f"BPMN{where} is not well-formed XML: {e}") from None
    if root is None:
        raise WorkflowError(f"BPMN{where} is empty")
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise WorkflowError(f"BPMN{where} has a DOCTYPE; BPMN files never need one, "
                            "so nbflow refuses it (entities are not expanded)")
    if root.tag != _b("definitions"):
        raise WorkflowError(
            f"{str(path) if path else 'the text'} is not BPMN 2.0: its root element is "
            f"{etree.QName(root).localname!r} (namespace {etree.QName(root).namespace!r}), "
            f"expected 'definitions' in {BPMN_NS}")
    return root, path


def _sanitize_id(raw: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]", "_", raw or "node")
    return s if re.match(r"[A-Za-z_]", s) else "_" + s


def _identifier(s: str) -> str:
    s = re.sub(r"\W", "_", s.strip()) or "signal"
    return s if not s[0].isdigit() else "_" + s


def _ext(el, tag: str):
    ext = el.find(_b("extensionElements"))
    return ext.find(_n(tag)) if ext is not None else None


def from_bpmn(source: str | bytes | os.PathLike, base_dir: str | os.PathLike | None = None
              ) -> Workflow:
    """Read a BPMN 2.0 model (a path, or the XML text) into the workflow IR (see module doc)."""
    root, path = _parse(source)
    if base_dir is None and path is not None:
        base_dir = path.resolve().parent
    unsupported: list[str] = []

    def refuse(el, why: str = "") -> None:
        item = f"{_local(el)} {el.get('id') or '?'!r}" + (f" ({why})" if why else "")
        if item not in unsupported:
            unsupported.append(item)

    processes = [p for p in root.iter(_b("process"))
                 if any(_local(c) not in _IGNORED for c in p if isinstance(c.tag, str))]
    if not processes:
        raise WorkflowError("the BPMN model has no process with flow elements to import")
    for extra in processes[1:]:
        refuse(extra, "a second pool with its own flow; nbflow imports one process")
        for el in extra:  # name what else it holds, so one error message says it all
            if isinstance(el.tag, str) and el.tag.startswith(f"{{{BPMN_NS}}}") \
                    and _local(el) not in _IGNORED | _TASKS | set(_GATEWAYS) | {
                        "sequenceFlow", "startEvent", "endEvent", "intermediateCatchEvent"}:
                refuse(el)
    for mf in root.iter(_b("messageFlow")):
        refuse(mf)
    proc = processes[0]
    signal_names = {s.get("id"): s.get("name") or s.get("id") for s in root.iter(_b("signal"))}

    # 1. classify the process's elements
    flow_nodes: list = []
    seq_flows: list = []
    all_ids = {el.get("id") for el in proc.iter() if isinstance(el.tag, str)}
    for el in proc:
        if not isinstance(el.tag, str):
            continue
        kind = _local(el)
        if el.tag.startswith(f"{{{BPMN_NS}}}") and kind in _IGNORED:
            continue
        if not el.tag.startswith(f"{{{BPMN_NS}}}"):
            continue  # another vendor's element outside extensionElements: not ours to judge
        if kind == "sequenceFlow":
            seq_flows.append(el)
        elif kind in ("startEvent", "endEvent", "intermediateCatchEvent") or kind in _TASKS \
                or kind in _GATEWAYS:
            flow_nodes.append(el)
        else:
            refuse(el)

    # 2. flow nodes -> IR nodes (or parts folded into one)
    owner: dict[str, str] = {}        # BPMN id -> IR node id
    nodes: list[Node] = []
    foreign: set[str] = set()         # IR ids of nodes that were not written by nbflow
    used_ids: set[str] = set()
    start_ids, end_ids = [], []

    def new_id(raw: str) -> str:
        base, cand, i = _sanitize_id(raw), _sanitize_id(raw), 2
        while cand in used_ids:
            cand, i = f"{base}_{i}", i + 1
        used_ids.add(cand)
        return cand

    for el in flow_nodes:  # nbflow's own main elements first: their ids are reserved
        ext = _ext(el, "node")
        if ext is not None:
            node = _node_from_ext(ext)
            if node.id in used_ids:
                raise WorkflowError(f"two BPMN elements claim nbflow node {node.id!r}")
            used_ids.add(node.id)
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
        node = _foreign_node(el, kind, new_id(bid or kind), signal_names, refuse)
        if node is None:
            continue
        owner[bid] = node.id
        foreign.add(node.id)
        nodes.append(node)
    for el, node_id in parts:
        if node_id not in used_ids:
            raise WorkflowError(f"{_local(el)} {el.get('id')!r} is part of nbflow node "
                                f"{node_id!r}, which the file does not have")
        owner[el.get("id")] = node_id
    for n in nodes:
        if n.kind == "start":
            start_ids.append(n.id)
        elif n.kind == "end":
            end_ids.append(n.id)
    for extra in start_ids[1:]:
        el = next(e for e in flow_nodes if owner.get(e.get("id")) == extra)
        refuse(el, "a second start event; nbflow workflows have one")

    # 3. sequence flows -> edges
    edges: list[Edge] = []
    by_pair: dict[tuple[str, str], Edge] = {}
    kinds_by_bid = {el.get("id"): _local(el) for el in flow_nodes}
    defaults = {el.get("default") for el in flow_nodes if el.get("default")}
    cond_of: dict[str, str | None] = {}
    for sf in seq_flows:
        fid, s_bid, t_bid = sf.get("id"), sf.get("sourceRef"), sf.get("targetRef")
        for ref in (s_bid, t_bid):
            if ref not in all_ids:
                raise WorkflowError(f"sequenceFlow {fid!r} points at {ref!r}, "
                                    "which is not a flow node of the process")
        ce = sf.find(_b("conditionExpression"))
        condition = None
        if ce is not None and "".join(ce.itertext()).strip():
            lang = ce.get("language") or ""
            if kinds_by_bid.get(s_bid) != "exclusiveGateway":
                refuse(sf, f"a condition on a flow out of a {kinds_by_bid.get(s_bid)}; "
                           "conditions are only supported out of an exclusive gateway")
            elif lang.lower().rstrip("/") not in {x.rstrip("/") for x in _PYTHON_LANGS}:
                refuse(sf, f"condition language {lang!r}; nbflow evaluates Python")
            condition = _get_text(ce) if ce.get(_n("json")) == "true" else "".join(ce.itertext())
        if s_bid not in owner or t_bid not in owner:
            continue  # an element we refused; the error is on its way
        s, t = owner[s_bid], owner[t_bid]
        if s == t:
            continue  # inside one nbflow node (its when/signal/timer/join/fork parts)
        fx = _ext(sf, "flow")
        data = [d.get("name") for d in fx.findall(_n("data"))] if fx is not None else []
        default = (fx is not None and fx.get("default") == "true") or fid in defaults
        key = (s, t)
        if key in by_pair:  # two flows between the same pair: one edge carries both
            e = by_pair[key]
            e.data += [d for d in data if d not in e.data]
            continue
        e = Edge(s, t, data=data, condition=condition, default=default)
        by_pair[key] = e
        edges.append(e)
        cond_of[fid] = condition

    if unsupported:
        raise WorkflowError("unsupported BPMN elements: " + ", ".join(unsupported) + " — "
                            + SUPPORTED)

    # 4. one start, one end; foreign conditions also become the target task's `when`
    ids = {n.id for n in nodes}
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
        ids = {n.id for n in nodes}
    has_in = {e.target for e in edges}
    has_out = {e.source for e in edges}
    if not start_ids:
        sid = new_id("start")
        heads = [n.id for n in nodes if n.id not in has_in]
        nodes.insert(0, Node(sid, "start"))
        edges[:0] = [Edge(sid, h) for h in heads]
    if not end_ids:
        eid = new_id("end")
        tails = [n.id for n in nodes if n.id not in has_out and n.kind != "start"]
        nodes.append(Node(eid, "end"))
        edges += [Edge(t, eid) for t in tails]
    _fold_conditions(nodes, edges, foreign)
    _check_acyclic(nodes, edges)
    del ids

    wf_ext = _ext(proc, "workflow")
    if wf_ext is not None:
        params_el = wf_ext.find(_n("params"))
        ps_el = wf_ext.find(_n("paramsSource"))
        try:
            params = json.loads(_get_text(params_el)) if params_el is not None else {}
        except json.JSONDecodeError:
            raise WorkflowError("nbflow:workflow params are not valid JSON") from None
        wf = Workflow(
            name=wf_ext.get("name") or "", nodes=nodes, edges=edges, params=params,
            params_source=_get_text(ps_el) if ps_el is not None else "",
            setup=[_get_text(s) for s in wf_ext.findall(_n("setup"))],
            source=wf_ext.get("source"),
            version=int(wf_ext.get("version") or 1))
    else:
        name = (proc.get("name") or root.get("name") or (path.stem if path else "")
                or proc.get("id") or "workflow")
        wf = Workflow(name=" ".join(name.split()), nodes=nodes, edges=edges,
                      source=str(path.resolve()) if path else None)
    if base_dir is not None:
        for n in wf.nodes:
            if n.notebook and not os.path.isabs(n.notebook):
                n.notebook = str((Path(base_dir) / n.notebook).resolve())
    return wf.validate()


def _foreign_node(el, kind: str, node_id: str, signal_names, refuse) -> Node | None:
    """A flow node drawn by another tool -> IR node; None (after refuse()) if outside the subset."""
    name = " ".join((el.get("name") or "").split())
    defs = [c for c in el if isinstance(c.tag, str) and _local(c) in _EVENT_DEFS]
    defs += [c for c in el if isinstance(c.tag, str) and _local(c) == "eventDefinitionRef"]
    if kind in ("startEvent", "endEvent"):
        if defs:
            refuse(el, f"{_local(defs[0])}; nbflow supports plain start/end events")
            return None
        return Node(node_id, "start" if kind == "startEvent" else "end", name=name)
    if kind in _GATEWAYS:
        return Node(node_id, _GATEWAYS[kind], name=name)
    if kind == "intermediateCatchEvent":
        if len(defs) != 1 or _local(defs[0]) not in ("timerEventDefinition", "signalEventDefinition"):
            what = ", ".join(_local(d) for d in defs) or "no event definition"
            refuse(el, f"{what}; nbflow catches one timer or signal")
            return None
        d = defs[0]
        if _local(d) == "signalEventDefinition":
            ref = (d.get("signalRef") or "").split(":")[-1]
            signal = signal_names.get(ref) or ref or name
            return Node(node_id, "task", name=name, wait_signal=_identifier(signal))
        dur, date = d.find(_b("timeDuration")), d.find(_b("timeDate"))
        if dur is not None:
            text = "".join(dur.itertext()).strip()
            secs = parse_duration(text)
            if secs is None:
                refuse(el, f"timeDuration {text!r}; use days/hours/minutes/seconds like PT2H")
                return None
            return Node(node_id, "task", name=name, sleep=secs)
        if date is not None:
            return Node(node_id, "task", name=name, at="".join(date.itertext()).strip())
        refuse(el, "timeCycle or an empty timer; nbflow waits for a duration or a date")
        return None
    # task / serviceTask / userTask
    node = Node(node_id, "task", name=name)
    for child in el:
        if not isinstance(child.tag, str) or not child.tag.startswith(f"{{{BPMN_NS}}}"):
            continue
        c = _local(child)
        if c == "multiInstanceLoopCharacteristics":
            m = _ext(child, "map")
            var = m.get("var") if m is not None else child.get(f"{{{CAMUNDA_NS}}}elementVariable")
            over = m.get("over") if m is not None else child.get(f"{{{CAMUNDA_NS}}}collection")
            if not var or not over:
                refuse(el, "multi-instance without a collection; name one with <nbflow:map "
                           "var=.. over=..> or camunda:collection/elementVariable")
                return None
            node.map_var, node.map_over = var, over
        elif c == "standardLoopCharacteristics":
            refuse(el, "a loop; nbflow workflows are acyclic")
            return None
        elif c not in _ACTIVITY_IGNORED:
            refuse(child)
    nb = el.get(f"{{{NBFLOW_NS}}}notebook")
    nb_task = el.get(f"{{{NBFLOW_NS}}}task")
    impl = el.get("implementation") or ""
    if not nb and re.search(r"\.ipynb(#|$)", impl):
        nb, _, nb_task = impl.partition("#")
    if nb:
        node.notebook, node.notebook_task = nb, nb_task or None
    if kind == "userTask":
        docs = " ".join("".join(d.itertext()).strip() for d in el.findall(_b("documentation")))
        node.approval = docs.strip() or f"Approve {name or node_id}?"
    return node


def _fold_conditions(nodes: list[Node], edges: list[Edge], foreign: set[str]) -> None:
    """Copy a foreign gateway's conditions to the `when` of tasks that only that flow reaches."""
    by_id = {n.id: n for n in nodes}
    incoming: dict[str, list[Edge]] = defaultdict(list)
    outgoing: dict[str, list[Edge]] = defaultdict(list)
    for e in edges:
        incoming[e.target].append(e)
        outgoing[e.source].append(e)
    for e in edges:
        src, tgt = by_id[e.source], by_id[e.target]
        if src.kind != "exclusive" or src.id not in foreign or tgt.id not in foreign:
            continue
        if tgt.kind != "task" or len(incoming[tgt.id]) != 1 or tgt.when:
            continue
        if e.condition:
            tgt.when = e.condition
        elif e.default:
            others = [o.condition for o in outgoing[src.id] if o is not e]
            if others and all(others):
                tgt.when = "not (" + " or ".join(f"({c})" for c in others) + ")"


def _check_acyclic(nodes: list[Node], edges: list[Edge]) -> None:
    cycle = Workflow("check", nodes=nodes, edges=edges).find_cycle()
    if cycle:
        raise WorkflowError("the BPMN process loops (" + " -> ".join(cycle)
                            + "); nbflow workflows are acyclic")
