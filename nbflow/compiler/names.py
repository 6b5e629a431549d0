"""The names a cell defines and reads, by ``ast`` (no execution): what makes the DAG's edges.

Python's scoping rules, simplified to what a notebook cell needs: module-level stores are defined,
loads of names not defined earlier in the cell are read; functions, lambdas, classes and
comprehensions open their own scopes (their locals are neither defined nor read).
"""
from __future__ import annotations

import ast
import builtins
from typing import Iterable

_SCOPE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


def _function_locals(args: ast.arguments, body: Iterable[ast.AST]) -> tuple[set[str], set[str]]:
    """(local names, global-declared names) of a function body, not descending into nested scopes."""
    local: set[str] = {a.arg for a in (args.posonlyargs + args.args + args.kwonlyargs)}
    if args.vararg:
        local.add(args.vararg.arg)
    if args.kwarg:
        local.add(args.kwarg.arg)
    declared: set[str] = set()
    stack = list(body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Global, ast.Nonlocal)):
            declared.update(n.names)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            local.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            local.add(n.name)
            stack.extend(n.decorator_list)
            continue
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                if a.name != "*":
                    local.add(a.asname or a.name.split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            local.add(n.name)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            local.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            local.add(n.rest)
        if isinstance(n, ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(n))
    return local - declared, declared


class _Scope:
    def __init__(self, kind: str, bound: set[str] | None = None, declared: set[str] | None = None):
        self.kind = kind                    # module | function | class | comp
        self.bound = bound or set()
        self.declared = declared or set()   # global/nonlocal names of a function


class NameAnalyzer(ast.NodeVisitor):
    """Top-level names a cell binds (``defines``) and the free names it reads (``reads``).

    Reads are loads not bound earlier in the cell (evaluation order within a statement is
    respected: ``x = x + 1`` reads x). Names local to functions, lambdas and comprehensions are
    not outputs; a function body's free names count as reads unless the cell binds them anywhere
    (the function may be called later in the cell).
    """

    def __init__(self) -> None:
        self.scopes = [_Scope("module")]
        self.defines: set[str] = set()
        self.reads: set[str] = set()
        self.deferred: set[str] = set()

    # results
    def free_reads(self) -> set[str]:
        return self.reads | (self.deferred - self.defines - self.scopes[0].bound)

    # name handling
    def _load(self, name: str) -> None:
        in_function = False
        for sc in reversed(self.scopes):
            if sc.kind == "comp" and name in sc.bound:
                return
            if sc.kind == "function":
                if name in sc.bound and name not in sc.declared:
                    return
                in_function = True
            if sc.kind == "class" and sc is self._innermost_noncomp() and name in sc.bound:
                return
            if sc.kind == "module":
                if name in sc.bound:
                    return
                (self.deferred if in_function else self.reads).add(name)

    def _innermost_noncomp(self) -> _Scope:
        for sc in reversed(self.scopes):
            if sc.kind != "comp":
                return sc
        return self.scopes[0]

    def _store(self, name: str, walrus: bool = False) -> None:
        sc = self._innermost_noncomp() if walrus else self.scopes[-1]
        if sc.kind == "module":
            sc.bound.add(name)
            self.defines.add(name)
        elif sc.kind == "function":
            if name in sc.declared:
                self.defines.add(name)
        else:
            sc.bound.add(name)

    def _delete(self, name: str) -> None:
        sc = self.scopes[-1]
        if sc.kind == "module":
            if name in sc.bound:
                sc.bound.discard(name)
                self.defines.discard(name)
            else:
                self.reads.add(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._store(node.id)
        else:
            self._delete(node.id)

    # statements in evaluation order
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self.visit(t)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
        self.visit(node.value)
        self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.annotation)
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)
        elif not isinstance(node.target, ast.Name):
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._store(node.target.id, walrus=True)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for s in node.body + node.orelse:
            self.visit(s)

    visit_AsyncFor = visit_For

    def visit_With(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self.visit(item.optional_vars)
        for s in node.body:
            self.visit(s)

    visit_AsyncWith = visit_With

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for a in node.names:
            if a.name != "*":
                self._store(a.asname or a.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._store(node.name)
        for s in node.body:
            self.visit(s)

    def _visit_args_defaults(self, args: ast.arguments) -> None:
        for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.visit(d)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self._visit_args_defaults(node.args)
        for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [
                node.args.vararg, node.args.kwarg]:
            if a is not None and a.annotation is not None:
                self.visit(a.annotation)
        if node.returns is not None:
            self.visit(node.returns)
        self._store(node.name)
        local, declared = _function_locals(node.args, node.body)
        self.scopes.append(_Scope("function", local, declared))
        for s in node.body:
            self.visit(s)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_args_defaults(node.args)
        local, declared = _function_locals(node.args, [node.body])
        self.scopes.append(_Scope("function", local, declared))
        self.visit(node.body)
        self.scopes.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(d)
        self.scopes.append(_Scope("class"))
        for s in node.body:
            self.visit(s)
        self.scopes.pop()
        self._store(node.name)

    def _visit_comp(self, node: ast.AST, elts: list[ast.AST]) -> None:
        gens = node.generators  # type: ignore[attr-defined]
        self.visit(gens[0].iter)             # evaluated in the enclosing scope
        self.scopes.append(_Scope("comp"))
        for i, g in enumerate(gens):
            if i:
                self.visit(g.iter)
            self.visit(g.target)
            for cond in g.ifs:
                self.visit(cond)
        for e in elts:
            self.visit(e)
        self.scopes.pop()

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._visit_comp(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._visit_comp(node, [node.key, node.value])

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self._store(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._store(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        for k in node.keys:
            self.visit(k)
        for p in node.patterns:
            self.visit(p)
        if node.rest:
            self._store(node.rest)


def analyze_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(defines, reads) of a parsed cell or expression."""
    a = NameAnalyzer()
    a.visit(tree)
    return set(a.defines), a.free_reads()


BUILTIN_NAMES = frozenset(dir(builtins)) | {"get_ipython", "display", "__name__", "__file__"}


# --- what a cell does to values and files (for compile-time warnings) ---------------------------

# methods that change their object in place (lists, dicts, sets, DataFrames with inplace=True)
MUTATING_METHODS = frozenset({
    "append", "extend", "insert", "pop", "remove", "clear", "update", "sort", "reverse", "add",
    "discard", "setdefault", "popitem", "difference_update", "intersection_update",
    "symmetric_difference_update",
})
# names a kernel provides that no cell assigns
KERNEL_NAMES = frozenset({"In", "Out", "exit", "quit", "_", "__", "___", "__nbflow__",
                          "__session__", "__builtins__"})

_WRITERS = ("to_csv", "to_parquet", "to_json", "to_excel", "to_pickle", "to_feather",
            "to_hdf", "to_html", "to_latex", "to_markdown", "to_stata", "to_xml", "savefig",
            "write_text", "write_bytes", "save", "savez", "savetxt", "to_netcdf", "to_file")


def in_place_changes(tree: ast.AST, names: set[str]) -> list[tuple[str, str]]:
    """(name, the statement as written) for each in-place change of one of ``names``:
    ``x.append(..)``, ``df.dropna(inplace=True)``, ``x[k] = v``, ``x.attr = v``, ``del x[k]``."""
    found: list[tuple[str, str]] = []

    def base(node: ast.AST) -> str | None:
        return node.id if isinstance(node, ast.Name) and node.id in names else None

    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            b = base(n.func.value)
            inplace = any(k.arg == "inplace" and isinstance(k.value, ast.Constant) and
                          k.value.value is True for k in n.keywords)
            if b and (n.func.attr in MUTATING_METHODS or inplace):
                found.append((b, ast.unparse(n)))
        elif isinstance(n, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else [n.target]
            for t in targets:
                if isinstance(t, (ast.Subscript, ast.Attribute)) and (b := base(t.value)):
                    found.append((b, ast.unparse(t) + (" = ..." if not isinstance(n, ast.Delete)
                                                       else "")))
    return found


def literal_files(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(paths written, paths read) given as string literals: ``df.to_csv('out/x.csv')``,
    ``pd.read_csv('out/x.csv')``, ``open('x', 'w')``, ``Path('x').write_text(..)``."""
    written: set[str] = set()
    read: set[str] = set()

    def lit(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip():
            return node.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("Path", "PurePath") and node.args:
            return lit(node.args[0])
        return None

    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        first = n.args[0] if n.args else None
        if isinstance(f, ast.Name) and f.id == "open" and (p := lit(first)):
            mode = n.args[1] if len(n.args) > 1 else next(
                (k.value for k in n.keywords if k.arg == "mode"), None)
            m = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) \
                else "r"
            (written if any(c in m for c in "wax") else read).add(p)
        elif isinstance(f, ast.Attribute):
            if f.attr in ("write_text", "write_bytes") and (p := lit(f.value)):
                written.add(p)
            elif f.attr in ("read_text", "read_bytes") and (p := lit(f.value)):
                read.add(p)
            elif f.attr in _WRITERS and (p := lit(first)):
                written.add(p)
            elif (f.attr.startswith("read_") or f.attr in ("load", "loadtxt", "imread")) and \
                    (p := lit(first)):
                read.add(p)
    return written, read
