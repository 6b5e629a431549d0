"""``%flow run / retry / watch / runs / approve / signal / cancel``: the run commands of the magic.

Thin: parse the line, call the client, show a widget. Listed in ``nbflow.magics.core.COMMANDS``,
whose dispatcher turns an NbflowError from the client into a one-line UsageError.
"""
from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from IPython.core.error import UsageError

from nbflow.client import parse_param
from nbflow.magics.notebook import compile_current, current_notebook_path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no SystemExit in a kernel
        raise UsageError(f"%flow {self.prog}: {message}")


def _parse(prog: str, args: str, *spec: tuple[tuple, dict]) -> argparse.Namespace:
    p = _Parser(prog=prog, add_help=False)
    for a, kw in spec:
        p.add_argument(*a, **kw)
    try:
        return p.parse_args(shlex.split(args))
    except ValueError as e:          # unbalanced quotes
        raise UsageError(f"%flow {prog}: {e}") from None


def _client():
    from nbflow.widgets.runview import shared_client

    return shared_client()


def _show(view) -> Any:
    from IPython import get_ipython
    from IPython.display import display

    from nbflow.widgets.runview import remember

    remember(view)
    display(view)
    ip = get_ipython()
    view._shown_in = getattr(ip, "execution_count", None)   # don't draw it twice (output hook)
    return view


def split_params(tokens: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for tok in tokens:
        name, eq, value = tok.partition("=")
        if not eq or not name:
            raise UsageError(f"%flow run: expected name=value, got {tok!r}")
        params[name] = parse_param(value, defaults.get(name))
    return params


def flow_run(shell, args: str):
    from nbflow.magics.unsaved import compile_as_seen, describe_changes
    from nbflow.widgets.runview import RunView

    ns = _parse("run", args, (("--user",), {"default": None}),
                (("--reuse",), {"action": "store_true"}),
                (("--saved",), {"action": "store_true"}),
                (("items",), {"nargs": "*"}))
    path = None
    items = list(ns.items)
    if items and items[0].endswith(".ipynb") and "=" not in items[0]:
        path = items.pop(0)
    note = ""
    if ns.saved:
        wf = compile_current(shell, path, "run")
    else:
        wf, changed, missing = compile_as_seen(shell, path or current_notebook_path(shell, "run"))
        note = describe_changes(changed, missing)
    params = split_params(items, wf.params)
    c = _client()
    run = c.submit(wf, params, by=ns.user, reuse_outputs=ns.reuse)
    if note:
        print(f"nbflow: run {run} is {note}")
    view = RunView(run, c, user=ns.user)
    if note:
        view._set_status(note)
    return _show(view)


def flow_retry(shell, args: str):
    from nbflow.widgets.runview import RunView

    ns = _parse("retry", args, (("run",), {}), (("--same-code",), {"action": "store_true"}),
                (("--user",), {"default": None}))
    c = _client()
    new = c.retry(ns.run, by=ns.user, same_code=ns.same_code)
    print(f"run {new} retries {ns.run}")
    return _show(RunView(new, c, user=ns.user))


def flow_watch(shell, args: str):
    from nbflow.widgets.runview import RunView

    ns = _parse("watch", args, (("run",), {}), (("--user",), {"default": None}))
    return _show(RunView(ns.run, _client(), user=ns.user))


def flow_runs(shell, args: str):
    from IPython.display import display

    from nbflow.widgets.runs import RunsList

    ns = _parse("runs", args, (("--limit",), {"type": int, "default": 20}))
    view = RunsList(_client(), limit=ns.limit)
    display(view)
    return None


def flow_approve(shell, args: str):
    ns = _parse("approve", args, (("run",), {}), (("task",), {}),
                (("--reject",), {"action": "store_true"}),
                (("--comment",), {"default": ""}), (("--user",), {"default": None}))
    d = _client().approve(ns.run, ns.task, approved=not ns.reject, by=ns.user, comment=ns.comment)
    print(f"{ns.task}: {d['state']} by {d['by']}")


def flow_signal(shell, args: str):
    ns = _parse("signal", args, (("run",), {}), (("name",), {}), (("value",), {"nargs": "?"}),
                (("--user",), {"default": None}))
    value = None
    if ns.value is not None:
        try:
            value = json.loads(ns.value)
        except ValueError:
            value = ns.value
    _client().signal(ns.run, ns.name, value, by=ns.user)
    print(f"signal {ns.name} sent to run {ns.run}")


def flow_cancel(shell, args: str):
    ns = _parse("cancel", args, (("run",), {}), (("--user",), {"default": None}))
    _client().cancel(ns.run, by=ns.user)
    print(f"cancel requested for run {ns.run}")
