"""Structure rewritten before import: a callActivity of a process in this file or beside it
is inlined as an embedded sub-process, and embedded sub-processes are flattened into gateways in
their parent."""
from __future__ import annotations

import copy
from pathlib import Path

from lxml import etree

from nbflow.compiler.bpmn.common import BPMN_NS, _b, _local
from nbflow.compiler.bpmn.reading import _EVENT_DEFS, _IGNORED, _parse, _Problems
from nbflow.core.ir import WorkflowError

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
