"""Write small notebooks the way an analyst would, for integration tests."""
from __future__ import annotations

from pathlib import Path

import nbformat


def write_notebook(path: Path, cells: list, params: str | None = None) -> Path:
    """cells: code strings (a leading '#md ' makes a markdown cell); params: a parameters cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if params is not None:
        c = nbformat.v4.new_code_cell(params)
        c.metadata["tags"] = ["parameters"]
        nb.cells.append(c)
    for src in cells:
        if src.startswith("#md "):
            nb.cells.append(nbformat.v4.new_markdown_cell(src[4:]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(src))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path
