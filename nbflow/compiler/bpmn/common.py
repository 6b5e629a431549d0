"""What BPMN export and import share: namespaces, text that XML can carry, the ``nbflow:node``
extension (every IR field of a node), ISO-8601 durations."""
from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import MISSING, fields

from lxml import etree

from nbflow.core.ir import Node, WorkflowError

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
# the expressionLanguage / language URI of nbflow's conditions (Python expressions)
PYTHON_LANGUAGE = "https://nbflow.dev/bpmn/python"

SUPPORTED = ("nbflow imports start/end events, tasks, exclusive/inclusive/parallel gateways, "
             "sequence flows with Python conditions, timer/signal catch events, multi-instance")


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
