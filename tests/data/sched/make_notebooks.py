"""Writes the scheduling test notebooks: `python tests/data/sched/make_notebooks.py`."""
from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def code(src: str, *tags: str):
    return new_code_cell(src, metadata={"tags": list(tags)} if tags else {})


NOTEBOOKS = {
    # one trivial task; receives its fire time
    "tick": [code('scheduled_for = ""', "parameters"),
             code("%%task work\nstamp = scheduled_for")],
    # no parameters at all: scheduled_for must not be passed
    "plain": [code("%%task work\nx = 1")],
    # an event trigger's notebook: the message body arrives as `payload`
    "event": [code("payload = None", "parameters"),
              code("%%task handle\nn = len(str(payload))")],
    # durable timer inside a workflow
    "sleepy": [code("%%task wait --sleep 2s"),
               code("%%task after --after wait\nb = 1")],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {
            "name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))


if __name__ == "__main__":
    main()
