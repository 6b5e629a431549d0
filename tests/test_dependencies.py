"""Every third-party module nbflow imports is brought by a dependency pyproject.toml declares
(directly, or as a requirement of one), so a fresh `pip install -e ".[test,browser]"` has it.

Reads pyproject.toml (dependencies and every extra), follows their requirements through the
installed metadata, and walks every import of the package with `ast`. An import guarded by
`except ImportError` is optional and not reported."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def norm(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared_closure(pyproject: Path) -> set[str]:
    """Distribution names the declared requirements bring, transitively (installed metadata)."""
    proj = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(proj.get("dependencies", []))
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += extra
    closure: set[str] = set()
    todo = [norm(r) for r in reqs]
    while todo:
        d = todo.pop()
        if d in closure:
            continue
        closure.add(d)
        try:
            todo += [norm(r) for r in (md.requires(d) or []) if "extra ==" not in r]
        except md.PackageNotFoundError:
            pass
    return closure


def _guarded_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(n in ast.unparse(h.type)
                                      for n in ("ImportError", "ModuleNotFoundError"))
                for h in node.handlers):
            for stmt in node.body:
                lines.update(sub.lineno for sub in ast.walk(stmt) if hasattr(sub, "lineno"))
    return lines


def undeclared(package: Path, closure: set[str]) -> dict[str, str]:
    """top-level module -> where it is imported, for imports no declared dependency brings."""
    dists_of = md.packages_distributions()
    found: dict[str, str] = {}
    for f in sorted(package.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        guarded = _guarded_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            if node.lineno in guarded:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top in sys.stdlib_module_names or top == package.name or top in found:
                    continue
                dists = [norm(d) for d in dists_of.get(top, [])]
                where = f"{f.relative_to(package.parent)}:{node.lineno}"
                if not dists:
                    found[top] = f"{where}: imports {top!r}, which is not installed and not declared"
                elif not any(d in closure for d in dists):
                    found[top] = (f"{where}: imports {top!r} (from {dists[0]}), which no declared "
                                  f"dependency brings")
    return found


def test_every_import_of_nbflow_is_declared():
    assert undeclared(REPO / "nbflow", declared_closure(REPO / "pyproject.toml")) == {}


def test_an_undeclared_import_is_found(tmp_path):
    # the bug this test exists for: compiler/bpmn imported lxml, which no dependency listed
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["click>=8"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\n')
    pkg = tmp_path / "nbflow"
    pkg.mkdir()
    (pkg / "bpmn.py").write_text("import json\nimport click\nfrom lxml import etree\n"
                                 "try:\n    import playwright\nexcept ImportError:\n    pass\n")
    found = undeclared(pkg, declared_closure(tmp_path / "pyproject.toml"))
    assert list(found) == ["lxml"]
    assert found["lxml"].startswith("nbflow/bpmn.py:3: imports 'lxml'")
