"""BPMN's token game, played on every combination of branch choices: what the engine's "run
each node once, join when all predecessors are resolved" cannot mean is refused."""
from __future__ import annotations

from collections import defaultdict

from nbflow.compiler.bpmn.common import _b
from nbflow.compiler.bpmn.reading import _Problems

MAX_PATHS = 20000            # branch combinations the token check explores before giving up


class _Flow:
    """A sequence flow as the importer sees it: ends, condition, default, and the guard that
    carries its condition's meaning."""
    __slots__ = ("id", "s", "t", "cond", "has_ce", "default", "name", "guard", "el")

    def __init__(self, el, s, t, cond, default):
        self.id, self.s, self.t, self.cond, self.default = el.get("id") or "?", s, t, cond, default
        self.has_ce = el.find(_b("conditionExpression")) is not None
        self.name = " ".join((el.get("name") or "").split())
        self.guard: str | None = None
        self.el = el


def _check_tokens(kinds: dict[str, str], flows: list[_Flow], problems: _Problems) -> None:
    """Play BPMN's token game on every combination of branch choices. The engine runs each node
    at most once and starts it when all its predecessors are resolved (skipped or done), which
    is what BPMN means exactly when no node other than an end event gets two tokens and no
    parallel join gets tokens on only some of its flows; anything else is refused."""
    from itertools import combinations

    inc: dict[str, list[_Flow]] = defaultdict(list)
    out: dict[str, list[_Flow]] = defaultdict(list)
    for f in flows:
        inc[f.t].append(f)
        out[f.s].append(f)
    ids = [b for b in kinds if b in inc or b in out]
    indeg = {b: len(inc[b]) for b in ids}
    order, ready = [], [b for b in ids if not indeg[b]]
    while ready:
        b = ready.pop(0)
        order.append(b)
        for f in out[b]:
            indeg[f.t] -= 1
            if not indeg[f.t]:
                ready.append(f.t)
    if len(order) < len(ids):
        return  # a loop: refused with the cycle named, after the IR is built

    def options(b: str) -> list[tuple[_Flow, ...]]:
        o, kind = out[b], kinds[b]
        conditional = [f for f in o if f.has_ce and not f.default]
        dflt = [f for f in o if f.default and (conditional or kind == "exclusiveGateway")]
        plain = [f for f in o if f not in conditional and f not in dflt]
        if kind == "exclusiveGateway" and (len(o) > 1 or conditional):
            return [(f,) for f in o]
        if not conditional:
            return [tuple(o)]
        res = [tuple(plain) + c for r in range(1, len(conditional) + 1)
               for c in combinations(conditional, r)]
        if dflt or plain:
            res.append(tuple(plain) + tuple(dflt))
        return res

    tokens: dict[str, int] = defaultdict(int)
    paths = [0]

    def fires(b: str) -> int:
        """How many times BPMN fires b (tokens it passes on); refuses what nbflow cannot mean."""
        ins = [tokens[f.id] for f in inc[b]]
        kind = kinds[b]
        if not ins:  # one start event starts a run (several are alternatives); boundary
            # events fire on what happens to their activity; other sources start with the run
            return int(b == start[0] if kind == "startEvent" else kind != "boundaryEvent")
        if kind == "parallelGateway" and len(ins) > 1:
            if min(ins) != max(ins):
                problems.add(kind, b, f"it waits for a token on each of its {len(ins)} incoming "
                             "flows, but on some paths only some get one (they follow an "
                             "exclusive or conditional choice), so BPMN would wait forever: "
                             "merge them with an exclusiveGateway or inclusiveGateway")
            return max(ins)
        n = max(ins) if kind == "inclusiveGateway" else sum(ins)
        if n > 1 and kind not in ("endEvent", "exclusiveGateway", "inclusiveGateway"):
            problems.add(kind, b, f"up to {n} tokens reach it in one run (no join gateway in "
                         "front; they come from a parallel split or from flows that are not "
                         "exclusive), so BPMN would run it once per token; nbflow runs each step "
                         "once: join the flows with a parallelGateway, or make them exclusive")
        return n

    def walk(i: int) -> None:
        if paths[0] > MAX_PATHS:
            return
        if i == len(order):
            paths[0] += 1
            return
        b = order[i]
        n = fires(b)
        if not n or not out[b]:
            return walk(i + 1)
        for opt in options(b):   # n > 1 tokens: all take the same choice (enough to see repeats)
            for f in opt:
                tokens[f.id] += n
            walk(i + 1)
            for f in opt:
                tokens[f.id] -= n

    starts = [b for b in order if kinds[b] == "startEvent" and not inc[b]] or [None]
    start: list[str | None] = [None]
    for start[0] in starts:
        walk(0)
    if paths[0] > MAX_PATHS:
        problems.add("process", "?", f"more than {MAX_PATHS} combinations of branch choices to "
                     "check; nbflow cannot prove it runs as drawn")
