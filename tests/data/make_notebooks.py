"""Writes the test notebooks next to this file: `python tests/data/make_notebooks.py`.

The .ipynb files are committed; this script is how they were made (edit here, re-run).
"""
from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def code(src: str, *tags: str):
    return new_code_cell(src, metadata={"tags": list(tags)} if tags else {})


def md(src: str):
    return new_markdown_cell(src)


NOTEBOOKS = {
    "sales": [
        md("# Daily sales report\nLoads the day's sales, totals them per region, publishes."),
        code("%load_ext nbflow"),
        code('day = "2026-11-20"\nregions = ["north", "south"]', "parameters"),
        code("import json\nfrom salesutil import load, write"),
        code("def fmt(x):\n    return f\"{x:,.2f}\""),
        md("## Extract\nRead the raw sales rows for `day`."),
        code("%%task extract --retries 3 --retry-delay 10s --timeout 10m\nsales = load(day)"),
        md("## Totals per region"),
        code("%%task by_region --map region in regions\n"
             "total = sum(r[\"amount\"] for r in sales if r[\"region\"] == region)"),
        code("%flow show", "skip"),
        code('%%task publish --approval "Publish the report?" --when "sum(total) > 0"\n'
             "write(total)"),
    ],
    "diamond": [
        code("n = 10", "parameters"),
        code("%%task a\nxs = list(range(n))"),
        code("%%task b\nevens = [x for x in xs if x % 2 == 0]"),
        code("%%task c\nodds = [x for x in xs if x % 2]"),
        code("%%task d\nresult = sum(evens) - sum(odds)\nprint(result)"),
    ],
    "chain": [
        code("%load_ext nbflow\nimport math"),
        code("%%task one\na = 1"),
        code("%%task two\nb = a + 1"),
        code("%%task three\nc = b * math.pi"),
        code("%%task four --after two\nprint(c)"),
    ],
    "fanout": [
        code('files = ["a.csv", "b.csv", "c.csv"]', "parameters"),
        code("%%task listing\nsizes = {f: len(f) for f in files}"),
        code("%%task per_file --map f in files --queue io --isolation fresh\n"
             "size = sizes[f]"),
        code("%%task left\nleft = sizes"),
        code("%%task right\nright = len(sizes)"),
        code("%%task join\nprint(size, left, right)"),
    ],
    "conditions": [
        code("threshold = 100", "parameters"),
        code("%%task measure\nvalue = 42"),
        code('%%task alert --when "value > threshold"\nprint("too high", value)'),
        code('%%task ok --when "value <= threshold"\nprint("fine")'),
    ],
    "approvals": [
        code("%%task prepare\nreport = 'draft'"),
        code('%%task review --approval "Is the draft good?" --approval-timeout 2d'),
        code("%%task wait --sleep 2h"),
        code("%%task at_six --at 2026-11-20T06:00:00Z --after prepare"),
        code("%%task send --after review wait at_six\nprint(report)"),
    ],
    "signals": [
        code("%%task ask\nquestion = 'go?'"),
        code("%%task answer --wait-signal reply\ndecision = (question, reply)"),
        code("%%task act --timeout 1h30m\nprint(decision)"),
    ],
    "bad_cycle": [
        code("%%task a --after c\nx = 1"),
        code("%%task b\ny = x + 1"),
        code("%%task c\nz = y + 1"),
    ],
    "bad_syntax": [
        code("import os"),
        code("%%task ok\nx = 1"),
        code("%%task broken\ny = x +\nprint(y)"),
    ],
    "bad_after": [
        code("%%task extract\nx = 1"),
        code("%%task report --after extrct\nprint(x)"),
    ],
    "bad_duplicate": [
        code("%%task load\nx = 1"),
        md("some notes"),
        code("%%task load --retries 2\ny = 2"),
    ],
    "bad_ambiguous": [
        code("%%task north\ntotal = 1"),
        code("%%task south\ntotal = 2"),
        code("%%task report --after north\nprint(total)"),
    ],
    "bad_map": [
        code("%%task first\nx = 1"),
        code("%%task each --map item in items\nprint(item)"),
    ],
    "empty": [
        md("# Nothing here yet"),
        code("import os"),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        for i, c in enumerate(nb.cells):
            c.id = f"c{i}"
        nbformat.validate(nb)
        with open(os.path.join(HERE, f"{name}.ipynb"), "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
    with open(os.path.join(HERE, "not_a_notebook.ipynb"), "w", encoding="utf-8") as f:
        f.write("this is plain text, not a notebook\n")


if __name__ == "__main__":
    main()
