"""Pictures of a workflow: DOT text, and SVG/PNG/PDF through graphviz, coloured by run state.

A view of the IR, nothing more: it never changes the workflow. BPMN looks are borrowed where they
help a reader (rounded service tasks, a writing hand on approvals, a clock on timers, ``+``/``×``
gateways, three bars on multi-instance tasks); a task's ``--when`` is drawn as a small exclusive
gateway in front of it, which the IR does not have.

Every user-provided string (task names, conditions, prompts, data names) is escaped: labels are
graphviz HTML-like labels built with :func:`html.escape`, edge labels are quoted DOT strings.
"""
from __future__ import annotations

import html
import os
from pathlib import Path

from nbflow.core.ir import Node, Workflow
from nbflow.errors import DotMissing, WorkflowError

# Fill colours per run state. Okabe-Ito hues (safe for the common colour-vision deficiencies)
# or light tints of them; black text stays readable on all (contrast >= 4.5:1). Shape styles
# (dashed for skipped/cancelled, bold for failed/rejected) back up the colour for the colour-blind.
STATE_COLOURS: dict[str, str] = {
    "pending": "#EEEEEE",
    "queued": "#DCEBF7",
    "running": "#56B4E9",
    "awaiting_approval": "#F0E442",
    "waiting_signal": "#F5C26B",
    "sleeping": "#C9C3E6",
    "retry_wait": "#E69F00",
    "succeeded": "#009E73",
    "reused": "#9ECAE1",          # succeeded in an earlier run; its outputs stand in (retry, --reuse)
    "failed": "#D55E00",
    "skipped": "#FFFFFF",
    "rejected": "#CC79A7",
    "cancelled": "#999999",
}

_STATE_STYLE = {"skipped": "dashed", "cancelled": "dashed", "failed": "bold", "rejected": "bold"}

DOT_MISSING = ("graphviz's `dot` program is not installed (apt-get install graphviz / "
               "brew install graphviz / conda install graphviz); here is the DOT text instead")

FORMATS = {".dot": None, ".gv": None, ".svg": "svg", ".png": "png", ".pdf": "pdf"}

# symbols in node labels: each is in DejaVu Sans (Debian's default font, which Chromium and
# graphviz fall back to); emoji such as U+1F464 render as empty boxes there
GLYPHS = {"approval": "✍", "signal": "△", "timer": "◷", "map": "≡", "notebook": "▤"}

_MAX_EDGE_LABEL = 32
_MAX_TEXT = 48


def legend_items() -> list[tuple[str, str]]:
    """(state, fill colour) pairs in lifecycle order, for widgets that draw their own legend."""
    return list(STATE_COLOURS.items())


# --- escaping ---------------------------------------------------------------------------------

def _q(s: str) -> str:
    """A DOT double-quoted string; backslashes, quotes and newlines are made literal."""
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{s}"'


def _h(s: str) -> str:
    """Text for an HTML-like label: entities escaped, newlines as <BR/>."""
    lines = str(s).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return '<BR ALIGN="CENTER"/>'.join(html.escape(line, quote=True) for line in lines)


def _short(s: str, limit: int = _MAX_TEXT) -> str:
    s = " ".join(str(s).split())  # one line: labels are not the place for whole paragraphs
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    """7200 -> '2h', 90 -> '1m30s', 1.5 -> '1.5s'."""
    if seconds < 60:
        return f"{seconds:g}s"
    out, rest = [], float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            n = int(rest // size)
            out.append(f"{n}{unit}")
            rest -= n * size
    if rest:
        out.append(f"{rest:g}s")
    return "".join(out)


def _data_label(names: list[str]) -> str:
    """Comma-joined data names, cut to a readable length with a '+N' tail."""
    if not names:
        return ""
    shown: list[str] = []
    for i, name in enumerate(names):
        candidate = ", ".join(shown + [name])
        more = len(names) - i - 1
        if len(candidate) + (len(f" +{more}") if more else 0) > _MAX_EDGE_LABEL and shown:
            return ", ".join(shown) + f" +{len(names) - len(shown)}"
        shown.append(name)
    label = ", ".join(shown)
    return label if len(label) <= _MAX_EDGE_LABEL + 8 else label[: _MAX_EDGE_LABEL + 7] + "…"


# --- DOT ----------------------------------------------------------------------------------------

def _task_label(n: Node) -> str:
    small: list[str] = []
    if n.approval is not None:
        small.append(GLYPHS["approval"] + " approval" + (f": {_short(n.approval, 36)}" if n.approval else ""))
    if n.wait_signal:
        small.append(f"{GLYPHS['signal']} signal {n.wait_signal}")
    if n.sleep is not None:
        small.append(f"{GLYPHS['timer']} sleep {_duration(n.sleep)}")
    if n.at:
        small.append(f"{GLYPHS['timer']} at {n.at}")
    if n.map_var:
        small.append(f"{GLYPHS['map']} for {n.map_var} in {n.map_over or '?'}")
    if n.notebook:
        small.append(GLYPHS["notebook"] + " " + n.notebook + (f" : {n.notebook_task}" if n.notebook_task else ""))
    opts = []
    if n.retries:
        opts.append(f"retries {n.retries}")
    if n.timeout is not None:
        opts.append(f"timeout {_duration(n.timeout)}")
    if n.queue and n.queue != "default":
        opts.append(f"queue {n.queue}")
    if opts:
        small.append(" · ".join(opts))
    rows = [f"<B>{_h(_short(n.label))}</B>"]
    rows += [f'<FONT POINT-SIZE="9">{_h(_short(s))}</FONT>' for s in small]
    return "<" + "<BR/>".join(rows) + ">"


def _node_attrs(n: Node, state: str | None) -> dict[str, str]:
    if n.kind == "start":
        a = {"shape": "circle", "label": '""', "xlabel": _q(n.label if n.name else "start"),
             "width": "0.35", "fixedsize": "true"}
    elif n.kind == "end":
        a = {"shape": "doublecircle", "label": '""', "xlabel": _q(n.label if n.name else "end"),
             "width": "0.3", "fixedsize": "true", "penwidth": "2"}
    elif n.kind == "parallel":
        a = {"shape": "diamond", "label": '"+"', "width": "0.45", "height": "0.45",
             "fixedsize": "true", "fontsize": "18"}
    elif n.kind == "exclusive":
        a = {"shape": "diamond", "label": '"×"', "width": "0.45", "height": "0.45",
             "fixedsize": "true", "fontsize": "16"}
    else:
        a = {"shape": "box", "label": _task_label(n), "margin": "\"0.15,0.06\""}
    styles = ["filled"] + (["rounded"] if n.kind == "task" else [])
    fill = "#FFFFFF"
    if n.kind == "task" and n.approval is not None:
        fill = "#FFF8E1"  # user task: a warmer paper, overridden by the run state
    if state:
        fill = STATE_COLOURS.get(state, fill)
        if state in _STATE_STYLE:
            styles.append(_STATE_STYLE[state])
        a["tooltip"] = _q(f"{n.label}: {state}")
    else:
        a["tooltip"] = _q(n.label)
    a["style"] = _q(",".join(styles))
    a["fillcolor"] = _q(fill)
    return a


def _attrs(a: dict[str, str]) -> str:
    return "[" + " ".join(f"{k}={v}" for k, v in a.items()) + "]"


def _legend() -> list[str]:
    rows = "".join(
        f'<TR><TD BGCOLOR="{colour}" WIDTH="14"> </TD><TD ALIGN="LEFT">{_h(state)}</TD></TR>'
        for state, colour in legend_items())
    table = f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="2" CELLPADDING="3">{rows}</TABLE>>'
    return [
        "  subgraph cluster_legend {",
        '    label="state"; fontsize=10; style="rounded"; color="#BBBBBB";',
        f"    legend [shape=plaintext fontsize=9 label={table}];",
        "  }",
    ]


def to_dot(wf: Workflow, states: dict[str, str] | None = None, title: str | None = None,
           legend: bool = False) -> str:
    """DOT text of the workflow, left to right; ``states`` (node id -> run state) colours nodes."""
    states = states or {}
    lines = [
        f"digraph {_q(wf.name or 'workflow')} {{",
        '  graph [rankdir=LR fontname="Helvetica" nodesep=0.35 ranksep=0.45 bgcolor="transparent"];',
        '  node [fontname="Helvetica" fontsize=11 color="#333333"];',
        '  edge [fontname="Helvetica" fontsize=9 color="#555555" fontcolor="#333333"];',
    ]
    if title:
        lines.append(f"  label={_q(title)}; labelloc=t; fontsize=14;")
    entry: dict[str, str] = {}  # node id -> DOT id its incoming edges point at
    for n in wf.nodes:
        a = _node_attrs(n, states.get(n.id))
        lines.append(f"  {_q(n.id)} {_attrs(a)};")
        entry[n.id] = n.id
        if n.kind == "task" and n.when:
            gw = f"when::{n.id}"
            entry[n.id] = gw
            lines.append(f"  {_q(gw)} [shape=diamond label=\"×\" width=0.35 height=0.35 "
                         f"fixedsize=true fontsize=12 style=filled fillcolor=\"#FFFFFF\" "
                         f"tooltip={_q('when ' + n.when)}];")
            lines.append(f"  {_q(gw)} -> {_q(n.id)} [label={_q('if ' + _short(n.when, 40))} "
                         f"fontcolor=\"#1F4E79\"];")
    known = {n.id for n in wf.nodes}
    for e in wf.edges:
        if e.source not in known or e.target not in known:
            raise WorkflowError(f"edge {e.source!r} -> {e.target!r} names an unknown node")
        parts = []
        if e.condition:
            parts.append(f"[{_short(e.condition, 30)}]")
        elif e.default:
            parts.append("default")
        if e.data:
            parts.append(_data_label(e.data))
        a = {}
        if parts:
            a["label"] = _q(" ".join(parts))
        if e.data:
            a["tooltip"] = _q(", ".join(e.data))
        if e.files:                  # an order inferred from a file handed over: dashed
            a["style"] = "dashed"
            a["label"] = _q(" ".join(parts + ["file " + _short(e.files[0], 30)]
                                     + (["…"] if len(e.files) > 1 else [])))
            a["tooltip"] = _q("runs after: it reads " + ", ".join(e.files))
        if e.default:
            a["arrowtail"] = "odot"  # BPMN marks the default flow with a slash at its source
            a["dir"] = "both"
        lines.append(f"  {_q(e.source)} -> {_q(entry[e.target])}"
                     + (f" {_attrs(a)}" if a else "") + ";")
    if legend:
        lines += _legend()
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- rendering ----------------------------------------------------------------------------------

def _pipe(dot: str, fmt: str) -> bytes:
    import graphviz

    try:
        return graphviz.Source(dot).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise DotMissing(DOT_MISSING, dot) from None
    except graphviz.CalledProcessError as e:  # a bug of ours, but say what dot said
        err = (e.stderr or b"").decode(errors="replace").strip()
        raise WorkflowError(f"graphviz could not draw the workflow: {err}") from None


def to_svg(wf: Workflow, states: dict[str, str] | None = None, **kw) -> str:
    """SVG text; raises :class:`DotMissing` when graphviz's ``dot`` is not installed."""
    return _pipe(to_dot(wf, states, **kw), "svg").decode("utf-8")


def render(wf: Workflow, path: str | os.PathLike, states: dict[str, str] | None = None,
           **kw) -> str | None:
    """Write the picture to ``path`` (format from its suffix: .dot .gv .svg .png .pdf).

    Returns None on success, or a one-line note when ``dot`` is missing and the DOT text was
    written to ``<stem>.dot`` beside ``path`` instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise WorkflowError(
            f"cannot draw to {str(path)!r}: unknown picture format {suffix or '(no suffix)'!r}; "
            "use .svg, .png, .pdf, .dot or .gv")
    dot = to_dot(wf, states, **kw)
    fmt = FORMATS[suffix]
    if fmt is None:
        path.write_text(dot, encoding="utf-8")
        return None
    try:
        data = _pipe(dot, fmt)
    except DotMissing:
        fallback = path.with_suffix(".dot")
        fallback.write_text(dot, encoding="utf-8")
        return (f"graphviz's `dot` program is not installed (apt-get install graphviz / "
                f"brew install graphviz / conda install graphviz); wrote the DOT text to "
                f"{fallback} instead of {path}")
    path.write_bytes(data)
    return None
