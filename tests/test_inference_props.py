"""Property: for random DAGs of tasks, inferred edges are exactly the generated dependencies."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nbflow.compiler import compile_notebook


@st.composite
def dags(draw):
    n = draw(st.integers(min_value=1, max_value=8))
    deps: list[set[int]] = []
    for i in range(n):
        deps.append(set(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else set())
    after: list[set[int]] = []
    for i in range(n):
        after.append(set(draw(st.sets(st.integers(0, i - 1), max_size=1))) - deps[i] if i else set())
    style = draw(st.lists(st.sampled_from(["plain", "aug", "comp", "func"]), min_size=n, max_size=n))
    return n, deps, after, style


def build(n, deps, after, style):
    cells = [{"cell_type": "code", "source": "seed = 1", "metadata": {"tags": ["parameters"]}},
             "import math\ndef helper(*a):\n    return len(a)"]
    for i in range(n):
        reads = [f"v{j}" for j in sorted(deps[i])]
        expr = " + ".join(reads) if reads else "seed"
        if style[i] == "aug":
            body = f"v{i} = seed\nv{i} += {expr}"
        elif style[i] == "comp":
            body = f"v{i} = sum(k for k in [{expr}, seed])\nlocal_{i} = [q for q in range(3)]"
        elif style[i] == "func":
            body = f"def f{i}(z):\n    tmp = z * 2\n    return tmp + helper()\nv{i} = f{i}({expr})"
        else:
            body = f"v{i} = math.floor({expr})"
        opts = (" --after " + " ".join(f"t{j}" for j in sorted(after[i]))) if after[i] else ""
        cells.append({"cell_type": "markdown", "source": f"## step {i}"})
        cells.append(f"%%task t{i}{opts}\n{body}")
    return cells


@settings(max_examples=60, deadline=None)
@given(dags())
def test_inferred_edges_equal_generated_dependencies(dag):
    n, deps, after, style = dag
    wf = compile_notebook(build(n, deps, after, style), name="prop")
    inner = {(e.source, e.target): e.data for e in wf.edges
             if e.source != "start" and e.target != "end"}
    expected = {}
    for i in range(n):
        for j in deps[i]:
            expected[(f"t{j}", f"t{i}")] = [f"v{j}"]
        for j in after[i]:
            expected[(f"t{j}", f"t{i}")] = []
    assert inner == expected
    for i in range(n):
        node = wf.node(f"t{i}")
        assert node.inputs == sorted(f"v{j}" for j in deps[i])
        assert node.sources == {f"v{j}": f"t{j}" for j in deps[i]}
        readers = [k for k in range(n) if i in deps[k]]
        assert node.outputs == ([f"v{i}"] if readers else [])
        assert node.doc == f"step {i}"
    roots = [f"t{i}" for i in range(n) if not deps[i] and not after[i]]
    assert wf.successors("start") == roots
    again = compile_notebook(build(n, deps, after, style), name="prop")
    assert again.content_hash() == wf.content_hash()
    assert again.to_json() == wf.to_json()
