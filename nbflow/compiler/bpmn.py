"""BPMN 2.0 XML out of the workflow IR (with a left-to-right diagram), and the same subset back in.

Export (:func:`to_bpmn`)
------------------------
Each IR node becomes one *main* BPMN element, plus a few synthesized *parts* that show in BPMN what
the IR keeps as task options. Reading left to right, a task node exports as::

    [join +]  [when ×]  [signal catch]  [timer catch]  serviceTask | userTask  [merge ×]  [fork +]

* ``parallelGateway`` join / fork when ≥2 edges come in / go out (BPMN would otherwise treat
  several incoming flows as "either", the IR waits for all of them);
* ``--when``: an ``exclusiveGateway`` whose conditional flow (``tFormalExpression``, language
  ``python``) leads to the task and whose default flow bypasses it to a merging gateway;
* ``--wait-signal``: an ``intermediateCatchEvent`` with a ``signalEventDefinition`` (the ``signal``
  is declared at definitions level); ``--sleep``/``--at``: one with a ``timerEventDefinition``
  (``timeDuration`` ISO-8601 such as ``PT2H``, or ``timeDate``);
* ``--approval``: the task is a ``userTask``; ``--map``: ``multiInstanceLoopCharacteristics``
  (parallel) whose ``nbflow:map`` extension names the variable and the collection;
* a pure gate (no code, no approval, only a signal and/or timer wait) is just its catch event(s).

The main element carries ``<nbflow:node>`` (namespace :data:`NBFLOW_NS`) in its
``extensionElements``: every :class:`~nbflow.core.ir.Node` field that differs from its
default (code in ``<nbflow:code>``). Parts carry ``<nbflow:part node=".." role=".."/>``. The process
carries ``<nbflow:workflow>`` (name, params, params_source, setup, source, version); flows carry
``<nbflow:flow>`` with the data names (also shown as the flow's ``name``). For files nbflow wrote,
the extension is authoritative: edit the options in the notebook, not in a modeller.

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
import math
import os
import re
import types
import typing
from collections import defaultdict
from dataclasses import MISSING, fields
from pathlib import Path
from urllib.parse import quote

from lxml import etree

from nbflow.core.ir import Edge, Node, Workflow, WorkflowError

BPMN_NS = "http://www.omg.org/spec/BPMN/20100524/MODEL"
BPMNDI_NS = "http://www.omg.org/spec/BPMN/20100524/DI"
DC_NS = "http://www.omg.org/spec/DD/20100524/DC"
DI_NS = "http://www.omg.org/spec/DD/20100524/DI"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
NBFLOW_NS = "https://nbflow.dev/bpmn"
CAMUNDA_NS = "http://camunda.org/schema/1.0/bpmn"
NSMAP = {"bpmn": BPMN_NS, "bpmndi": BPMNDI_NS, "dc": DC_NS, "di": DI_NS, "xsi": XSI_NS,
         "nbflow": NBFLOW_NS}
PYTHON = "python"

SUPPORTED = ("nbflow imports start/end events, tasks, exclusive/parallel gateways, sequence flows, "
             "timer/signal catch events, multi-instance")


def _b(tag: str) -> str:
    return f"{{{BPMN_NS}}}{tag}"


def _n(tag: str) -> str:
    return f"{{{NBFLOW_NS}}}{tag}"


def _local(el) -> str:
    return etree.QName(el).localname if isinstance(el.tag, str) else ""


# --- text that XML can carry -----------------------------------------------------------------

_ILLEGAL = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LONG_FIELDS = {"code", "doc", "when", "approval", "first_line"}


def _set_text(el, text: str) -> None:
    """Element text; strings XML cannot hold (control characters) go in as JSON."""
    if _ILLEGAL.search(text):
        el.set(_n("json"), "true")  # namespaced: BPMN expressions allow other namespaces' attributes
        el.text = json.dumps(text)
    else:
        el.text = text


def _get_text(el) -> str:
    text = el.text or ""
    return json.loads(text) if el.get(_n("json")) == "true" else text


def _display(s: str) -> str:
    return _ILLEGAL.sub("", " ".join(str(s).split()))


# --- Node fields <-> extension attributes ----------------------------------------------------

_NODE_TYPES = typing.get_type_hints(Node)
_NODE_DEFAULTS = {
    f.name: (f.default if f.default is not MISSING else f.default_factory())  # type: ignore[misc]
    for f in fields(Node) if f.default is not MISSING or f.default_factory is not MISSING
}


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
    return typing.get_origin(tp) or tp


def _encode(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=True, sort_keys=True)


def _decode(name: str, text: str):
    base = _base_type(_NODE_TYPES.get(name, str))
    if base is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise WorkflowError(f"nbflow:node attribute {name}={text!r} is not valid") from None


def _node_ext(node: Node):
    el = etree.Element(_n("node"), id=node.id, kind=node.kind)
    for f in fields(Node):
        if f.name in ("id", "kind"):
            continue
        value = getattr(node, f.name)
        if f.name in _NODE_DEFAULTS and value == _NODE_DEFAULTS[f.name] \
                and type(value) is type(_NODE_DEFAULTS[f.name]):
            continue
        text = _encode(value) if value is not None else None
        if value is None:  # only reachable when a field's default is not None
            etree.SubElement(el, _n("none"), field=f.name)
        elif f.name in _LONG_FIELDS or "\n" in text or "\r" in text or _ILLEGAL.search(text):
            _set_text(etree.SubElement(el, _n("text"), field=f.name), text)
        else:
            el.set(f.name, text)
    return el


def _node_from_ext(el) -> Node:
    kw = {}
    for name, text in el.attrib.items():
        if name in ("id", "kind") or "{" in name:
            continue
        kw[name] = _decode(name, text)
    for child in el:
        field = child.get("field")
        if child.tag == _n("text") and field:
            kw[field] = _decode(field, _get_text(child))
        elif child.tag == _n("none") and field:
            kw[field] = None
    known = {f.name for f in fields(Node)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise WorkflowError(f"nbflow:node {el.get('id')!r} has unknown fields: {', '.join(unknown)}")
    return Node(id=el.get("id") or "", kind=el.get("kind") or "task", **kw)


# --- ISO-8601 durations ----------------------------------------------------------------------

_DURATION = re.compile(
    r"^P(?:(?P<w>\d+(?:[.,]\d+)?)W)?(?:(?P<d>\d+(?:[.,]\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:[.,]\d+)?)H)?(?:(?P<m>\d+(?:[.,]\d+)?)M)?(?:(?P<s>\d+(?:[.,]\d+)?)S)?)?$")


def iso_duration(seconds: float) -> str:
    """7200 -> 'PT2H', 90.5 -> 'PT1M30.5S', 0 -> 'PT0S'."""
    seconds = float(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = "PT" + (f"{int(h)}H" if h else "") + (f"{int(m)}M" if m else "")
    if s or out == "PT":
        out += f"{round(s, 6):g}S" if s != int(s) else f"{int(s)}S"
    return out


def parse_duration(text: str) -> float | None:
    """Seconds of an ISO-8601 duration without years/months ('P1DT2H', 'PT30S'); None if not one."""
    text = text.strip().upper()
    m = _DURATION.match(text)
    if not m or text in ("P", "PT") or text.endswith("T"):
        return None
    scale = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
    return float(sum(float(v.replace(",", ".")) * scale[k] for k, v in m.groupdict().items() if v))


# --- export ----------------------------------------------------------------------------------

_SIZE = {"event": (36, 36), "gateway": (50, 50), "activity": (100, 80)}
_KIND_OF_TAG = {"startEvent": "event", "endEvent": "event", "intermediateCatchEvent": "event",
                "parallelGateway": "gateway", "exclusiveGateway": "gateway",
                "serviceTask": "activity", "userTask": "activity", "task": "activity"}


def _ncname(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", s) or "_"
    return s if re.match(r"[A-Za-z_]", s) else "_" + s


class _Ids:
    def __init__(self):
        self.used: set[str] = set()

    def fresh(self, base: str) -> str:
        base = _ncname(base)
        cand, i = base, 2
        while cand in self.used:
            cand, i = f"{base}_{i}", i + 1
        self.used.add(cand)
        return cand


class _El:
    """One BPMN flow node being exported."""

    def __init__(self, tag: str, id: str, node: Node, role: str | None):
        self.tag, self.id, self.node, self.role = tag, id, node, role
        self.incoming: list[str] = []
        self.outgoing: list[str] = []
        self.default: str | None = None


def _needs_activity(n: Node) -> bool:
    waits = bool(n.wait_signal) or n.sleep is not None or bool(n.at)
    return bool(n.code.strip() or n.notebook or n.approval is not None or n.map_var or n.when
                or n.notebook_task or not waits)


def to_bpmn(wf: Workflow) -> str:
    """BPMN 2.0 XML (semantic model + diagram) of the workflow; validates against the OMG XSD."""
    ids = _Ids()
    main_id = {n.id: ids.fresh(n.id) for n in wf.nodes}
    indeg: dict[str, int] = defaultdict(int)
    outdeg: dict[str, int] = defaultdict(int)
    for e in wf.edges:
        outdeg[e.source] += 1
        indeg[e.target] += 1

    chains: dict[str, list[_El]] = {}
    signals: dict[str, str] = {}
    for n in wf.nodes:
        chain: list[_El] = []

        def part(tag: str, role: str, n=n, chain=chain):
            chain.append(_El(tag, ids.fresh(f"{n.id}__{role}"), n, role))

        if n.kind in ("task", "end") and indeg[n.id] >= 2:
            part("parallelGateway", "join")
        if n.kind == "task":
            if n.when:
                part("exclusiveGateway", "when")
            waits = [r for r, on in (("signal", bool(n.wait_signal)),
                                     ("timer", n.sleep is not None or bool(n.at))) if on]
            if n.wait_signal and n.wait_signal not in signals:
                signals[n.wait_signal] = ids.fresh(f"Signal_{n.wait_signal}")
            last_wait_is_main = not _needs_activity(n)
            for i, role in enumerate(waits):
                if last_wait_is_main and i == len(waits) - 1:
                    el = _El("intermediateCatchEvent", main_id[n.id], n, None)
                    el.wait = role  # type: ignore[attr-defined]
                    chain.append(el)
                else:
                    part("intermediateCatchEvent", role)
                    chain[-1].wait = role  # type: ignore[attr-defined]
            if not last_wait_is_main:
                tag = "userTask" if n.approval is not None else "serviceTask"
                chain.append(_El(tag, main_id[n.id], n, None))
            if n.when:
                part("exclusiveGateway", "merge")
        else:
            tag = {"start": "startEvent", "end": "endEvent", "parallel": "parallelGateway",
                   "exclusive": "exclusiveGateway"}.get(n.kind)
            if tag is None:
                raise WorkflowError(f"node {n.id!r} has unknown kind {n.kind!r}")
            chain.append(_El(tag, main_id[n.id], n, None))
        if n.kind in ("task", "start") and outdeg[n.id] >= 2:
            part("parallelGateway", "fork")
        chains[n.id] = chain

    # flows: one per IR edge (document order = edge order), then the internal ones of each chain
    flows: list[dict] = []
    for e in wf.edges:
        if e.source not in chains or e.target not in chains:
            raise WorkflowError(f"edge {e.source!r} -> {e.target!r} names an unknown node")
        src, tgt = chains[e.source][-1], chains[e.target][0]
        flows.append({"id": ids.fresh(f"Flow_{e.source}_{e.target}"), "src": src, "tgt": tgt,
                      "edge": e, "condition": e.condition, "default": e.default})
    for n in wf.nodes:
        chain = chains[n.id]
        for a, b in zip(chain, chain[1:]):
            f = {"id": ids.fresh(f"Flow_{a.id}_{b.id}"), "src": a, "tgt": b, "edge": None,
                 "condition": n.when if a.role == "when" else None, "default": False}
            flows.append(f)
        if n.when:
            split = next(el for el in chain if el.role == "when")
            merge = next(el for el in chain if el.role == "merge")
            flows.append({"id": ids.fresh(f"Flow_{n.id}__skip"), "src": split, "tgt": merge,
                          "edge": None, "condition": None, "default": True})
    for f in flows:
        f["src"].outgoing.append(f["id"])
        f["tgt"].incoming.append(f["id"])
        if f["default"] and f["src"].tag in ("exclusiveGateway", "serviceTask", "userTask"):
            f["src"].default = f["id"]

    defs = etree.Element(_b("definitions"), nsmap=NSMAP)
    defs.set("id", ids.fresh("Definitions_" + (wf.name or "workflow")))
    defs.set("name", _display(wf.name))
    defs.set("targetNamespace", "https://nbflow.dev/workflows/" + quote(wf.name or "workflow", safe=""))
    defs.set("exporter", "nbflow")
    defs.set("exporterVersion", str(wf.version))
    for name, sid in signals.items():
        etree.SubElement(defs, _b("signal"), id=sid, name=_display(name))
    process_id = ids.fresh("Process_" + (wf.name or "workflow"))
    proc = etree.SubElement(defs, _b("process"), id=process_id, name=_display(wf.name),
                            isExecutable="true")
    ext = etree.SubElement(etree.SubElement(proc, _b("extensionElements")), _n("workflow"),
                           name=wf.name, version=str(wf.version))
    if wf.source is not None:
        ext.set("source", wf.source)
    _set_text(etree.SubElement(ext, _n("params")), json.dumps(wf.params, ensure_ascii=True))
    if wf.params_source:
        _set_text(etree.SubElement(ext, _n("paramsSource")), wf.params_source)
    for cell in wf.setup:
        _set_text(etree.SubElement(ext, _n("setup")), cell)

    elements = [el for n in wf.nodes for el in chains[n.id]]
    for el in elements:
        _write_flow_node(proc, el, signals)
    for f in flows:
        sf = etree.SubElement(proc, _b("sequenceFlow"), id=f["id"], sourceRef=f["src"].id,
                              targetRef=f["tgt"].id)
        e = f["edge"]
        if e is not None and e.data:
            sf.set("name", _display(", ".join(e.data)))
        if e is not None and (e.data or e.default):
            fx = etree.SubElement(etree.SubElement(sf, _b("extensionElements")), _n("flow"))
            if e.default:
                fx.set("default", "true")
            for name in e.data:
                etree.SubElement(fx, _n("data"), name=name)
        if f["condition"]:
            ce = etree.SubElement(sf, _b("conditionExpression"), language=PYTHON)
            ce.set(f"{{{XSI_NS}}}type", "bpmn:tFormalExpression")
            _set_text(ce, f["condition"])
    _write_diagram(defs, proc, elements, flows, ids)
    return etree.tostring(defs, xml_declaration=True, encoding="UTF-8", pretty_print=True).decode()


def _write_flow_node(proc, el: _El, signals: dict[str, str]) -> None:
    n = el.node
    x = etree.SubElement(proc, _b(el.tag), id=el.id)
    label = n.label if el.role is None else {
        "join": "", "fork": "", "merge": "", "when": f"{n.label}?",
        "signal": f"signal {n.wait_signal}", "timer": f"wait {n.label}"}[el.role]
    if label:
        x.set("name", _display(label))
    if el.default:
        x.set("default", el.default)
    if el.role is None and n.doc:
        etree.SubElement(x, _b("documentation")).text = _ILLEGAL.sub("", n.doc)  # shown; ext keeps it
    extel = etree.SubElement(x, _b("extensionElements"))
    if el.role is None:
        extel.append(_node_ext(n))
    else:
        etree.SubElement(extel, _n("part"), node=n.id, role=el.role)
    for ref in el.incoming:
        etree.SubElement(x, _b("incoming")).text = ref
    for ref in el.outgoing:
        etree.SubElement(x, _b("outgoing")).text = ref
    wait = getattr(el, "wait", None)
    if wait == "signal":
        etree.SubElement(x, _b("signalEventDefinition"), signalRef=signals[n.wait_signal])
    elif wait == "timer":
        td = etree.SubElement(x, _b("timerEventDefinition"))
        if n.at:
            etree.SubElement(td, _b("timeDate")).text = _display(n.at)
        else:
            etree.SubElement(td, _b("timeDuration")).text = iso_duration(n.sleep or 0)
    if el.tag in ("serviceTask", "userTask") and n.map_var:
        mi = etree.SubElement(x, _b("multiInstanceLoopCharacteristics"), isSequential="false")
        etree.SubElement(etree.SubElement(mi, _b("extensionElements")), _n("map"),
                         var=n.map_var, over=n.map_over or "")


def _layout(elements: list[_El], flows: list[dict]) -> dict[str, tuple[float, float, float, float]]:
    """Longest-path layers left to right; within a layer, order by predecessors' mean position."""
    order = {el.id: i for i, el in enumerate(elements)}
    preds: dict[str, list[str]] = defaultdict(list)
    succs: dict[str, list[str]] = defaultdict(list)
    for f in flows:
        preds[f["tgt"].id].append(f["src"].id)
        succs[f["src"].id].append(f["tgt"].id)
    indeg = {el.id: len(preds[el.id]) for el in elements}
    layer = {el.id: 0 for el in elements}
    ready = [el.id for el in elements if indeg[el.id] == 0]
    seen = []
    while ready:
        cur = ready.pop(0)
        seen.append(cur)
        for s in succs[cur]:
            layer[s] = max(layer[s], layer[cur] + 1)
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
                ready.sort(key=order.__getitem__)
    top = max(layer.values(), default=0)
    for el in elements:  # only on a cyclic IR: park the rest at the far right
        if el.id not in seen:
            top += 1
            layer[el.id] = top
    by_layer: dict[int, list[str]] = defaultdict(list)
    for el in elements:
        by_layer[layer[el.id]].append(el.id)
    row: dict[str, float] = {}
    for lay in sorted(by_layer):
        members = by_layer[lay]
        members.sort(key=lambda i: (
            sum(row[p] for p in preds[i] if p in row) / max(1, sum(1 for p in preds[i] if p in row)),
            order[i]))
        for r, i in enumerate(members):
            row[i] = r
    kinds = {el.id: _KIND_OF_TAG[el.tag] for el in elements}
    boxes = {}
    for el in elements:
        w, h = _SIZE[kinds[el.id]]
        cx, cy = 120 + layer[el.id] * 160, 120 + row[el.id] * 130
        boxes[el.id] = (cx - w / 2, cy - h / 2, w, h)
    return boxes


def _write_diagram(defs, proc, elements, flows, ids: _Ids) -> None:
    boxes = _layout(elements, flows)
    dia = etree.SubElement(defs, f"{{{BPMNDI_NS}}}BPMNDiagram", id=ids.fresh("Diagram"))
    plane = etree.SubElement(dia, f"{{{BPMNDI_NS}}}BPMNPlane", id=ids.fresh("Plane"),
                             bpmnElement=proc.get("id"))

    def num(v: float) -> str:
        return f"{v:g}"

    for el in elements:
        x, y, w, h = boxes[el.id]
        sh = etree.SubElement(plane, f"{{{BPMNDI_NS}}}BPMNShape", id=ids.fresh(el.id + "_di"),
                              bpmnElement=el.id)
        if el.tag == "exclusiveGateway":
            sh.set("isMarkerVisible", "true")
        etree.SubElement(sh, f"{{{DC_NS}}}Bounds", x=num(x), y=num(y), width=num(w), height=num(h))
    for f in flows:
        sx, sy, sw, sh_ = boxes[f["src"].id]
        tx, ty, tw, th = boxes[f["tgt"].id]
        a, b = (sx + sw, sy + sh_ / 2), (tx, ty + th / 2)
        points = [a]
        if not math.isclose(a[1], b[1]):
            mid = (a[0] + b[0]) / 2
            points += [(mid, a[1]), (mid, b[1])]
        points.append(b)
        edge = etree.SubElement(plane, f"{{{BPMNDI_NS}}}BPMNEdge", id=ids.fresh(f["id"] + "_di"),
                                bpmnElement=f["id"])
        for px, py in points:
            etree.SubElement(edge, f"{{{DI_NS}}}waypoint", x=num(px), y=num(py))


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
