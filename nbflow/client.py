"""The Python client that the CLI, the magics and the widgets share. Async first::

    async with Client.connect() as c:
        run = await c.submit("report.ipynb", {"day": "2026-11-20"})
        async for ev, state in c.watch(run):
            ...

and the same calls, synchronously, on :class:`SyncClient` (its event loop runs in a background
thread, so it works inside Jupyter too).
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any, AsyncIterator

from nbflow.core.ir import Workflow, WorkflowError  # noqa: F401
from nbflow.errors import AlreadyDecided, Conflict, NatsError, NbflowError, NotFound, Transient
from nbflow.core.fingerprint import fingerprints
from nbflow.runs import BundleWarning, Runs, _reuse_entry, _task_ids, new_run_id, whoami  # noqa: F401
from nbflow.nats import infra
from nbflow.core.events import Event, decode, task_key
from nbflow.nats.layout import SIGNAL_NAME_RE, Layout, default_namespace
from nbflow.core.state import RUN_FINAL, RunState, fold, refusal

def parse_param(value: str, default: Any = None) -> Any:
    """A -p value from the shell: JSON when it parses (numbers, lists, true/false), else text.
    A parameter whose default is a string stays a string."""
    if isinstance(default, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def resolve_url(url: str | None = None) -> str:
    """``url``, else NBFLOW_NATS_URL, else a running embedded stack. The client starts no
    process: the faces (``nbflow ...``, ``%flow``) start the stack on demand before connecting
    (:func:`nbflow.stack.nats_url`)."""
    url = url or os.environ.get("NBFLOW_NATS_URL")
    if url:
        return url
    from nbflow.stack import running_url

    url = running_url()
    if url is None:
        raise NbflowError("no NATS server to connect to: pass a URL, set NBFLOW_NATS_URL, or "
                          "start the embedded stack with `nbflow up` (the CLI and %flow start "
                          "it for you)")
    return url


def _served_by_the_local_stack(url: str, namespace: str) -> None:
    """On this machine's embedded stack, a namespace it does not serve yet (``--namespace``)
    is served from now on: its users' permissions, streams, an engine and workers. (Only the
    stack's owner can ask; the stack starts the processes, not the client.)"""
    from nbflow.nats import auth

    found = auth.local_stack(url)
    if found is None:
        return
    d, info = found
    if namespace in (info.get("namespaces") or [info.get("namespace") or ""]):
        return
    try:
        Layout(namespace)
    except ValueError as e:
        raise NbflowError(str(e)) from None
    from nbflow.errors import StackError
    from nbflow.stack import serve_namespace

    try:
        serve_namespace(d, namespace)
    except StackError as e:
        raise NbflowError(str(e)) from None


def _local_time(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class Client(Runs):
    """Everything the faces do with runs: submit (from :class:`~nbflow.runs.Runs`), read, watch,
    steer, fetch artifacts."""

    @classmethod
    async def connect(cls, url: str | None = None, namespace: str | None = None,
                      reconnect: bool = False, **conn) -> "Client":
        """``reconnect``: ride out server restarts and leader moves (long-lived clients such as
        widgets); a one-shot CLI command fails fast instead."""
        url = resolve_url(url)
        _served_by_the_local_stack(url, default_namespace() if namespace is None else namespace)
        opts = infra.ConnectOptions.from_env(url, **conn)
        nc = await infra.connect(opts, name="nbflow-client", reconnect=reconnect)
        try:
            c = cls(nc, Layout(default_namespace() if namespace is None else namespace))
        except ValueError as e:
            await nc.close()
            raise NbflowError(str(e)) from None
        c.auth_user = opts.user or ""
        try:
            await infra.guarded(nc, infra.ensure(c.js, c.L))
        except Transient as e:
            await nc.close()
            raise Transient(f"NATS at {infra.redact(url)} did not answer while checking "
                            f"nbflow's streams ({e}); retry later") from None
        except Exception as e:  # noqa: BLE001 - permissions: surface clearly
            await nc.close()
            raise NbflowError(f"NATS at {infra.redact(url)} refused nbflow's streams: {e}") from None
        return c

    auth_user = ""
    delegate = False      # a host that authenticates its users itself (the runs console)

    def principal(self, by: str | None = None) -> str:
        """Who decides, as the decide service will record it: the authenticated NATS user
        (``--as`` may not claim anyone else); on a server without users, the declared name."""
        claimed = _subject_token(by) if by else ""
        if self.delegate and claimed:
            return claimed      # nats-server decides whether this user may delegate
        if self.auth_user:
            if claimed and claimed != _subject_token(self.auth_user):
                raise NbflowError(
                    f"you are connected as NATS user {self.auth_user!r}: decisions are recorded "
                    f"under that user, and --as {by!r} cannot claim another identity")
            return _subject_token(self.auth_user)
        return claimed or _subject_token(whoami())

    async def _decide(self, what: str, by: str | None, body: dict) -> dict:
        """A request to the engine's decide service on ``decide.<user>.<what>``."""
        import nats.errors

        who = self.principal(by)
        deadline = time.monotonic() + 30       # an engine starting or restarting: wait for it
        while True:
            try:
                msg = await infra.guarded(self.nc, self.nc.request(
                    self.L.decide_subject(who, what), json.dumps(body).encode(), timeout=15))
                break
            except infra.PermissionDenied as e:
                raise NbflowError(f"{e}: this user may not {what} as {who!r}") from None
            except nats.errors.NoRespondersError:
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                raise NbflowError(f"no nbflow engine is running for namespace "
                                  f"{self.L.namespace or '(default)'} to record the {what}; "
                                  f"start one (`nbflow up` or `nbflow engine`)") from None
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                raise NbflowError(f"the engine did not answer the {what} request within 15 s; "
                                  f"try again") from None
        return json.loads(msg.data)

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # --- reading ------------------------------------------------------------------------------
    async def _resolve_run(self, run: str) -> str:
        """Accept a unique prefix of a run id."""
        if not isinstance(run, str) or not run or not all(ch.isalnum() or ch in "-_"
                                                          for ch in run):
            raise NbflowError(f"no run {run!r}: a run id is letters and digits "
                              f"(see `nbflow runs` for recent runs)")
        runs = await self.kv(self.L.runs_bucket)
        if await runs.get_or_none(run) is not None:
            return run
        if await self.has_run(run):          # not found: try history, then prefixes
            return run
        keys = await runs.keys()
        matches = [k for k in keys if k.startswith(run)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NbflowError(f"run id {run!r} is ambiguous: {', '.join(sorted(matches)[:5])}")
        raise NbflowError(f"no run {run!r} (see `nbflow runs` for recent runs)")

    async def status(self, run: str) -> RunState:
        """The run's state now: the engine's snapshot, caught up with the history after it (a
        busy run's snapshot is written behind, up to NBFLOW_SNAPSHOT_EVERY seconds late)."""
        run = await self._resolve_run(run)
        st = await self.snapshot(run)
        if st is not None and not st.is_final:
            st = await self._caught_up(st)
        st = st or await self.replay(run)   # no snapshot yet: replay
        if st is None:
            raise NbflowError(f"no run {run!r}")
        return st

    async def _caught_up(self, st: RunState, most: int = 500) -> RunState | None:
        """``st`` with the history events after its sequence folded in (None: too far behind
        for message-by-message reads; the caller replays)."""
        subj = await self._history_of(st.run)
        try:
            last = (await self.streams.get_last(self.L.history_stream, subj)).seq
        except NotFound:
            return st
        events: list[Event] = []
        seq = st.seq + 1
        while seq <= last:
            if len(events) >= most:
                return None
            try:
                raw = await self.streams.get_msg(self.L.history_stream, seq=seq, subject=subj,
                                                 next=True)
            except NotFound:
                break
            try:
                ev = decode(raw.data, seq=raw.seq)
                if self._sent_as(ev, raw.subject):
                    events.append(ev)
            except Exception:  # noqa: BLE001 - malformed messages are dead-lettered
                pass
            seq = raw.seq + 1
        if not events:
            return st
        return fold(events, await self.workflow(st.wf), st)[0]

    def _sent_as(self, ev: Event, subject: str | None) -> bool:
        """Whether ``ev`` was published on its own kind's subject: one sent on another kind's
        (a forgery the engine dead-letters and removes) is never shown or folded. A run
        recorded before subjects carried the kind has its events on its one legacy subject."""
        return subject is None or subject == self.L.history_legacy_subject(ev.run) or \
            self.L.history_kind(subject) == ev.type

    async def _history_of(self, run: str) -> str:
        """The subject filter of ``run``'s events: its kinds' subjects, or, for a run recorded
        before subjects carried the kind (an older nbflow wrote this store), its legacy one."""
        subj = self.L.history_subject(run)
        try:
            await self.streams.get_last(self.L.history_stream, subj)
            return subj
        except NotFound:
            pass
        legacy = self.L.history_legacy_subject(run)
        try:
            await self.streams.get_last(self.L.history_stream, legacy)
            return legacy
        except NotFound:
            return subj

    async def history(self, run: str) -> list[Event]:
        run = await self._resolve_run(run)
        return [ev async for ev in self._events(run, follow=False)]

    async def _events(self, run: str, follow: bool) -> AsyncIterator[Event]:
        subj = await self._history_of(run)
        try:
            last = await self.streams.get_last(self.L.history_stream, subj)
            last_seq = last.seq
        except NotFound:
            if not follow:
                return
            last_seq = 0
        sub = await self.js.subscribe(subj, ordered_consumer=True, stream=self.L.history_stream)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None if follow else 10)
                except asyncio.TimeoutError:
                    return
                seq = msg.metadata.sequence.stream
                try:
                    ev = decode(msg.data, seq=seq)
                except Exception:  # noqa: BLE001 - malformed messages are dead-lettered
                    ev = None
                if ev is not None and self._sent_as(ev, msg.subject):
                    yield ev
                if not follow and seq >= last_seq:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass

    async def replay(self, run: str) -> RunState | None:
        """The run's history folded (core.state.fold, as the engine does)."""
        events = [ev async for ev in self._events(run, follow=False)]
        start = next((ev for ev in events if ev.type == "RunStarted"), None)
        if start is None:
            return None                     # stray events without a start are not a run
        return fold(events, await self.workflow(start["wf"]))[0]

    async def watch(self, run: str) -> AsyncIterator[tuple[Event, RunState]]:
        """Every event of the run from the start, live, with the state after it; ends when the
        run reaches a final state."""
        run = await self._resolve_run(run)
        st = None
        async for ev in self._events(run, follow=True):
            if refusal(st, ev):
                continue
            st, _ = fold([ev], await self.workflow(ev["wf"] if st is None else st.wf), st)
            yield ev, st
            if st.is_final:
                return

    async def wait(self, run: str, timeout: float | None = None) -> RunState:
        """The run's final state. When this returns, ``status`` and ``runs`` show it too."""
        async def _w():
            st = None
            async for _, st in self.watch(run):
                pass
            if st is not None:
                await self.settled(st)
            return st
        return await asyncio.wait_for(_w(), timeout)

    async def settled(self, st: RunState, timeout: float = 15.0) -> None:
        """Wait until the run snapshot (what ``status`` and ``runs`` read) has caught up with
        ``st`` — a state replayed from history — so a caller reads its own writes."""
        runs = await self.kv(self.L.runs_bucket)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                snap = json.loads((await runs.get(st.run)).value)
                if snap.get("seq", 0) >= st.seq or snap.get("state") == st.state:
                    return
            except Exception:  # noqa: BLE001 - not written yet
                pass
            await asyncio.sleep(0.02)

    async def runs(self, limit: int = 50) -> list[RunState]:
        runs = await self.kv(self.L.runs_bucket)
        out = []
        for k in await runs.keys():
            e = await runs.get_or_none(k)          # None: deleted meanwhile
            if e is not None:
                out.append(RunState.from_dict(json.loads(e.value)))
        out.sort(key=lambda s: s.started, reverse=True)
        return out[:limit]

    async def watch_runs(self) -> AsyncIterator[tuple[str, RunState | None]]:
        """Every run's snapshot, then each change as the engine records it, live. Yields
        ``("", None)`` once the snapshots that existed at the start are all delivered, and
        ``(run, None)`` when a snapshot is deleted. A console keeps an index from this
        instead of reading thousands of keys per page."""
        async for item in self._watch_bucket(self.L.runs_bucket,
                                             lambda v: RunState.from_dict(json.loads(v))):
            yield item

    async def workers(self) -> list[dict[str, Any]]:
        """Live workers (their last heartbeat, within the bucket's TTL), by name."""
        kv = await self.kv(self.L.workers_bucket)
        out = []
        for k in await kv.keys():
            e = await kv.get_or_none(k)            # None: expired between keys() and get()
            try:
                if e is not None:
                    out.append(json.loads(e.value))
            except ValueError:                     # garbage
                continue
        return sorted(out, key=lambda w: str(w.get("name", "")))

    async def watch_workers(self) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """Worker heartbeats (name, queue, concurrency, pid, ts, ...): those in the bucket,
        then each new one, live. ``("", None)`` marks the end of the initial ones."""
        async for item in self._watch_bucket(self.L.workers_bucket, json.loads):
            yield item

    async def _watch_bucket(self, bucket: str, parse) -> AsyncIterator[tuple[str, Any]]:
        """(key, parse(value)) for each entry, then live; ("", None) after the initial ones,
        (key, None) for a deletion; a value that does not parse (another version) is skipped."""
        kv = await self.kv(bucket)
        w = await kv.watchall()
        try:
            async for e in w:
                if e is None:
                    yield "", None
                elif e.operation in ("DEL", "PURGE"):
                    yield e.key, None
                else:
                    try:
                        yield e.key, parse(e.value)
                    except (ValueError, TypeError):
                        continue
        finally:
            await w.stop()

    # --- steering -----------------------------------------------------------------------------
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

    # --- artifacts ----------------------------------------------------------------------------
    def _task_keys(self, st: RunState, task: str | None) -> list[str]:
        if task is None:
            return list(st.tasks)
        if task in st.tasks:
            return [task]
        keys = [k for k, t in st.tasks.items() if t.node == task]
        if not keys:
            names = sorted({t.node for t in st.tasks.values()})
            raise NbflowError(f"run {st.run} has no executed task {task!r} "
                              f"(executed: {', '.join(names) or 'none yet'})")
        return keys

    async def output(self, run: str, task: str) -> bytes:
        """The executed notebook of a task (its latest attempt), as papermill wrote it."""
        st = await self.status(run)
        keys = self._task_keys(st, task)
        t = st.tasks[keys[0]]
        if not t.notebook:
            raise NbflowError(f"task {t.key} of run {st.run} has no executed notebook "
                              f"(it is {t.state})")
        return await self.artifacts.get_bytes(t.notebook)

    async def logs(self, run: str, task: str | None = None) -> str:
        import nbformat

        from nbflow.worker.runner import notebook_logs

        from nbflow.worker.artifacts import Artifacts

        st = await self.status(run)
        keys = self._task_keys(st, task)
        attempts: dict[str, list[Event]] = {k: [] for k in keys}
        for ev in await self.history(st.run):
            if ev.type in ("TaskSucceeded", "TaskFailed", "TaskSkipped") and ev["key"] in attempts:
                attempts[ev["key"]].append(ev)
        art = Artifacts(self.js, self.L.artifacts_store)
        parts = []
        for key in keys:
            t = st.tasks[key]
            ends = attempts[key]
            if t.reused:
                parts.append(f"── {key} (reused from run {t.reused_from}: "
                             f"nbflow logs {t.reused_from} {t.node}) ──")
                continue
            if not ends:                       # still queued or running
                parts.append(f"── {key} (attempt {t.attempt}, {t.state}) ──")
                continue
            # an attempt still to come: the retry waiting for its delay, or one queued/running
            coming = (t.attempt + 1 if t.state == "retry_wait" else
                      t.attempt if t.state in ("queued", "running") and t.attempt > len(ends)
                      else 0)
            of = max(len(ends), coming)
            for ev in ends:                    # every attempt, oldest first, newest last
                state = {"TaskSucceeded": "succeeded", "TaskFailed": "failed",
                         "TaskSkipped": "skipped"}[ev.type]
                head = f"── {key} (attempt {ev['attempt']} of {of}, {state}) "
                parts.append(head + "─" * max(0, 70 - len(head)))
                text = ""
                if ev.get("notebook"):
                    try:
                        raw = await art.get_bytes(ev["notebook"])
                        text = notebook_logs(nbformat.reads(raw.decode(), as_version=4)).rstrip()
                    except Exception:  # noqa: BLE001 - pruned: the event still tells
                        text = ""
                if ev.type == "TaskFailed" and (not text or ev["error"] not in text):
                    text = "\n".join(x for x in (text, ev.get("traceback") or "", ev["error"])
                                     if x).rstrip()
                if text:
                    parts.append(text)
            if coming:                         # the newest attempt has no log yet
                what = "waits to retry" if t.state == "retry_wait" else t.state
                parts.append(f"── {key} (attempt {coming} of {of}, {what}) ──")
        return "\n".join(parts)

    async def load_output(self, run: str, task: str, name: str) -> Any:
        """The value of an output variable of a finished task (a list for --map tasks)."""
        import pickle

        st = await self.status(run)
        art = self.artifacts
        wf = await self.workflow(st.wf)
        refs = st.node_outputs(task, wf) if task in st.nodes else {}
        if name not in refs:
            raise NbflowError(f"task {task!r} of run {st.run} has no output {name!r}")
        ref = refs[name]
        if isinstance(ref, list):
            return [pickle.loads(await art.get_bytes(r)) if r else None for r in ref]
        return pickle.loads(await art.get_bytes(ref))


def _node_task_dicts(st: RunState, node_id: str) -> dict[str, dict[str, Any]]:
    return {t.key: dict(t.__dict__) for t in st.tasks.values() if t.node == node_id}


def _subject_token(name: str) -> str:
    """A user name as one NATS subject token (what the decide subjects carry)."""
    out = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in name)
    return out[:64] or "unknown"


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


def run_once(fn, url: str | None = None, namespace: str | None = None):
    """Blocking, for one-shot callers (a CLI command): connect, ``await fn(client)``, close."""
    async def go():
        c = await Client.connect(url, namespace)
        try:
            return await fn(c)
        finally:
            await c.close()
    return asyncio.run(go())


class SyncClient:
    """The same calls, blocking. The event loop lives in a daemon thread, so this works in
    plain scripts and inside Jupyter kernels (which already run a loop)."""

    def __init__(self, url: str | None = None, namespace: str | None = None, **conn):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="nbflow-client")
        self._thread.start()
        self.aclient: Client = self._call(Client.connect(url, namespace, reconnect=True, **conn))

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def close(self) -> None:
        try:
            self._call(self.aclient.close(), 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name: str):
        fn = getattr(self.aclient, name)
        if not asyncio.iscoroutinefunction(fn):
            raise AttributeError(name)

        def call(*a, **kw):     # a denied action raises PermissionDenied, not a timeout
            return self._call(infra.guarded(self.aclient.nc, fn(*a, **kw)))
        call.__name__ = name
        call.__doc__ = fn.__doc__
        return call


__all__ = ["Client", "SyncClient", "NbflowError", "AlreadyDecided", "new_run_id", "whoami",
           "parse_param", "resolve_url", "RUN_FINAL", "task_key"]
