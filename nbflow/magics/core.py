"""IPython magics: ``%%task`` (mark and run a task cell) and ``%flow`` (workflow commands).

Thin by design: options are parsed by the compiler's own parser (``compiler.cells``), so the
notebook and the compiled workflow can never disagree about what ``%%task`` means.

Every ``%flow`` subcommand is listed in :data:`COMMANDS` below, in one place; ``%flow help``
prints that table. Another package can add its own with::

    from nbflow.magics.core import flow_command

    @flow_command("hello", "say hello: %flow hello NAME")
    def _hello(shell, args): ...
"""
from __future__ import annotations

import json
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from nbflow.compiler.cells import TaskSpec, parse_python, parse_task_line, task_magic_arguments
from nbflow.compiler.names import analyze_names
from nbflow.core.ir import suggest
from nbflow.errors import NbflowError, WorkflowError
from nbflow.magics import schedules, unsaved, widgets
from nbflow.magics.notebook import (compile_current, current_notebook_path, executed_cells,  # noqa: F401
                                    gated_names, record_cell, registered_tasks)

FlowCommand = Callable[[Any, str], Any]


@magics_class
class NbflowMagics(Magics):

    @cell_magic
    @task_magic_arguments
    def task(self, line: str, cell: str | None = None) -> None:
        """Mark a notebook cell as a workflow task: ``%%task NAME [options]``.

        In the notebook the cell runs as usual (``--map`` runs it once per element and leaves
        lists, like the workflow does; a false ``--when`` skips it); ``--no-run`` only
        registers it. Dependencies are inferred from the names the cell reads and assigns.
        DURATION is like 30s, 10m, 2h, 1d, 1h30m, 250ms or plain seconds.
        """
        try:
            opts = parse_task_line(line)
        except WorkflowError as e:
            raise UsageError(f"%%task {line.strip()}: {e}") from None
        body = cell or ""
        spec = TaskSpec(code=body, first_line=f"%%task {line.strip()}", **opts)
        try:
            spec.defines, spec.reads = analyze_names(parse_python(body, f"task {spec.name!r}"))
        except WorkflowError:
            pass                       # running the cell shows Python's own SyntaxError
        registered_tasks(self.shell)[spec.name] = spec
        record_cell(self.shell, spec.name, f"%%task {line}", body)
        if spec.no_run or not body.strip():
            return
        ns = self.shell.user_ns
        pending = gated_names(self.shell)
        for name in spec.defines:             # run again below: no longer waiting, or still
            pending.pop(name, None)
        why = self._gate(spec, ns, pending)
        if why:
            for name in spec.defines:
                pending[name] = (spec.name, why)
            return
        if spec.when:
            try:
                ok = eval(spec.when, ns)     # the user's own kernel, as the worker would
            except Exception as e:
                raise UsageError(f"%%task {spec.name}: --when {spec.when!r} failed: "
                                 f"{type(e).__name__}: {e}") from None
            if not ok:
                print(f"nbflow: --when {spec.when!r} is false: task {spec.name!r} skipped")
                return
        if spec.map_var:
            self._run_map(spec, body)
        else:
            self.shell.run_cell(body)

    def _gate(self, spec: TaskSpec, ns: dict, pending: dict) -> str:
        """Why the body must not run in the notebook ("" when it may): it waits for an
        approval or a signal in a run, or reads what such a task would produce. Says so."""
        if spec.here:
            return ""
        hint = (f"`%flow run` starts a run; `%%task {spec.name} --here ...` runs it in this "
                "kernel for debugging")
        if spec.approval is not None:
            print(f"nbflow: task {spec.name!r} waits for approval in a run "
                  f"({spec.approval!r}); its body did not run here. {hint}")
            return "waits for approval"
        if spec.wait_signal:
            if spec.example is not None:
                ns[spec.wait_signal] = json.loads(spec.example)
                print(f"nbflow: {spec.wait_signal} = {spec.example} (the --example value; in a "
                      f"run it is the value of signal {spec.wait_signal!r})")
                return ""
            print(f"nbflow: task {spec.name!r} waits for signal {spec.wait_signal!r} in a run; "
                  f"its body did not run here. Add --example JSON to run it with a sample "
                  f"value, or {hint}")
            return f"waits for signal {spec.wait_signal!r}"
        blocked = sorted(n for n in spec.reads if n in pending and n not in ns)
        if blocked:
            producer, why = pending[blocked[0]]
            names = ", ".join(f"`{n}`" for n in blocked)
            print(f"nbflow: task {spec.name!r} reads {names}, which task {producer!r} produces "
                  f"in a run ({why}); its body did not run here")
            return f"reads {blocked[0]} from task {producer!r}, which {why}"
        return ""

    def _run_map(self, spec: TaskSpec, body: str) -> None:
        ns = self.shell.user_ns
        if spec.map_over not in ns:
            raise UsageError(f"%%task {spec.name}: --map over {spec.map_over!r}, which is not "
                             "defined in this kernel yet")
        results: dict[str, list[Any]] = {n: [] for n in sorted(spec.defines)}
        for item in list(ns[spec.map_over]):
            ns[spec.map_var] = item
            res = self.shell.run_cell(body)
            if not res.success:
                return
            for n in results:
                results[n].append(ns.get(n))
        ns.update(results)

    @line_magic
    def flow(self, line: str) -> Any:
        """Workflow commands: ``%flow help`` lists them (``%flow show [path.ipynb]``, ...)."""
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("", "-h", "--help"):
            cmd = "help"
        func = FLOW_COMMANDS.get(cmd)
        if func is None:
            raise UsageError(f"unknown %flow command {cmd!r}{suggest(cmd, list(FLOW_COMMANDS))} "
                             "(`%flow help` lists them)")
        try:
            return func(self.shell, rest.strip())
        except NbflowError as e:            # a user mistake: one line, no traceback
            raise UsageError(str(e)) from None


def _help(shell: Any, args: str) -> None:
    width = max(len(n) for n in FLOW_COMMANDS)
    lines = ["%flow commands:"] + [f"  {n.ljust(width)}  {FLOW_HELP.get(n, '')}"
                                   for n in sorted(FLOW_COMMANDS)]
    print("\n".join(lines))


def _show(shell: Any, args: str) -> None:
    from IPython.display import SVG, display

    from nbflow.compiler import render

    wf = compile_current(shell, args or None, "show")
    try:
        svg = render.to_svg(wf)
    except Exception as e:  # graphviz's `dot` missing or failing: the DOT text still helps
        print(render.to_dot(wf))
        print(f"nbflow: could not draw the SVG ({e}); install graphviz (`dot`) to see the picture")
        return
    display(SVG(svg))


# --- the %flow subcommands: name, function(shell, argstring), one-line help ------------------------

COMMANDS: tuple[tuple[str, FlowCommand, str], ...] = (
    ('help', _help,
     'list the %flow commands'),
    ('show', _show,
     "draw this notebook's workflow DAG: %flow show [path.ipynb]"),
    ('run', widgets.flow_run,
     'submit this notebook (its cells as this kernel ran them) and watch it live: %flow run [path.ipynb] [name=value ...] [--reuse] [--saved] [--user NAME]'),
    ('retry', widgets.flow_retry,
     'a new run of a failed run with the notebook file as it is now (your fix), reusing unchanged tasks: %flow retry RUN [--same-code]'),
    ('watch', widgets.flow_watch,
     'show a run live (catches up from its history): %flow watch RUN'),
    ('runs', widgets.flow_runs,
     'recent runs, click one to watch it: %flow runs [--limit N]'),
    ('approve', widgets.flow_approve,
     'decide an approval: %flow approve RUN TASK [--reject] [--comment TEXT] [--user NAME]'),
    ('signal', widgets.flow_signal,
     'send a signal to a run: %flow signal RUN NAME VALUE (JSON or text)'),
    ('cancel', widgets.flow_cancel,
     'cancel a run: %flow cancel RUN'),
    ('schedule', schedules.flow_schedule,
     'schedule this notebook: %flow schedule --cron "0 6 * * *" [name=value ...]'),
    ('schedules', schedules.flow_schedules,
     'the schedules: next run, last run and its state'),
)

FLOW_COMMANDS: dict[str, FlowCommand] = {name: func for name, func, _ in COMMANDS}
FLOW_HELP: dict[str, str] = {name: text for name, _, text in COMMANDS}


def flow_command(name: str, help: str = "") -> Callable[[FlowCommand], FlowCommand]:
    """Register ``%flow NAME ...``: ``func(shell, argstring)``. Raise WorkflowError or
    UsageError for user mistakes (shown as one line)."""
    def deco(func: FlowCommand) -> FlowCommand:
        FLOW_COMMANDS[name] = func
        FLOW_HELP[name] = help or (func.__doc__ or "").strip().split("\n")[0]
        return func
    return deco


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbflow``: register ``%%task`` and ``%flow``."""
    ipython.register_magics(NbflowMagics)
    unsaved.install(ipython)
