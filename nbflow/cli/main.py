"""The `nbflow` command: the group, its error handling and the one table of its subcommands.
Each subcommand lives with its kind (compiling, running, services, inspect, steer, storage,
schedule, workers, console) and is thin: parse arguments, call compiler / client / stack, print."""
from __future__ import annotations

import sys

import click

from nbflow.cli.compiling import compile, show
from nbflow.cli.console import stats, ui
from nbflow.cli.inspect import history, logs, output, runs, status
from nbflow.cli.running import retry, run
from nbflow.cli.schedule import backfill, schedule, trigger
from nbflow.cli.services import down, engine, up, user, worker
from nbflow.cli.steer import approve, cancel, signal_cmd
from nbflow.cli.storage import gc
from nbflow.cli.workers import workers
from nbflow.errors import NbflowError
from nbflow.kernelspec import kernel


class NbflowGroup(click.Group):
    """Turns expected errors into one clear line (and exit code 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NbflowError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(getattr(e, "code", 2))


@click.group(cls=NbflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbflow-nats", prog_name="nbflow")
def main():
    """nbflow: run Jupyter notebooks as durable workflows on NATS JetStream.

    Mark cells with %%task, then `nbflow run NOTEBOOK`. With no NATS configured
    (no --nats, no NBFLOW_NATS_URL) an embedded stack is started for you.
    """


# --- every command of `nbflow`, grouped by concern (click lists them alphabetically) ----------

COMMANDS = (
    compile, show,                                  # the compiler
    run, up, down, user, engine, worker,            # running, the embedded stack's users
    runs, status, history, logs, output,            # reading runs
    workers,                                        # the workers seen
    cancel, retry, approve, signal_cmd,             # steering runs
    gc,                                             # storage
    schedule, backfill, trigger,                    # schedules and triggers
    ui, stats,                                      # the console
    kernel,                                         # the Jupyter kernelspec
)
for _command in COMMANDS:
    main.add_command(_command)
