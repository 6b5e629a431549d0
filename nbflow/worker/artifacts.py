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


def named_by(events) -> set[str]:
    """The artifact keys a run's recorded task results name."""
    named: set[str] = set()
    for ev in events:
        if ev.type in ("TaskSucceeded", "TaskFailed", "TaskSkipped"):
            named.update(written_keys(ev))
    return named


async def orphan_artifacts(art: Artifacts, named: set[str], keep_run) -> list:
    """THE orphan finder (`nbflow gc`): infos of task artifacts (bundles aside) that no kept
    run names — results of late (frozen, redelivered) workers that could not remove them,
    uploads of attempts whose result never made it, objects of deleted or expired runs.

    ``named``: every key the kept runs' recorded results (or reuses of them) name (see
    :func:`named_by`); ``keep_run(run)`` (async): True for a run whose objects must all stay —
    a run in flight has written keys it has not named yet."""
    out, kept = [], {}
    for info in await art.list():
        run, sep, _ = info.name.partition("/")
        if not sep or run == "bundles" or info.name in named:
            continue
        if run not in kept:
            kept[run] = await keep_run(run)
        if not kept[run]:
            out.append(info)
    return out
