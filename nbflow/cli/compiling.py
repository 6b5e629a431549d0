"""`nbflow compile` and `nbflow show`: the compiler and the DAG picture, no server."""
from __future__ import annotations

import os

import click

from nbflow.errors import UserError


def _load_workflow(path: str):
    """Compile; print the compiler's notes and warnings (each names its cells) to stderr."""
    from nbflow.compiler import compile_file

    wf = compile_file(path)
    for n in getattr(wf, "notes", []):
        click.echo(f"note: {n}", err=True)
    for w in getattr(wf, "warnings", []):
        click.secho(f"warning: {w}", fg="yellow", err=True)
    return wf


@click.command()
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


@click.command()
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
