"""Helpers the sales.ipynb setup cell imports (a local module next to the notebook)."""

ROWS = [
    {"region": "north", "amount": 120.0},
    {"region": "south", "amount": 80.5},
    {"region": "north", "amount": 10.0},
]


def load(day):
    return [dict(r, day=day) for r in ROWS]


def write(total):
    print("report:", total)
