"""Starting runs and reading their definitions: what the faces (through the client) and the
engine's scheduler share. The engine never imports the client; both build on :class:`Runs`.

A start stores the definition (immutable, by content hash; the notebook's folder as a bundle)
and publishes ``RunStarted`` with a deduplicating message id: a repeated start is recorded once.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import os
import secrets
from typing import Any

from nbflow.core.events import make, start_msg_id, start_record, task_key
from nbflow.core.fingerprint import fingerprints, reusable_across_runs
from nbflow.core.ir import Workflow
from nbflow.core.state import RunState
from nbflow.errors import Conflict, NbflowError, NotFound
from nbflow.nats.calls import CLIENT_RETRY
from nbflow.nats.kv import KV
from nbflow.nats.layout import MSG_ID, Layout
from nbflow.nats.objects import Objects
from nbflow.nats.streams import Streams

_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"   # no 0/o, 1/l/i: easy to read and type


def new_run_id(n: int = 8) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def whoami() -> str:
    """Who decides: JUPYTERHUB_USER, else NBFLOW_USER, else the OS user."""
    for var in ("NBFLOW_USER", "JUPYTERHUB_USER"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


class BundleWarning(UserWarning):
    """Files of the notebook's folder left out of its bundle (over the per-file limit)."""


class Runs:
    def __init__(self, nc, layout: Layout, role: str = "client"):
        self.nc, self.js, self.L, self.role = nc, nc.jetstream(), layout, role
        # every NATS call goes through the typed boundary (nbflow.nats); one-shot calls ride
        # out short outages (bounded backoff), then raise Transient ("retry later")
        self.streams = Streams(self.js, role=role, retrying=CLIENT_RETRY)
        self.artifacts = Objects(self.js, self.L.artifacts_store, role=role,
                                 retrying=CLIENT_RETRY)
        self._kv: dict[str, KV] = {}
        self._defs: dict[str, Workflow] = {}

    async def kv(self, bucket: str) -> KV:
        if bucket not in self._kv:
            self._kv[bucket] = await KV.open(self.js, bucket, role=self.role,
                                             retrying=CLIENT_RETRY)
        return self._kv[bucket]

    # --- submit -------------------------------------------------------------------------------
    async def put_workflow(self, wf: Workflow, *, bundle: bool | None = None) -> str:
        """Store the definition (immutable, by content hash); with ``bundle`` (default:
        NBFLOW_BUNDLE, on) the notebook's folder travels with it (see :meth:`with_bundle`)."""
        wf = await self.with_bundle(wf, bundle)
        h, body = wf.hash_and_json()
        body = body.encode()
        limit = self.nc.max_payload
        if len(body) > limit:
            big = max(wf.tasks, key=lambda n: len(n.code), default=None)
            where = (f": the largest cell is task {big.id!r} (cell {big.cell}, "
                     f"{len(big.code.encode()) / 2**20:.1f} MB)") if big else ""
            raise NbflowError(
                f"workflow {wf.name} is {len(body) / 2**20:.1f} MB, over the NATS max payload "
                f"of {limit / 2**20:.1f} MB{where}; load big data from files instead of "
                f"writing it into cells")
        defs = await self.kv(self.L.defs_bucket)
        try:
            await defs.create(h, body)
        except Conflict:         # exists: definitions are immutable by hash
            pass
        self._defs[h] = wf
        return h

    async def with_bundle(self, wf: Workflow, bundle: bool | None = None) -> Workflow:
        """A copy of ``wf`` recording the submitter's module versions and, unless bundling is
        off, the hash of its notebook's folder packed and uploaded (once) to the object store."""
        import dataclasses
        import warnings

        from nbflow.compiler import bundle as packing
        from nbflow.worker import bundles

        folder = os.path.dirname(wf.source) if wf.source else ""
        changes: dict[str, Any] = {}
        if not wf.requires:
            mods = {m for m in packing.workflow_modules(wf)
                    if not (folder and packing.local_module(folder, m))}
            changes["requires"] = await asyncio.get_running_loop().run_in_executor(
                None, packing.module_versions, mods)
        if wf.bundle is None and folder and os.path.isdir(folder) and bundles.enabled(bundle):
            try:
                b = await asyncio.get_running_loop().run_in_executor(
                    None, packing.pack, folder, (os.path.basename(wf.source),))
            except packing.BundleError as e:
                raise NbflowError(str(e)) from None
            if b.skipped_big:
                warnings.warn(packing.big_files_warning(folder, b), BundleWarning, stacklevel=2)
            await bundles.upload(self.artifacts, b)
            changes["bundle"] = b.hash
        return dataclasses.replace(wf, **changes) if changes else wf

    async def submit(self, workflow: Workflow | str, params: dict[str, Any] | None = None, *,
                     by: str | None = None, run_id: str | None = None, msg_id: str | None = None,
                     schedule: str | None = None, retry_of: str | None = None,
                     reuse: dict | None = None, reuse_outputs: bool = False,
                     bundle: bool | None = None) -> str:
        """Start a run; returns its id. ``workflow`` is an IR or a notebook/BPMN/JSON path.

        ``reuse_outputs`` (``nbflow run --reuse``): each task whose fingerprint matches the
        latest succeeded execution of any earlier run in this namespace reuses its outputs
        instead of running.

        ``bundle=False`` (or NBFLOW_BUNDLE=0): workers use the notebook's folder in place (a
        shared filesystem) instead of a bundle of it."""
        if isinstance(workflow, str):
            from nbflow.compiler import compile_file

            workflow = compile_file(workflow)
        params = dict(params or {})
        unknown = sorted(set(params) - workflow.param_names())
        if unknown:
            known = ", ".join(sorted(workflow.params)) or "(none: add a cell tagged 'parameters')"
            raise NbflowError(f"unknown parameter {', '.join(map(repr, unknown))} for "
                              f"{workflow.name}; its parameters are: {known}")
        try:
            json.dumps(params)
        except TypeError as e:
            raise NbflowError(f"parameters must be JSON values: {e}") from None
        workflow = await self.with_bundle(workflow, bundle)   # fingerprints cover the folder
        h = await self.put_workflow(workflow, bundle=False)
        run = run_id or new_run_id()
        await self._record_start(run, h, params)
        fps = fingerprints(workflow, {**workflow.params, **params})
        if reuse_outputs:
            reuse = {**(await self._indexed(workflow, fps)), **(reuse or {})}
        ev = make("RunStarted", run, wf=h, params=params, by=by or whoami(),
                  source=workflow.source, name=workflow.name, schedule=schedule,
                  retry_of=retry_of, reuse=reuse or None,
                  fps={k: v for k, v in fps.items() if v and k in _task_ids(workflow)})
        subj = self.L.history_subject(run, ev.type)
        ack = await self.streams.publish(subj, ev.encode(),
                                         headers={MSG_ID: msg_id or start_msg_id(run)})
        if ack.duplicate and not await self._holds_start(ack.seq, subj):
            # message ids are per stream: another role's message (a worker's, on its own
            # subject) took this predictable id first; record the start under a fresh one
            await self.streams.publish(subj, ev.encode(), headers={
                MSG_ID: f"{msg_id or start_msg_id(run)}.{secrets.token_hex(8)}"})
        return run          # (a genuine duplicate: this start was already recorded)

    async def _holds_start(self, seq: int, subject: str) -> bool:
        """Whether history message ``seq`` is a RunStarted on ``subject`` (which only authors
        and the engine may publish to), not a squatter on its message id."""
        try:
            raw = await self.streams.get_msg(self.L.history_stream, seq=seq)
        except NotFound:         # removed: it was dead-lettered as a forgery
            return False
        return raw.subject == subject

    async def _record_start(self, run: str, wf_hash: str, params: dict) -> None:
        """The start record the engine checks before it starts a run (workers cannot write
        definitions, so they cannot start runs)."""
        defs = await self.kv(self.L.defs_bucket)
        try:
            await defs.create(f"start.{run}", json.dumps(start_record(wf_hash, params)).encode())
        except Exception as e:  # noqa: BLE001 - exists: an idempotent re-submit of this run
            if "wrong last sequence" not in str(e).lower() and \
                    type(e).__name__ != "KeyWrongLastSequenceError":
                raise

    async def _indexed(self, wf: Workflow, fps: dict[str, str | None]) -> dict[str, Any]:
        """node -> reuse entry, for each task the fingerprint index has a success of."""
        index = await self.kv(self.L.fps_bucket)
        out: dict[str, Any] = {}
        for node in wf.tasks:
            fp = fps.get(node.id)
            if not fp or not reusable_across_runs(node):
                continue
            entry = await index.get_or_none(fp)
            if entry is None:                   # never executed with this fingerprint
                continue
            rec = json.loads(entry.value)
            out[node.id] = _reuse_entry(node.id, rec.get("count"), rec.get("tasks") or {},
                                        rec.get("run", ""))
        return out

    async def workflow(self, wf_hash: str) -> Workflow:
        if wf_hash not in self._defs:
            defs = await self.kv(self.L.defs_bucket)
            self._defs[wf_hash] = Workflow.stored((await defs.get(wf_hash)).value, wf_hash)
        return self._defs[wf_hash]

    async def has_run(self, run: str) -> bool:
        """True when the history holds any event of this exact run id."""
        return (await self._history_last(run))[1] is not None

    async def _history_last(self, run: str):
        """The subject filter of ``run``'s events and its newest one (None: no event yet): its
        kinds' subjects, or, for a run recorded before subjects carried the kind (an older
        nbflow wrote this store), its legacy one."""
        subj = self.L.history_subject(run)
        for s in (subj, self.L.history_legacy_subject(run)):
            try:
                return s, await self.streams.get_last(self.L.history_stream, s)
            except NotFound:
                pass
        return subj, None

    async def snapshot(self, run: str) -> RunState | None:
        """The engine's last snapshot of the run (None when there is none yet)."""
        runs = await self.kv(self.L.runs_bucket)
        e = await runs.get_or_none(run)
        return None if e is None else RunState.from_dict(json.loads(e.value))


def _task_ids(wf: Workflow) -> set[str]:
    return {n.id for n in wf.tasks}


def _reuse_entry(node_id: str, count: int | None, tasks: dict[str, dict[str, Any]],
                 origin: str) -> dict[str, Any]:
    """What RunStarted.reuse holds for one node: its task results re-keyed to ``node_id`` (a
    task may have been renamed since), and the run that executed them."""
    out = {}
    for t in tasks.values():
        key = task_key(node_id, t.get("instance"))
        out[key] = {**t, "key": key, "node": node_id,
                    "reused_from": t.get("reused_from") or origin}
    return {"state": "succeeded", "count": count, "tasks": out, "from": origin}
