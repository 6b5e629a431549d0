"""What the run widgets draw as HTML: state badges, the legend, the task table, a task's cell
outputs, the download link, short reprs. Pure (no widgets, no client)."""
from __future__ import annotations

import base64
import html
import reprlib
from typing import Any

from nbflow.compiler import render
from nbflow.core.tracebacks import strip_ansi, user_cells

def badge(state: str) -> str:
    colour = render.STATE_COLOURS.get(state, "#EEEEEE")
    return (f'<span class="nbflow-state nbflow-state-{html.escape(state)}" '
            f'style="background:{colour};padding:1px 6px;border-radius:3px;'
            f'border:1px solid #888">{html.escape(state)}</span>')


def legend_html() -> str:
    items = "".join(
        f'<span style="display:inline-block;margin-right:8px"><span style="display:inline-block;'
        f'width:12px;height:12px;background:{c};border:1px solid #888;vertical-align:middle">'
        f'</span> {html.escape(s)}</span>' for s, c in render.legend_items())
    return f'<div class="nbflow-legend" style="font-size:11px">{items}</div>'


def table_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{h}</th>" for h in
                   ("task", "state", "attempt", "started", "duration", "worker"))
    body = []
    for r in rows:
        pad = 8 + 18 * r.get("level", 0)
        body.append(
            f"<tr class='nbflow-row' data-key='{html.escape(r['key'])}'>"
            f"<td style='padding:2px 8px 2px {pad}px'>{html.escape(str(r['task']))}</td>"
            f"<td style='padding:2px 8px'>{badge(r['state'])}</td>"
            + "".join(f"<td style='padding:2px 8px'>{html.escape(str(r[k]))}</td>"
                      for k in ("attempt", "started", "duration", "worker")) + "</tr>")
    return (f"<table class='nbflow-table' style='border-collapse:collapse;font-size:12px'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def task_cell_outputs(nb: Any) -> list[dict[str, Any]]:
    """The outputs of the task cell of an executed task notebook, as nbformat output dicts
    (what ``widgets.Output.outputs`` takes)."""
    outs = []
    for cell in nb.get("cells", []):
        if "nbflow-task" in cell.get("metadata", {}).get("tags", []):
            for o in cell.get("outputs", []):
                o = _plain(o)
                if o.get("output_type") == "execute_result":   # shown like display_data
                    o = {"output_type": "display_data", "data": o.get("data", {}),
                         "metadata": o.get("metadata", {})}
                elif o.get("output_type") == "error":          # the user's cell and lines
                    o = {**o, "traceback": [user_cells(nb, strip_ansi(
                        "\n".join(o.get("traceback") or [])))]}
                outs.append(o)
    return outs


def _plain(o: Any, key: str = "") -> Any:
    """NotebookNode -> plain dicts/strings (multiline lists joined), as the Output widget takes."""
    if isinstance(o, dict):
        return {k: _plain(v, k) for k, v in o.items()}
    if isinstance(o, list) and key == "traceback":
        return list(o)
    if isinstance(o, list):
        return "".join(o) if all(isinstance(x, str) for x in o) else [_plain(x) for x in o]
    return o


def download_html(run: str, key: str, raw: bytes) -> str:
    name = f"{run}-{key.replace('#', '-')}.ipynb"
    b64 = base64.b64encode(raw).decode()
    return (f'<a class="nbflow-download" download="{html.escape(name)}" '
            f'href="data:application/x-ipynb+json;base64,{b64}">⬇ download {html.escape(name)}'
            f'</a>')


def short_repr(value: Any, limit: int = 60) -> str:
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict = limit, limit, 6, 6
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
