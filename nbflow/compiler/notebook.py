"""Notebook -> Workflow IR: the compiler proper.

    compile_notebook(source, *, name=None) -> Workflow   # path, NotebookNode or list of cells
    compile_file(path) -> Workflow                       # .ipynb, .bpmn/.xml or .json (IR)
    load_notebook(path) -> NotebookNode                  # with clear errors
    parse_duration(text) -> float                        # "1h30m" -> 5400.0

Dependencies are inferred from names: a task reading a name that another task assigns runs
after it and receives its value. The producer of a name read by task T is the nearest task
*above* T in the notebook that assigns it (or a later task T runs ``--after``); two producers
with no order between them are an error. Parameters (the ``parameters``-tagged cell) and names
only setup cells define are available everywhere and are not edges.

Cells are numbered 1-based among *all* cells of the notebook (see ``cells.py``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

from nbflow.compiler.cells import (
    ParsedNotebook,
    TaskSpec,
    parse_duration,
    parse_notebook_cells,
    where,
)
from nbflow.compiler.names import BUILTIN_NAMES
from nbflow.core.ir import Edge, Node, Workflow, describe
from nbflow.errors import WorkflowError

__all__ = ["compile_notebook", "compile_file", "load_notebook", "parse_duration", "Workflow",
           "Node", "Edge", "WorkflowError", "TaskSpec"]

NO_TASKS = "no %%task cells found — mark a cell with `%%task NAME`"


def load_notebook(path: str | os.PathLike) -> Any:
    """Read an .ipynb file as a v4 notebook (attribute access like nbformat's NotebookNode);
    WorkflowError if it is not one."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise WorkflowError(f"notebook not found: {p}") from None
    except IsADirectoryError:
        raise WorkflowError(f"{p} is a directory, not a notebook") from None
    except OSError as e:
        raise WorkflowError(f"cannot read {p}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkflowError(f"{p} is not a notebook: not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{p} is not a notebook: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or "nbformat" not in data:
        raise WorkflowError(f"{p} is not a notebook: JSON without an 'nbformat' version")
    if data.get("nbformat") == 4:
        # the common case, without importing nbformat: its JSON-schema validator costs ~1.6 s of
        # imports (jsonschema -> rfc3987_syntax builds a grammar) on every `nbflow run`
        return _v4(p, data)
    import nbformat

    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as e:  # nbformat raises assorted errors for malformed notebooks
        raise WorkflowError(f"{p} is not a valid notebook: {e}") from None
    if not isinstance(nb.get("cells"), list):
        raise WorkflowError(f"{p} is not a valid notebook: no cells")
    return nb


class _Node(dict):
    """A dict with attribute access, like nbformat's NotebookNode (which we avoid importing)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _v4(p: str, data: dict) -> _Node:
    """A v4 notebook from its JSON, checked cheaply (what the compiler reads), sources joined."""
    cells = data.get("cells")
    if not isinstance(cells, list):
        raise WorkflowError(f"{p} is not a valid notebook: no cells")
    out = []
    for i, c in enumerate(cells, 1):
        if not isinstance(c, dict) or not isinstance(c.get("cell_type"), str):
            raise WorkflowError(f"{p} is not a valid notebook: cell {i} has no cell_type")
        src = c.get("source", "")
        if isinstance(src, list) and all(isinstance(x, str) for x in src):
            src = "".join(src)
        if not isinstance(src, str):
            raise WorkflowError(f"{p} is not a valid notebook: cell {i}'s source is not text")
        meta = c.get("metadata")
        out.append(_Node(c, source=src, metadata=_Node(meta if isinstance(meta, dict) else {})))
    return _Node(data, cells=out, metadata=_Node(data.get("metadata") or {}))


def _cells_of(source: Any) -> tuple[list[Any], str, str | None]:
    """(cells, default name, absolute path or None) of any accepted notebook source."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(source))
        nb = load_notebook(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return list(nb.cells), stem, path
    if isinstance(source, dict):
        if not isinstance(source.get("cells"), list):
            raise WorkflowError("not a notebook: expected a dict with a 'cells' list")
        return list(source["cells"]), "notebook", None
    if isinstance(source, Iterable):
        return list(source), "notebook", None
    raise WorkflowError(f"cannot compile {type(source).__name__}: pass a path, a notebook or a "
                        "list of cells")


def compile_notebook(source: Any, *, name: str | None = None) -> Workflow:
    """Compile a notebook (path, NotebookNode/dict or list of cells) into a validated Workflow.
    Warnings (sentences naming cells) are in ``wf.warnings``; ``wf.notes`` says which orders
    were inferred from files one task writes and another reads (:func:`file_handoffs`)."""
    cells, default_name, path = _cells_of(source)
    parsed = parse_notebook_cells(cells)
    if not parsed.tasks:
        where_ = f"{path}: " if path else ""
        raise WorkflowError(where_ + NO_TASKS)
    check_setup_reads(parsed)
    wf = build_workflow(parsed, name=name or default_name, source=path)
    # not part of the IR (nor of its content hash): sentences naming cells
    wf.notes, handoff_warnings = file_handoffs(parsed, wf)
    wf.warnings = lint(parsed, wf) + handoff_warnings
    return wf


def _setup_where(cell: int, line: str) -> str:
    return f"setup cell {cell} `{line}`"


def check_setup_reads(parsed: ParsedNotebook) -> None:
    """A setup cell runs before every task, in each task's kernel: it cannot read what only a
    task assigns."""
    by_task: dict[str, TaskSpec] = {}
    for s in parsed.tasks:
        for x in s.defines:
            by_task.setdefault(x, s)
    for cell, line, reads in parsed.setup_cells:
        for x in sorted(reads):
            if x in by_task and x not in parsed.setup_names and x not in parsed.param_names:
                t = by_task[x]
                raise WorkflowError(
                    f"{_setup_where(cell, line)} reads {x!r}, which only task {t.name!r} "
                    f"(cell {t.cell} `{t.first_line}`) assigns. Setup cells run before every "
                    f"task, so they never see task results: make cell {cell} a task "
                    f"(`%%task NAME` as its first line) or assign {x!r} in a setup cell")


def lint(parsed: ParsedNotebook, wf: Workflow) -> list[str]:
    """Compile-time warnings: names nothing assigns, in-place changes of upstream values (files
    handed from task to task: :func:`file_handoffs`)."""
    from nbflow.compiler.cells import parse_python
    from nbflow.compiler.names import KERNEL_NAMES, in_place_changes

    out: list[str] = []
    assigned = set(parsed.param_names) | parsed.setup_names | BUILTIN_NAMES | KERNEL_NAMES
    for s in parsed.tasks:
        assigned |= s.defines
    for cell, line, reads in parsed.setup_cells:
        for x in sorted(reads - assigned):
            out.append(f"{_setup_where(cell, line)} reads {x!r}, which no cell assigns "
                       f"(a typo, or a name from a module nbflow cannot see?)")
    for s in parsed.tasks:
        node = wf.node(s.name)
        own = {v for v in (s.map_var, s.wait_signal) if v}
        for x in sorted(s.reads - assigned - own):
            out.append(f"{describe(node)} reads {x!r}, which no cell assigns (a typo?)")
        try:
            tree = parse_python(s.code, f"task {s.name!r}")
        except WorkflowError:
            continue
        upstream = set(node.sources) - s.defines
        seen: set[str] = set()
        for x, stmt in in_place_changes(tree, upstream):
            if x in seen:
                continue
            seen.add(x)
            out.append(
                f"{describe(node)} changes {x!r} in place (`{stmt}`), but {x!r} comes from task "
                f"{node.sources[x]!r}: tasks downstream get {node.sources[x]!r}'s {x!r}, not "
                f"this change. Rebind it instead (e.g. `{x} = {x}.dropna()` or "
                f"`{x} = {x} + [item]`), then {x!r} is this task's output")
    return out


def shared_path(p: str) -> bool:
    """A path every task of a run sees the same: absolute, under ``~`` or a URL (s3://...).
    A relative path resolves in the task's own copy of the notebook's folder (the bundle)."""
    return os.path.isabs(p) or p.startswith("~") or "://" in p


def file_handoffs(parsed: ParsedNotebook, wf: Workflow) -> tuple[list[str], list[str]]:
    """Tasks that write and read the same literal file path: ``(notes, warnings)``.

    A shared path (absolute, ``~``, URL) written by W and read by R that nothing orders gets an
    inferred edge W -> R (``Edge.files``; the DAG picture draws it dashed) and a note saying so;
    when R already runs before W, the edge would be a cycle: a warning names both cells. A
    relative path cannot hand a file over at all (each task runs in its own copy of the folder
    and its writes there are discarded when it ends): a warning says so and how to fix it."""
    from nbflow.compiler.cells import parse_python
    from nbflow.compiler.names import literal_files

    files: dict[str, tuple[set[str], set[str]]] = {}
    for s in parsed.tasks:
        try:
            files[s.name] = literal_files(parse_python(s.code, f"task {s.name!r}"))
        except WorkflowError:
            continue
    notes: list[str] = []
    warnings: list[str] = []
    inferred: dict[tuple[str, str], Edge] = {}
    for w, (written, _) in files.items():
        for r, (_, read) in files.items():
            if w == r:
                continue
            for p in sorted(written & read):
                W, R = describe(wf.node(w)), describe(wf.node(r))
                if not shared_path(p):
                    warnings.append(
                        f"{R} reads {p!r}, which {W} writes, but a relative path cannot hand a "
                        f"file from one task to another: each task runs in its own copy of the "
                        f"notebook's folder, and what it writes there is discarded when it "
                        f"ends, so {r!r} would read the folder's original or find no file. "
                        f"Pass the data as a variable (assign it in {w!r}, use it in {r!r}), or "
                        f"write to an absolute path (e.g. /data/{p.lstrip('./')}): then nbflow "
                        f"runs {w!r} before {r!r} by itself. (Only `nbflow run --no-bundle`, "
                        f"on a folder the workers share, keeps relative writes; then add "
                        f"`--after {w}` to task {r!r}.)")
                elif w in wf.ancestors(r):
                    if (w, r) in inferred:
                        inferred[(w, r)].files.append(p)
                    continue
                elif r in wf.ancestors(w):
                    warnings.append(
                        f"{R} reads {p!r}, which {W} writes, but {w!r} runs after {r!r} (it "
                        f"depends on it), so {r!r} reads what an earlier run left there. Pass "
                        f"the data as a variable, or have {r!r} read it in a task after {w!r}")
                else:
                    inferred[(w, r)] = _add_order(wf, w, r, p)
    for (w, r), edge in inferred.items():
        names = ", ".join(repr(p) for p in edge.files)
        notes.append(f"{describe(wf.node(r))} runs after {describe(wf.node(w))}: it reads "
                     f"{names}, which {w!r} writes (an order inferred from the file; "
                     f"`nbflow show` draws it dashed)")
    return notes, warnings


def _add_order(wf: Workflow, w: str, r: str, path: str) -> Edge:
    """The inferred edge w -> r, replacing ``start -> r`` and ``w -> end`` (the shape
    build_workflow emits: start -> roots, leaves -> end)."""
    wf.edges = [e for e in wf.edges
                if not ((e.source == "start" and e.target == r) or
                        (e.source == w and e.target == "end"))]
    edge = Edge(w, r, files=[path])
    wf.edges.append(edge)
    return edge


def _node(spec: TaskSpec) -> Node:
    return Node(id=spec.name, kind="task", code=spec.code, cell=spec.cell,
                first_line=spec.first_line, line_offset=spec.line_offset, doc=spec.doc,
                **spec.node_options())


def build_workflow(parsed: ParsedNotebook, *, name: str, source: str | None = None) -> Workflow:
    """Resolve producers, emit the IR (start -> tasks -> end) and validate it."""
    specs = parsed.tasks
    task_nodes = [_node(s) for s in specs]
    start, end = Node(id="start", kind="start"), Node(id="end", kind="end")
    after_edges = [Edge(a, n.id) for n in task_nodes for a in n.after]
    # 1. names, --after targets and cycles through --after, before reasoning about data
    Workflow(name, [start, *task_nodes, end], after_edges).validate()
    ordering = Workflow(name, task_nodes, after_edges)

    order = {s.name: i for i, s in enumerate(specs)}
    by_name = {n.id: n for n in task_nodes}
    definers: dict[str, list[str]] = {}
    for s in specs:
        for x in s.defines:
            definers.setdefault(x, []).append(s.name)

    # 2. producers: nearest task above that assigns the name (or a later one we run --after)
    data: dict[tuple[str, str], set[str]] = {}
    rivals: list[tuple[str, str, str, list[str]]] = []   # (reader, name, producer, others)
    for s in specs:
        k = order[s.name]
        after_anc = None
        for x in sorted(s.reads):
            cands = [p for p in definers.get(x, []) if p != s.name]
            above = [p for p in cands if order[p] < k]
            if not above:
                below = [p for p in cands if order[p] > k]
                if not below:
                    continue
                if after_anc is None:
                    after_anc = ordering.ancestors(s.name)
                above = [p for p in below if p in after_anc]
                if not above:
                    if x in parsed.param_names or x in parsed.setup_names or x in BUILTIN_NAMES:
                        continue
                    p = by_name[below[0]]
                    raise WorkflowError(
                        f"{describe(by_name[s.name])} reads {x!r}, which only a task further "
                        f"down assigns: {describe(p)}. Move the cell below it or add "
                        f"`--after {p.id}`")
            producer = above[-1]
            data.setdefault((producer, s.name), set()).add(x)
            by_name[s.name].sources[x] = producer
            rivals.append((s.name, x, producer, above[:-1]))
        if s.map_over and s.map_over not in by_name[s.name].sources and \
                s.map_over not in parsed.param_names:
            raise WorkflowError(
                f"{describe(by_name[s.name])}: --map over a name nothing defines: "
                f"{s.map_over!r} is neither a parameter nor assigned by a task above")

    for n in task_nodes:
        n.inputs = sorted(n.sources)
        n.sources = dict(sorted(n.sources.items()))
    for (p, _t), names in data.items():
        by_name[p].outputs = sorted(set(by_name[p].outputs) | names)

    # 3. edges: task -> task (data and --after merged), start -> roots, leaves -> end
    pairs: dict[tuple[str, str], set[str]] = {}
    for e in after_edges:
        pairs.setdefault((e.source, e.target), set())
    for key, names in data.items():
        pairs.setdefault(key, set()).update(names)
    inner = [Edge(src, dst, sorted(names)) for (src, dst), names in
             sorted(pairs.items(), key=lambda kv: (order[kv[0][1]], order[kv[0][0]]))]
    has_pred = {e.target for e in inner}
    has_succ = {e.source for e in inner}
    edges = ([Edge("start", n.id) for n in task_nodes if n.id not in has_pred] + inner
             + [Edge(n.id, "end") for n in task_nodes if n.id not in has_succ])
    wf = Workflow(name=name, nodes=[start, *task_nodes, end], edges=edges,
                  params=dict(parsed.params), params_source=parsed.params_source,
                  setup=list(parsed.setup), source=source)
    wf.validate()

    # 4. two producers of one name with no order between them
    anc: dict[str, set[str]] = {}
    for reader, x, producer, others in rivals:
        for o in others:
            a_p = anc.setdefault(producer, wf.ancestors(producer))
            a_o = anc.setdefault(o, wf.ancestors(o))
            if o not in a_p and producer not in a_o:
                raise WorkflowError(
                    f"ambiguous {x!r} read by {describe(by_name[reader])}: both "
                    f"{describe(by_name[o])} and {describe(by_name[producer])} assign it and "
                    f"neither runs before the other. Add `--after {o}` to task {producer!r}, "
                    f"or rename one of the variables")
    return wf


def compile_file(path: str | os.PathLike) -> Workflow:
    """By suffix: .ipynb (notebook), .bpmn/.xml (BPMN 2.0), .json (workflow IR)."""
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if ext == ".ipynb":
        return compile_notebook(p)
    if ext in (".bpmn", ".xml"):
        if not os.path.exists(p):
            raise WorkflowError(f"file not found: {p}")
        from nbflow.compiler.bpmn import from_bpmn

        return from_bpmn(p).validate()
    if ext == ".json":
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise WorkflowError(f"file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise WorkflowError(f"cannot read {p}: {e}") from None
        return Workflow.from_json(text).validate()
    raise WorkflowError(f"cannot compile {p!r}: expected a .ipynb notebook, a .bpmn/.xml "
                        "BPMN 2.0 file or a .json workflow")
