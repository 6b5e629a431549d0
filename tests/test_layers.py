"""The layer contract (docs/DESIGN.md): which part of nbflow may import which, and no import
cycles. Pure ``ast`` over nbflow/: every import counts, the ones inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nbflow"

# (modules under this prefix, may not import modules under any of these prefixes)
FORBIDDEN = [
    ("nbflow.core", ("nbflow.",)),                      # the core imports nothing of nbflow ...
    ("nbflow.compiler", ("nbflow.engine", "nbflow.client", "nbflow.worker", "nbflow.nats",
                         "nbflow.schedules", "nbflow.stack", "nbflow.cli", "nbflow.magics",
                         "nbflow.widgets", "nbflow.console", "nbflow.runs")),
    ("nbflow.engine", ("nbflow.client", "nbflow.cli", "nbflow.widgets", "nbflow.magics",
                       "nbflow.console")),
    ("nbflow.schedules.scheduler", ("nbflow.client", "nbflow.cli", "nbflow.widgets",
                                    "nbflow.magics", "nbflow.console")),   # the engine side
    ("nbflow.widgets", ("nbflow.engine", "nbflow.nats", "nbflow.worker")),  # runs via the client
    ("nbflow.worker", ("nbflow.widgets", "nbflow.magics", "nbflow.cli", "nbflow.console")),
    ("nbflow.stack", ("nbflow.engine", "nbflow.client", "nbflow.worker", "nbflow.cli",
                      "nbflow.widgets", "nbflow.magics", "nbflow.console",
                      "nbflow.schedules")),    # it starts those as processes, never imports them
    ("nbflow.widgets.htmlparts", ("nbflow.client", "nbflow.stack", "nbflow.runs")),  # pure HTML
    ("nbflow.worker.kernels", ("nbflow.nats", "nbflow.engine", "nbflow.client", "nbflow.runs",
                               "nbflow.stack", "nbflow.schedules")),  # kernels know no NATS
    ("nbflow.compiler.bpmn", ("nbflow.compiler.notebook", "nbflow.compiler.tasknb",
                              "nbflow.compiler.bundle")),   # BPMN <-> IR, never a notebook
    ("nbflow.client", ("nbflow.engine", "nbflow.cli", "nbflow.widgets", "nbflow.magics",
                       "nbflow.console", "nbflow.schedules")),   # below every face
    ("nbflow.nats", ("nbflow.engine", "nbflow.client", "nbflow.cli", "nbflow.widgets",
                     "nbflow.magics", "nbflow.console", "nbflow.worker", "nbflow.schedules")),
]
# ... except the one exception hierarchy, which imports nothing itself
ALLOWED_EVERYWHERE = ("nbflow.errors",)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """nbflow modules that ``name`` imports anywhere in its file (resolved to known modules)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:      # a submodule, or a name defined in the module ``mod``
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in known else mod)
    out = set()
    for mod in found:
        if not mod.startswith("nbflow"):
            continue
        while mod not in known and "." in mod:
            mod = mod.rpartition(".")[0]
        if mod in known and mod != name and mod != "nbflow":
            out.add(mod)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix.rstrip(".") or mod.startswith(prefix if prefix.endswith(".")
                                                       else prefix + ".")


# packages whose modules are their own rooms: the rest of nbflow imports the package only
# (``from nbflow.client import Client``), so a room can move without touching a face
SEALED = ("nbflow.client",)


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        for pkg in SEALED:
            if _under(mod, pkg):
                continue
            for dep in sorted(deps):
                if dep.startswith(pkg + "."):
                    out.append(f"{mod} imports {dep} (outside {pkg}, import {pkg} itself)")
    for mod, deps in sorted(graph.items()):
        for layer, banned in FORBIDDEN:
            if not _under(mod, layer):
                continue
            for dep in sorted(deps):
                if dep in ALLOWED_EVERYWHERE or _under(dep, layer):
                    continue
                if any(_under(dep, b) for b in banned):
                    out.append(f"{mod} imports {dep} (layer {layer} may not)")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_layers_import_only_downwards(graph):
    assert "nbflow.core.state" in graph and "nbflow.client" in graph
    assert violations(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_contract_catches_a_violation_and_a_cycle(graph):
    bad = {k: set(v) for k, v in graph.items()}
    bad["nbflow.core.state"].add("nbflow.client")            # the core reaching up
    bad["nbflow.engine.engine"].add("nbflow.widgets.runview")  # the engine drawing widgets
    bad["nbflow.widgets.runs"].add("nbflow.client.reading")   # a face reaching into a room
    bad["nbflow.client.reading"].add("nbflow.engine.engine")   # the client reaching up
    assert violations(bad) == [
        "nbflow.widgets.runs imports nbflow.client.reading (outside nbflow.client, "
        "import nbflow.client itself)",
        "nbflow.client.reading imports nbflow.engine.engine (layer nbflow.client may not)",
        "nbflow.core.state imports nbflow.client (layer nbflow.core may not)",
        "nbflow.engine.engine imports nbflow.widgets.runview (layer nbflow.engine may not)"]
    bad = {k: set(v) for k, v in graph.items()}
    bad["nbflow.core.events"].add("nbflow.magics.core")      # magics -> ... -> core -> magics
    assert any("nbflow.magics.core" in c and "nbflow.core.events" in c for c in cycles(bad))


def test_imports_inside_functions_count(tmp_path):
    pkg = tmp_path / "nbflow"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "x.py").write_text("def f():\n    from nbflow import client\n")
    (pkg / "client.py").write_text("from .core import x\n")
    g = import_graph(pkg)
    assert g["nbflow.core.x"] == {"nbflow.client"} and g["nbflow.client"] == {"nbflow.core.x"}
    assert violations(g) == ["nbflow.core.x imports nbflow.client (layer nbflow.core may not)"]
    assert cycles(g) == [["nbflow.client", "nbflow.core.x"]]
