"""DAG pictures: DOT text, SVG through graphviz, colours by run state, and `nbflow show`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbflow.compiler import render
from nbflow.core.ir import Edge, Node, Workflow
from nbflow.compiler.render import STATE_COLOURS, legend_items, to_dot, to_svg
from nbflow.errors import DotMissing, WorkflowError


def daily_report() -> Workflow:
    """start -> extract -> by_region (map) -> publish (approval) -> end, plus options."""
    return Workflow(
        name="daily",
        nodes=[
            Node("start", "start"),
            Node("extract", "task", code="sales = load(day)", outputs=["sales", "regions"],
                 retries=3, timeout=600.0),
            Node("by_region", "task", code="totals = f(sales, region)", inputs=["sales"],
                 map_var="region", map_over="regions", outputs=["totals"]),
            Node("publish", "task", code="write(totals)", approval="Publish the report?",
                 inputs=["totals"]),
            Node("wait_go", "task", wait_signal="go"),
            Node("nap", "task", sleep=7200.0),
            Node("maybe", "task", code="x = 1", when="len(sales) > 0"),
            Node("end", "end"),
        ],
        edges=[
            Edge("start", "extract"),
            Edge("extract", "by_region", data=["sales", "regions"]),
            Edge("by_region", "publish", data=["totals"]),
            Edge("extract", "maybe", data=["sales"]),
            Edge("start", "wait_go"),
            Edge("wait_go", "nap"),
            Edge("nap", "end"),
            Edge("publish", "end"),
            Edge("maybe", "end"),
        ],
    )


def node_line(dot: str, node_id: str) -> str:
    for line in dot.splitlines():
        if line.strip().startswith(f'"{node_id}" ['):
            return line
    raise AssertionError(f"node {node_id} not in DOT:\n{dot}")


def test_dot_has_every_task_with_its_shape_and_markers():
    dot = to_dot(daily_report())
    assert "rankdir=LR" in dot
    for task in ("extract", "by_region", "publish", "wait_go", "nap", "maybe"):
        assert "shape=box" in node_line(dot, task) and "rounded" in node_line(dot, task)
    assert "shape=circle" in node_line(dot, "start")
    assert "shape=doublecircle" in node_line(dot, "end")
    assert "retries 3 · timeout 10m" in node_line(dot, "extract")
    assert "≡ for region in regions" in node_line(dot, "by_region")
    assert "✍ approval: Publish the report?" in node_line(dot, "publish")
    assert "△ signal go" in node_line(dot, "wait_go")
    assert "◷ sleep 2h" in node_line(dot, "nap")


def test_when_is_drawn_as_an_exclusive_gateway_before_the_task():
    dot = to_dot(daily_report())
    assert '"when::maybe" [shape=diamond label="×"' in dot
    assert '"extract" -> "when::maybe" [label="sales"' in dot
    assert '"when::maybe" -> "maybe" [label="if len(sales) &gt; 0"' not in dot  # quoted, not HTML
    assert '"when::maybe" -> "maybe" [label="if len(sales) > 0"' in dot


def test_gateways_and_edge_data_labels():
    wf = Workflow("gw", nodes=[
        Node("start", "start"), Node("fork", "parallel"), Node("choose", "exclusive"),
        Node("a", "task", code="a=1"), Node("b", "task", code="b=1"), Node("end", "end")],
        edges=[Edge("start", "fork"), Edge("fork", "choose"), Edge("choose", "a", condition="x > 1"),
               Edge("choose", "b", default=True),
               Edge("a", "end", data=[f"name_{i}" for i in range(8)]), Edge("b", "end")])
    dot = to_dot(wf)
    assert 'label="+"' in node_line(dot, "fork") and "shape=diamond" in node_line(dot, "fork")
    assert 'label="×"' in node_line(dot, "choose")
    assert '"choose" -> "a" [label="[x > 1]"' in dot
    assert '"choose" -> "b" [label="default"' in dot
    label = re.search(r'"a" -> "end" \[label="([^"]*)"', dot).group(1)
    assert label.startswith("name_0, name_1") and re.search(r"\+\d$", label)
    assert len(label) <= 40


def test_states_colour_nodes_and_legend():
    states = {"extract": "succeeded", "by_region": "running", "publish": "awaiting_approval",
              "maybe": "skipped", "nap": "failed"}
    dot = to_dot(daily_report(), states=states, legend=True, title="run 42")
    for node, state in states.items():
        assert f'fillcolor="{STATE_COLOURS[state]}"' in node_line(dot, node)
    assert "dashed" in node_line(dot, "maybe") and "bold" in node_line(dot, "nap")
    assert "cluster_legend" in dot and 'label="run 42"' in dot
    items = legend_items()
    assert [s for s, _ in items] == [
        "pending", "queued", "running", "awaiting_approval", "waiting_signal", "sleeping",
        "retry_wait", "succeeded", "reused", "failed", "skipped", "rejected", "cancelled"]
    assert len({c for _, c in items}) == len(items)  # every state tells itself apart
    for state, colour in items:
        assert f'BGCOLOR="{colour}"' in dot


@pytest.mark.needs_dot
def test_nasty_names_and_conditions_are_escaped():
    nasty = 'say "hi" <b>&</b>\nline2 \\ end'
    wf = Workflow('wf "x"', nodes=[
        Node("start", "start"), Node("t", "task", name=nasty, code="", when='a < "b" and c > 1\\n'),
        Node("g", "exclusive"), Node("u", "task", code="u=1"), Node("end", "end")],
        edges=[Edge("start", "t", data=['"q"']), Edge("t", "g"),
               Edge("g", "u", condition='x == "<y>"\n'), Edge("u", "end")])
    dot = to_dot(wf)
    label = re.search(r'"t" \[.*?label=(<.*>) margin', dot).group(1)
    assert "<b>" not in label and "&lt;b&gt;" in label and "&quot;hi&quot;" in label
    assert "line2 \\ end" in label                    # an HTML label keeps the backslash as is
    assert 'tooltip="say \\"hi\\" <b>&</b>\\nline2 \\\\ end"' in dot  # quoted-string rules
    assert '\\"<y>\\"' in dot           # quoted edge label keeps < > but escapes the quotes
    assert 'digraph "wf \\"x\\""' in dot
    svg = to_svg(wf)                    # and graphviz accepts it all
    assert "<svg" in svg and "&lt;b&gt;" in svg


@pytest.mark.needs_dot
def test_svg_renders():
    svg = to_svg(daily_report(), states={"extract": "succeeded"}, legend=True)
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "by_region" in svg and STATE_COLOURS["succeeded"].lower() in svg.lower()


@pytest.mark.needs_dot
@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf", ".dot", ".gv"])
def test_render_writes_each_format(tmp_path, suffix):
    out = tmp_path / f"dag{suffix}"
    assert render.render(daily_report(), out) is None
    data = out.read_bytes()
    assert data
    if suffix in (".dot", ".gv"):
        assert data.startswith(b"digraph")
    elif suffix == ".png":
        assert data.startswith(b"\x89PNG")
    elif suffix == ".pdf":
        assert data.startswith(b"%PDF")


def test_render_without_dot_writes_dot_text_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    out = tmp_path / "dag.svg"
    note = render.render(daily_report(), out)
    assert note and "\n" not in note
    assert "`dot` program is not installed" in note and "dag.dot" in note
    assert not out.exists()
    assert (tmp_path / "dag.dot").read_text().startswith("digraph")
    with pytest.raises(DotMissing, match="here is the DOT text instead") as err:
        to_svg(daily_report())
    assert err.value.dot.startswith("digraph")


def test_unknown_suffix_is_a_clear_error(tmp_path):
    with pytest.raises(WorkflowError, match=r"unknown picture format '\.jpg'.*\.svg"):
        render.render(daily_report(), tmp_path / "dag.jpg")
    with pytest.raises(WorkflowError, match="no suffix"):
        render.render(daily_report(), tmp_path / "dag")


# --- the CLI (needs nbflow.compiler.compile_file, written in parallel) -------------------------

def _compile_file_or_skip():
    import nbflow.compiler as compiler

    if not hasattr(compiler, "compile_file"):
        pytest.skip("nbflow.compiler.compile_file has not landed yet")
    return compiler.compile_file


def test_cli_show_writes_svg_from_workflow_json(tmp_path):
    from click.testing import CliRunner

    from nbflow.cli.main import main

    _compile_file_or_skip()
    src = tmp_path / "daily.json"
    src.write_text(daily_report().to_json(), encoding="utf-8")
    out = tmp_path / "out.svg"
    result = CliRunner().invoke(main, ["show", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "<svg" in out.read_text()
    result = CliRunner().invoke(main, ["show", str(src)])
    assert result.exit_code == 0 and result.output.startswith("digraph")
    result = CliRunner().invoke(main, ["show", str(src), "-o", str(tmp_path / "x.bmp")])
    assert result.exit_code == 2 and "unknown picture format" in result.output


def test_cli_show_draws_a_notebook_and_a_bpmn_file(tmp_path):
    from click.testing import CliRunner

    from nbflow.cli.main import main

    _compile_file_or_skip()
    nb = Path(__file__).resolve().parent / "data" / "diamond.ipynb"
    out = tmp_path / "dag.svg"
    result = CliRunner().invoke(main, ["show", str(nb), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "<svg" in out.read_text()
    bpmn = tmp_path / "flow.bpmn"
    result = CliRunner().invoke(main, ["compile", str(nb), "-o", str(bpmn)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["show", str(bpmn), "-o", str(tmp_path / "again.dot")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.dot").read_text().startswith("digraph")


def test_label_symbols_exist_in_debians_default_font():
    """An emoji (e.g. the person U+1F464 we used for approvals) is an empty box in Debian's
    Chromium and graphviz: every symbol must be in DejaVu Sans."""
    import shutil
    import subprocess

    from nbflow.compiler.render import GLYPHS

    if not shutil.which("fc-list") or "DejaVu Sans" not in subprocess.run(
            ["fc-list"], capture_output=True, text=True).stdout:
        pytest.skip("fontconfig with DejaVu Sans is not installed here")
    for what, ch in GLYPHS.items():
        fonts = subprocess.run(["fc-list", f":charset={ord(ch):x}", "family"],
                               capture_output=True, text=True).stdout
        assert "DejaVu Sans" in fonts, f"{what} symbol {ch!r} (U+{ord(ch):04X}) is not in DejaVu Sans"
    dot = to_dot(daily_report())
    assert all(ord(c) < 0x1F000 for c in dot), "an emoji crept into a label"


# --- DOT: Graphviz routes edges around nodes and places labels off them ------------------------

def _bezier_points(pos: str, steps: int = 12) -> list[tuple[float, float]]:
    pts = [tuple(float(v) for v in p.split(",")[-2:]) for p in pos.split()
           if not p.startswith(("s,", "e,"))]
    out = []
    for i in range(0, len(pts) - 3, 3):
        p0, p1, p2, p3 = pts[i:i + 4]
        for k in range(steps + 1):
            t = k / steps
            a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
            out.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0],
                        a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return out


def dot_overlaps(dot_text: str) -> list[str]:
    """Edges (their drawn curves) through nodes other than their ends, and edge or external
    labels on nodes, in Graphviz's own layout of `dot_text`."""
    import json
    import subprocess

    g = json.loads(subprocess.run(["dot", "-Tjson"], input=dot_text, capture_output=True,
                                  text=True, check=True).stdout)
    boxes = {}
    for o in g.get("objects", []):
        if "pos" in o and "width" in o:
            x, y = (float(v) for v in o["pos"].split(","))
            w, h = float(o["width"]) * 72 / 2 - 2, float(o["height"]) * 72 / 2 - 2
            boxes[o["_gvid"]] = (o["name"], x - w, y - h, x + w, y + h)

    def inside(p, b):
        return b[1] < p[0] < b[3] and b[2] < p[1] < b[4]

    bad = []
    for e in g.get("edges", []):
        for gid, b in boxes.items():
            if gid in (e["tail"], e["head"]):
                continue
            if any(inside(p, b) for p in _bezier_points(e["pos"])):
                bad.append(f"edge {boxes[e['tail']][0]}->{boxes[e['head']][0]} through {b[0]}")
            if "lp" in e and inside(tuple(float(v) for v in e["lp"].split(",")), b):
                bad.append(f"label of {boxes[e['tail']][0]}->{boxes[e['head']][0]} on {b[0]}")
    for o in g.get("objects", []):
        if "xlp" in o:
            p = tuple(float(v) for v in o["xlp"].split(","))
            bad += [f"label of {o['name']} on {b[0]}" for gid, b in boxes.items()
                    if gid != o["_gvid"] and inside(p, b)]
    return bad


DOT_NOTEBOOKS = sorted(p for p in [*(Path(__file__).parent / "data").glob("*.ipynb"),
                                   *(Path(__file__).parent.parent / "notebooks").glob("*.ipynb")]
                       if not p.name.startswith(("bad_", "not_a_", "empty")))


@pytest.mark.needs_dot
@pytest.mark.parametrize("path", DOT_NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dot_edges_go_around_nodes(path):
    from nbflow.compiler import compile_notebook

    assert dot_overlaps(to_dot(compile_notebook(path))) == []


@pytest.mark.needs_dot
def test_dot_overlap_detector_can_fail():
    pinned = ('digraph{layout=neato; splines=line; node[shape=box]; a[pos="0,0!"]; '
              'b[pos="1.5,0!"]; c[pos="3,0!"]; a->c}')          # a straight line through b
    assert dot_overlaps(pinned) == ["edge a->c through b"]
