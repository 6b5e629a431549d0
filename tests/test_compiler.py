"""A notebook goes in, a workflow comes out: inference, options, and every error names its cell."""
from __future__ import annotations

import json
import os

import pytest

from nbflow.compiler import (
    Edge,
    Node,
    Workflow,
    WorkflowError,
    compile_file,
    compile_notebook,
    load_notebook,
    parse_duration,
)
from nbflow.compiler.cells import parse_python, strip_nbflow_lines
from nbflow.compiler.names import analyze_names

DATA = os.path.join(os.path.dirname(__file__), "data")


def nb(name: str) -> str:
    return os.path.join(DATA, name + ".ipynb")


def data_edges(wf: Workflow) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(e.source, e.target, tuple(e.data)) for e in wf.edges
            if e.source != "start" and e.target != "end"}


def names(src: str) -> tuple[set[str], set[str]]:
    return analyze_names(parse_python(src, "test"))


# --- the example from the issue ---------------------------------------------------------------

def test_sales_notebook_compiles_into_the_expected_workflow():
    wf = compile_notebook(nb("sales"))
    assert wf.name == "sales"
    assert wf.source == os.path.abspath(nb("sales"))
    assert [n.id for n in wf.nodes] == ["start", "extract", "by_region", "publish", "end"]
    assert wf.params == {"day": "2026-11-20", "regions": ["north", "south"]}
    assert "regions = [" in wf.params_source
    assert wf.setup == ["import json\nfrom salesutil import load, write",
                        'def fmt(x):\n    return f"{x:,.2f}"']          # %load_ext stripped
    assert data_edges(wf) == {("extract", "by_region", ("sales",)),
                              ("by_region", "publish", ("total",))}
    assert wf.successors("start") == ["extract"] and wf.predecessors("end") == ["publish"]

    ex, br, pub = wf.node("extract"), wf.node("by_region"), wf.node("publish")
    assert (ex.retries, ex.retry_delay, ex.timeout) == (3, 10.0, 600.0)
    assert ex.outputs == ["sales"] and ex.inputs == [] and ex.code == "sales = load(day)"
    assert ex.cell == 7 and ex.first_line.startswith("%%task extract --retries 3")
    assert ex.doc == "Extract\n\nRead the raw sales rows for `day`."
    assert br.doc == "Totals per region"
    assert (br.map_var, br.map_over) == ("region", "regions")
    assert br.inputs == ["sales"] and br.sources == {"sales": "extract"} and br.outputs == ["total"]
    assert pub.approval == "Publish the report?" and pub.when == "sum(total) > 0"
    assert pub.inputs == ["total"] and pub.sources == {"total": "by_region"}
    assert pub.doc == ""            # the cell before it is a (skipped) code cell


def test_content_hash_is_deterministic_and_ignores_the_path(tmp_path):
    a = compile_notebook(nb("sales"))
    b = compile_notebook(nb("sales"))
    assert a.content_hash() == b.content_hash()
    copy = tmp_path / "sales.ipynb"
    copy.write_bytes(open(nb("sales"), "rb").read())
    assert compile_notebook(str(copy)).content_hash() == a.content_hash()
    assert Workflow.from_json(a.to_json()).content_hash() == a.content_hash()


def test_diamond_and_chain():
    d = compile_notebook(nb("diamond"))
    assert data_edges(d) == {("a", "b", ("xs",)), ("a", "c", ("xs",)),
                             ("b", "d", ("evens",)), ("c", "d", ("odds",))}
    assert d.node("a").inputs == []            # `n` is a parameter: not an edge
    c = compile_notebook(nb("chain"))
    # --after two adds an ordering edge without data; `math` (setup) is not an edge
    assert data_edges(c) == {("one", "two", ("a",)), ("two", "three", ("b",)),
                             ("two", "four", ()), ("three", "four", ("c",))}
    assert c.node("four").after == ["two"]
    assert c.setup == ["import math"]


def test_fanout_options_and_join():
    wf = compile_notebook(nb("fanout"))
    pf = wf.node("per_file")
    assert (pf.map_var, pf.map_over, pf.queue, pf.isolation) == ("f", "files", "io", "fresh")
    assert pf.inputs == ["sizes"]                 # `files` is a parameter, `f` is bound by --map
    assert sorted(wf.predecessors("join")) == ["left", "per_file", "right"]
    assert wf.successors("start") == ["listing"]


def test_conditions_read_upstream_outputs():
    wf = compile_notebook(nb("conditions"))
    assert wf.node("alert").when == "value > threshold"
    assert wf.node("alert").inputs == ["value"]
    assert wf.node("ok").inputs == ["value"]
    assert wf.node("measure").outputs == ["value"]


def test_gates_timers_and_signals():
    wf = compile_notebook(nb("approvals"))
    review, wait, at6 = wf.node("review"), wf.node("wait"), wf.node("at_six")
    assert review.approval == "Is the draft good?" and review.approval_timeout == 172800.0
    assert review.code == "" and not review.needs_worker
    assert wait.sleep == 7200.0 and not wait.needs_worker
    assert at6.at == "2026-11-20T06:00:00+00:00"
    assert sorted(wf.predecessors("send")) == ["at_six", "prepare", "review", "wait"]
    assert wf.node("send").sources == {"report": "prepare"}
    s = compile_notebook(nb("signals"))
    ans = s.node("answer")
    assert ans.wait_signal == "reply" and ans.inputs == ["question"]   # `reply` is bound
    assert s.node("act").timeout == 5400.0


def test_accepts_cells_and_notebook_nodes():
    cells = ["%%task a\nx = 1", {"cell_type": "code", "source": ["%%task b\n", "y = x"]}]
    wf = compile_notebook(cells, name="mini")
    assert wf.name == "mini" and wf.source is None
    assert data_edges(wf) == {("a", "b", ("x",))}
    nbn = load_notebook(nb("diamond"))
    assert compile_notebook(nbn).content_hash() == compile_notebook(nbn).content_hash()


def test_compile_file_by_suffix(tmp_path):
    wf = compile_file(nb("diamond"))
    p = tmp_path / "wf.json"
    p.write_text(wf.to_json())
    assert compile_file(str(p)).content_hash() == wf.content_hash()
    with pytest.raises(WorkflowError, match=r"expected a \.ipynb notebook"):
        compile_file(str(tmp_path / "x.txt"))
    with pytest.raises(WorkflowError, match="file not found"):
        compile_file(str(tmp_path / "missing.json"))


# --- inference rules --------------------------------------------------------------------------

@pytest.mark.parametrize("src, defines, reads", [
    ("x = y + 1", {"x"}, {"y"}),
    ("x = 1\ny = x", {"x", "y"}, set()),
    ("x = x + 1", {"x"}, {"x"}),
    ("x += 1", {"x"}, {"x"}),
    ("x: int = n", {"x"}, {"int", "n"}),
    ("x: int", set(), {"int"}),
    ("for i in items:\n    acc = i", {"i", "acc"}, {"items"}),
    ("with open(p) as f:\n    data = f.read()", {"f", "data"}, {"open", "p"}),
    ("import os.path\nimport numpy as np\nfrom a import b as c", {"os", "np", "c"}, set()),
    ("def f(a, b=d):\n    t = a + g\n    return t\n", {"f"}, {"d", "g"}),
    ("def f():\n    return h\nh = 1", {"f", "h"}, set()),
    ("class K(Base):\n    z = 1\n    w = z", {"K"}, {"Base"}),
    ("ys = [v * k for v in vs if v]", {"ys"}, {"k", "vs"}),
    ("d = {k: v for k, v in pairs}", {"d"}, {"pairs"}),
    ("if (m := find()):\n    r = m", {"m", "r"}, {"find"}),
    ("any((hit := x) for x in xs)", {"hit"}, {"any", "xs"}),
    ("f = lambda q: q + off", {"f"}, {"off"}),
    ("try:\n    a = 1\nexcept E as err:\n    b = err", {"a", "b", "err"}, {"E"}),
    ("x = 1\ndel x", set(), set()),
    ("!ls -l\nfiles = !ls\ny = z", {"files", "y"}, {"get_ipython", "z"}),
    ("match cmd:\n    case [a, *rest]:\n        q = rest", {"a", "rest", "q"}, {"cmd"}),
])
def test_names_defined_and_read(src, defines, reads):
    assert names(src) == (defines, reads)


def test_nearest_preceding_producer_wins_when_ordered():
    wf = compile_notebook(["%%task a\nx = 1", "%%task b\nx = x + 1", "%%task c\nprint(x)"])
    assert wf.node("c").sources == {"x": "b"}
    assert wf.node("b").sources == {"x": "a"}
    assert wf.node("a").outputs == ["x"] and wf.node("b").outputs == ["x"]


def test_after_orders_two_producers():
    wf = compile_notebook(["%%task a\nx = 1", "%%task b --after a\nx = 2", "%%task c\nprint(x)"])
    assert wf.node("c").sources == {"x": "b"}
    assert wf.node("a").outputs == []          # nobody reads a's x


def test_params_and_setup_names_are_not_edges_unless_reassigned():
    cells = [
        {"cell_type": "code", "source": "day = '2026-01-01'\nnow = day.upper()",
         "metadata": {"tags": ["parameters"]}},
        "def helper():\n    return 1",
        "%%task a\nx = helper() + len(day)",
        "%%task b\nday = 'other'",
        "%%task c\nprint(day, now)",
    ]
    wf = compile_notebook(cells)
    assert wf.params == {"day": "2026-01-01"}           # non-literal `now` kept out of params
    assert "now = day.upper()" in wf.params_source
    assert wf.node("a").inputs == []
    assert wf.node("c").sources == {"day": "b"}


def test_skip_cells_and_flow_lines_are_left_out():
    cells = [
        "%load_ext nbflow\nimport os\n%flow show\n%reload_ext nbflow",
        {"cell_type": "code", "source": "raise SystemExit('never')", "metadata": {"tags": ["skip"]}},
        "%%flow\nwhatever",
        "%%task a\nx = os.getcwd()",
    ]
    wf = compile_notebook(cells)
    assert wf.setup == ["import os"]
    assert strip_nbflow_lines("  %flow run day=1\nx = 1") == "x = 1"


def test_reading_a_name_only_a_later_task_assigns_is_an_error():
    with pytest.raises(WorkflowError) as e:
        compile_notebook(["%%task a\nprint(x)", "%%task b\nx = 1"])
    msg = str(e.value)
    assert "task 'a' (cell 1 `%%task a`)" in msg and "'x'" in msg and "task 'b' (cell 2" in msg
    # ... unless the reader explicitly runs after it
    wf = compile_notebook(["%%task a --after b\nprint(x)", "%%task b\nx = 1"])
    assert wf.node("a").sources == {"x": "b"}


# --- durations --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("250ms", 0.25),
    ("90", 90), ("1.5", 1.5), ("1.5h", 5400), (12, 12.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "-5", "1h30", "h", "5 minutes"])
def test_parse_duration_rejects(text):
    with pytest.raises(WorkflowError, match="bad duration"):
        parse_duration(text)


# --- errors name the cell, its first line and the task ----------------------------------------

# each bad notebook (tests/data/<name>.ipynb or its cells) and what its one error must say
BAD = [
    ("bad_cycle", ["a (cell 1) -> b (cell 2) -> c (cell 3) -> a (cell 1)"]),
    ("bad_syntax", ["cell 3 `%%task broken`", "task 'broken'", "line 2 of the cell", "y = x +"]),
    (["%load_ext nbflow\nimport os\ndef f(:\n    pass", "%%task a\nx = 1"],
     ["cell 1 `%load_ext nbflow`", "setup", "line 3"]),                  # a setup cell
    ("bad_after", ["task 'report' (cell 2 `%%task report --after extrct`)", "'extrct'",
                   "did you mean 'extract'?"]),
    ("bad_duplicate", ["duplicate task name 'load'", "cell 1 `%%task load`",
                       "cell 3 `%%task load --retries 2`"]),
    ("bad_ambiguous", ["ambiguous 'total'", "task 'north' (cell 1 `%%task north`)",
                       "task 'south' (cell 2 `%%task south`)", "task 'report' (cell 3"]),
    ("bad_map", ["--map over a name nothing defines", "'items'",
                 "cell 2 `%%task each --map item in items`"]),
]


@pytest.mark.parametrize("source,says", BAD, ids=[b[0] if isinstance(b[0], str) else "bad_setup"
                                                  for b in BAD])
def test_a_bad_notebook_is_one_error_naming_the_cell(source, says):
    with pytest.raises(WorkflowError) as e:
        compile_notebook(nb(source) if isinstance(source, str) else source)
    msg = str(e.value)
    assert [s for s in says if s not in msg] == [], msg


def test_empty_and_not_a_notebook(tmp_path):
    with pytest.raises(WorkflowError, match="no %%task cells found — mark a cell with `%%task NAME`"):
        compile_notebook(nb("empty"))
    with pytest.raises(WorkflowError, match="is not a notebook: not JSON"):
        compile_notebook(nb("not_a_notebook"))
    with pytest.raises(WorkflowError, match="notebook not found"):
        compile_notebook(str(tmp_path / "nope.ipynb"))
    latin = tmp_path / "latin.ipynb"
    latin.write_bytes("{'caf\u00e9'}".encode("latin-1"))
    with pytest.raises(WorkflowError, match="not UTF-8"):
        compile_notebook(str(latin))
    other = tmp_path / "other.ipynb"
    other.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(WorkflowError, match="not a notebook"):
        compile_notebook(str(other))
    with pytest.raises(WorkflowError, match="no %%task cells"):
        compile_notebook([])


@pytest.mark.parametrize("line, expected", [
    ("%%task x --retries many", "invalid int value: 'many'"),
    ("%%task x --bogus", "unrecognized arguments: --bogus"),
    ("%%task x --timeout soon", "--timeout: bad duration 'soon'"),
    ("%%task x --map region regions", "expected 3 argument"),
    ("%%task x --map region of regions", "malformed --map"),
    ("%%task x --isolation shared", "invalid choice: 'shared'"),
    ("%%task x --when 'a >'", "--when 'a >' is not a Python expression"),
    ("%%task x --at tomorrow", "bad --at 'tomorrow'"),
    ("%%task x --wait-signal 'my signal'", "must be a Python identifier"),
    ("%%task x --queue a.b", "bad --queue"),
    ("%%task x --retries -1", "--retries must be 0 or more"),
    ("%%task x --approval 'unclosed", "cannot split the options"),
    ("%%task x -h", "bad options"),
    ("%%task", "a %%task needs a name"),
    ("%%task my.task", "bad task name 'my.task'"),
    ("%%task start", "'start' is reserved"),
])
def test_bad_options_are_one_clear_error(line, expected):
    with pytest.raises(WorkflowError) as e:
        compile_notebook(["import os", line + "\nx = 1"])
    msg = str(e.value)
    assert expected in msg
    assert f"cell 2 `{line}`" in msg


def test_validate_catches_hand_made_ir_problems():
    def wf(nodes, edges):
        return Workflow("w", [Node("start", "start"), *nodes, Node("end", "end")], edges)

    t = Node("t", "task", cell=3, first_line="%%task t")
    wf([t], [Edge("start", "t"), Edge("t", "end")]).validate()
    with pytest.raises(WorkflowError, match="unknown node 'ghost'"):
        wf([t], [Edge("start", "ghost")]).validate()
    with pytest.raises(WorkflowError, match="exactly one start"):
        Workflow("w", [t, Node("end", "end")]).validate()
    with pytest.raises(WorkflowError, match="bad name 'a b'"):
        wf([Node("a b", "task")], []).validate()
    with pytest.raises(WorkflowError, match="bad name 'a#1'"):
        wf([Node("a#1", "task")], []).validate()
    with pytest.raises(WorkflowError, match="unknown node kind"):
        wf([Node("g", "inclusive")], []).validate()
    with pytest.raises(WorkflowError, match=r"t \(cell 3\) -> u -> t \(cell 3\)"):
        wf([t, Node("u", "task")], [Edge("t", "u"), Edge("u", "t")]).validate()


# --- errors and warnings that point at the cause -------------------------------------------------

def _compile(cells, params=None):
    from nbflow.compiler import compile_notebook

    nb = [{"cell_type": "code", "source": params, "metadata": {"tags": ["parameters"]}}] \
        if params else []
    return compile_notebook(nb + [{"cell_type": "code", "source": c, "metadata": {}}
                                  for c in cells])


def test_setup_cell_reading_a_task_result_names_both_cells():
    with pytest.raises(WorkflowError) as e:
        _compile(["%%task load\ndf = [1, 2]", "top = df[:1]"])
    msg = str(e.value)
    assert "setup cell 2 `top = df[:1]` reads 'df', which only task 'load' (cell 1" in msg
    assert "make cell 2 a task" in msg


def test_a_name_no_cell_assigns_is_a_warning_naming_the_cell():
    wf = _compile(["import math", "%%task a\nx = 1", "%%task b\ny = x + totl + math.pi + len([])"])
    assert wf.warnings == ["task 'b' (cell 3 `%%task b`) reads 'totl', which no cell assigns "
                           "(a typo?)"]


def test_in_place_change_of_an_upstream_value_warns_how_to_rebind():
    wf = _compile(["%%task load\ndf = make()\nrows = []", "%%task clean\ndf.dropna(inplace=True)\n"
                   "rows.append(1)", "%%task use\nn = len(df) + len(rows)"], params="make = list")
    text = "\n".join(wf.warnings)
    assert "task 'clean' (cell 3 `%%task clean`) changes 'df' in place " \
           "(`df.dropna(inplace=True)`), but 'df' comes from task 'load'" in text
    assert "changes 'rows' in place (`rows.append(1)`)" in text and "Rebind it" in text


def test_a_file_handed_over_by_absolute_path_orders_the_tasks_with_a_dashed_edge():
    from nbflow.compiler.render import to_dot

    # the reader comes first in the notebook: without the inferred edge both would be roots
    wf = _compile(["%%task read\nimport pandas as pd\nd = pd.read_csv('/data/x.csv')\n"
                   "t = open('/data/y.txt').read()",
                   "%%task write\nimport pandas as pd\npd.DataFrame().to_csv('/data/x.csv')\n"
                   "open('/data/y.txt', 'w').write('1')"])
    assert wf.warnings == []
    inferred = [e for e in wf.edges if e.files]
    assert [(e.source, e.target, e.files) for e in inferred] == \
        [("write", "read", ["/data/x.csv", "/data/y.txt"])]
    assert wf.predecessors("read") == ["write"] and wf.successors("write") == ["read"]
    assert wf.predecessors("write") == ["start"] and wf.successors("read") == ["end"]
    assert wf.notes == ["task 'read' (cell 1 `%%task read`) runs after task 'write' (cell 2 "
                        "`%%task write`): it reads '/data/x.csv', '/data/y.txt', which 'write' "
                        "writes (an order inferred from the file; `nbflow show` draws it dashed)"]
    line = next(ln for ln in to_dot(wf).splitlines() if '"write" -> "read"' in ln)
    assert 'style=dashed' in line and "file /data/x.csv" in line
    assert not any('dashed' in ln for ln in to_dot(wf).splitlines() if "->" in ln
                   and '"write" -> "read"' not in ln)
    # the IR keeps it (JSON round trip); a workflow without one keeps its old hash (no key)
    from nbflow.core.ir import Workflow
    assert [e.files for e in Workflow.from_json(wf.to_json()).edges if e.files] == \
        [["/data/x.csv", "/data/y.txt"]]
    plain = _compile(["%%task a\nx = 1", "%%task b\ny = x"])
    assert all("files" not in e for e in plain.to_dict()["edges"]) and plain.notes == []


def test_a_file_hand_off_that_would_be_a_cycle_is_a_warning_naming_both():
    wf = _compile(["%%task read\nt = open('/data/x.txt').read()\nn = 1",
                   "%%task write\nopen('/data/x.txt', 'w').write(str(n))"])
    assert not any(e.files for e in wf.edges) and wf.notes == []
    assert len(wf.warnings) == 1
    w = wf.warnings[0]
    assert "task 'read' (cell 1" in w and "reads '/data/x.txt'" in w and "task 'write' (cell 2" in w
    assert "'write' runs after 'read'" in w
    # already ordered by data: nothing to infer, nothing to say
    ok = _compile(["%%task write\nopen('/data/x.txt', 'w').write('1')\nn = 1",
                   "%%task read\nt = open('/data/x.txt').read() * n"])
    assert ok.warnings == [] and ok.notes == [] and not any(e.files for e in ok.edges)


def test_a_relative_file_hand_off_warns_that_it_cannot_work_and_how_to_fix_it():
    for reader in ("%%task read\nimport pandas as pd\nd = pd.read_csv('out/x.csv')",
                   "%%task read --after write\nimport pandas as pd\nd = pd.read_csv('out/x.csv')"):
        wf = _compile(["%%task write\nimport pandas as pd\npd.DataFrame().to_csv('out/x.csv')",
                       reader])
        assert not any(e.files for e in wf.edges) and wf.notes == []
        assert len(wf.warnings) == 1
        w = wf.warnings[0]
        assert "task 'read' (cell 2" in w and "reads 'out/x.csv'" in w and "task 'write' (cell 1" in w
        assert "relative path cannot hand a file from one task to another" in w
        assert "own copy of the notebook's folder" in w
        assert "absolute path (e.g. /data/out/x.csv)" in w and "as a variable" in w


def test_blank_lines_above_the_task_line_are_recorded_for_tracebacks():
    from nbflow.compiler.tasknb import task_notebook
    from nbflow.core.tracebacks import user_cells

    wf = compile_notebook(["%%task a\nx = 1", "\n\n%%task b\ny = x\nraise ValueError(y)"])
    assert wf.node("a").line_offset == 0 and wf.node("b").line_offset == 2
    # absent when 0, so a definition stored by an older version keeps its content hash ...
    d = wf.to_dict()
    assert "line_offset" not in next(n for n in d["nodes"] if n["id"] == "a")
    old = json.loads(wf.to_json())
    for n in old["nodes"]:
        n.pop("line_offset", None)
    assert Workflow.from_dict(old).node("b").line_offset == 0   # ... and reads as before
    task = task_notebook(wf, "b")
    cell = next(c for c in task.cells if c.metadata.get("nbflow", {}).get("task") == "b")
    cell.execution_count = 4
    tb = "Cell In[4], line 2\n      1 y = x\n----> 2 raise ValueError(y)"
    assert user_cells(task, tb) == \
        "cell 2 (task b), line 5\n      4 y = x\n----> 5 raise ValueError(y)"
    del cell.metadata["nbflow"]["offset"]          # a task notebook of an older version
    assert user_cells(task, tb).startswith("cell 2 (task b), line 3\n      2 y = x")
