"""BPMN import keeps a model's meaning or refuses it: every reproduction of issue 16, and every
foreign model under tests/data/bpmn (MIWG reference models and vendor exports, SpiffWorkflow's
test data) with its expected outcome — imported and run (which steps ran, per branch choice,
played through the real state machine) or refused naming each element by type and id."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
from lxml import etree

from bpmnplay import play
from nbflow.compiler.bpmn import BPMN_NS, PYTHON_LANGUAGE, from_bpmn, to_bpmn
from nbflow.core.ir import WorkflowError

DATA = Path(__file__).resolve().parent / "data" / "bpmn"
PY = f'language="{PYTHON_LANGUAGE}"'


def model(body: str, defs: str = "") -> str:
    return (f'<definitions xmlns="{BPMN_NS}" targetNamespace="x" {defs}>'
            f'<process id="p">{body}</process></definitions>')


def refusal(source) -> str:
    """The refusal's text, whitespace collapsed (long reasons wrap), for substring checks; its
    lines are checked in test_every_problem_in_one_error_grouped_by_type."""
    with pytest.raises(WorkflowError) as err:
        from_bpmn(source)
    return str(err.value)


def flat(message: str) -> str:
    return " ".join(message.split())


def refused(message: str) -> dict[str, set[str]]:
    """{element type: {ids}} named by a refusal (one element per line, grouped by type)."""
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^  (\w+) '([^']*)'", message, re.M):
        out.setdefault(m.group(1), set()).add(m.group(2))
    return out


def read(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


# --- the reproductions of issue 16 -------------------------------------------------------------

XOR_INTO_FORK = model(f"""
  <startEvent id="s"/><exclusiveGateway id="x" default="to_c"/>
  <parallelGateway id="fork"/><task id="a"/><task id="b"/><task id="c"/>
  <parallelGateway id="join"/><exclusiveGateway id="merge"/><endEvent id="e"/>
  <sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
  <sequenceFlow id="to_fork" sourceRef="x" targetRef="fork">
    <conditionExpression {PY}>amount &gt; 1000</conditionExpression></sequenceFlow>
  <sequenceFlow id="to_c" sourceRef="x" targetRef="c"/>
  <sequenceFlow id="fa" sourceRef="fork" targetRef="a"/><sequenceFlow id="fb" sourceRef="fork" targetRef="b"/>
  <sequenceFlow id="ja" sourceRef="a" targetRef="join"/><sequenceFlow id="jb" sourceRef="b" targetRef="join"/>
  <sequenceFlow id="jm" sourceRef="join" targetRef="merge"/><sequenceFlow id="cm" sourceRef="c" targetRef="merge"/>
  <sequenceFlow id="me" sourceRef="merge" targetRef="e"/>""")


def test_condition_into_a_fork_is_kept():
    wf = from_bpmn(XOR_INTO_FORK)
    assert set(play(wf, {"amount": 10})[1]) & {"a", "b", "c"} == {"c"}       # issue: a, b and c
    assert set(play(wf, {"amount": 5000})[1]) & {"a", "b", "c"} == {"a", "b"}
    guard = wf.node("to_fork")                   # the guard that carries the condition
    assert guard.kind == "task" and guard.when == "amount > 1000" and not guard.code
    assert wf.node("c").when == "not ((amount > 1000))"
    assert wf.params == {"amount": None}         # what conditions read: the run's parameters


def test_conditions_onto_events_and_gateways_are_kept():
    xml = model(f"""
      <startEvent id="s"/><exclusiveGateway id="x" default="d"/>
      <intermediateCatchEvent id="wait"><timerEventDefinition><timeDuration>PT1M</timeDuration>
        </timerEventDefinition></intermediateCatchEvent>
      <task id="t"/><task id="u"/><exclusiveGateway id="m"/><endEvent id="e"/>
      <sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="c1" sourceRef="x" targetRef="wait"><conditionExpression {PY}>n == 1</conditionExpression></sequenceFlow>
      <sequenceFlow id="c2" sourceRef="x" targetRef="m"><conditionExpression {PY}>n == 2</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="x" targetRef="u"/>
      <sequenceFlow id="f1" sourceRef="wait" targetRef="t"/><sequenceFlow id="f2" sourceRef="t" targetRef="m"/>
      <sequenceFlow id="f3" sourceRef="u" targetRef="m"/><sequenceFlow id="f4" sourceRef="m" targetRef="e"/>""")
    wf = from_bpmn(xml)
    assert {k: set(play(wf, {"n": k})[1]) & {"wait", "t", "u"} for k in (1, 2, 3)} == {
        1: {"wait", "t"}, 2: set(), 3: {"u"}}


def test_exclusive_gateway_takes_the_first_true_flow_only():
    xml = model(f"""
      <startEvent id="s"/><exclusiveGateway id="x"><outgoing>big</outgoing><outgoing>any</outgoing></exclusiveGateway>
      <task id="B"/><task id="A"/><endEvent id="e"/>
      <sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="any" sourceRef="x" targetRef="A"><conditionExpression {PY}>n &gt; 0</conditionExpression></sequenceFlow>
      <sequenceFlow id="big" sourceRef="x" targetRef="B"><conditionExpression {PY}>n &gt; 10</conditionExpression></sequenceFlow>
      <sequenceFlow id="f1" sourceRef="A" targetRef="e"/><sequenceFlow id="f2" sourceRef="B" targetRef="e"/>""")
    wf = from_bpmn(xml)
    assert play(wf, {"n": 50})[1] == ["B"]       # both conditions hold: the first in <outgoing>
    assert play(wf, {"n": 5})[1] == ["A"]
    state, ran = play(wf, {"n": -1})             # none holds, no default: BPMN raises; so do we
    assert state == "failed" and ran == []


@pytest.mark.parametrize("path", ["miwg/reference/A.2.0.bpmn", "miwg/vendors/bpmn.io-A.2.0.bpmn",
                                  "miwg/vendors/signavio-A.2.0.bpmn"])
def test_exclusive_split_without_conditions_is_refused_naming_the_gateway(path):
    msg = refusal(DATA / path)
    named = refused(msg)
    assert set(named) == {"exclusiveGateway"} and len(named["exclusiveGateway"]) == 1
    assert "takes exactly one flow" in flat(msg)
    assert all(len(line) <= 100 for line in msg.splitlines()[:-1])   # lists: one id per line


UNCONTROLLED = model("""
  <startEvent id="s"/><parallelGateway id="fork"/><task id="a"/><task id="b"/><task id="c"/>
  <endEvent id="e"/>
  <sequenceFlow id="f0" sourceRef="s" targetRef="fork"/>
  <sequenceFlow id="f1" sourceRef="fork" targetRef="a"/><sequenceFlow id="f2" sourceRef="fork" targetRef="b"/>
  <sequenceFlow id="f3" sourceRef="a" targetRef="c"/><sequenceFlow id="f4" sourceRef="b" targetRef="c"/>
  <sequenceFlow id="f5" sourceRef="c" targetRef="e"/>""")


def test_uncontrolled_merge_of_parallel_branches_is_refused():
    msg = refusal(UNCONTROLLED)
    assert refused(msg) == {"task": {"c"}}
    assert "once per token" in flat(msg) and "parallelGateway" in flat(msg)


def _with_python_conditions(path: Path) -> bytes:
    """A vendor's A.2.1 with a Python condition on each flow the gateway would otherwise take
    blindly (the reference models leave them out): n == 3 -> Task 3, n == 4 -> Task 4."""
    root = etree.fromstring(read(path))
    ns = {"b": BPMN_NS}
    names = {el.get("id"): el.get("name") for el in root.iter() if el.get("name")}
    gw = next(g for g in root.iterfind(".//b:exclusiveGateway", ns) if g.get("default"))
    for sf in root.iterfind(".//b:sequenceFlow", ns):
        for ce in sf.findall("b:conditionExpression", ns):
            sf.remove(ce)
        if sf.get("sourceRef") == gw.get("id") and sf.get("id") != gw.get("default"):
            ce = etree.SubElement(sf, f"{{{BPMN_NS}}}conditionExpression", language=PYTHON_LANGUAGE)
            ce.text = f"n == {names[sf.get('targetRef')].split()[-1]}"
    return etree.tostring(root)


@pytest.mark.parametrize("vendor", ["bpmn.io", "signavio"])
def test_a_2_1_uncontrolled_merge_means_what_bpmn_says(vendor):
    """Task 3 has three incoming flows and no join: BPMN runs it once per token. Only one token
    can arrive (the branches are exclusive), so "run once when one arrives" is exactly that."""
    path = DATA / "miwg" / "vendors" / f"{vendor}-A.2.1.bpmn"
    refusal(path)                                   # as exported: no conditions on the split
    wf = from_bpmn(_with_python_conditions(path), base_dir="/tmp")
    task3 = next(n for n in wf.nodes if n.name == "Task 3")
    assert len(wf.incoming(task3.id)) == 3
    label = {n.id: n.name for n in wf.nodes}
    ran = {k: sorted(label[i] for i in play(wf, {"n": k})[1] if label[i].startswith("Task"))
           for k in (2, 3, 4)}
    assert ran == {2: ["Task 1", "Task 2", "Task 3"], 3: ["Task 1", "Task 3"],
                   4: ["Task 1", "Task 3", "Task 4"]}


@pytest.mark.parametrize("cond, defs, expected", [
    ("${amount > 1000}", "", "'http://www.w3.org/1999/XPath' (BPMN's default"),
    ("amount > 1000", 'expressionLanguage="http://www.w3.org/1999/XPath"',
     "(definitions/@expressionLanguage)"),
    ("amount > 1000", 'expressionLanguage="https://www.omg.org/spec/FEEL/20140401"', "FEEL"),
])
def test_conditions_not_in_python_are_refused_naming_the_flow(cond, defs, expected):
    xml = model(f"""<startEvent id="s"/><exclusiveGateway id="x" default="d"/><task id="a"/>
      <task id="b"/><sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="big" sourceRef="x" targetRef="a"><conditionExpression>{cond}</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="x" targetRef="b"/>""", defs)
    msg = refusal(xml)
    assert refused(msg) == {"sequenceFlow": {"big"}} and expected in flat(msg)
    assert PYTHON_LANGUAGE in flat(msg)                   # and says how to declare Python


@pytest.mark.parametrize("cond, hint", [("${amount > 1000}", "JUEL"), ("=amount > 1000", "FEEL"),
                                        ("amount >", "invalid syntax")])
def test_python_conditions_are_parsed_at_import(cond, hint):
    xml = model(f"""<startEvent id="s"/><exclusiveGateway id="x" default="d"/><task id="a"/>
      <task id="b"/><sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="big" sourceRef="x" targetRef="a"><conditionExpression {PY}>{cond}</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="x" targetRef="b"/>""")
    msg = refusal(xml)
    assert refused(msg) == {"sequenceFlow": {"big"}} and "not a Python expression" in flat(msg)
    assert hint in flat(msg)


def test_definitions_language_python_is_honoured():
    xml = model("""<startEvent id="s"/><exclusiveGateway id="x" default="d"/><task id="a"/>
      <task id="b"/><sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="big" sourceRef="x" targetRef="a"><conditionExpression>n &gt; 1</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="x" targetRef="b"/>""", f'expressionLanguage="{PYTHON_LANGUAGE}"')
    wf = from_bpmn(xml)
    assert set(play(wf, {"n": 2})[1]) & {"a", "b"} == {"a"}


CAMUNDA = 'xmlns:camunda="http://camunda.org/schema/1.0/bpmn"'
ZEEBE = 'xmlns:zeebe="http://camunda.org/schema/zeebe/1.0"'


@pytest.mark.parametrize("mi, var, over", [
    ('<multiInstanceLoopCharacteristics camunda:collection="${items}" camunda:elementVariable="item"/>',
     "item", "items"),
    ('<multiInstanceLoopCharacteristics camunda:collection="#{items}" camunda:elementVariable="item"/>',
     "item", "items"),
    ('<multiInstanceLoopCharacteristics><extensionElements><zeebe:loopCharacteristics '
     'inputCollection="=items" inputElement="item"/></extensionElements></multiInstanceLoopCharacteristics>',
     "item", "items"),
    ('<multiInstanceLoopCharacteristics><loopDataInputRef>items</loopDataInputRef>'
     '<inputDataItem id="item" name="an item"/></multiInstanceLoopCharacteristics>', "item", "items"),
])
def test_vendor_expressions_translate_by_the_documented_rule(mi, var, over):
    wf = from_bpmn(model(f'<task id="t">{mi}</task>', f"{CAMUNDA} {ZEEBE}"))
    assert (wf.node("t").map_var, wf.node("t").map_over) == (var, over)


@pytest.mark.parametrize("mi, shown", [
    ('<multiInstanceLoopCharacteristics camunda:collection="${order.items}" camunda:elementVariable="item"/>',
     "'${order.items}'"),
    ('<multiInstanceLoopCharacteristics><extensionElements><zeebe:loopCharacteristics '
     'inputCollection="=order.items" inputElement="item"/></extensionElements></multiInstanceLoopCharacteristics>',
     "'=order.items'"),
    ('<multiInstanceLoopCharacteristics isSequential="true" camunda:collection="items" '
     'camunda:elementVariable="item"/>', "sequential"),
    ('<multiInstanceLoopCharacteristics><loopCardinality>3</loopCardinality></multiInstanceLoopCharacteristics>',
     "loopCardinality"),
])
def test_vendor_expressions_beyond_a_name_are_refused(mi, shown):
    msg = refusal(model(f'<task id="t">{mi}</task>', f"{CAMUNDA} {ZEEBE}"))
    assert refused(msg) == {"task": {"t"}} and shown in flat(msg)
    assert "map_over" not in msg


@pytest.mark.parametrize("timer, ok", [
    ("<timeDate>tomorrow</timeDate>", False), ("<timeDate>${due}</timeDate>", False),
    ("<timeDate>2026-11-20T12:00:00Z</timeDate>", True), ("<timeDate>2026-11-20</timeDate>", True),
    ("<timeDuration>=PT5M</timeDuration>", False), ("<timeDuration>P1M</timeDuration>", False),
    ("<timeDuration>PT5M</timeDuration>", True),
])
def test_timer_values_must_be_iso_8601(timer, ok):
    xml = model(f'<intermediateCatchEvent id="w"><timerEventDefinition>{timer}'
                '</timerEventDefinition></intermediateCatchEvent>')
    if ok:
        node = from_bpmn(xml).node("w")
        assert node.at or node.sleep
    else:
        msg = refusal(xml)
        assert refused(msg) == {"intermediateCatchEvent": {"w"}} and "ISO-8601" in flat(msg)


def test_every_problem_in_one_error_grouped_by_type():
    msg = refusal(model("""<task id="a"/><scriptTask id="s1"/><callActivity id="sub"/>
      <sequenceFlow id="f0" sourceRef="a" targetRef="ghost"/>
      <sequenceFlow id="f1" targetRef="a"/>"""))
    assert refused(msg) == {"scriptTask": {"s1"}, "callActivity": {"sub"},
                            "sequenceFlow": {"f0", "f1"}}
    assert "'ghost'" in msg and "has no sourceRef" in flat(msg) and "None" not in msg
    lines = msg.splitlines()
    kinds = [re.match(r"  (\w+)", ln).group(1) for ln in lines if re.match(r"  \w", ln)]
    assert kinds == sorted(kinds)                       # grouped by element type


def test_inclusive_gateway_refusal_never_says_none():
    msg = refusal(DATA / "spiff" / "inclusive_gateway.bpmn")
    assert "None" not in msg and "sequenceFlow 'u_positive'" in msg


def test_long_refusal_is_one_element_per_line():
    msg = refusal(read(DATA / "miwg" / "reference" / "B.2.0.bpmn.gz"))
    assert sum(len(ids) for ids in refused(msg).values()) > 30
    assert max(len(line) for line in msg.splitlines()[:-1]) <= 100


def test_conditions_out_of_a_task_take_every_true_flow():
    xml = model(f"""<startEvent id="s"/><task id="t" default="d"/><task id="a"/><task id="b"/>
      <task id="c"/><inclusiveGateway id="j"/><endEvent id="e"/>
      <sequenceFlow id="f0" sourceRef="s" targetRef="t"/>
      <sequenceFlow id="ca" sourceRef="t" targetRef="a"><conditionExpression {PY}>n % 2 == 0</conditionExpression></sequenceFlow>
      <sequenceFlow id="cb" sourceRef="t" targetRef="b"><conditionExpression {PY}>n % 3 == 0</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="t" targetRef="c"/>
      <sequenceFlow id="f1" sourceRef="a" targetRef="j"/><sequenceFlow id="f2" sourceRef="b" targetRef="j"/>
      <sequenceFlow id="f3" sourceRef="c" targetRef="j"/><sequenceFlow id="f4" sourceRef="j" targetRef="e"/>""")
    wf = from_bpmn(xml)
    got = {n: set(play(wf, {"n": n})[1]) & {"a", "b", "c"} for n in (6, 4, 9, 1)}
    assert got == {6: {"a", "b"}, 4: {"a"}, 9: {"b"}, 1: {"c"}}


def test_parallel_join_after_a_choice_is_refused():
    msg = refusal(model(f"""<startEvent id="s"/><exclusiveGateway id="x" default="d"/>
      <task id="a"/><task id="b"/><parallelGateway id="j"/><endEvent id="e"/>
      <sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="c" sourceRef="x" targetRef="a"><conditionExpression {PY}>ok</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="x" targetRef="b"/>
      <sequenceFlow id="f1" sourceRef="a" targetRef="j"/><sequenceFlow id="f2" sourceRef="b" targetRef="j"/>
      <sequenceFlow id="f3" sourceRef="j" targetRef="e"/>"""))
    assert refused(msg) == {"parallelGateway": {"j"}} and "wait forever" in flat(msg)


@pytest.mark.parametrize("where, body", [
    ("startEvent", '<startEvent id="s"/><task id="a"/><sequenceFlow id="c" sourceRef="s" '
                   f'targetRef="a"><conditionExpression {PY}>x</conditionExpression></sequenceFlow>'),
    ("parallelGateway", '<parallelGateway id="g"/><task id="a"/><sequenceFlow id="c" sourceRef="g" '
                        f'targetRef="a"><conditionExpression {PY}>x</conditionExpression></sequenceFlow>'),
])
def test_conditions_where_bpmn_allows_none_are_refused(where, body):
    msg = refusal(model(body))
    assert "sequenceFlow 'c'" in msg and where in flat(msg)


# --- every foreign model under tests/data/bpmn: expected outcome --------------------------------
# "refused": the element types the refusal names. "runs": [(params, step names that run)], the
# model imported as it is. Counted in docs/bpmn.md.

SUB, CALL, BOUNDARY = "subProcess", "callActivity", "boundaryEvent"
EXPECTED: dict[str, dict] = {
    "miwg/reference/A.1.0.bpmn": {"runs": [({}, ["Task 1", "Task 2", "Task 3"])]},
    "miwg/reference/A.2.0.bpmn": {"refused": {"exclusiveGateway"}},
    "miwg/reference/A.2.1.bpmn": {"refused": {"sequenceFlow"}},      # XPath conditions
    "miwg/reference/A.3.0.bpmn": {"refused": {BOUNDARY}},
    "miwg/reference/A.4.0.bpmn": {"refused": {"process", SUB, "messageFlow"}},
    "miwg/reference/A.4.1.bpmn": {"refused": {"process", SUB, "messageFlow"}},
    "miwg/reference/B.1.0.bpmn.gz": {"refused": {CALL, "messageFlow", "process", "startEvent", SUB}},
    "miwg/reference/B.2.0.bpmn.gz": {"refused": {BOUNDARY, CALL, "endEvent", "eventBasedGateway",
                                                 "intermediateThrowEvent", "messageFlow", "process",
                                                 "receiveTask", "sendTask", "startEvent", SUB,
                                                 "userTask", "intermediateCatchEvent"}},
    "miwg/reference/C.1.0.bpmn.gz": {"refused": {"eventBasedGateway", "intermediateCatchEvent",
                                                 "messageFlow", "process", "startEvent"}},
    "miwg/reference/C.1.1.bpmn.gz": {"refused": {"sequenceFlow"}},
    "miwg/reference/C.2.0.bpmn.gz": {"refused": {BOUNDARY, "endEvent", "messageFlow", "process",
                                                 "startEvent", SUB}},
    "miwg/reference/C.3.0.bpmn.gz": {"refused": {BOUNDARY, "exclusiveGateway", "sequenceFlow",
                                                 "startEvent"}},
    "miwg/reference/C.4.0.bpmn.gz": {"refused": {"exclusiveGateway", "intermediateCatchEvent",
                                                 "intermediateThrowEvent", "process"}},
    "miwg/reference/C.5.0.bpmn.gz": {"refused": {"endEvent", "exclusiveGateway"}},  # call inlined
    "miwg/reference/C.6.0.bpmn.gz": {"refused": {BOUNDARY, "eventBasedGateway",
                                                 "intermediateCatchEvent", "intermediateThrowEvent",
                                                 "sendTask", "startEvent", SUB}},
    "miwg/reference/C.7.0.bpmn.gz": {"refused": {"businessRuleTask", "exclusiveGateway",
                                                 "serviceTask"}},
    "miwg/reference/C.8.0.bpmn.gz": {"refused": {BOUNDARY, "businessRuleTask", "sendTask",
                                                 "sequenceFlow"}},
    "miwg/reference/C.8.1.bpmn.gz": {"refused": {BOUNDARY, "businessRuleTask", "sendTask",
                                                 "sequenceFlow"}},
    "miwg/reference/C.9.0.bpmn.gz": {"refused": {BOUNDARY, "businessRuleTask", CALL, "endEvent",
                                                 "sendTask", "sequenceFlow", SUB}},
    "miwg/reference/C.9.1.bpmn.gz": {"refused": {BOUNDARY, "receiveTask", "sendTask"}},
    "miwg/reference/C.9.2.bpmn.gz": {"refused": {BOUNDARY, "endEvent", SUB}},
    "miwg/vendors/bpmn.io-A.2.0.bpmn": {"refused": {"exclusiveGateway"}},
    "miwg/vendors/bpmn.io-A.2.1.bpmn": {"refused": {"exclusiveGateway", "sequenceFlow"}},
    "miwg/vendors/signavio-A.2.0.bpmn": {"refused": {"exclusiveGateway"}},
    "miwg/vendors/signavio-A.2.1.bpmn": {"refused": {"exclusiveGateway"}},
    "spiff/ParallelOrder.bpmn": {"runs": [({}, ["Task 1", "Task 2", "Task 3", "Task 4"])]},
    "spiff/ScriptTest.bpmn": {"refused": {"scriptTask"}},
    "spiff/boundary.bpmn": {"refused": {BOUNDARY, "sequenceFlow"}},
    "spiff/boundary_event_split.bpmn": {"refused": {BOUNDARY, "sequenceFlow"}},
    "spiff/boundary_timer_on_task.bpmn": {"refused": {BOUNDARY, "scriptTask"}},
    "spiff/call_activity_call_activity.bpmn": {"refused": {"scriptTask"}},
    "spiff/call_activity_end_event.bpmn": {"refused": {"scriptTask"}},   # the callee's too
    "spiff/collaboration.bpmn": {"refused": {"intermediateCatchEvent", "messageFlow", "sendTask"}},
    "spiff/conditional_event.bpmn": {"refused": {BOUNDARY, "intermediateCatchEvent", "process"}},
    "spiff/data_object_gateway.bpmn": {"refused": {"sequenceFlow"}},
    "spiff/event-gateway.bpmn": {"refused": {"eventBasedGateway", "intermediateCatchEvent"}},
    "spiff/exclusive_gateway_no_default.bpmn": {"refused": {"endEvent", "sequenceFlow"}},
    "spiff/gateway_loop_input.bpmn": {"refused": {"scriptTask", "sequenceFlow"}},
    "spiff/inclusive_gateway.bpmn": {"refused": {"scriptTask", "sequenceFlow"}},
    "spiff/lanes.bpmn": {"refused": {"sequenceFlow"}},      # XPath by default
    "spiff/multiple-start.bpmn": {"refused": {"startEvent"}},
    "spiff/no-tasks.bpmn": {"runs": [({}, [])]},
    "spiff/parallel_multiinstance_loop_input.bpmn": {"runs": [({"input_data": [1, 2, 3]},
                                                                ["Any Task"])]},
    "spiff/sequential_multiinstance_loop_input.bpmn": {"refused": {"task"}},
    "spiff/service_task.bpmn": {"runs": [({}, ["ServiceTask1"])]},
    "spiff/single_call_activity.bpmn": {"refused": {CALL}},
    "spiff/standard_loop.bpmn": {"refused": {"task"}},
    "spiff/start_event_split.bpmn": {"refused": {"startEvent"}},
    "spiff/timer-cycle.bpmn": {"refused": {BOUNDARY, "scriptTask"}},
    "spiff/timer-date-start.bpmn": {"refused": {"intermediateCatchEvent", "scriptTask"}},
    "spiff/timer-non-interrupt-boundary.bpmn": {"refused": {BOUNDARY, "sequenceFlow"}},
    "spiff/timer.bpmn": {"refused": {"intermediateCatchEvent"}},
}


def test_every_foreign_model_has_an_expected_outcome():
    files = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.name.endswith((".bpmn", ".bpmn.gz"))
             and p.parent != DATA}
    assert files == set(EXPECTED)
    assert len([f for f in files if f.startswith("miwg/reference/")]) == 21
    assert len([f for f in files if f.startswith("spiff/")]) == 27


@pytest.fixture(scope="module")
def schema():
    import xmlschema

    return xmlschema.XMLSchema(str(DATA / "xsd" / "BPMN20.xsd"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_foreign_model(name, schema):
    expected, data = EXPECTED[name], read(DATA / name)
    if "refused" in expected:
        with pytest.raises(WorkflowError) as err:
            from_bpmn(data, base_dir=(DATA / name).parent)
        msg = str(err.value)
        assert set(refused(msg)) == expected["refused"], msg
        assert msg.startswith("cannot import this BPMN model") and "None" not in msg
        return
    wf = from_bpmn(data, base_dir=(DATA / name).parent)    # where called processes are found
    label = {n.id: n.label for n in wf.nodes}
    for params, ran in expected["runs"]:
        state, ids = play(wf, params)
        assert state == "succeeded"
        assert sorted(label[i] for i in ids) == ran
    text = to_bpmn(wf)                                  # and it writes back out: valid, unchanged
    schema.validate(text)
    assert from_bpmn(text).to_dict() == wf.to_dict()


# --- on the real stack: a nats-server, the engine and papermill workers ----------------------

def test_condition_into_a_fork_runs_on_the_stack(client, tmp_path):
    """The issue's first reproduction, run for real: only c runs when the condition is false;
    a and b (behind the fork the condition leads to) run when it is true."""
    from support import finish, success_counts

    path = tmp_path / "xor_fork.bpmn"
    path.write_text(XOR_INTO_FORK)
    low = finish(client, client.submit(str(path), {"amount": 10}))
    high = finish(client, client.submit(str(path), {"amount": 5000}))
    assert low.state == high.state == "succeeded"
    assert {n: low.nodes[n].state for n in "abc"} == {"a": "skipped", "b": "skipped", "c": "succeeded"}
    assert {n: high.nodes[n].state for n in "abc"} == {"a": "succeeded", "b": "succeeded",
                                                       "c": "skipped"}
    # the guard ran on a worker and its condition held; c's condition did not
    assert success_counts(client, high.run).get("to_fork") == 1


# --- embedded sub-processes: flattened ---------------------------------------------------------

def _declare_python(path: Path) -> bytes:
    """A SpiffWorkflow file as its author meant it: Spiff evaluates undeclared conditions in
    Python, so declare that (nbflow's language URI) on its definitions."""
    root = etree.fromstring(read(path))
    root.set("expressionLanguage", PYTHON_LANGUAGE)
    return etree.tostring(root)


def test_spiff_lanes_with_a_sub_process_runs_once_python_is_declared():
    wf = from_bpmn(_declare_python(DATA / "spiff" / "lanes.bpmn"))
    label = {n.id: n.label for n in wf.nodes}
    steps = {"Request Feature", "Clarifying Questions?", "Clarify Request", "Implement Feature",
             "Send to testing", "SubProcessTask"}
    ran = {v: {label[i] for i in play(wf, {"NeedClarification": v})[1]} & steps for v in ("Yes", "No")}
    assert ran == {"Yes": steps, "No": steps - {"Clarify Request"}}
    sub = wf.node("Activity_0i0rxuw")              # the sub-process: a gateway in front ...
    assert wf.successors(sub.id) == ["SubProcessTask"]
    assert wf.successors("SubProcessTask") == ["Activity_0i0rxuw__end"]   # ... and one behind


def test_sub_process_completes_when_everything_inside_has():
    xml = model(f"""<startEvent id="s"/><exclusiveGateway id="x" default="d"/><task id="a"/>
      <subProcess id="sub" name="Sub"><startEvent id="is"/><parallelGateway id="f"/>
        <task id="p"/><task id="q"/><exclusiveGateway id="c" default="no"/><task id="r"/>
        <endEvent id="ie1"/><endEvent id="ie2"/>
        <sequenceFlow id="i0" sourceRef="is" targetRef="f"/>
        <sequenceFlow id="i1" sourceRef="f" targetRef="p"/><sequenceFlow id="i2" sourceRef="f" targetRef="c"/>
        <sequenceFlow id="yes" sourceRef="c" targetRef="r"><conditionExpression {PY}>deep</conditionExpression></sequenceFlow>
        <sequenceFlow id="no" sourceRef="c" targetRef="q"/>
        <sequenceFlow id="i3" sourceRef="p" targetRef="ie1"/><sequenceFlow id="i4" sourceRef="r" targetRef="ie2"/>
        <sequenceFlow id="i5" sourceRef="q" targetRef="ie2"/>
      </subProcess><task id="after"/><endEvent id="e"/>
      <sequenceFlow id="f0" sourceRef="s" targetRef="x"/>
      <sequenceFlow id="go" sourceRef="x" targetRef="sub"><conditionExpression {PY}>go</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="x" targetRef="a"/><sequenceFlow id="f1" sourceRef="a" targetRef="sub"/>
      <sequenceFlow id="f2" sourceRef="sub" targetRef="after"/><sequenceFlow id="f3" sourceRef="after" targetRef="e"/>""")
    wf = from_bpmn(xml)
    steps = {"a", "p", "q", "r", "after"}
    got = {(go, deep): set(play(wf, {"go": go, "deep": deep})[1]) & steps
           for go in (True, False) for deep in (True, False)}
    assert got == {(True, True): {"p", "r", "after"}, (True, False): {"p", "q", "after"},
                   (False, True): {"a", "p", "r", "after"}, (False, False): {"a", "p", "q", "after"}}
    assert wf.node("sub").kind == "exclusive"      # two flows come in: each token starts it


def test_sub_process_entered_twice_at_once_is_refused():
    xml = model("""<startEvent id="s"/><parallelGateway id="f"/><task id="a"/><task id="b"/>
      <subProcess id="sub"><task id="inner"/></subProcess><endEvent id="e"/>
      <sequenceFlow id="f0" sourceRef="s" targetRef="f"/>
      <sequenceFlow id="f1" sourceRef="f" targetRef="a"/><sequenceFlow id="f2" sourceRef="f" targetRef="b"/>
      <sequenceFlow id="f3" sourceRef="a" targetRef="sub"/><sequenceFlow id="f4" sourceRef="b" targetRef="sub"/>
      <sequenceFlow id="f5" sourceRef="sub" targetRef="e"/>""")
    assert refused(refusal(xml)) == {"task": {"inner"}}


def test_event_sub_processes_are_refused():
    msg = refusal(model('<task id="a"/><subProcess id="ev" triggeredByEvent="true">'
                        '<startEvent id="es"><messageEventDefinition/></startEvent></subProcess>'))
    assert refused(msg) == {"subProcess": {"ev"}} and "event sub-process" in flat(msg)


def test_spiff_exclusive_choice_into_end_events_runs_once_python_is_declared():
    """Conditions straight into end events ride on guard nodes; the run takes one of them."""
    wf = from_bpmn(_declare_python(DATA / "spiff" / "data_object_gateway.bpmn"))
    assert wf.params == {"val": None}
    guards = {n.id for n in wf.nodes if n.when}
    taken = {v: set(play(wf, {"val": v})[1]) & guards for v in (True, False)}
    assert len(taken[True]) == len(taken[False]) == 1 and taken[True] != taken[False]
    assert wf.node(taken[True].pop()).when == "val"


def test_inclusive_gateway_takes_every_true_flow_and_joins_what_arrives():
    xml = model(f"""<startEvent id="s"/><inclusiveGateway id="split" default="d"/>
      <task id="a"/><task id="b"/><task id="c"/><inclusiveGateway id="join"/><task id="after"/>
      <endEvent id="e"/><sequenceFlow id="f0" sourceRef="s" targetRef="split"/>
      <sequenceFlow id="ca" sourceRef="split" targetRef="a"><conditionExpression {PY}>x &gt; 0</conditionExpression></sequenceFlow>
      <sequenceFlow id="cb" sourceRef="split" targetRef="b"><conditionExpression {PY}>y &gt; 0</conditionExpression></sequenceFlow>
      <sequenceFlow id="d" sourceRef="split" targetRef="c"/>
      <sequenceFlow id="ja" sourceRef="a" targetRef="join"/><sequenceFlow id="jb" sourceRef="b" targetRef="join"/>
      <sequenceFlow id="jc" sourceRef="c" targetRef="join"/><sequenceFlow id="j" sourceRef="join" targetRef="after"/>
      <sequenceFlow id="fe" sourceRef="after" targetRef="e"/>""")
    wf = from_bpmn(xml)
    got = {(x, y): set(play(wf, {"x": x, "y": y})[1]) & {"a", "b", "c", "after"}
           for x in (1, -1) for y in (1, -1)}
    assert got == {(1, 1): {"a", "b", "after"}, (1, -1): {"a", "after"},
                   (-1, 1): {"b", "after"}, (-1, -1): {"c", "after"}}


# --- call activities: the called process inlined, then flattened ----------------------------

def test_call_activity_runs_the_called_process_in_place(tmp_path):
    (tmp_path / "lib.bpmn").write_text(f'''<definitions xmlns="{BPMN_NS}" targetNamespace="x">
      <process id="Review"><startEvent id="s"/><task id="check" name="Check"/>
        <exclusiveGateway id="ok" default="fine"/><task id="fix" name="Fix"/><endEvent id="e"/>
        <sequenceFlow id="f0" sourceRef="s" targetRef="check"/><sequenceFlow id="f1" sourceRef="check" targetRef="ok"/>
        <sequenceFlow id="bad" sourceRef="ok" targetRef="fix"><conditionExpression {PY}>errors</conditionExpression></sequenceFlow>
        <sequenceFlow id="fine" sourceRef="ok" targetRef="e"/><sequenceFlow id="f2" sourceRef="fix" targetRef="e"/>
      </process></definitions>''')
    main = tmp_path / "main.bpmn"
    main.write_text(model("""<startEvent id="s"/><task id="write" name="Write"/>
      <callActivity id="rev" name="Review it" calledElement="Review"/><task id="ship" name="Ship"/>
      <endEvent id="e"/><sequenceFlow id="f0" sourceRef="s" targetRef="write"/>
      <sequenceFlow id="f1" sourceRef="write" targetRef="rev"/><sequenceFlow id="f2" sourceRef="rev" targetRef="ship"/>
      <sequenceFlow id="f3" sourceRef="ship" targetRef="e"/>"""))
    wf = from_bpmn(main)
    label = {n.id: n.label for n in wf.nodes}
    named = {"Write", "Check", "Fix", "Ship"}
    ran = {v: {label[i] for i in play(wf, {"errors": v})[1]} & named for v in (0, 3)}
    assert ran == {0: {"Write", "Check", "Ship"}, 3: {"Write", "Check", "Fix", "Ship"}}
    assert "rev__check" in label                      # the callee's ids, prefixed by the call's


def test_unresolvable_and_recursive_calls_are_refused(tmp_path):
    msg = refusal(model('<callActivity id="c" calledElement="Nowhere"/>'))
    assert refused(msg) == {"callActivity": {"c"}} and "'Nowhere'" in msg
    loop = (f'<definitions xmlns="{BPMN_NS}" targetNamespace="x"><process id="main">'
            '<callActivity id="c" calledElement="P"/></process>'
            '<process id="P"><callActivity id="d" calledElement="P"/></process></definitions>')
    assert "nest more than 10 deep" in flat(refusal(loop))


def test_a_2_1_uncontrolled_merge_runs_on_the_stack(client, tmp_path):
    """Signavio's A.2.1 (with Python conditions on its split): Task 3, entered by three flows
    without a join, runs exactly once on whichever branch is taken."""
    from support import finish

    path = tmp_path / "a21.bpmn"
    path.write_bytes(_with_python_conditions(DATA / "miwg" / "vendors" / "signavio-A.2.1.bpmn"))
    wf = from_bpmn(path)
    name = {n.id: n.name for n in wf.nodes}
    for n, expected in ((4, {"Task 1", "Task 3", "Task 4"}), (2, {"Task 1", "Task 2", "Task 3"})):
        st = finish(client, client.submit(str(path), {"n": n}))
        assert st.state == "succeeded"
        ran = {name[i] for i, ns in st.nodes.items() if ns.state == "succeeded"
               and (name.get(i) or "").startswith("Task")}
        assert ran == expected
