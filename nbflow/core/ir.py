"""The workflow IR: pure data (nodes, edges, setup code, parameters), its JSON form,
content hash and validation.

Every other part of nbflow speaks this IR: the compiler produces it, BPMN and DOT are views
of it, the engine's state machine walks it, workers run its task nodes.

Node kinds
----------
``start`` / ``end``          one each; instant.
``task``                     a service task: a notebook cell run by a worker. It may also carry
                             ``approval`` (a person approves first), ``wait_signal`` (waits for a
                             signal first), ``sleep``/``at`` (a durable timer first), ``map_var``/
                             ``map_over`` (multi-instance) and ``when`` (a condition evaluated in
                             the task's kernel).  A task whose ``code`` is empty and has no
                             ``when`` never reaches a worker: it is a pure gate (approval, signal
                             or timer) that succeeds once its wait is over.
``parallel``                 a parallel gateway (fork or join); instant.
``exclusive``                an exclusive gateway; instant. Conditions live on its outgoing edges
                             and are evaluated by the *target* task's kernel (never by the engine).

Engine semantics, uniform for every kind: a node becomes ready when all its predecessors are
resolved (succeeded or skipped); if it has predecessors and all of them were skipped, it is
skipped too (skips propagate to what only they feed).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nbflow.errors import WorkflowError

IR_VERSION = 1

NODE_KINDS = ("start", "end", "task", "parallel", "exclusive")
INSTANT_KINDS = ("start", "end", "parallel", "exclusive")
ISOLATIONS = ("run", "fresh", "reuse")

# node ids go into NATS subjects and KV keys: no '.', '#', spaces or wildcards
TASK_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


_FIELDS: dict[type, tuple[str, ...]] = {}
_ATOMS = (str, int, float, bool, type(None))


def _plain(v: Any) -> Any:
    """``dataclasses.asdict`` for the IR: dataclasses to dicts, lists/tuples/dicts rebuilt,
    JSON atoms as they are, anything else deep-copied — the same result (content hashes depend
    on it) without asdict's per-value deepcopy calls, which made hashing a workflow the
    largest cost of submitting a run."""
    t = type(v)
    if t in _ATOMS:
        return v
    names = _FIELDS.get(t)
    if names is None and hasattr(t, "__dataclass_fields__") and not isinstance(v, type):
        names = _FIELDS[t] = tuple(f.name for f in fields(t))
    if names is not None:
        return {n: _plain(getattr(v, n)) for n in names}
    if t is list:
        return [_plain(x) for x in v]
    if t is dict:
        return {_plain(k): _plain(x) for k, x in v.items()}
    return asdict_value(v)


def asdict_value(v: Any) -> Any:
    """What asdict makes of a value that is not a plain list, dict or JSON atom."""
    import copy

    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*[_plain(x) for x in v])
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return type(v)((_plain(k), _plain(x)) for k, x in v.items())
    return copy.deepcopy(v)


@dataclass
class Node:
    id: str                                  # unique; the task name for tasks
    kind: str                                # one of NODE_KINDS
    name: str = ""                           # display label (defaults to id)
    code: str = ""                           # task cell body, without the %%task line
    cell: int | None = None                  # 1-based index among ALL cells of the notebook
    first_line: str = ""                     # the %%task line as written (for error messages)
    line_offset: int = 0                     # blank lines above the %%task line in the cell
    doc: str = ""                            # documentation (preceding markdown heading)
    inputs: list[str] = field(default_factory=list)    # names this task reads from upstream tasks
    outputs: list[str] = field(default_factory=list)   # names this task assigns that others read
    sources: dict[str, str] = field(default_factory=dict)  # input name -> producing task id
    retries: int = 0
    retry_delay: float = 0.0                 # seconds before the 1st retry; doubles each time
    timeout: float | None = None             # seconds per attempt
    queue: str = "default"
    map_var: str | None = None               # --map VAR in OVER
    map_over: str | None = None
    when: str | None = None                  # Python expression, evaluated in the task's kernel
    approval: str | None = None              # prompt; a person must approve before it runs
    approval_timeout: float | None = None    # seconds; no decision by then -> rejected (timeout)
    wait_signal: str | None = None           # signal name; its value is bound to that variable
    sleep: float | None = None               # seconds of durable wait before running
    at: str | None = None                    # ISO-8601 UTC instant to wait for before running
    notebook: str | None = None              # another notebook to run (BPMN import); else own code
    notebook_task: str | None = None         # the task inside that notebook
    isolation: str | None = None             # kernel isolation: "run" | "fresh" | "reuse" | None
    after: list[str] = field(default_factory=list)  # --after targets (ordering edges, no data)

    @property
    def label(self) -> str:
        return self.name or self.id

    @property
    def is_instant(self) -> bool:
        return self.kind in INSTANT_KINDS

    @property
    def needs_worker(self) -> bool:
        """A task node runs on a worker unless it is a pure gate (no code, no condition)."""
        return self.kind == "task" and bool(self.code.strip() or self.when or self.notebook)


@dataclass
class Edge:
    source: str
    target: str
    data: list[str] = field(default_factory=list)   # names flowing along this edge
    condition: str | None = None                     # on flows out of an exclusive gateway
    default: bool = False                            # the gateway's default flow
    files: list[str] = field(default_factory=list)  # an order inferred from these file paths
                                                     # (one task writes, the other reads them)


@dataclass
class Workflow:
    name: str                                # usually the notebook's stem
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # parameter defaults (JSON values)
    params_source: str = ""                  # the parameters cell as written
    setup: list[str] = field(default_factory=list)        # setup cell sources, notebook order
    source: str | None = None                # absolute path of the notebook it came from
    bundle: str | None = None                # hash of the notebook's folder in the object store
    requires: dict[str, str] = field(default_factory=dict)  # module -> submitter's version ("": ?)
    version: int = IR_VERSION

    # --- access -----------------------------------------------------------------------------
    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def tasks(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "task"]

    def param_names(self) -> set[str]:
        """Every parameter a run may set: the JSON defaults plus any other name the parameters
        cell assigns (e.g. ``day = date.today()``, whose value nbflow cannot see)."""
        import ast

        try:
            tree = ast.parse(self.params_source or "")
        except SyntaxError:
            tree = ast.Module(body=[], type_ignores=[])
        names = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                 if isinstance(t, ast.Name)}
        return names | set(self.params)

    def predecessors(self, node_id: str) -> list[str]:
        return [e.source for e in self.edges if e.target == node_id]

    def successors(self, node_id: str) -> list[str]:
        return [e.target for e in self.edges if e.source == node_id]

    def incoming(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.target == node_id]

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)                # what dataclasses.asdict gives, ~5x faster
        for e in d["edges"]:            # absent unless inferred: older versions keep their hash
            if not e.get("files"):
                e.pop("files", None)
        for n in d["nodes"]:            # absent unless set: older versions keep their hash
            if not n.get("line_offset"):
                n.pop("line_offset", None)
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Workflow":
        if not isinstance(d, dict) or "nodes" not in d:
            raise WorkflowError("not a workflow: expected a JSON object with 'nodes' and 'edges'")
        node_fields = {f.name for f in fields(Node)}
        edge_fields = {f.name for f in fields(Edge)}
        nodes = [Node(**{k: v for k, v in n.items() if k in node_fields}) for n in d["nodes"]]
        edges = [Edge(**{k: v for k, v in e.items() if k in edge_fields}) for e in d.get("edges", [])]
        rest = {k: v for k, v in d.items() if k not in ("nodes", "edges")}
        wf_fields = {f.name for f in fields(cls)}
        return cls(nodes=nodes, edges=edges, **{k: v for k, v in rest.items() if k in wf_fields})

    @classmethod
    def from_json(cls, text: str) -> "Workflow":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkflowError(f"workflow JSON is malformed: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def stored(cls, body: bytes | str, wf_hash: str) -> "Workflow":
        """A definition read back from the definitions bucket, where it is kept under its
        content hash: decoded and checked, since definitions are immutable (an altered one
        raises WorkflowError rather than run)."""
        wf = cls.from_json(body.decode() if isinstance(body, bytes) else body)
        if wf.content_hash() != wf_hash:
            raise WorkflowError(f"definition {wf_hash} was altered (its content hashes to "
                                f"{wf.content_hash()}): refusing to run it")
        return wf

    def content_hash(self) -> str:
        """Deterministic version id: sha256 of the canonical JSON without the source path."""
        return self._hash(self.to_dict())

    @staticmethod
    def _hash(d: dict[str, Any]) -> str:
        d = {k: v for k, v in d.items() if k != "source"}
        canon = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def hash_and_json(self) -> tuple[str, str]:
        """``(content_hash(), to_json())`` from one conversion (what storing a definition
        needs)."""
        d = self.to_dict()
        return self._hash(d), json.dumps(d, sort_keys=True, ensure_ascii=False)

    # --- validation -------------------------------------------------------------------------
    def validate(self) -> "Workflow":
        """Raise WorkflowError (a message naming tasks and their cells) unless the graph is sound:
        unique, well-formed node ids; known kinds; exactly one start and one end; edges and
        ``--after`` targets that exist; no cycles. Returns self."""
        seen: dict[str, Node] = {}
        for n in self.nodes:
            if n.kind not in NODE_KINDS:
                raise WorkflowError(f"{describe(n)}: unknown node kind {n.kind!r} "
                                    f"(known: {', '.join(NODE_KINDS)})")
            if not isinstance(n.id, str) or not TASK_NAME_RE.fullmatch(n.id):
                raise WorkflowError(
                    f"{describe(n)}: bad name {n.id!r}: use letters, digits, _ and - "
                    "(starting with a letter or _; no '.', '#' or spaces: names go into NATS "
                    "subjects)")
            if n.id in seen:
                raise WorkflowError(f"duplicate task name {n.id!r}: {describe(seen[n.id], name=False)}"
                                    f" and {describe(n, name=False)}")
            seen[n.id] = n
        for kind in ("start", "end"):
            found = [n.id for n in self.nodes if n.kind == kind]
            if len(found) != 1:
                raise WorkflowError(f"a workflow needs exactly one {kind} node, found "
                                    f"{len(found)}{': ' + ', '.join(found) if found else ''}")
        tasks = [n.id for n in self.nodes if n.kind == "task"]
        for n in self.nodes:
            for a in n.after:
                if a not in seen or a == n.id:
                    hint = suggest(a, [t for t in tasks if t != n.id])
                    why = "a task cannot run after itself" if a == n.id else "no such task"
                    raise WorkflowError(f"{describe(n)}: unknown --after target {a!r} ({why})"
                                        f"{hint}")
            if n.map_var is not None and n.map_over is None or n.map_over is not None and n.map_var is None:
                raise WorkflowError(f"{describe(n)}: --map needs both VAR and NAME")
            if n.isolation is not None and n.isolation not in ISOLATIONS:
                raise WorkflowError(f"{describe(n)}: --isolation must be run, fresh or reuse, "
                                    f"not {n.isolation!r}")
            if n.retries < 0:
                raise WorkflowError(f"{describe(n)}: --retries must be 0 or more")
        for e in self.edges:
            for end in (e.source, e.target):
                if end not in seen:
                    raise WorkflowError(f"edge {e.source} -> {e.target}: unknown node {end!r}"
                                        f"{suggest(end, list(seen))}")
        start = next(n.id for n in self.nodes if n.kind == "start")
        end = next(n.id for n in self.nodes if n.kind == "end")
        if self.predecessors(start):
            raise WorkflowError(f"the start node {start!r} cannot have incoming edges")
        if self.successors(end):
            raise WorkflowError(f"the end node {end!r} cannot have outgoing edges")
        cycle = self.find_cycle()
        if cycle:
            path = " -> ".join(describe(seen[i], short=True) for i in cycle)
            raise WorkflowError(f"the tasks form a cycle: {path}; remove a --after or a "
                                "variable shared in both directions")
        return self

    def find_cycle(self) -> list[str] | None:
        """A cycle as a list of node ids ``[a, b, a]``, or None. Deterministic (node order)."""
        succ: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for e in self.edges:
            succ.setdefault(e.source, []).append(e.target)
        color: dict[str, int] = {}   # 1 = on the current path, 2 = done
        for root in (n.id for n in self.nodes):
            if root in color:
                continue
            # iterative DFS (a recursive one overflows the stack at ~1,000 chained nodes)
            path: list[str] = [root]
            todo: list[Any] = [iter(succ.get(root, []))]
            color[root] = 1
            while todo:
                v = next(todo[-1], None)
                if v is None:
                    color[path.pop()] = 2
                    todo.pop()
                elif color.get(v) == 1:
                    return path[path.index(v):] + [v]
                elif v not in color:
                    color[v] = 1
                    path.append(v)
                    todo.append(iter(succ.get(v, [])))
        return None

    def ancestors(self, node_id: str) -> set[str]:
        """Every node with a path to ``node_id``."""
        pred: dict[str, list[str]] = {}
        for e in self.edges:
            pred.setdefault(e.target, []).append(e.source)
        seen: set[str] = set()
        todo = [node_id]
        while todo:
            for p in pred.get(todo.pop(), []):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen


def describe(n: Node, *, name: bool = True, short: bool = False) -> str:
    """How errors name a node: ``task 'x' (cell 4 `%%task x --after y`)``."""
    label = f"{n.kind} {n.id!r}" if name else ""
    if short:
        return f"{n.id} (cell {n.cell})" if n.cell is not None else n.id
    if n.cell is None:
        return label or repr(n.id)
    where = f"cell {n.cell} `{n.first_line}`" if n.first_line else f"cell {n.cell}"
    return f"{label} ({where})" if label else where


def suggest(name: str, choices: list[str]) -> str:
    """``"; did you mean 'extract'?"`` when a close name exists, else ``""``."""
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
