"""One element of another tool's model into the IR: events, gateways and tasks (timers,
signals, multi-instance, approvals, notebooks), ids, and the Python text of a flow's condition
(Camunda/Zeebe expressions translated by one rule)."""
from __future__ import annotations

import ast
import re
from datetime import datetime

from nbflow.compiler.bpmn.common import (BPMN_NS, CAMUNDA_NS, NBFLOW_NS, PYTHON_LANGUAGE, _b,
                                         _get_text, _local, _n, parse_duration)
from nbflow.compiler.bpmn.reading import (_ACTIVITY_IGNORED, _EVENT_DEFS, _GATEWAYS, _PYTHON_LANGS,
                                          XPATH, ZEEBE_NS, _ext, _Problems, _short, _text)
from nbflow.core.ir import Node

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


def _sanitize_id(raw: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]", "_", raw or "node")
    return s if re.match(r"[A-Za-z_]", s) else "_" + s


def _identifier(s: str) -> str:
    s = re.sub(r"\W", "_", s.strip()) or "signal"
    return s if not s[0].isdigit() else "_" + s


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
