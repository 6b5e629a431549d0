"""Bounded storage: retention of finished runs, and `nbflow gc`.

What is kept (defaults; environment variables change them):

* finished runs (history, snapshot, approvals, signals, artifacts): ``NBFLOW_RETENTION_DAYS``
  (30) days after they finished; running runs are never touched;
* dead letters: ``NBFLOW_DEADLETTER_DAYS`` (90) days (the stream's max age, set by ``ensure``);
* work dirs of workers that are gone (killed mid-task): removed by the next worker on the machine
  at its start, and by `nbflow gc`.

`nbflow gc [--dry-run]` removes finished runs past retention, orphaned artifacts (objects of a
finished or deleted run that no recorded completion names: a worker killed mid-upload, an
attempt whose result never made it), orphaned object chunks (an upload cut off before its
metadata was written, older than an hour) and stale work dirs. An object still named by any
kept run (its own outputs, or outputs another run reuses) is never removed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from nbflow.core.state import RunState
from nbflow.errors import NotFound

DAY = 24 * 3600
CHUNK_GRACE_S = 3600          # an upload's chunks without metadata younger than this may be live


def retention_days() -> float:
    return float(os.environ.get("NBFLOW_RETENTION_DAYS", "30"))


def deadletter_days() -> float:
    return float(os.environ.get("NBFLOW_DEADLETTER_DAYS", "90"))


@dataclass
class GcReport:
    dry_run: bool
    runs: list[str] = field(default_factory=list)           # finished runs past retention
    objects: list[str] = field(default_factory=list)        # artifacts removed
    object_bytes: int = 0
    chunk_subjects: int = 0                                 # orphaned upload chunks
    workdirs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        return [f"{verb} {len(self.runs)} finished run(s) past retention"
                + (f": {', '.join(self.runs[:10])}" + (" ..." if len(self.runs) > 10 else "")
                   if self.runs else ""),
                f"{verb} {len(self.objects)} artifact(s), {self.object_bytes / 2**20:.1f} MB",
                f"{verb} {self.chunk_subjects} orphaned upload(s) of object chunks",
                f"{verb} {len(self.workdirs)} stale work dir(s)"]


def _strings(v: Any, out: set[str]) -> None:
    if isinstance(v, str):
        out.add(v)
    elif isinstance(v, dict):
        for x in v.values():
            _strings(x, out)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _strings(x, out)


async def gc(client, *, dry_run: bool = False, days: float | None = None,
             now: float | None = None) -> GcReport:
    """Collect garbage in ``client``'s namespace (see the module doc). ``client``: a
    :class:`nbflow.runs.Runs` (the client)."""
    from nbflow.worker import workdirs

    L = client.L
    now = now or time.time()
    keep_s = (retention_days() if days is None else days) * DAY
    rep = GcReport(dry_run=dry_run)
    runs_kv = await client.kv(L.runs_bucket)
    snaps: dict[str, dict] = {}
    for k in await runs_kv.keys():
        e = await runs_kv.get_or_none(k)
        if e is not None:
            try:
                snaps[k] = json.loads(e.value)
            except ValueError:
                continue
    expired = {r for r, d in snaps.items()
               if d.get("state") != "running" and (d.get("finished") or d.get("started") or now)
               < now - keep_s}
    referenced: set[str] = set()
    for r, d in snaps.items():
        if r not in expired:
            _strings(d.get("tasks"), referenced)
            _strings(d.get("reuse"), referenced)
    fps_kv = await client.kv(L.fps_bucket)
    if True:
        for k in await fps_kv.keys():
            e = await fps_kv.get_or_none(k)
            if e is not None:
                try:
                    rec = json.loads(e.value)
                except ValueError:
                    continue
                if rec.get("run") in expired:          # its outputs go with the run
                    if not dry_run:
                        await fps_kv.delete(k)
                else:
                    _strings(rec, referenced)

    # artifacts: objects of finished/expired/deleted runs that nothing kept names
    for info in await client.artifacts.list():
        name = info.name
        run, sep, _ = name.partition("/")
        if not sep or run == "bundles" or name in referenced:
            continue
        d = snaps.get(run)
        if d is not None and d.get("state") == "running":
            continue
        if d is None and run not in expired and await client.has_run(run):
            continue                                   # the engine has not caught up yet
        rep.objects.append(name)
        rep.object_bytes += int(getattr(info, "size", 0) or 0)
        if not dry_run:
            await client.artifacts.delete(name)

    rep.chunk_subjects = await _orphan_chunks(client, dry_run, now)

    # finished runs past retention: history, snapshot, approvals, signals
    for run in sorted(expired):
        rep.runs.append(run)
        if dry_run:
            continue
        await client.streams.purge(L.history_stream, subject=L.history_subject(run))
        for bucket in (L.approvals_bucket, L.signals_bucket):
            kv = await client.kv(bucket)
            for k in await kv.keys():
                if k.startswith(run + "."):
                    await kv.purge(k)
        await runs_kv.purge(run)

    rep.workdirs = workdirs.clean_stale(dry_run=dry_run)
    return rep


async def _orphan_chunks(client, dry_run: bool, now: float) -> int:
    """Chunk subjects of the artifacts store that no object's metadata names (uploads cut off),
    older than CHUNK_GRACE_S. Returns how many were (or would be) purged."""
    stream = f"OBJ_{client.L.artifacts_store}"
    prefix = f"$O.{client.L.artifacts_store}.C."
    try:
        info = await client.streams.info(stream, subjects_filter=prefix + ">")
    except NotFound:
        return 0
    subjects = info.state.subjects or {}
    if not subjects:
        return 0
    live = {i.nuid for i in await client.artifacts.list()}
    n = 0
    for subj in subjects:
        if subj[len(prefix):] in live:
            continue
        try:
            last = await client.streams.get_last(stream, subj)
        except NotFound:
            continue
        t = last.time.timestamp() if getattr(last, "time", None) else now
        if t > now - CHUNK_GRACE_S:
            continue                                   # maybe an upload in progress
        n += 1
        if not dry_run:
            await client.streams.purge(stream, subject=subj)
    return n
