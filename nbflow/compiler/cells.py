"""Cell sources -> TaskSpec: the ``%%task`` options (the magic declares them with IPython's
``magic_arguments``, so ``%%task?`` shows their help; the compiler parses them with the same
argparse options without importing IPython, ~0.3-1.3 s on every `nbflow run`), cell text, and a whole notebook's cells parsed; the names
each cell defines and reads come from :mod:`nbflow.compiler.names`.

Cell numbers: everywhere in nbflow a cell is named by its 1-based index among *all* cells of
the notebook (markdown and raw cells count), because Jupyter's ``[n]`` execution counts change
on every run and are not reliable.  The first line of the cell is quoted next to the number.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from nbflow.compiler.names import analyze_names
from nbflow.core import durations
from nbflow.core.ir import TASK_NAME_RE
from nbflow.errors import WorkflowError

# --- durations --------------------------------------------------------------------------------

def parse_duration(text: Any) -> float:
    """``30s``, ``10m``, ``2h``, ``1d``, ``1h30m``, ``250ms`` or plain seconds -> seconds."""
    s = durations.seconds(text)
    if s is not None:
        return s
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        raise WorkflowError(f"bad duration {text!r}: it must not be negative")
    raise WorkflowError(
        f"bad duration {text!r}: use e.g. 30s, 10m, 2h, 1d, 1h30m, 250ms or plain seconds")


def parse_instant(text: str) -> str:
    """An ISO-8601 instant -> normalised UTC ISO string (a naive time is taken as UTC)."""
    try:
        dt = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise WorkflowError(
            f"bad --at {text!r}: use an ISO-8601 time like 2026-11-20T06:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat()


# --- the %%task options -----------------------------------------------------------------------

def argument(*args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """One ``%%task`` option: ``argparse``'s ``add_argument`` arguments."""
    return args, kwargs


_TASK_ARGS = [
    argument("name", nargs="?", help="the task's name: letters, digits, _ and -"),
    argument("--after", nargs="+", metavar="TASK", default=[],
             help="run after these tasks (ordering only, no data)"),
    argument("--retries", type=int, default=0, metavar="N", help="retry a failed run N times"),
    argument("--retry-delay", metavar="DURATION", help="delay before the 1st retry; doubles"),
    argument("--timeout", metavar="DURATION", help="time limit of one attempt"),
    argument("--queue", metavar="NAME", help="worker queue (default: default)"),
    argument("--map", nargs=3, metavar=("VAR", "in", "NAME"),
             help="one instance per element of NAME, bound to VAR; downstream sees lists"),
    argument("--when", metavar="EXPR",
             help="Python condition over parameters and upstream outputs; false -> skipped"),
    argument("--approval", metavar="PROMPT", help="a person must approve before it runs"),
    argument("--approval-timeout", metavar="DURATION", help="no decision by then -> rejected"),
    argument("--wait-signal", metavar="NAME", help="wait for signal NAME; its value is bound to NAME"),
    argument("--sleep", metavar="DURATION", help="durable wait before the task runs"),
    argument("--at", metavar="ISO8601", help="durable wait until this instant"),
    argument("--isolation", choices=["run", "fresh", "reuse"],
             help="kernel isolation: run (default: one kernel per run, reset between its "
                  "tasks), fresh (a new kernel for this task), reuse (share kernels across runs)"),
    argument("--no-run", action="store_true", help="register the task without running it (magic only)"),
    argument("--here", action="store_true",
             help="run the body in this kernel even if it waits for an approval or a signal "
                  "(debugging; magic only)"),
    argument("--example", metavar="JSON",
             help="with --wait-signal NAME: bind NAME to this value when the cell runs in the "
                  "notebook (magic only; a run binds the signal's value)"),
]


def task_magic_arguments(func):
    """Decorate ``func`` with the ``%%task`` options (its docstring becomes the help)."""
    from IPython.core.magic_arguments import argument as ipython_argument, magic_arguments

    for a, kw in reversed(_TASK_ARGS):
        func = ipython_argument(*a, **kw)(func)
    func = magic_arguments()(func)
    func.parser.allow_abbrev = False
    return func


class _BadOptions(Exception):
    pass


class _TaskParser(argparse.ArgumentParser):
    """The ``%%task`` options as IPython's magic parser has them: no -h, errors raised."""

    def error(self, message):
        raise _BadOptions(message)


@functools.lru_cache(maxsize=1)
def _task_parser() -> _TaskParser:
    p = _TaskParser(prog="task", add_help=False, allow_abbrev=False)
    for a, kw in _TASK_ARGS:
        p.add_argument(*a, **kw)
    return p


@dataclass
class TaskSpec:
    """One ``%%task`` cell: its options, code and the names it defines and reads."""
    name: str
    code: str = ""
    cell: int | None = None                  # 1-based index among all cells of the notebook
    first_line: str = ""
    line_offset: int = 0                     # blank lines above the %%task line
    doc: str = ""
    after: list[str] = field(default_factory=list)
    retries: int = 0
    retry_delay: float = 0.0
    timeout: float | None = None
    queue: str = "default"
    map_var: str | None = None
    map_over: str | None = None
    when: str | None = None
    approval: str | None = None
    approval_timeout: float | None = None
    wait_signal: str | None = None
    sleep: float | None = None
    at: str | None = None
    isolation: str | None = None
    no_run: bool = False
    here: bool = False                       # run a gated body in the kernel anyway (magic)
    example: str | None = None               # JSON bound to --wait-signal NAME in the kernel
    defines: set[str] = field(default_factory=set)   # names the cell binds at top level
    reads: set[str] = field(default_factory=set)     # free names (code + --when + --map NAME)

    NODE_OPTIONS = ("after", "retries", "retry_delay", "timeout", "queue", "map_var", "map_over",
                    "when", "approval", "approval_timeout", "wait_signal", "sleep", "at",
                    "isolation")

    def node_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.NODE_OPTIONS}


def _is_ident(s: str) -> bool:
    return s.isidentifier()


def parse_task_line(argstring: str) -> dict[str, Any]:
    """The text after ``%%task`` -> TaskSpec keyword arguments. Raises WorkflowError."""
    try:
        argv = shlex.split(argstring, posix=True)
    except ValueError as e:
        raise WorkflowError(f"cannot split the options: {e}") from None
    try:
        ns = _task_parser().parse_args(argv)
    except _BadOptions as e:
        raise WorkflowError(f"bad options: {e}") from None
    except SystemExit:       # argparse exits on -h / some errors; never let it out
        raise WorkflowError("bad options (see `%%task?` for help)") from None
    name = ns.name
    if not name:
        raise WorkflowError("a %%task needs a name: `%%task NAME [options]`")
    if not TASK_NAME_RE.fullmatch(name):
        raise WorkflowError(
            f"bad task name {name!r}: use letters, digits, _ and - (starting with a letter or _)")
    if name in ("start", "end"):
        raise WorkflowError(f"{name!r} is reserved: pick another task name")
    out: dict[str, Any] = {"name": name, "after": list(ns.after or []), "no_run": ns.no_run,
                           "here": ns.here}
    task = f"task {name!r}: "
    if ns.retries < 0:
        raise WorkflowError(task + f"--retries must be 0 or more, not {ns.retries}")
    out["retries"] = ns.retries
    for opt in ("retry_delay", "timeout", "approval_timeout", "sleep"):
        v = getattr(ns, opt)
        if v is not None:
            try:
                out[opt] = parse_duration(v)
            except WorkflowError as e:
                raise WorkflowError(task + f"--{opt.replace('_', '-')}: {e}") from None
    if ns.at is not None:
        try:
            out["at"] = parse_instant(ns.at)
        except WorkflowError as e:
            raise WorkflowError(task + str(e)) from None
    if ns.queue is not None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", ns.queue):
            raise WorkflowError(task + f"bad --queue {ns.queue!r}: use letters, digits, _ and -")
        out["queue"] = ns.queue
    if ns.map is not None:
        var, word, over = ns.map
        if word != "in" or not _is_ident(var) or not _is_ident(over):
            raise WorkflowError(
                task + f"malformed --map {' '.join(ns.map)!r}: write `--map VAR in NAME`, "
                "e.g. `--map region in regions`")
        out["map_var"], out["map_over"] = var, over
    if ns.when is not None:
        expr = ns.when.strip()
        try:
            ast.parse(expr, mode="eval")
        except SyntaxError as e:
            raise WorkflowError(task + f"--when {ns.when!r} is not a Python expression: {e.msg}") from None
        out["when"] = expr
    if ns.approval is not None:
        out["approval"] = ns.approval
    if ns.wait_signal is not None:
        if not _is_ident(ns.wait_signal):
            raise WorkflowError(task + f"--wait-signal {ns.wait_signal!r} must be a Python identifier "
                                "(its value is bound to that variable)")
        out["wait_signal"] = ns.wait_signal
    if ns.example is not None:
        if ns.wait_signal is None:
            raise WorkflowError(task + "--example gives the value of a --wait-signal NAME; "
                                "add --wait-signal NAME")
        try:
            json.loads(ns.example)
        except ValueError as e:
            raise WorkflowError(task + f"--example {ns.example!r} is not JSON ({e}); quote "
                                "text as '\"text\"'") from None
        out["example"] = ns.example
    if ns.isolation is not None:
        out["isolation"] = ns.isolation
    return out


# --- cell text --------------------------------------------------------------------------------

_STRIP_LINE_RE = re.compile(r"[ \t]*%(?:(?:re)?load_ext[ \t]+nbflow[ \t]*|flow(?:[ \t].*)?)")
_TASK_RE = re.compile(r"%%task(?=\s|$)")


def strip_nbflow_lines(source: str, blank: bool = False) -> str:
    """Drop ``%load_ext nbflow``, ``%reload_ext nbflow`` and ``%flow ...`` lines; ``%%flow``
    cells become empty. They must not run in workers. ``blank`` keeps line numbers (for errors)."""
    if source.lstrip().startswith("%%flow"):
        return ""
    if blank:
        return "\n".join("" if _STRIP_LINE_RE.fullmatch(line) else line
                         for line in source.split("\n"))
    kept = [line for line in source.split("\n") if not _STRIP_LINE_RE.fullmatch(line)]
    return "\n".join(kept).strip("\n")


def split_task_cell(source: str) -> tuple[str, str, int] | None:
    """``(argstring, body, line offset of the body)`` if the cell is a ``%%task`` cell, else None."""
    lines = source.split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or not _TASK_RE.match(lines[i].lstrip()):
        return None
    first = lines[i].lstrip()
    return first[len("%%task"):].strip(), "\n".join(lines[i + 1:]), i + 1


def first_line(source: str) -> str:
    for line in source.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def parse_python(source: str, where: str, line_offset: int = 0) -> ast.Module:
    """IPython-transform then ``ast.parse``; a syntax error names ``where`` and the cell line.
    Plain Python (most cells) is parsed as it is: IPython's transforms leave valid Python
    unchanged, and importing IPython costs ~0.3-1.3 s."""
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        pass
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        code = TransformerManager().transform_cell(source)
    except Exception as e:  # transformers raise assorted errors on odd input
        raise WorkflowError(f"{where}: cannot read the cell: {e}") from None
    try:
        return ast.parse(code)
    except SyntaxError as e:
        lines = source.split("\n")
        lead = next((i for i, line in enumerate(lines) if line.strip()), 0)  # IPython drops these
        lineno = (e.lineno or 1) + lead + line_offset
        lines = source.split("\n")
        text = lines[lineno - 1 - line_offset].strip() if 0 < lineno - line_offset <= len(lines) else ""
        show = f": `{text}`" if text else ""
        raise WorkflowError(f"{where}: syntax error at line {lineno} of the cell{show}: {e.msg}") from None


def where(cell: int | None, line: str, task: str | None = None) -> str:
    """``cell 4 `%%task x --retries many` (task 'x')`` — how every compiler error names a cell."""
    s = f"cell {cell} `{line}`"
    return f"{s} (task {task!r})" if task else s


def doc_from_markdown(source: str) -> str:
    """A markdown cell's text as a task's doc if it starts with a heading, else ''."""
    text = source.strip()
    if not text.startswith("#"):
        return ""
    head, _, rest = text.partition("\n")
    head = head.lstrip("#").strip()
    rest = rest.strip()
    return f"{head}\n\n{rest}" if rest else head


def parse_task_cell(source: str, cell: int | None = None, doc: str = "") -> TaskSpec:
    """One ``%%task`` cell (with its magic line) -> TaskSpec. Raises WorkflowError naming the cell."""
    split = split_task_cell(source)
    if split is None:
        raise WorkflowError(f"{where(cell, first_line(source))}: not a %%task cell")
    argstring, body, offset = split
    fl = first_line(source)
    guess = argstring.split()[0] if argstring.split() and not argstring.startswith("-") else None
    try:
        opts = parse_task_line(argstring)
    except WorkflowError as e:
        raise WorkflowError(f"{where(cell, fl, guess)}: {e}") from None
    spec = TaskSpec(code=body, cell=cell, first_line=fl, line_offset=offset - 1, doc=doc,
                    **opts)
    tree = parse_python(body, where(cell, fl, spec.name), offset)
    spec.defines, reads = analyze_names(tree)
    if spec.when:
        _, when_reads = analyze_names(ast.parse(spec.when, mode="eval"))
        reads |= when_reads
    bound = {spec.map_var, spec.wait_signal} - {None}
    reads -= bound
    if spec.map_over:
        reads.add(spec.map_over)
    spec.reads = reads
    return spec


# --- a whole notebook -------------------------------------------------------------------------

@dataclass
class ParsedNotebook:
    """A notebook's cells sorted into parameters, setup and tasks (nothing resolved yet)."""
    params_source: str = ""
    params: dict[str, Any] = field(default_factory=dict)   # literal, JSON-able defaults
    param_names: set[str] = field(default_factory=set)     # every name the parameters cell binds
    setup: list[str] = field(default_factory=list)         # stripped setup sources
    setup_names: set[str] = field(default_factory=set)
    tasks: list[TaskSpec] = field(default_factory=list)
    code: list[str] = field(default_factory=list)          # setup + task bodies, notebook order
    setup_cells: list[tuple[int, str, set[str]]] = field(default_factory=list)  # cell, line, reads


def normalize_cells(cells: Iterable[Any]) -> list[dict[str, Any]]:
    """nbformat cells, plain dicts (source as str or list of lines) or bare strings (code)."""
    out = []
    for c in cells:
        if isinstance(c, str):
            out.append({"cell_type": "code", "source": c, "tags": []})
            continue
        if not isinstance(c, dict):
            raise WorkflowError(f"not a notebook cell: {c!r:.60}")
        src = c.get("source", "")
        if isinstance(src, list):
            src = "".join(src)
        meta = c.get("metadata") or {}
        out.append({"cell_type": c.get("cell_type", "code"), "source": str(src),
                    "tags": list(meta.get("tags") or [])})
    return out


def _json_value(v: Any) -> bool:
    import json

    try:
        return json.loads(json.dumps(v)) == v
    except (TypeError, ValueError):
        return False


def literal_params(tree: ast.Module) -> dict[str, Any]:
    """Defaults of the parameters cell: ``NAME = <literal>`` per assignment (JSON values only)."""
    params: dict[str, Any] = {}
    for stmt in tree.body:
        targets: list[ast.AST] = []
        value = None
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        defines, _ = analyze_names(stmt)
        for name in defines:                 # a later non-literal rebinding wins
            params.pop(name, None)
        for t in targets:
            pairs: list[tuple[ast.AST, ast.AST]] = []
            if isinstance(t, ast.Name):
                pairs = [(t, value)]
            elif (isinstance(t, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List))
                  and len(t.elts) == len(value.elts)):
                pairs = list(zip(t.elts, value.elts))
            for tn, tv in pairs:
                if not isinstance(tn, ast.Name):
                    continue
                try:
                    v = ast.literal_eval(tv)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                if _json_value(v):
                    params[tn.id] = v
    return params


def parse_notebook_cells(cells: Iterable[Any]) -> ParsedNotebook:
    """Sort cells: ``parameters``-tagged -> params, ``%%task`` -> tasks, other code -> setup.
    Cells tagged ``skip`` and raw cells are left out; markdown only feeds task docs."""
    nb = ParsedNotebook()
    params_parts: list[str] = []
    last_md: tuple[int, str] | None = None
    prev = 0
    for i, c in enumerate(normalize_cells(cells), start=1):
        kind, src, tags = c["cell_type"], c["source"], c["tags"]
        if "skip" in tags:
            continue
        md_before, prev = (last_md[1] if last_md and last_md[0] == prev else ""), i
        if kind == "markdown":
            last_md = (i, src)
            continue
        if kind != "code":
            continue
        fl = first_line(src)
        if "parameters" in tags:
            if split_task_cell(src) is not None:
                raise WorkflowError(f"{where(i, fl)}: the parameters cell cannot be a %%task")
            stripped = strip_nbflow_lines(src)
            tree = parse_python(strip_nbflow_lines(src, blank=True), f"{where(i, fl)} (parameters)")
            defines, _ = analyze_names(tree)
            nb.param_names |= defines
            nb.params.update(literal_params(tree))
            if stripped.strip():
                params_parts.append(stripped)
            continue
        if split_task_cell(src) is not None:
            spec = parse_task_cell(src, i, doc_from_markdown(md_before))
            nb.tasks.append(spec)
            nb.code.append(spec.code)
            continue
        stripped = strip_nbflow_lines(src)
        if not stripped.strip():
            continue
        tree = parse_python(strip_nbflow_lines(src, blank=True), f"{where(i, fl)} (setup cell)")
        defines, reads = analyze_names(tree)
        nb.setup_cells.append((i, fl, reads - nb.setup_names))
        nb.setup_names |= defines
        nb.setup.append(stripped)
        nb.code.append(stripped)
    nb.params_source = "\n".join(params_parts)
    return nb
