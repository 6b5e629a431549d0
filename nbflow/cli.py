"""The `nbflow` command. Thin: parse arguments, call compiler / client / stack, print."""
from __future__ import annotations

import os
import sys

import click

from nbflow.compiler.graph import WorkflowError


class NbflowGroup(click.Group):
    """Turns expected errors into one clear line (and exit code 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WorkflowError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.code)


class UserError(Exception):
    """An error meant for the user: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@click.group(cls=NbflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbflow-nats", prog_name="nbflow")
def main():
    """nbflow: run Jupyter notebooks as durable workflows on NATS JetStream.

    Mark cells with %%task, then `nbflow run NOTEBOOK`. With no NATS configured
    (no --nats, no NBFLOW_NATS_URL) an embedded stack is started for you.
    """


# --- compiler --------------------------------------------------------------------------------

def _load_workflow(path: str):
    from nbflow.compiler import compile_file

    return compile_file(path)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="Write here: .bpmn/.xml (BPMN 2.0), .json (workflow IR). Default: print IR JSON.")
def compile(source, output):
    """Compile a notebook (or a BPMN 2.0 file) into a workflow.

    \b
    nbflow compile report.ipynb -o flow.bpmn      # BPMN 2.0 XML with diagram
    nbflow compile flow.bpmn -o workflow.json     # BPMN in, workflow IR out
    """
    wf = _load_workflow(source)
    if output is None:
        click.echo(wf.to_json(indent=2))
        return
    ext = os.path.splitext(output)[1].lower()
    if ext in (".bpmn", ".xml"):
        from nbflow.compiler.bpmn import to_bpmn

        text = to_bpmn(wf)
    elif ext == ".json":
        text = wf.to_json(indent=2)
    else:
        raise UserError(f"cannot write {output!r}: use a .bpmn, .xml or .json file name")
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    click.echo(f"wrote {output} ({len(wf.tasks)} tasks, version {wf.content_hash()})", err=True)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="dag.svg, dag.png, dag.pdf or dag.dot. Default: print DOT text.")
def show(source, output):
    """Draw the workflow's DAG with graphviz."""
    from nbflow.compiler import render

    wf = _load_workflow(source)
    if output is None:
        click.echo(render.to_dot(wf))
        return
    note = render.render(wf, output)
    if note:
        click.echo(note, err=True)
    else:
        click.echo(f"wrote {output}", err=True)


if __name__ == "__main__":
    main()
