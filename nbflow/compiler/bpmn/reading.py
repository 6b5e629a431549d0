"""Reading a BPMN file for the importer: safe XML parsing (no entities, DTDs or network), the
element vocabulary (what is imported, what is ignored, why something is refused), and the
refusals, collected and raised as one error."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

from lxml import etree

from nbflow.compiler.bpmn.common import BPMN_NS, PYTHON_LANGUAGE, SUPPORTED, _b, _local, _n
from nbflow.core.ir import WorkflowError

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


def _ext(el, tag: str):
    ext = el.find(_b("extensionElements"))
    return ext.find(_n(tag)) if ext is not None else None


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
