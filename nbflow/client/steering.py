"""Steering runs: cancel, approve, signal (each a request to the engine's decide service, as
the authenticated user) and retry (a new run reusing what succeeded)."""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from nbflow.client.reading import Reading
from nbflow.core.fingerprint import fingerprints
from nbflow.core.ir import Workflow, WorkflowError
from nbflow.core.state import RunState
from nbflow.errors import AlreadyDecided, NbflowError
from nbflow.nats import infra
from nbflow.nats.layout import SIGNAL_NAME_RE
from nbflow.runs import _reuse_entry, _task_ids


class Steering(Reading):
    """What a face does to a run (reads it first, to refuse clearly what cannot apply)."""

    async def _running(self, run: str, what: str) -> RunState:
        st = await self.status(run)
        if st.is_final:
            raise NbflowError(f"run {st.run} is already {st.state}; {what} only applies to "
                              f"running runs")
        return st

    async def cancel(self, run: str, by: str | None = None, reason: str = "") -> None:
        """Cancel through the engine's decide service: the canceller recorded is the user NATS
        authenticated (``by`` only names the person when this client is a delegate, the runs
        console; on a server without users it is the declared name)."""
        st = await self._running(run, "cancel")
        out = await self._decide("cancel", by, {"run": st.run, "reason": reason})
        if out.get("ok"):
            return
        if out.get("kind") == "final":
            raise NbflowError(f"run {st.run} is already {out.get('state')}; cancel only applies "
                              f"to running runs")
        raise NbflowError(f"could not cancel run {st.run}: {out.get('error')}")

    async def approve(self, run: str, task: str, approved: bool = True, by: str | None = None,
                      comment: str = "") -> dict[str, Any]:
        """Decide a pending approval through the engine's decide service, as the authenticated
        user. Exactly one decision wins; a loser gets AlreadyDecided naming who decided first."""
        st = await self.status(run)
        self.principal(by)                      # refuse a claimed identity before deciding
        ns = st.nodes.get(task)
        if ns is None:
            raise NbflowError(f"run {st.run} has no task {task!r} (tasks: "
                              f"{', '.join(k for k in st.nodes if k not in ('start', 'end'))})")
        ap = await self.kv(self.L.approvals_bucket)
        key = f"{st.run}.{task}"
        try:
            entry, rec = await infra.guarded(self.nc, self._approval_entry(
                ap, key, wait=ns.state == "awaiting_approval"))
        except infra.PermissionDenied as e:
            raise NbflowError(f"{e}: this user may not read or decide approvals") from None
        if rec and rec.get("state") != "pending":
            if ns.state == "awaiting_approval" and rec.get("state") in ("approved", "rejected"):
                # decided but not (yet) in the history: the engine re-publishes it (same id)
                await self._decide("approve", by, {"run": st.run, "node": task})
            raise AlreadyDecided(_decided_msg(st.run, task, rec), rec)
        if ns.state != "awaiting_approval" or entry is None:
            if ns.approval and ns.approval.get("state") not in (None, "pending"):
                raise AlreadyDecided(_decided_msg(st.run, task, ns.approval), ns.approval)
            raise NbflowError(f"task {task!r} of run {st.run} is not awaiting approval "
                              f"(it is {ns.state})")
        out = await self._decide("approve", by, {"run": st.run, "node": task,
                                                 "approved": bool(approved), "comment": comment,
                                                 "token": rec.get("token", "")})
        if out.get("ok"):
            return out["decision"]
        if out.get("kind") == "already_decided":
            won = out["decision"]
            raise AlreadyDecided(_decided_msg(st.run, task, won), won)
        raise NbflowError(f"could not decide {task!r} of run {st.run}: {out.get('error')}")

    async def _approval_entry(self, ap, key: str, wait: bool, timeout: float = 10.0):
        """The approvals KV entry; when history already says 'awaiting approval' the engine
        may not have recorded it yet, so give it a moment."""
        deadline = time.monotonic() + (timeout if wait else 0)
        while True:
            entry = await ap.get_or_none(key)
            if entry is not None:
                return entry, json.loads(entry.value)
            if time.monotonic() >= deadline:       # not (yet) recorded
                return None, None
            await asyncio.sleep(0.05)

    async def signal(self, run: str, name: str, value: Any = None, by: str | None = None) -> None:
        check_signal_name(name)
        st = await self._running(run, "a signal")
        wf = await self.workflow(st.wf)
        waits = sorted({n.wait_signal for n in wf.nodes if n.wait_signal})
        if name not in waits:
            raise NbflowError(f"nothing in run {st.run} waits for signal {name!r}; it waits for "
                              + (", ".join(waits) if waits else "no signals"))
        try:
            json.dumps(value)
        except TypeError as e:
            raise NbflowError(f"signal value must be JSON: {e}") from None
        out = await self._decide("signal", by, {"run": st.run, "name": name, "value": value})
        if not out.get("ok"):
            raise NbflowError(f"could not send signal {name!r} to run {st.run}: "
                              f"{out.get('error')}")

    async def retry(self, run: str, by: str | None = None, same_code: bool = False) -> str:
        """A new run of a failed/rejected/cancelled run, with the same parameters.

        By default the notebook is compiled again from the file the run was submitted from (so
        the fix runs); a task that succeeded in ``run`` and whose fingerprint is unchanged is not
        executed again, its outputs are reused. ``same_code``: rerun the stored version and
        reuse everything that succeeded."""
        st = await self.status(run)
        if st.state == "running":
            raise NbflowError(f"run {st.run} is still running; cancel it first or wait")
        if st.state == "succeeded":
            raise NbflowError(f"run {st.run} succeeded; nothing to retry "
                              f"(start a new one with `nbflow run`)")
        old = await self.workflow(st.wf)
        keep = None if old.bundle else False        # a --no-bundle run is retried without one
        given = await self._given_params(st)
        if same_code:
            reuse = {nid: _reuse_entry(nid, ns.count, _node_task_dicts(st, nid), st.run)
                     for nid, ns in st.nodes.items()
                     if ns.state == "succeeded" and nid in _task_ids(old)}
            return await self.submit(old, given, by=by, retry_of=st.run, reuse=reuse,
                                     bundle=keep)
        wf = await self.with_bundle(self._recompile(st), keep)
        params = {k: v for k, v in given.items() if k in wf.param_names()}
        old_fps = fingerprints(old, {**old.params, **given}, across_runs=False)
        new_fps = fingerprints(wf, {**wf.params, **params}, across_runs=False)
        reuse = {}
        for node in wf.tasks:
            ns = st.nodes.get(node.id)
            if ns is not None and ns.state == "succeeded" and new_fps.get(node.id) and \
                    new_fps[node.id] == old_fps.get(node.id):
                reuse[node.id] = _reuse_entry(node.id, ns.count, _node_task_dicts(st, node.id),
                                              st.run)
        return await self.submit(wf, params, by=by, retry_of=st.run, reuse=reuse, bundle=keep)

    def _recompile(self, st: RunState) -> Workflow:
        from nbflow.compiler import compile_file

        src = st.source
        hint = f"`nbflow retry {st.run} --same-code` reruns the code run {st.run} ran"
        if not src:
            raise NbflowError(f"run {st.run} was not submitted from a file; {hint}")
        if not os.path.isfile(src):
            raise NbflowError(f"run {st.run} was submitted from {src}, which is gone; {hint}")
        try:
            return compile_file(src)
        except WorkflowError as e:
            raise NbflowError(f"{src} no longer compiles: {e}\n{hint}") from None

    async def _given_params(self, st: RunState) -> dict[str, Any]:
        """The parameters the run was started with (not the defaults merged in)."""
        events = self._events(st.run, follow=False)
        try:
            async for ev in events:
                if ev.type == "RunStarted":
                    return dict(ev.get("params") or {})
        finally:
            await events.aclose()
        return dict(st.params)


def _node_task_dicts(st: RunState, node_id: str) -> dict[str, dict[str, Any]]:
    return {t.key: dict(t.__dict__) for t in st.tasks.values() if t.node == node_id}



def check_signal_name(name: str) -> str:
    if not isinstance(name, str) or not SIGNAL_NAME_RE.match(name):
        raise NbflowError(f"signal name {name!r} is invalid: use 1-64 ASCII letters, digits, "
                          f"'_' or '-' (no spaces, dots, '*' or '>')")
    return name


def _decided_msg(run: str, task: str, rec: dict[str, Any]) -> str:
    if not rec.get("by") and rec.get("reason"):      # closed by the run itself, not a person
        return (f"task {task!r} of run {run} was already {rec.get('state')} "
                f"({rec['reason']}) at {_local_time(rec.get('at'))}")
    return (f"task {task!r} of run {run} was already {rec.get('state')} by "
            f"{rec.get('by', '?')} at {_local_time(rec.get('at'))}")



def _local_time(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
