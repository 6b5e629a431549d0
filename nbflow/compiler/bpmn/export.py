"""BPMN 2.0 XML out of the workflow IR, with a diagram.

Export (:func:`to_bpmn`)
------------------------
Each IR node becomes one *main* BPMN element, plus a few synthesized *parts* that show in BPMN what
the IR keeps as task options. Reading left to right, a task node exports as::

    [join ○]  [when ×]  [signal catch]  [timer catch]  serviceTask | userTask  [fork +]
                  └─ default flow ─> (skipped) end event

* ``inclusiveGateway`` join when ≥2 edges come in: the engine starts a node once every
  predecessor is resolved and runs it if any of them ran, which is what an inclusive join means
  (it waits for the tokens that can still arrive); a ``parallelGateway`` fork when ≥2 go out;
* ``--when``: an ``exclusiveGateway`` whose conditional flow (``tFormalExpression``, nbflow's
  Python language URI) leads to the task and whose default flow ends in an end event
  ("skipped"): a skipped task's token goes no further, so what only it feeds is skipped too, as
  in the engine;
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
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections import defaultdict
from urllib.parse import quote

from lxml import etree

from nbflow.compiler.bpmn.common import (
    BPMNDI_NS, DC_NS, DI_NS, NSMAP, PYTHON_LANGUAGE, XSI_NS, _ILLEGAL, _b, _display, _n, _node_ext,
    _set_text, iso_duration)
from nbflow.core.ir import Node, Workflow, WorkflowError

# --- export ----------------------------------------------------------------------------------

_SIZE = {"event": (36, 36), "gateway": (50, 50), "activity": (100, 80)}
_KIND_OF_TAG = {"startEvent": "event", "endEvent": "event", "intermediateCatchEvent": "event",
                "parallelGateway": "gateway", "exclusiveGateway": "gateway",
                "inclusiveGateway": "gateway",
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
            part("inclusiveGateway", "join")
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
    extras: list[_El] = []          # the end events that skipped tasks' tokens go to
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
            skip = _El("endEvent", ids.fresh(f"{n.id}__skip"), n, "skip")
            extras.append(skip)
            flows.append({"id": ids.fresh(f"Flow_{n.id}__skip"), "src": split, "tgt": skip,
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

    elements = [el for n in wf.nodes for el in chains[n.id]] + extras
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
            ce = etree.SubElement(sf, _b("conditionExpression"), language=PYTHON_LANGUAGE)
            ce.set(f"{{{XSI_NS}}}type", "bpmn:tFormalExpression")
            _set_text(ce, f["condition"])
    _write_diagram(defs, proc, elements, flows, ids)
    return etree.tostring(defs, xml_declaration=True, encoding="UTF-8", pretty_print=True).decode()


def _write_flow_node(proc, el: _El, signals: dict[str, str]) -> None:
    n = el.node
    x = etree.SubElement(proc, _b(el.tag), id=el.id)
    label = n.label if el.role is None else {
        "join": "", "fork": "", "skip": "skipped", "when": f"{n.label}?",
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


_DOT_SHAPE = {"event": "circle", "gateway": "diamond", "activity": "box"}
_CHAR_W, _LABEL_H = 6.5, 14.0     # label size estimate (BPMN renderers use ~11px sans-serif)


def _label_size(text: str) -> tuple[float, float]:
    return max(20.0, len(text) * _CHAR_W + 8), _LABEL_H


def _graphviz_layout(elements: list[_El], flows: list[dict], names: dict[str, str]):
    """Shapes, edge routes and label boxes from Graphviz's ``dot`` (left to right, edges routed
    around shapes as polylines, labels placed where nothing else is); None without Graphviz."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    kinds = {el.id: _KIND_OF_TAG[el.tag] for el in elements}
    lines = ['digraph bpmn {',
             '  graph [rankdir=LR splines=polyline nodesep=0.45 ranksep=0.55 forcelabels=true '
             'fontsize=11 fontname="Helvetica"];',
             '  node [fixedsize=true label="" fontsize=13 fontname="Helvetica"];',
             '  edge [fontsize=11 fontname="Helvetica" arrowhead=none];']
    for el in elements:
        w, h = _SIZE[kinds[el.id]]
        attrs = f'shape={_DOT_SHAPE[kinds[el.id]]} width={w / 72:.4f} height={h / 72:.4f}'
        if kinds[el.id] != "activity" and names.get(el.id):
            attrs += f" xlabel={json.dumps(names[el.id])}"   # outside the shape, as BPMN draws it
        lines.append(f'  "{el.id}" [{attrs}];')
    for i, f in enumerate(flows):
        label = names.get(f["id"])
        attrs = f'id="e{i}"' + (f" label={json.dumps(label)}" if label else "")
        lines.append(f'  "{f["src"].id}" -> "{f["tgt"].id}" [{attrs}];')
    lines.append("}")
    try:
        out = subprocess.run([dot, "-Tjson"], input="\n".join(lines), capture_output=True,
                             text=True, timeout=60, check=True).stdout
        g = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    top = float(g["bb"].split(",")[3])
    pad = 40.0

    def pt(text: str) -> tuple[float, float]:
        x, y = (float(v) for v in text.split(",")[-2:])
        return round(x + pad, 2), round(top - y + pad, 2)

    boxes, label_boxes, routes, edge_labels = {}, {}, {}, {}
    for o in g.get("objects", []):
        if o.get("name") not in kinds:
            continue
        w, h = _SIZE[kinds[o["name"]]]
        cx, cy = pt(o["pos"])
        boxes[o["name"]] = (cx - w / 2, cy - h / 2, w, h)
        if "xlp" in o and names.get(o["name"]):
            lw, lh = _label_size(names[o["name"]])
            lx, ly = pt(o["xlp"])
            label_boxes[o["name"]] = (lx - lw / 2, ly - lh / 2, lw, lh)
    for e in g.get("edges", []):
        i = int(e.get("id", "e-1")[1:])
        if i < 0 or "pos" not in e:
            continue
        parts = e["pos"].split()
        start = next((pt(p[2:]) for p in parts if p.startswith("s,")), None)
        end = next((pt(p[2:]) for p in parts if p.startswith("e,")), None)
        pts = [pt(p) for p in parts if not p.startswith(("s,", "e,"))]
        pts = ([start] if start else []) + pts + ([end] if end else [])
        route = [pts[0]]
        for p in pts[1:]:
            if p != route[-1]:
                route.append(p)
        routes[i] = route
        if "lp" in e and names.get(flows[i]["id"]):
            lw, lh = _label_size(names[flows[i]["id"]])
            lx, ly = pt(e["lp"])
            edge_labels[i] = (lx - lw / 2, ly - lh / 2, lw, lh)
    if set(boxes) != set(kinds) or len(routes) != len(flows):
        return None
    return boxes, routes, label_boxes, edge_labels


def _write_diagram(defs, proc, elements, flows, ids: _Ids) -> None:
    names = {el.get("id"): el.get("name") for el in proc if el.get("name")}
    laid = _graphviz_layout(elements, flows, names)
    if laid is None:
        boxes = _layout(elements, flows)
        routes, label_boxes, edge_labels = {}, {}, {}
    else:
        boxes, routes, label_boxes, edge_labels = laid
    dia = etree.SubElement(defs, f"{{{BPMNDI_NS}}}BPMNDiagram", id=ids.fresh("Diagram"))
    plane = etree.SubElement(dia, f"{{{BPMNDI_NS}}}BPMNPlane", id=ids.fresh("Plane"),
                             bpmnElement=proc.get("id"))

    def num(v: float) -> str:
        return f"{round(v, 2):g}"

    def label(parent, box) -> None:
        lab = etree.SubElement(parent, f"{{{BPMNDI_NS}}}BPMNLabel")
        x, y, w, h = box
        etree.SubElement(lab, f"{{{DC_NS}}}Bounds", x=num(x), y=num(y), width=num(w),
                         height=num(h))

    for el in elements:
        x, y, w, h = boxes[el.id]
        sh = etree.SubElement(plane, f"{{{BPMNDI_NS}}}BPMNShape", id=ids.fresh(el.id + "_di"),
                              bpmnElement=el.id)
        if el.tag == "exclusiveGateway":
            sh.set("isMarkerVisible", "true")
        etree.SubElement(sh, f"{{{DC_NS}}}Bounds", x=num(x), y=num(y), width=num(w), height=num(h))
        if el.id in label_boxes:
            label(sh, label_boxes[el.id])
    for i, f in enumerate(flows):
        points = routes.get(i)
        if points is None:
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
        if i in edge_labels:
            label(edge, edge_labels[i])
