"""Bounded storage: retention of finished runs, and `nbflow gc`.

What is kept (defaults; environment variables change them):

* finished runs (history, snapshot, approvals, signals, artifacts): ``NBFLOW_RETENTION_DAYS``
  (30) days after they finished; running runs are never touched;
* dead letters: ``NBFLOW_DEADLETTER_DAYS`` (90) days (the stream's max age, set by ``ensure``);
* work dirs of workers that are gone (killed mid-task): removed by the next worker on the machine
  at its start, and by `nbflow gc`.

`nbflow gc [--dry-run]` removes finished runs past retention, orphaned artifacts (objects of a
finished or deleted run that no recorded completion names: a worker killed mid-upload, an
attempt whose result never made it; :func:`nbflow.worker.artifacts.orphan_artifacts`),
notebook-folder bundles that no kept run, pending submit or schedule names and that were last
uploaded or reused more than NBFLOW_BUNDLE_GRACE_S (3600) seconds ago
(:func:`nbflow.worker.bundles.orphan_bundles`), orphaned object chunks (an upload cut off before
its metadata was written, older than an hour) and stale work dirs. An object still named by any
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
    bundles: list[str] = field(default_factory=list)        # bundle hashes removed
    bundle_bytes: int = 0

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        return [f"{verb} {len(self.runs)} finished run(s) past retention"
                + (f": {', '.join(self.runs[:10])}" + (" ..." if len(self.runs) > 10 else "")
                   if self.runs else ""),
                f"{verb} {len(self.objects)} artifact(s), {self.object_bytes / 2**20:.1f} MB",
                f"{verb} {len(self.bundles)} unused notebook-folder bundle(s), "
                f"{self.bundle_bytes / 2**20:.1f} MB",
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
    from nbflow.worker import bundles, workdirs
    from nbflow.worker.artifacts import orphan_artifacts

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
    async def keep_run(run: str) -> bool:
        d = snaps.get(run)
        if d is not None:
            return d.get("state") == "running"
        return run not in expired and await client.has_run(run)   # the engine is behind
    for info in await orphan_artifacts(client.artifacts, referenced, keep_run):
        rep.objects.append(info.name)
        rep.object_bytes += int(getattr(info, "size", 0) or 0)
        if not dry_run:
            await client.artifacts.delete(info.name)

    # bundles: what no kept run, pending submit or schedule names, past the grace period
    wanted = await _wanted_bundles(client, snaps, expired, dry_run)
    for info in await bundles.orphan_bundles(client.artifacts, wanted, now):
        rep.bundles.append(bundles.hash_of(info.name) or info.name)
        rep.bundle_bytes += int(getattr(info, "size", 0) or 0)
        if not dry_run:
            await client.artifacts.delete(info.name)

    rep.chunk_subjects = await _orphan_chunks(client, dry_run, now)

    # finished runs past retention: history, snapshot, approvals, signals
    for run in sorted(expired):
        rep.runs.append(run)
        if dry_run:
            continue
        for subj in (L.history_subject(run), L.history_legacy_subject(run)):
            await client.streams.purge(L.history_stream, subject=subj)
        for bucket in (L.approvals_bucket, L.signals_bucket):
            kv = await client.kv(bucket)
            for k in await kv.keys():
                if k.startswith(run + "."):
                    await kv.purge(k)
        await runs_kv.purge(run)

    rep.workdirs = workdirs.clean_stale(dry_run=dry_run)
    return rep


async def _wanted_bundles(client, snaps: dict[str, dict], expired: set[str],
                          dry_run: bool) -> set[str]:
    """Bundle hashes still needed: of the definitions of kept runs (their snapshots), of runs
    submitted but not yet folded (their start records, while their history exists), and of
    schedules and triggers. Start records of expired runs are removed (not in a dry run)."""
    L = client.L
    wfs = {d["wf"] for r, d in snaps.items() if r not in expired and d.get("wf")}
    defs = await client.kv(L.defs_bucket)
    for k in await defs.keys():
        if not k.startswith("start."):
            continue
        run = k[len("start."):]
        if run in expired:
            if not dry_run:
                await defs.purge(k)
            continue
        if run in snaps:
            continue                                    # its snapshot named its definition
        e = await defs.get_or_none(k)
        if e is None or not e.value:
            continue
        try:
            rec = json.loads(e.value)
        except ValueError:
            continue
        # a start record without history: a submit in progress (the bundle's grace period
        # covers it) or a run gc already removed
        if rec.get("wf") and await client.has_run(run):
            wfs.add(rec["wf"])
    try:
        sched = await client.kv(L.schedules_bucket)
        sched_keys = await sched.keys()
    except NotFound:                                    # no schedule was ever made
        sched_keys = []
    for k in sched_keys:
        if k.startswith(("sched.", "trig.")):
            e = await sched.get_or_none(k)
            try:
                d = json.loads(e.value) if e is not None and e.value else {}
            except ValueError:
                continue
            if d.get("wf"):
                wfs.add(d["wf"])
    out = set()
    for h in wfs:
        try:
            wf = await client.workflow(h)
        except NotFound:
            continue
        if wf.bundle:
            out.add(wf.bundle)
    return out


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
