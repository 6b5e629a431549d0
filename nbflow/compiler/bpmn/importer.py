"""BPMN 2.0 XML into the workflow IR: nbflow's own files exactly, other tools' models when their
meaning survives, else one error that names every element it refuses (grouped by element type).

What imports, what runs and what is refused, element by element: ``docs/bpmn.md``.

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
import re
import textwrap
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from lxml import etree

from nbflow.compiler.bpmn.common import (
    BPMN_NS, CAMUNDA_NS, NBFLOW_NS, PYTHON_LANGUAGE, SUPPORTED, _b, _get_text, _local, _n,
    _node_from_ext, parse_duration)
from nbflow.core.ir import Edge, Node, Workflow, WorkflowError

ZEEBE_NS = "http://camunda.org/schema/zeebe/1.0"
XPATH = "http://www.w3.org/1999/XPath"

_IGNORED = {
    "documentation", "extensionElements", "laneSet", "textAnnotation", "association", "group",
    "dataObject", "dataObjectReference", "dataStoreReference", "ioSpecification", "property",
    "auditing", "monitoring", "supports", "ioBinding", "correlationSubscription", "performer",
    "potentialOwner", "humanPerformer", "resourceRole",
}
_ACTIVITY_IGNORED = _IGNORED | {
    "incoming", "outgoing", "dataInputAssociation", "dataOutputAssociation", "rendering",
}
_TASKS = {"task", "serviceTask", "userTask", "manualTask"}
_GATEWAYS = {"exclusiveGateway": "exclusive", "parallelGateway": "parallel",
             "inclusiveGateway": "parallel"}
_EVENTS = {"startEvent", "endEvent", "intermediateCatchEvent"}
_EVENT_DEFS = {"timerEventDefinition", "signalEventDefinition", "messageEventDefinition",
               "errorEventDefinition", "escalationEventDefinition", "conditionalEventDefinition",
               "compensateEventDefinition", "linkEventDefinition", "terminateEventDefinition",
               "cancelEventDefinition"}
_PYTHON_LANGS = {PYTHON_LANGUAGE, "python", "text/x-python", "application/x-python"}
# why an element is refused, when there is more to say than "not supported"
_HINTS = {
    "subProcess": "this kind of sub-process is not imported",
    "adHocSubProcess": "ad-hoc sub-processes have no order to run in",
    "transaction": "transactions (compensation, cancel) are not supported",
    "callActivity": "a call nbflow cannot resolve",
    "boundaryEvent": "boundary events are not imported yet",
    "scriptTask": "a script in the modeller's language; nbflow runs notebooks (point a "
                  "serviceTask at one with nbflow:notebook)",
    "businessRuleTask": "business rules (DMN) are not supported",
    "sendTask": "messages are not supported", "receiveTask": "messages are not supported",
    "eventBasedGateway": "event-based gateways (a race between events) are not supported",
    "complexGateway": "complex gateways are not supported",
    "intermediateThrowEvent": "throw events (messages, signals, escalations) are not supported",
    "messageFlow": "messages between pools are not supported",
    "subChoreography": "choreographies are not supported",
}
MAX_PATHS = 20000            # branch combinations the token check explores before giving up


class _Problems:
    """Every reason to refuse the model, collected; raised once, grouped by element type."""

    def __init__(self):
        self.items: dict[str, dict[str, list[str]]] = {}

    def add(self, kind: str, eid: str | None, why: str = "") -> None:
        whys = self.items.setdefault(kind, {}).setdefault(eid or "?", [])
        if why not in whys:
            whys.append(why)

    def refuse(self, el, why: str = "") -> None:
        self.add(_local(el), el.get("id"), why or _HINTS.get(_local(el), "not supported"))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __contains__(self, kind_id: tuple[str, str]) -> bool:
        return kind_id[1] in self.items.get(kind_id[0], {})

    def raise_if_any(self) -> None:
        if not self.items:
            return
        count = sum(len(ids) for ids in self.items.values())
        lines = [f"cannot import this BPMN model without changing what it means "
                 f"({count} element{'s' if count != 1 else ''}):"]
        for kind in sorted(self.items):
            for eid, whys in self.items[kind].items():
                whys = [w for w in whys if w]
                why = whys[0] if len(whys) == 1 else "".join(f"\n    - {w}" for w in whys)
                head = f"  {kind} {eid!r}" + (f": {why}" if why else "")
                lines += [textwrap.fill(part, 100, subsequent_indent="      ",
                                        break_long_words=False, break_on_hyphens=False)
                          for part in head.split("\n")]
        lines.append(SUPPORTED + " (see docs/bpmn.md)")
        raise WorkflowError("\n".join(lines))


def _text(el) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


_EXPR = re.compile(r"^\s*(?:\$\{(?P<juel>.*)\}|#\{(?P<juel2>.*)\}|=(?P<feel>.*))\s*$", re.S)


def vendor_name(value: str) -> str | None:
    """The documented translation of a Camunda/Zeebe expression: ``${items}``, ``#{items}``,
    ``=items`` and ``items`` mean the name ``items``; None for anything else."""
    m = _EXPR.match(value or "")
    inner = next((g for g in m.groups() if g is not None), "") if m else (value or "")
    inner = inner.strip()
    return inner if inner.isidentifier() else None


def _is_vendor_expression(value: str) -> bool:
    return bool(_EXPR.match(value or ""))


def parse_date(text: str) -> datetime | None:
    """An ISO-8601 date or date-time (``2026-11-20``, ``2026-11-20T12:00:00Z``); None if not one."""
    t = text.strip()
    if not re.match(r"^\d{4}-\d{2}-\d{2}", t):
        return None
    try:
        return datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None


def _condition(sf, root, problems: _Problems) -> str | None:
    """The Python text of a flow's condition; None if it has none (or after refusing it)."""
    ce = sf.find(_b("conditionExpression"))
    if ce is None:
        return None
    fid = sf.get("id")
    text = _get_text(ce) if ce.get(_n("json")) == "true" else "".join(ce.itertext())
    if not text.strip():
        problems.add("sequenceFlow", fid, "its conditionExpression is empty; write a Python "
                     "condition or remove the element")
        return None
    lang = (ce.get("language") or root.get("expressionLanguage") or XPATH).strip()
    if lang.lower().rstrip("/") not in {x.rstrip("/") for x in _PYTHON_LANGS}:
        where = ("its language attribute" if ce.get("language") else
                 "definitions/@expressionLanguage" if root.get("expressionLanguage") else
                 "BPMN's default, since neither the condition nor the model names a language")
        problems.add("sequenceFlow", fid,
                     f"condition {_short(text)} is in {lang!r} ({where}); nbflow evaluates "
                     f"Python: set language=\"{PYTHON_LANGUAGE}\"")
        return None
    try:
        ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        hint = (" (a Camunda/JUEL or FEEL expression: write the Python inside it)"
                if _is_vendor_expression(text) else "")
        problems.add("sequenceFlow", fid, f"condition {_short(text)} is not a Python expression"
                     f"{hint}: {e.msg}")
        return None
    return text.strip()


def _listing(items: list[str]) -> str:
    """Ids for a message: inline when one or two, else one per line."""
    if len(items) <= 2:
        return " " + ", ".join(repr(i) for i in items)
    return "".join(f"\n      - {i!r}" for i in items)


def _short(text: str, n: int = 60) -> str:
    t = " ".join(text.split())
    return repr(t if len(t) <= n else t[:n - 1] + "…")


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


class _Flow:
    __slots__ = ("id", "s", "t", "cond", "has_ce", "default", "name", "guard", "el")

    def __init__(self, el, s, t, cond, default):
        self.id, self.s, self.t, self.cond, self.default = el.get("id") or "?", s, t, cond, default
        self.has_ce = el.find(_b("conditionExpression")) is not None
        self.name = " ".join((el.get("name") or "").split())
        self.guard: str | None = None
        self.el = el


def _any(conds: list[str]) -> str:
    return " or ".join(f"({c})" for c in conds)


def from_bpmn(source: str | bytes | os.PathLike, base_dir: str | os.PathLike | None = None
              ) -> Workflow:
    """Read a BPMN 2.0 model (a path, or the XML text) into the workflow IR (see module doc)."""
    root, path = _parse(source)
    if base_dir is None and path is not None:
        base_dir = path.resolve().parent
    problems = _Problems()
    refuse = problems.refuse

    called = {c.get("calledElement") for c in root.iter(_b("callActivity"))}
    processes = [p for p in root.iter(_b("process"))
                 if any(_local(c) not in _IGNORED for c in p if isinstance(c.tag, str))
                 and p.get("id") not in called]
    if not processes:
        raise WorkflowError("the BPMN model has no process with flow elements to import")
    for extra in processes[1:]:
        refuse(extra, "a second pool with its own flow; nbflow imports one process")
        for el in extra:  # name what else it holds, so one error message says it all
            if isinstance(el.tag, str) and el.tag.startswith(f"{{{BPMN_NS}}}") \
                    and _local(el) not in _IGNORED | _TASKS | set(_GATEWAYS) | _EVENTS | {
                        "sequenceFlow"}:
                refuse(el)
    for mf in root.iter(_b("messageFlow")):
        refuse(mf)
    proc = processes[0]
    _inline_call_activities(proc, root, base_dir, problems)
    _flatten_subprocesses(proc, problems)
    signal_names = {s.get("id"): s.get("name") or s.get("id") for s in root.iter(_b("signal"))}

    # 1. classify the process's elements
    flow_nodes: list = []
    seq_flows: list = []
    kinds: dict[str, str] = {}        # BPMN id -> element type, for every flow node (refused too)
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
            refuse(el)
    all_ids = {el.get("id") for el in proc.iter() if isinstance(el.tag, str)}

    # 2. flow nodes -> IR nodes (nbflow's own main elements first: their ids are reserved)
    owner: dict[str, str] = {}        # BPMN id -> IR node id
    nodes: list[Node] = []
    foreign: set[str] = set()         # BPMN ids of flow nodes not written by nbflow
    used_ids: set[str] = set()

    def new_id(raw: str) -> str:
        base, cand, i = _sanitize_id(raw), _sanitize_id(raw), 2
        while cand in used_ids:
            cand, i = f"{base}_{i}", i + 1
        used_ids.add(cand)
        return cand

    for el in flow_nodes:
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
        foreign.add(bid)
        node = _foreign_node(el, kind, new_id(bid or kind), signal_names, problems)
        if node is None:
            continue
        owner[bid] = node.id
        nodes.append(node)
    for el, node_id in parts:
        if node_id not in used_ids:
            raise WorkflowError(f"{_local(el)} {el.get('id')!r} is part of nbflow node "
                                f"{node_id!r}, which the file does not have")
        owner[el.get("id")] = node_id
    start_ids = [n.id for n in nodes if n.kind == "start"]
    end_ids = [n.id for n in nodes if n.kind == "end"]
    for extra in start_ids[1:]:
        el = next(e for e in flow_nodes if owner.get(e.get("id")) == extra)
        refuse(el, "a second start event; nbflow workflows have one")

    # 3. sequence flows: well-formed, their conditions Python and where BPMN allows them
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

    out_flows: dict[str, list[_Flow]] = defaultdict(list)
    in_count: dict[str, int] = defaultdict(int)
    for f in flows:
        out_flows[f.s].append(f)
        in_count[f.t] += 1

    # 4. conditions -> guards (the `when` that carries each conditional flow's meaning)
    no_branch: list[tuple[str, str]] = []   # (gateway BPMN id, "no flow is taken" condition)
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

    # 5. tokens: refuse what the engine's "run once, join on all resolved" cannot mean
    # (on a graph with refused elements the check would guess; those are named already)
    if foreign and all(b in owner for b in kinds):
        _check_tokens(kinds, [f for f in flows if f.s in foreign or f.t in foreign], problems)
    problems.raise_if_any()

    # 6. edges, with guard nodes where a condition cannot sit on the target itself
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
            g = Node(new_id(f.id), "task", name=f.name or f"if {_short(f.guard, 40)[1:-1]}",
                     when=f.guard)
            nodes.append(g)
            by_id[g.id] = g
            connect(s, g.id, data, on_edge, f.default)
            connect(g.id, t, data)

    # 7. one start, one end
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
        sid = new_id("start")
        heads = [n.id for n in nodes if n.id not in has_in]
        nodes.insert(0, Node(sid, "start"))
        edges[:0] = [Edge(sid, h) for h in heads]
    if not end_ids:
        eid = new_id("end")
        tails = [n.id for n in nodes if n.id not in has_out and n.kind != "start"]
        nodes.append(Node(eid, "end"))
        edges += [Edge(t, eid) for t in tails]
        end_ids = [eid]
    for gw, cond in no_branch:  # BPMN raises when an exclusive choice has no way out: so do we
        label = by_id[owner[gw]].label
        msg = f"no condition out of gateway {label!r} is true and it has no default flow"
        n = Node(new_id(f"{owner[gw]}__no_branch"), "task", name=f"no branch of {label}",
                 when=cond, code=f"raise RuntimeError({msg!r})")
        nodes.append(n)
        edges += [Edge(owner[gw], n.id), Edge(n.id, end_ids[0])]
    _check_acyclic(nodes, edges)

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
                      params={p: None for p in _free_names(nodes)},
                      source=str(path.resolve()) if path else None)
    if base_dir is not None:
        for n in wf.nodes:
            if n.notebook and not os.path.isabs(n.notebook):
                n.notebook = str((Path(base_dir) / n.notebook).resolve())
    return wf.validate()


_REFS = ("sourceRef", "targetRef", "default", "attachedToRef")


def _called_process(name: str, root, base_dir):
    """The process a callActivity's calledElement names: in this file, else in a .bpmn file of
    ``base_dir`` (the model's folder); None if neither has it."""
    for p in root.iter(_b("process")):
        if p.get("id") == name:
            return p
    if base_dir is None:
        return None
    for f in sorted(Path(base_dir).glob("*.bpmn")):
        try:
            other, _ = _parse(f)
        except WorkflowError:
            continue
        for p in other.iter(_b("process")):
            if p.get("id") == name:
                return p
    return None


def _inline_call_activities(parent, root, base_dir, problems: _Problems, depth: int = 0) -> None:
    """A callActivity whose calledElement is a process of this file or of a .bpmn file beside
    it becomes an embedded sub-process holding a copy of that process (ids prefixed with the
    call's id), then flattened like one. Calls of anything else are refused naming the call."""
    import copy

    for ca in [c for c in parent if isinstance(c.tag, str) and c.tag == _b("callActivity")]:
        cid, name = ca.get("id") or "?", ca.get("calledElement") or ""
        callee = _called_process(name, root, base_dir) if name else None
        why = ("it names no calledElement" if not name else
               f"calledElement {name!r} is not a process of this file or of a .bpmn file beside it"
               if callee is None else
               "calls nest more than 10 deep (a process calling itself?)" if depth >= 10 else "")
        if any(_local(c) in ("multiInstanceLoopCharacteristics", "standardLoopCharacteristics")
               for c in ca if isinstance(c.tag, str)):
            why = "a looping or multi-instance call"
        if why:
            problems.refuse(ca, why)
            continue
        sp = etree.Element(_b("subProcess"), id=cid, name=ca.get("name") or callee.get("name")
                           or "")
        if ca.get("default"):
            sp.set("default", ca.get("default"))
        ids = {el.get("id") for el in callee.iter() if isinstance(el.tag, str) and el.get("id")}
        for child in callee:
            if not isinstance(child.tag, str) or _local(child) in ("laneSet",):
                continue
            c = copy.deepcopy(child)
            for el in c.iter():
                if not isinstance(el.tag, str):
                    continue
                if el.get("id"):
                    el.set("id", f"{cid}__{el.get('id')}")
                for attr in _REFS:
                    if el.get(attr) in ids:
                        el.set(attr, f"{cid}__{el.get(attr)}")
                if _local(el) in ("incoming", "outgoing") and (el.text or "").strip() in ids:
                    el.text = f"{cid}__{el.text.strip()}"
            sp.append(c)
        _inline_call_activities(sp, root, base_dir, problems, depth + 1)
        parent.replace(ca, sp)


def _flatten_subprocesses(parent, problems: _Problems) -> None:
    """Embedded sub-processes, flattened into their parent (innermost first): the sub-process
    becomes a gateway in front (its id; an exclusive one when several flows come in, since each
    token starts it again) and an inclusive gateway ``<id>__end`` behind it, which waits for
    whatever inside can still arrive, as a sub-process completes when its last token ends. Its
    start event's flows leave the front gateway, flows into its end events go to the back one.
    Event sub-processes, loops, multi-instance, and triggered or terminate events inside are
    refused."""
    children = [c for c in parent if isinstance(c.tag, str)]
    flows = [c for c in children if c.tag == _b("sequenceFlow")]
    for sp in children:
        if sp.tag != _b("subProcess"):
            continue
        _flatten_subprocesses(sp, problems)
        sid, name = sp.get("id") or "?", sp.get("name") or ""
        inner = [c for c in sp if isinstance(c.tag, str) and c.tag.startswith(f"{{{BPMN_NS}}}")
                 and _local(c) not in ("incoming", "outgoing", "documentation",
                                       "extensionElements", "ioSpecification", "property")]
        starts = [c for c in inner if _local(c) == "startEvent"]
        ends = [c for c in inner if _local(c) == "endEvent"]
        why = ""
        if sp.get("triggeredByEvent") == "true":
            why = "an event sub-process (started by an event, not by a flow)"
        elif any(_local(c) in ("multiInstanceLoopCharacteristics", "standardLoopCharacteristics")
                 for c in sp if isinstance(c.tag, str)):
            why = "a looping or multi-instance sub-process"
        elif len(starts) > 1 or any(_local(d) in _EVENT_DEFS for e in starts + ends for d in e
                                    if isinstance(d.tag, str)):
            why = "a sub-process with several, triggered or terminating start/end events"
        if why:
            problems.refuse(sp, why)
            continue
        inner_flows = [c for c in inner if _local(c) == "sequenceFlow"]
        nodes = [c for c in inner if _local(c) != "sequenceFlow" and c not in starts + ends
                 and _local(c) not in _IGNORED and _local(c) != "boundaryEvent"]
        into = [f for f in flows if f.get("targetRef") == sid]
        front = etree.Element(_b("exclusiveGateway" if len(into) > 1 else "parallelGateway"),
                              id=sid, name=name)
        back = etree.Element(_b("inclusiveGateway"), id=f"{sid}__end", name=f"end of {name}"
                             if name else "")
        if sp.get("default"):
            back.set("default", sp.get("default"))
        firsts: list[str] = []
        for f in inner_flows:
            if f.get("sourceRef") in {e.get("id") for e in starts}:
                firsts.append(f.get("targetRef"))
                f.getparent().remove(f)
            if f.get("targetRef") in {e.get("id") for e in ends}:
                f.set("targetRef", back.get("id"))
        targeted = {f.get("targetRef") for f in inner_flows}
        sourced = {f.get("sourceRef") for f in inner_flows}
        if not starts:
            firsts = [n.get("id") for n in nodes if n.get("id") not in targeted]
        lasts = [] if ends else [n.get("id") for n in nodes if n.get("id") not in sourced]
        if not nodes:
            firsts, lasts = [back.get("id")], []
        entry = front
        added = [front]
        if len(firsts) > 1 and front.tag == _b("exclusiveGateway"):
            entry = etree.Element(_b("parallelGateway"), id=f"{sid}__fork")
            added.append(entry)
            added.append(etree.Element(_b("sequenceFlow"), id=f"{sid}__fork_in",
                                       sourceRef=sid, targetRef=entry.get("id")))
        for i, t in enumerate(firsts):
            added.append(etree.Element(_b("sequenceFlow"), id=f"{sid}__in{i}",
                                       sourceRef=entry.get("id"), targetRef=t))
        for i, t in enumerate(lasts):
            added.append(etree.Element(_b("sequenceFlow"), id=f"{sid}__out{i}", sourceRef=t,
                                       targetRef=back.get("id")))
        for f in flows:
            if f.get("sourceRef") == sid:
                f.set("sourceRef", back.get("id"))
        added.append(back)
        added += [c for c in inner if c not in starts + ends and c.getparent() is sp]
        at = parent.index(sp)
        parent.remove(sp)
        for j, el in enumerate(added):
            parent.insert(at + j, el)


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


def _check_tokens(kinds: dict[str, str], flows: list[_Flow], problems: _Problems) -> None:
    """Play BPMN's token game on every combination of branch choices. The engine runs each node
    at most once and starts it when all its predecessors are resolved (skipped or done), which
    is what BPMN means exactly when no node other than an end event gets two tokens and no
    parallel join gets tokens on only some of its flows; anything else is refused."""
    from itertools import combinations

    inc: dict[str, list[_Flow]] = defaultdict(list)
    out: dict[str, list[_Flow]] = defaultdict(list)
    for f in flows:
        inc[f.t].append(f)
        out[f.s].append(f)
    ids = [b for b in kinds if b in inc or b in out]
    indeg = {b: len(inc[b]) for b in ids}
    order, ready = [], [b for b in ids if not indeg[b]]
    while ready:
        b = ready.pop(0)
        order.append(b)
        for f in out[b]:
            indeg[f.t] -= 1
            if not indeg[f.t]:
                ready.append(f.t)
    if len(order) < len(ids):
        return  # a loop: refused with the cycle named, after the IR is built

    def options(b: str) -> list[tuple[_Flow, ...]]:
        o, kind = out[b], kinds[b]
        conditional = [f for f in o if f.has_ce and not f.default]
        dflt = [f for f in o if f.default and (conditional or kind == "exclusiveGateway")]
        plain = [f for f in o if f not in conditional and f not in dflt]
        if kind == "exclusiveGateway" and (len(o) > 1 or conditional):
            return [(f,) for f in o]
        if not conditional:
            return [tuple(o)]
        res = [tuple(plain) + c for r in range(1, len(conditional) + 1)
               for c in combinations(conditional, r)]
        if dflt or plain:
            res.append(tuple(plain) + tuple(dflt))
        return res

    tokens: dict[str, int] = defaultdict(int)
    paths = [0]

    def fires(b: str) -> int:
        """How many times BPMN fires b (tokens it passes on); refuses what nbflow cannot mean."""
        ins = [tokens[f.id] for f in inc[b]]
        kind = kinds[b]
        if not ins:  # one start event starts a run (several are alternatives); boundary
            # events fire on what happens to their activity; other sources start with the run
            return int(b == start[0] if kind == "startEvent" else kind != "boundaryEvent")
        if kind == "parallelGateway" and len(ins) > 1:
            if min(ins) != max(ins):
                problems.add(kind, b, f"it waits for a token on each of its {len(ins)} incoming "
                             "flows, but on some paths only some get one (they follow an "
                             "exclusive or conditional choice), so BPMN would wait forever: "
                             "merge them with an exclusiveGateway or inclusiveGateway")
            return max(ins)
        n = max(ins) if kind == "inclusiveGateway" else sum(ins)
        if n > 1 and kind not in ("endEvent", "exclusiveGateway", "inclusiveGateway"):
            problems.add(kind, b, f"up to {n} tokens reach it in one run (no join gateway in "
                         "front; they come from a parallel split or from flows that are not "
                         "exclusive), so BPMN would run it once per token; nbflow runs each step "
                         "once: join the flows with a parallelGateway, or make them exclusive")
        return n

    def walk(i: int) -> None:
        if paths[0] > MAX_PATHS:
            return
        if i == len(order):
            paths[0] += 1
            return
        b = order[i]
        n = fires(b)
        if not n or not out[b]:
            return walk(i + 1)
        for opt in options(b):   # n > 1 tokens: all take the same choice (enough to see repeats)
            for f in opt:
                tokens[f.id] += n
            walk(i + 1)
            for f in opt:
                tokens[f.id] -= n

    starts = [b for b in order if kinds[b] == "startEvent" and not inc[b]] or [None]
    start: list[str | None] = [None]
    for start[0] in starts:
        walk(0)
    if paths[0] > MAX_PATHS:
        problems.add("process", "?", f"more than {MAX_PATHS} combinations of branch choices to "
                     "check; nbflow cannot prove it runs as drawn")


def _foreign_node(el, kind: str, node_id: str, signal_names, problems: _Problems) -> Node | None:
    """A flow node drawn by another tool -> IR node; None (after refusing it) if outside the
    subset."""
    refuse = problems.refuse
    name = " ".join((el.get("name") or "").split())
    defs = [c for c in el if isinstance(c.tag, str) and _local(c) in _EVENT_DEFS]
    defs += [c for c in el if isinstance(c.tag, str) and _local(c) == "eventDefinitionRef"]
    if kind in ("startEvent", "endEvent"):
        if defs:
            refuse(el, f"a {_local(defs[0])}; nbflow supports plain start/end events")
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
        timer = _timer(el, d, problems)
        if timer is None:
            return None
        what, value = timer
        return Node(node_id, "task", name=name, **{what: value})
    # task / serviceTask / userTask / manualTask
    node = Node(node_id, "task", name=name)
    for child in el:
        if not isinstance(child.tag, str) or not child.tag.startswith(f"{{{BPMN_NS}}}"):
            continue
        c = _local(child)
        if c == "multiInstanceLoopCharacteristics":
            mapping = _multi_instance(el, child, problems)
            if mapping is None:
                return None
            node.map_var, node.map_over = mapping
        elif c == "standardLoopCharacteristics":
            refuse(el, "a loop; nbflow workflows are acyclic")
            return None
        elif c not in _ACTIVITY_IGNORED:
            problems.add(_local(child), child.get("id") or f"in {el.get('id')}", "not supported")
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


def _timer(el, d, problems: _Problems) -> tuple[str, float | str] | None:
    """("sleep", seconds) or ("at", ISO text) of a timerEventDefinition; None after refusing."""
    dur, date = d.find(_b("timeDuration")), d.find(_b("timeDate"))
    if dur is not None:
        text = _text(dur)
        secs = parse_duration(text)
        if secs is None:
            problems.refuse(el, f"timeDuration {text!r} is not an ISO-8601 duration in weeks, "
                                "days, hours, minutes, seconds (like PT2H or P1DT12H)")
            return None
        return "sleep", secs
    if date is not None:
        text = _text(date)
        if parse_date(text) is None:
            problems.refuse(el, f"timeDate {text!r} is not an ISO-8601 date-time (like "
                                "2026-11-20T12:00:00Z)")
            return None
        return "at", text
    problems.refuse(el, "a timeCycle or an empty timer; nbflow waits for a duration or a date")
    return None


def _multi_instance(el, mi, problems: _Problems) -> tuple[str, str] | None:
    """(var, collection) of a parallel multi-instance, from nbflow's extension, Camunda's or
    Zeebe's attributes, or BPMN's loopDataInputRef/inputDataItem; None after refusing."""
    if mi.get("isSequential") == "true":
        problems.refuse(el, "a sequential multi-instance; nbflow runs the instances in parallel")
        return None
    m = _ext(mi, "map")
    if m is not None:
        return m.get("var") or "", m.get("over") or ""
    for what in ("loopCardinality", "completionCondition"):
        if mi.find(_b(what)) is not None:
            problems.refuse(el, f"a multi-instance with {what}; nbflow runs one instance per "
                                "element of a collection, all of them")
            return None
    ext = mi.find(_b("extensionElements"))
    zeebe = ext.find(f"{{{ZEEBE_NS}}}loopCharacteristics") if ext is not None else None
    item = mi.find(_b("inputDataItem"))
    raw_over = (mi.get(f"{{{CAMUNDA_NS}}}collection")
                or (zeebe.get("inputCollection") if zeebe is not None else None)
                or _text(mi.find(_b("loopDataInputRef"))) or None)
    raw_var = (mi.get(f"{{{CAMUNDA_NS}}}elementVariable")
               or (zeebe.get("inputElement") if zeebe is not None else None)
               or (item.get("id") or item.get("name") if item is not None else None))
    if not raw_over or not raw_var:
        problems.refuse(el, "a multi-instance without a collection; name one with <nbflow:map "
                            "var=.. over=..>, camunda:collection/elementVariable or "
                            "loopDataInputRef/inputDataItem")
        return None
    over, var = vendor_name(raw_over), vendor_name(raw_var)
    for raw, got, what in ((raw_over, over, "collection"), (raw_var, var, "element variable")):
        if got is None:
            problems.refuse(el, f"multi-instance {what} {raw!r} is an expression; nbflow takes "
                                "a single name (${items}, #{items} and =items mean items)")
    if over is None or var is None:
        return None
    return var, over


def _check_acyclic(nodes: list[Node], edges: list[Edge]) -> None:
    cycle = Workflow("check", nodes=nodes, edges=edges).find_cycle()
    if cycle:
        raise WorkflowError("the BPMN process loops (" + " -> ".join(cycle)
                            + "); nbflow workflows are acyclic")
