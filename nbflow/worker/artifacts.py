"""Task inputs/outputs and executed notebooks in the object store ``nbflow_artifacts``.

Values are streamed from and to files (the object store chunks them), so outputs of hundreds
of MB never sit in the worker's memory whole. The calls are the NATS boundary's
(:class:`nbflow.nats.objects.Objects`); this module names the objects.
"""
from __future__ import annotations

from nbflow.nats.objects import Objects


def output_key(run: str, key: str, attempt: int, name: str, delivery: str = "") -> str:
    """Per delivery: a late (frozen, redelivered) worker writes beside the recorded result,
    never over it; the completion event names the keys that count."""
    d = f"{delivery}/" if delivery else ""
    return f"{run}/{key}/{attempt}/{d}out/{name}.pkl"


def notebook_key(run: str, key: str, attempt: int, delivery: str = "") -> str:
    d = f"{delivery}/" if delivery else ""
    return f"{run}/{key}/{attempt}/{d}notebook.ipynb"


def written_keys(ev) -> list[str]:
    """The artifact keys a task result event names (its outputs and executed notebook)."""
    keys = [ev.get("notebook")] if ev.get("notebook") else []
    for ref in (ev.get("outputs") or {}).values():
        keys += [r for r in (ref if isinstance(ref, list) else [ref]) if r]
    return keys


class Artifacts(Objects):
    """The artifacts object store (task outputs and executed notebooks)."""


async def orphan_artifacts(art: Artifacts, run: str, events) -> list[str]:
    """Objects of a FINISHED run that no recorded task result names: results of late (frozen,
    redelivered) workers that could not remove them. For `nbflow gc`; never call it on a
    running run (a task in flight has written keys it has not named yet)."""
    named: set[str] = set()
    for ev in events:
        if ev.type in ("TaskSucceeded", "TaskFailed", "TaskSkipped"):
            named.update(written_keys(ev))
    return sorted(i.name for i in await art.list()
                  if i.name.startswith(f"{run}/") and i.name not in named)
