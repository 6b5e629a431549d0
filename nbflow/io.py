"""How a task notebook receives its inputs and hands back its outputs: the seam between the
compiled task notebook (which calls these functions) and the worker (which configures them).

The worker injects one papermill parameter, ``__nbflow__``, a JSON dict::

    {"task": "by_region", "key": "by_region#1", "run": "k3x9...", "dir": "/tmp/nbflow-io-...",
     "inputs": {"sales": "in/sales.pkl", "total": ["in/total.0.pkl", null, ...]},
     "map": {"var": "region", "over": "regions", "index": 1, "value": "north"} | null,
     "signal": {"var": "answer", "value": <json>} | null,
     "outputs": ["total"]}

Values travel as pickle files inside ``dir`` (the worker moves them to and from the object
store). A notebook run without ``__nbflow__`` (e.g. by hand) keeps its own variables: loading
and saving do nothing, and the ``--when`` check only prints.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any

from nbflow.errors import OutputError

SKIP_MARKER = "_skipped"
META_FILE = "_meta.json"
OUT_DIR = "out"


class Skip(Exception):
    """Raised in a task's kernel when its --when condition is false: the task is skipped."""


def _path(spec: dict, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(spec["dir"], rel)


def _load_file(spec: dict, rel: str | None) -> Any:
    if rel is None:                       # a skipped --map instance
        return None
    with open(_path(spec, rel), "rb") as f:
        return pickle.load(f)


def load_inputs(ns: dict, spec: dict | None) -> None:
    """Bind the task's inputs (and its --map element and --wait-signal value) in ``ns``."""
    if not spec:
        return
    for name, ref in (spec.get("inputs") or {}).items():
        if isinstance(ref, list):
            ns[name] = [_load_file(spec, r) for r in ref]
        else:
            ns[name] = _load_file(spec, ref)
    m = spec.get("map")
    if m:
        if "value" in m:                  # the engine sent the element (a parameter's)
            ns[m["var"]] = m["value"]
        else:
            seq = ns[m["over"]]
            ns[m["var"]] = list(seq)[m["index"]]
    s = spec.get("signal")
    if s:
        ns[s["var"]] = s.get("value")


def check_when(value: Any, spec: dict | None, expr: str = "") -> None:
    """Skip the task when its --when condition is false (evaluated here, in the task's kernel)."""
    if value:
        return
    if not spec:
        print(f"nbflow: --when {expr!r} is false: this task would be skipped")
        return
    with open(os.path.join(spec["dir"], SKIP_MARKER), "w") as f:
        f.write(expr)
    raise Skip(f"--when {expr!r} is false: task {spec.get('task')!r} skipped")


def save_outputs(ns: dict, spec: dict | None) -> None:
    """Pickle each output the task defined into ``dir/out/NAME.pkl`` (+ lengths for --map)."""
    if not spec:
        return
    out = os.path.join(spec["dir"], OUT_DIR)
    os.makedirs(out, exist_ok=True)
    meta: dict[str, Any] = {"lens": {}, "missing": []}
    for name in spec.get("outputs") or []:
        if name not in ns:
            meta["missing"].append(name)
            continue
        value = ns[name]
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # pickle raises many types (TypeError, PicklingError, AttributeError)
            raise OutputError(
                f"task {spec.get('task')!r}: output variable {name!r} "
                f"({type(value).__name__}) cannot be pickled: {e}. "
                f"Convert it to plain data (lists, dicts, DataFrames) or `del {name}` at the end "
                f"of the cell if no other task needs it."
            ) from None
        with open(os.path.join(out, f"{name}.pkl"), "wb") as f:
            f.write(data)
        try:
            meta["lens"][name] = len(value)
        except TypeError:
            pass
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f)


def forget(ns: dict, keep: set) -> None:
    """Between two --map instances run in one kernel (a chunk): drop every name the last one
    made (``keep``: the names after the task's setup cells) and the output cache, so an
    instance never sees another's variables."""
    for name in [n for n in ns if n not in keep]:
        del ns[name]
    out = ns.get("Out")
    if isinstance(out, dict):
        out.clear()
    for name in ("_", "__", "___"):
        if name in ns:
            ns[name] = ""
