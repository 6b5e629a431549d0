"""BPMN 2.0: every file nbflow writes passes the OMG XSD; IR -> BPMN -> IR gives the same workflow;
models from other tools import, or are refused with one clear error naming what is unsupported."""
from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from nbflow.compiler.bpmn import (BPMN_NS, PYTHON_LANGUAGE, from_bpmn, iso_duration, parse_duration,
                                  to_bpmn)
from nbflow.core.ir import Edge, Node, Workflow, WorkflowError

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "bpmn"


XSD = DATA / "xsd" / "BPMN20.xsd"
MIWG = DATA / "miwg" / "reference"


@pytest.fixture(scope="module")
def schema():
    import xmlschema

    return xmlschema.XMLSchema(str(XSD))


@pytest.fixture
def check(schema):
    """to_bpmn + XSD validation: every BPMN text a test makes goes through here."""
    def _check(wf: Workflow) -> str:
        text = to_bpmn(wf)
        schema.validate(text)
        return text
    return _check


# --- hand-built IRs ----------------------------------------------------------------------------

def chain() -> Workflow:
    return Workflow(
        name="chain", params={"day": "2026-11-20", "n": 3}, params_source='day = "2026-11-20"\nn = 3',
        setup=["import math", "from x import y\n\ndef f():\n    return 1"], source="/tmp/chain.ipynb",
        nodes=[Node("start", "start"),
               Node("extract", "task", code="sales = load(day)\r\nregions = ['n', 's']", cell=2,
                    first_line="%%task extract --retries 3", doc="# Extract\nthe data",
                    inputs=["day"], outputs=["sales", "regions"], sources={"day": "params"},
                    retries=3, retry_delay=1.5, timeout=600.0, queue="gpu", isolation="fresh"),
               Node("report", "task", code="print(sales)", cell=3, inputs=["sales"],
                    sources={"sales": "extract"}),
               Node("end", "end")],
        edges=[Edge("start", "extract"), Edge("extract", "report", data=["sales"]),
               Edge("report", "end")])


def diamond() -> Workflow:
    return Workflow(
        name="diamond",
        nodes=[Node("start", "start"), Node("a", "task", code="x = 1", outputs=["x"]),
               Node("b", "task", code="y = x + 1", inputs=["x"]),
               Node("c", "task", code="z = x * 2", inputs=["x"]),
               Node("d", "task", code="print(y, z)", inputs=["y", "z"]), Node("end", "end")],
        edges=[Edge("start", "a"), Edge("a", "b", data=["x"]), Edge("a", "c", data=["x"]),
               Edge("b", "d", data=["y"]), Edge("c", "d", data=["z"]), Edge("d", "end")])


def features() -> Workflow:
    """map, when, approval, signal, sleep, at, pure gates, notebook tasks, gateways."""
    return Workflow(
        name="features 'all' <of> them",
        nodes=[
            Node("start", "start"),
            Node("by_region", "task", code="t = f(region)", map_var="region", map_over="regions"),
            Node("maybe", "task", code="x = 1", when='len(t) > 0 and mode == "full"'),
            Node("publish", "task", code="write()", approval="Publish?\nReally?",
                 approval_timeout=3600.0),
            Node("approve_only", "task", approval=""),
            Node("wait_go", "task", wait_signal="go"),
            Node("go_then_run", "task", code="print(go)", wait_signal="go", sleep=5.0),
            Node("nap", "task", sleep=7200.0),
            Node("at_noon", "task", at="2026-11-20T12:00:00Z"),
            Node("both", "task", wait_signal="ready", at="2026-11-21T00:00:00Z"),
            Node("other", "task", notebook="etl.ipynb", notebook_task="load", name="Load it"),
            Node("choose", "exclusive", name="which?"),
            Node("big", "task", code="big()"),
            Node("small", "task", code="small()"),
            Node("join", "parallel"),
            Node("end", "end"),
        ],
        edges=[
            Edge("start", "by_region"), Edge("by_region", "maybe", data=["t"]),
            Edge("maybe", "publish"), Edge("publish", "approve_only"),
            Edge("start", "wait_go"), Edge("wait_go", "go_then_run", data=["go"]),
            Edge("go_then_run", "nap"), Edge("nap", "at_noon"), Edge("at_noon", "both"),
            Edge("start", "other"), Edge("other", "choose"),
            Edge("choose", "big", condition="size > 10"), Edge("choose", "small", default=True),
            Edge("big", "join"), Edge("small", "join"),
            Edge("approve_only", "end"), Edge("both", "end"), Edge("join", "end"),
        ])


SAMPLES = {"chain": chain, "diamond": diamond, "features": features}


def bpmn_tree(text: str):
    return etree.fromstring(text.encode())


def tags(text: str, local: str):
    return bpmn_tree(text).findall(f".//{{{BPMN_NS}}}{local}")


# --- export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", list(SAMPLES))
def test_export_validates_and_round_trips(check, sample):
    wf = SAMPLES[sample]()
    text = check(wf)
    back = from_bpmn(text)
    assert back.to_dict() == wf.to_dict()
    assert back.content_hash() == wf.content_hash()
    assert to_bpmn(back) == text  # deterministic


def test_export_is_bpmn_shaped(check):
    text = check(features())
    root = bpmn_tree(text)
    proc = root.find(f"{{{BPMN_NS}}}process")
    by_id = {el.get("id"): etree.QName(el).localname for el in proc}
    assert by_id["start"] == "startEvent" and by_id["end"] == "endEvent"
    assert by_id["by_region"] == "serviceTask" and by_id["publish"] == "userTask"
    assert by_id["approve_only"] == "userTask"
    assert by_id["wait_go"] == "intermediateCatchEvent" and by_id["nap"] == "intermediateCatchEvent"
    assert by_id["choose"] == "exclusiveGateway" and by_id["join"] == "parallelGateway"
    # multi-instance, timers, signals
    mi = proc.find(f"{{{BPMN_NS}}}serviceTask[@id='by_region']/{{{BPMN_NS}}}multiInstanceLoopCharacteristics")
    assert mi is not None and mi.get("isSequential") == "false"
    durations = [el.text for el in tags(text, "timeDuration")]
    assert "PT2H" in durations and "PT5S" in durations
    assert {el.text for el in tags(text, "timeDate")} == {"2026-11-20T12:00:00Z", "2026-11-21T00:00:00Z"}
    assert sorted(s.get("name") for s in root.findall(f"{{{BPMN_NS}}}signal")) == ["go", "ready"]
    # when: a gateway before the task, python condition in, default flow around it
    conds = {c.text: c for c in tags(text, "conditionExpression")}
    ce = conds['len(t) > 0 and mode == "full"']
    assert ce.get("language") == PYTHON_LANGUAGE
    assert ce.get("{http://www.w3.org/2001/XMLSchema-instance}type") == "bpmn:tFormalExpression"
    flow = ce.getparent()
    gw = proc.find(f"*[@id='{flow.get('sourceRef')}']")
    assert etree.QName(gw).localname == "exclusiveGateway" and gw.get("default")
    assert flow.get("targetRef") == "maybe"
    assert "size > 10" in conds
    # fan-out of start (3 branches): a parallel gateway; fan-in of end (3): an inclusive join
    starts = [f for f in tags(text, "sequenceFlow") if f.get("sourceRef") == "start"]
    assert len(starts) == 1 and by_id[starts[0].get("targetRef")] == "parallelGateway"
    ends = [f for f in tags(text, "sequenceFlow") if f.get("targetRef") == "end"]
    assert len(ends) == 1 and by_id[ends[0].get("sourceRef")] == "inclusiveGateway"
    # a --when task's default flow ends (what only it feeds is skipped, as in the engine)
    skip = proc.find(f"*[@id='{gw.get('default')}']")
    assert by_id[skip.get("targetRef")] == "endEvent"
    # data names are shown on the flows
    assert any(f.get("name") == "t" for f in tags(text, "sequenceFlow"))


def test_diagram_covers_everything_left_to_right(check):
    text = check(diamond())
    root = bpmn_tree(text)
    DI = "http://www.omg.org/spec/BPMN/20100524/DI"
    DC = "http://www.omg.org/spec/DD/20100524/DC"
    proc = root.find(f"{{{BPMN_NS}}}process")
    flow_nodes = {el.get("id") for el in proc if etree.QName(el).localname not in
                  ("sequenceFlow", "extensionElements")}
    flows = {el.get("id") for el in proc.findall(f"{{{BPMN_NS}}}sequenceFlow")}
    shapes = {s.get("bpmnElement"): s.find(f"{{{DC}}}Bounds") for s in root.iter(f"{{{DI}}}BPMNShape")}
    edges = {e.get("bpmnElement"): e.findall("{http://www.omg.org/spec/DD/20100524/DI}waypoint")
             for e in root.iter(f"{{{DI}}}BPMNEdge")}
    assert set(shapes) == flow_nodes and set(edges) == flows
    x = {k: float(b.get("x")) for k, b in shapes.items()}
    assert x["start"] < x["a"] < x["b"] < x["d"] < x["end"]
    assert x["b"] == x["c"]
    assert float(shapes["b"].get("y")) != float(shapes["c"].get("y"))
    assert all(len(w) >= 2 for w in edges.values())


def test_nasty_text_round_trips(check):
    wf = chain()
    wf.nodes[1].code = 'a = "<&>"\x0c\n# ]]> \' " \t tab\r\nz = 1\r'
    wf.nodes[1].name = 'Extract <"sales"> & more'
    wf.nodes[1].doc = "line1\n\nline3 \x01 control"
    wf.params = {"s": "\x00 nul <x>", "nested": {"a": [1, 2.5, None, True]}}
    wf.setup = ["\x1b[31m red"]
    text = check(wf)
    back = from_bpmn(text)
    assert back.to_dict() == wf.to_dict()


def test_int_and_float_values_keep_their_type(check):
    wf = chain()
    wf.nodes[1].timeout = 600      # an int where a float is usual: the hash must not change
    back = from_bpmn(check(wf))
    assert back.content_hash() == wf.content_hash()


def test_file_round_trip_and_notebook_paths(check, tmp_path):
    wf = features()
    path = tmp_path / "flow.bpmn"
    path.write_text(check(wf), encoding="utf-8")
    back = from_bpmn(path)
    assert back.node("other").notebook == str(tmp_path / "etl.ipynb")
    back.node("other").notebook = "etl.ipynb"
    assert back.to_dict() == wf.to_dict()
    assert from_bpmn(path.read_bytes()).to_dict() == wf.to_dict()   # bytes: as written
    assert from_bpmn(str(path), base_dir="/data").node("other").notebook == "/data/etl.ipynb"


def test_iso_durations():
    assert iso_duration(7200) == "PT2H"
    assert iso_duration(90.5) == "PT1M30.5S"
    assert iso_duration(0) == "PT0S"
    assert iso_duration(90061) == "PT25H1M1S"
    for s in (0, 1, 59.25, 3600, 86400 * 3 + 5):
        assert parse_duration(iso_duration(s)) == s
    assert parse_duration("P1DT2H") == 93600
    assert parse_duration("P1W") == 604800
    assert parse_duration("PT0,5S") == 0.5
    for bad in ("P1M", "P1Y", "PT", "P", "2h", "PT1H2"):
        assert parse_duration(bad) is None


# --- import: other tools' models -----------------------------------------------------------------

# Models from other tools (MIWG, SpiffWorkflow) and the reproductions of issue 16 are in
# tests/test_bpmn_import.py; here: nbflow's own subset, what is ignored, and bad input.


def test_foreign_model_with_conditions_timers_signals_and_notebooks(check):
    wf = from_bpmn(DATA / "foreign.bpmn")
    ids = [n.id for n in wf.nodes]
    assert ids[0] == "start" and "_1-task" in ids            # ids sanitized ("1 task" -> "_1-task")
    load = wf.node("Load")
    assert load.notebook == str((DATA / "etl.ipynb").resolve()) and load.notebook_task == "load"
    assert wf.node("Clean").notebook.endswith("clean.ipynb") and wf.node("Clean").notebook_task is None
    assert wf.node("Review").approval == "Check the numbers"
    assert wf.node("Wait").sleep == 5400.0 and wf.node("Wait").code == ""
    assert wf.node("Go").wait_signal == "go_ahead"
    assert wf.node("Each").map_var == "item" and wf.node("Each").map_over == "items"
    gw = wf.node("Choose")
    assert gw.kind == "exclusive"
    out = {e.target: e for e in wf.edges if e.source == "Choose"}
    assert out["Big"].condition == "total > 100" and not out["Big"].default
    assert out["Small"].default and out["Small"].condition is None
    assert wf.node("Big").when == "total > 100"
    assert wf.node("Small").when == "not ((total > 100))"
    assert [n.id for n in wf.nodes if n.kind == "end"] == ["End_1"]  # two end events, one end
    assert {e.source for e in wf.edges if e.target == "End_1"} == {"Big", "Small"}
    again = from_bpmn(check(wf))
    assert again.to_dict() == wf.to_dict()


def test_no_start_or_end_events_are_added(tmp_path):
    xml = f"""<definitions xmlns="{BPMN_NS}" targetNamespace="x" id="d">
      <process id="p"><task id="a" name="A"/><task id="b"/>
        <sequenceFlow id="f" sourceRef="a" targetRef="b"/></process></definitions>"""
    wf = from_bpmn(xml)
    assert [n.kind for n in wf.nodes] == ["start", "task", "task", "end"]
    assert [(e.source, e.target) for e in wf.edges] == [("start", "a"), ("a", "b"), ("b", "end")]


@pytest.mark.parametrize("body, expected", [
    ('<scriptTask id="s1"/><transaction id="tx"/><boundaryEvent id="b1" attachedToRef="s1"/>',
     ["boundaryEvent 'b1'", "scriptTask 's1'", "transaction 'tx'"]),
    ('<intermediateCatchEvent id="m"><messageEventDefinition/></intermediateCatchEvent>',
     ["intermediateCatchEvent 'm': messageEventDefinition"]),
    ('<startEvent id="t"><timerEventDefinition/></startEvent>', ["startEvent 't': a timerEventDefinition"]),
    ('<intermediateCatchEvent id="c"><timerEventDefinition><timeDuration>P1M</timeDuration>'
     '</timerEventDefinition></intermediateCatchEvent>', ["intermediateCatchEvent 'c': timeDuration 'P1M'"]),
    ('<task id="l"><standardLoopCharacteristics/></task>', ["task 'l': a loop"]),
    ('<task id="mi"><multiInstanceLoopCharacteristics/></task>', ["task 'mi': a multi-instance without"]),
    ('<eventBasedGateway id="eg"/><complexGateway id="cg"/>', ["complexGateway 'cg'", "eventBasedGateway 'eg'"]),
    ('<exclusiveGateway id="g"/><task id="t1"/><sequenceFlow id="f1" sourceRef="g" targetRef="t1">'
     '<conditionExpression language="http://www.w3.org/1999/XPath">a = 1</conditionExpression>'
     '</sequenceFlow>', ["sequenceFlow 'f1': condition 'a = 1' is in 'http://www.w3.org/1999/XPath'"]),
])
def test_unsupported_elements_are_refused_in_one_error(body, expected):
    xml = f'<definitions xmlns="{BPMN_NS}" targetNamespace="x"><process id="p">{body}</process></definitions>'
    with pytest.raises(WorkflowError) as err:
        from_bpmn(xml)
    msg = str(err.value)
    assert msg.startswith("cannot import this BPMN model without changing what it means")
    lines = [" ".join(ln.split()) for ln in msg.splitlines()[1:-1] if ln.startswith("  ") and ln[2] != " "]
    assert len(lines) == len(expected)             # one line per element, sorted by type
    assert all(ln.startswith(x) for ln, x in zip(lines, expected)), lines
    assert "nbflow imports start/end events, tasks" in msg


def test_lanes_pools_annotations_and_data_are_ignored():
    xml = f"""<definitions xmlns="{BPMN_NS}" targetNamespace="x">
      <collaboration id="c"><participant id="pp" processRef="p"/></collaboration>
      <process id="p"><laneSet id="ls"><lane id="l1"><flowNodeRef>a</flowNodeRef></lane></laneSet>
        <documentation>about</documentation>
        <startEvent id="s"/><task id="a"><documentation>doc</documentation></task><endEvent id="e"/>
        <dataObject id="do"/><textAnnotation id="ta"><text>note</text></textAnnotation>
        <association id="as" sourceRef="ta" targetRef="a"/>
        <sequenceFlow id="f1" sourceRef="s" targetRef="a"/><sequenceFlow id="f2" sourceRef="a" targetRef="e"/>
      </process></definitions>"""
    wf = from_bpmn(xml)
    assert [n.id for n in wf.nodes] == ["s", "a", "e"]


@pytest.mark.parametrize("text, expected", [
    ("<definitions", "not well-formed XML"),
    ("", "not well-formed XML"),
    ("<root xmlns='urn:x'/>", "not BPMN 2.0: its root element is 'root'"),
    (f'<definitions xmlns="{BPMN_NS}" targetNamespace="x"/>', "no process with flow elements"),
    (f'<definitions xmlns="{BPMN_NS}" targetNamespace="x"><process id="p"><task id="a"/>'
     '<sequenceFlow id="f" sourceRef="a" targetRef="nowhere"/></process></definitions>',
     "sequenceFlow 'f': its targetRef 'nowhere' is not a flow node"),
    (f'<definitions xmlns="{BPMN_NS}" targetNamespace="x"><process id="p"><task id="a"/><task id="b"/>'
     '<sequenceFlow id="f" sourceRef="a" targetRef="b"/><sequenceFlow id="g" sourceRef="b" targetRef="a"/>'
     '</process></definitions>', "loops"),
])
def test_bad_input_is_a_clear_error(text, expected):
    with pytest.raises(WorkflowError, match=expected.replace("(", r"\(")):
        from_bpmn(text.encode() if text == "" else text)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(WorkflowError, match="cannot read BPMN file"):
        from_bpmn(tmp_path / "nope.bpmn")


def test_entities_are_never_expanded(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    xxe = f"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file://{secret}">]>
<definitions xmlns="{BPMN_NS}" targetNamespace="x"><process id="p"><task id="a" name="&xxe;"/></process></definitions>"""
    laughs = "<?xml version='1.0'?><!DOCTYPE l [<!ENTITY a 'lol'>" + "".join(
        f"<!ENTITY {c} '&{p};&{p};&{p};&{p};&{p};&{p};&{p};&{p};&{p};&{p};'>"
        for p, c in zip("abcdefgh", "bcdefghi")) + f"]><definitions xmlns='{BPMN_NS}'>&i;</definitions>"
    for text in (xxe, laughs):
        with pytest.raises(WorkflowError) as err:
            from_bpmn(text.encode())
        assert "TOP SECRET" not in str(err.value) and "lol" not in str(err.value)


# --- notebooks: compile -> BPMN -> IR ------------------------------------------------------------

NOTEBOOKS = ["chain", "diamond", "fanout", "conditions", "approvals", "signals", "sales"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_compiled_notebooks_round_trip(check, name):
    compiler = pytest.importorskip("nbflow.compiler")
    if not hasattr(compiler, "compile_notebook"):
        pytest.skip("nbflow.compiler.compile_notebook has not landed yet")
    path = HERE / "data" / f"{name}.ipynb"
    if not path.exists():
        pytest.skip(f"{path.name} is not there")
    wf = compiler.compile_notebook(path)
    back = from_bpmn(check(wf))
    assert back.to_dict() == wf.to_dict()
    assert back.content_hash() == wf.content_hash()


def test_cli_compile_writes_valid_bpmn_and_reads_it_back(schema, tmp_path):
    from click.testing import CliRunner

    from nbflow.cli.main import main

    compiler = pytest.importorskip("nbflow.compiler")
    if not hasattr(compiler, "compile_file"):
        pytest.skip("nbflow.compiler.compile_file has not landed yet")
    nb = HERE / "data" / "sales.ipynb"
    out = tmp_path / "sales.bpmn"
    result = CliRunner().invoke(main, ["compile", str(nb), "-o", str(out)])
    assert result.exit_code == 0, result.output
    schema.validate(str(out))
    back = tmp_path / "sales.json"
    result = CliRunner().invoke(main, ["compile", str(out), "-o", str(back)])
    assert result.exit_code == 0, result.output
    assert Workflow.from_json(back.read_text()).content_hash() == compiler.compile_file(nb).content_hash()
    result = CliRunner().invoke(main, ["compile", str(MIWG / "A.3.0.bpmn")])
    assert result.exit_code == 2 and "boundaryEvent '_428dcbf5-8e5e-48e0-9c0c-d93003fa8c82'" in result.output


# --- property: any DAG with any options survives the trip ------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)


@st.composite
def workflows(draw):
    n = draw(st.integers(1, 7))
    ids = draw(st.lists(_names.filter(lambda s: s not in ("start", "end")), min_size=n, max_size=n,
                        unique=True))
    nodes = [Node("start", "start")]
    for i in ids:
        kind = draw(st.sampled_from(["task"] * 5 + ["parallel", "exclusive"]))
        node = Node(i, kind)
        if kind == "task":
            node.code = draw(st.sampled_from(["", "x = 1", "y = f(x)\nprint(y)"]))
            node.when = draw(st.none() | st.just("x > 1"))
            node.approval = draw(st.none() | st.just("ok?"))
            node.wait_signal = draw(st.none() | st.just("go"))
            node.sleep = draw(st.none() | st.sampled_from([1.0, 90.5, 7200.0]))
            node.retries = draw(st.integers(0, 3))
            if draw(st.booleans()):
                node.map_var, node.map_over = "item", "items"
        nodes.append(node)
    nodes.append(Node("end", "end"))
    edges = []
    for j, node in enumerate(nodes[1:-1], start=1):  # edges only go forward: a DAG
        preds = draw(st.lists(st.integers(0, j - 1), min_size=1, max_size=3, unique=True))
        for p in sorted(preds):
            edges.append(Edge(nodes[p].id, node.id, data=draw(st.lists(_names, max_size=2, unique=True))))
    has_out = {e.source for e in edges}
    for node in nodes[:-1]:
        if node.id not in has_out:
            edges.append(Edge(node.id, "end"))
    return Workflow("prop", nodes=nodes, edges=edges)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wf=workflows())
def test_any_workflow_round_trips_and_validates(schema, wf):
    text = to_bpmn(wf)
    schema.validate(text)
    assert from_bpmn(text).to_dict() == wf.to_dict()


# --- the diagram: Graphviz routes every edge around the shapes ---------------------------------

def _segment_hits_box(p, q, box, shrink=1.0) -> bool:
    """Does segment p-q pass through the inside of box (x, y, w, h), shrunk by `shrink`?"""
    x0, y0 = box[0] + shrink, box[1] + shrink
    x1, y1 = box[0] + box[2] - shrink, box[1] + box[3] - shrink
    if x0 >= x1 or y0 >= y1:
        return False
    (px, py), (qx, qy) = p, q
    t0, t1 = 0.0, 1.0            # Liang-Barsky clipping of the segment against the box
    dx, dy = qx - px, qy - py
    for pk, qk in ((-dx, px - x0), (dx, x1 - px), (-dy, py - y0), (dy, y1 - py)):
        if pk == 0:
            if qk < 0:
                return False
        else:
            t = qk / pk
            if pk < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 > t1:
                return False
    return t1 - t0 > 1e-6


def _boxes_overlap(a, b, shrink=1.0) -> bool:
    return (a[0] + shrink < b[0] + b[2] - shrink and b[0] + shrink < a[0] + a[2] - shrink
            and a[1] + shrink < b[1] + b[3] - shrink and b[1] + shrink < a[1] + a[3] - shrink)


def diagram_crossings(text: str) -> list[str]:
    """Every edge segment that passes through a shape (other than the shapes it joins, at its
    ends) and every label that sits on a shape, in the BPMN DI of `text`."""
    root = bpmn_tree(text)
    DI, DC = "http://www.omg.org/spec/BPMN/20100524/DI", "http://www.omg.org/spec/DD/20100524/DC"
    flows = {f.get("id"): (f.get("sourceRef"), f.get("targetRef"))
             for f in root.iter(f"{{{BPMN_NS}}}sequenceFlow")}

    def box(el):
        b = el.find(f"{{{DC}}}Bounds")
        return tuple(float(b.get(k)) for k in ("x", "y", "width", "height"))

    shapes, labels = {}, []
    for s in root.iter(f"{{{DI}}}BPMNShape"):
        shapes[s.get("bpmnElement")] = box(s)
        lab = s.find(f"{{{DI}}}BPMNLabel")
        if lab is not None:
            labels.append((s.get("bpmnElement"), box(lab)))
    bad = []
    for e in root.iter(f"{{{DI}}}BPMNEdge"):
        src, tgt = flows[e.get("bpmnElement")]
        pts = [(float(w.get("x")), float(w.get("y")))
               for w in e.findall("{http://www.omg.org/spec/DD/20100524/DI}waypoint")]
        segs = list(zip(pts, pts[1:]))
        for i, (p, q) in enumerate(segs):
            for sid, b in shapes.items():
                if (sid == src and i == 0) or (sid == tgt and i == len(segs) - 1):
                    continue
                if _segment_hits_box(p, q, b):
                    bad.append(f"edge {e.get('bpmnElement')} crosses {sid}")
        lab = e.find(f"{{{DI}}}BPMNLabel")
        if lab is not None:
            labels.append((e.get("bpmnElement"), box(lab)))
    for owner, lb in labels:
        for sid, b in shapes.items():
            if _boxes_overlap(lb, b):
                bad.append(f"label of {owner} on {sid}")
    return bad


DIAGRAM_NOTEBOOKS = sorted(p for p in [*(HERE / "data").glob("*.ipynb"),
                                       *(HERE.parent / "notebooks").glob("*.ipynb")]
                           if not p.name.startswith(("bad_", "not_a_", "empty")))


def test_crossing_detector_can_fail(check):
    text = check(diamond())
    root = bpmn_tree(text)
    DI = "http://www.omg.org/spec/BPMN/20100524/DI"
    DC = "http://www.omg.org/spec/DD/20100524/DC"
    shape = next(s for s in root.iter(f"{{{DI}}}BPMNShape") if s.get("bpmnElement") == "b")
    b = shape.find(f"{{{DC}}}Bounds")           # move b onto the middle of the a -> c edge
    edge = next(e for e in root.iter(f"{{{DI}}}BPMNEdge") if e.get("bpmnElement").startswith("Flow_a_c"))
    w = edge.findall("{http://www.omg.org/spec/DD/20100524/DI}waypoint")
    mx = (float(w[0].get("x")) + float(w[-1].get("x"))) / 2
    my = (float(w[0].get("y")) + float(w[-1].get("y"))) / 2
    b.set("x", str(mx - 50)), b.set("y", str(my - 40))
    assert any("crosses b" in c for c in diagram_crossings(etree.tostring(root).decode()))


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="Graphviz is not installed")
@pytest.mark.parametrize("path", DIAGRAM_NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_exported_diagrams_have_no_crossings(schema, path):
    from nbflow.compiler import compile_notebook

    text = to_bpmn(compile_notebook(path))
    schema.validate(text)
    assert diagram_crossings(text) == []


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_sample_diagrams_have_no_crossings(check, sample):
    assert diagram_crossings(check(SAMPLES[sample]())) == []
