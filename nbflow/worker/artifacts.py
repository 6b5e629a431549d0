"""Task inputs/outputs and executed notebooks in the object store ``nbflow_artifacts``.

Values are streamed from and to files (the object store chunks them), so outputs of hundreds
of MB never sit in the worker's memory whole. The calls are the NATS boundary's
(:class:`nbflow.nats.objects.Objects`); this module names the objects.
"""
from __future__ import annotations

from nbflow.nats.objects import Objects


def output_key(run: str, key: str, attempt: int, name: str) -> str:
    return f"{run}/{key}/{attempt}/out/{name}.pkl"


def notebook_key(run: str, key: str, attempt: int) -> str:
    return f"{run}/{key}/{attempt}/notebook.ipynb"


class Artifacts(Objects):
    """The artifacts object store (task outputs and executed notebooks)."""
