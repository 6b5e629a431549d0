"""`nbflow run` following a run in the terminal: one tqdm bar per task (map tasks count their
instances), or one line per state change when stderr is not a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm

from nbflow.core.ir import Workflow
from nbflow.core.state import NODE_FINAL, RunState, reused_from, shown_state

_ICON = {"succeeded": "✔", "failed": "✘", "skipped": "–", "rejected": "⊘", "cancelled": "⊘",
         "running": "▶", "awaiting_approval": "?", "waiting_signal": "…", "sleeping": "⏱",
         "pending": " ", "reused": "↺"}


def _done(st: RunState, node_id: str) -> tuple[int, int]:
    ns = st.nodes[node_id]
    if ns.count is None:
        return (1 if ns.state in NODE_FINAL else 0), 1
    n = sum(1 for t in st.tasks.values() if t.node == node_id and
            t.state in ("succeeded", "skipped", "failed", "cancelled"))
    return n, max(ns.count, 1)


def _label(st: RunState, node_id: str) -> str:
    ns = st.nodes[node_id]
    extra = ""
    tasks = [t for t in st.tasks.values() if t.node == node_id]
    attempt = max((t.attempt for t in tasks), default=1)
    if attempt > 1:
        extra = f" (attempt {attempt})"
    if shown_state(st, node_id) == "reused":
        return f"{_ICON['reused']} reused from run {reused_from(st, node_id)}"
    if ns.state == "awaiting_approval":
        extra = f" → nbflow approve {st.run} {node_id}"
    elif ns.state == "waiting_signal":
        extra = " → nbflow signal " + st.run + " NAME VALUE"
    return f"{_ICON.get(ns.state, ' ')} {ns.state}{extra}"


async def follow(client, run: str, wf: Workflow, stream=None) -> RunState:
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    tasks = [n.id for n in wf.tasks]
    width = max((len(t) for t in tasks), default=4)
    bars: dict[str, tqdm] = {}
    last: dict[str, str] = {}
    st: RunState | None = None
    try:
        async for _, st in client.watch(run):
            for i, node_id in enumerate(tasks):
                ns = st.nodes.get(node_id)
                if ns is None:
                    continue
                label = _label(st, node_id)
                if tty:
                    done, total = _done(st, node_id)
                    b = bars.get(node_id)
                    if b is None:
                        b = bars[node_id] = tqdm(total=total, desc=node_id.ljust(width),
                                                 position=i, file=stream, leave=True,
                                                 bar_format="{desc} {bar:20} {n}/{total} "
                                                            "{elapsed} {postfix}")
                    if b.total != total:
                        b.total = total
                    b.n = done
                    b.set_postfix_str(label, refresh=False)
                    b.refresh()
                elif last.get(node_id) != label:
                    last[node_id] = label
                    print(f"{node_id.ljust(width)}  {label}", file=stream, flush=True)
    finally:
        for b in bars.values():
            b.close()
    return st
