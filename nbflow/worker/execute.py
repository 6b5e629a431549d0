"""Executing one task: its workflow definition and task notebook (cached), its bundle and
folder, its inputs fetched from the artifacts store, the environment check, the run through
papermill (``runner.run_task``) and its outputs stored — ending in the completion event to
publish (TaskSucceeded, TaskSkipped or TaskFailed, with bounded error text). A mixin of
:class:`nbflow.worker.worker.Worker`."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

from nbflow.core.events import TaskMessage, make
from nbflow.core.ir import Workflow
from nbflow.errors import BundleError, NotFound
from nbflow.worker import bundles, environment
from nbflow.worker.artifacts import notebook_key, output_key

log = logging.getLogger("nbflow.worker")

# An output bigger than this fails the task with a clear message instead of filling the store.
MAX_OUTPUT_BYTES = int(float(os.environ.get("NBFLOW_MAX_OUTPUT_MB", "2048")) * 1024 * 1024)
# A failure's text in TaskFailed stays small, so publishing it always fits in one message; the
# full error and traceback stay in the executed notebook.
MAX_ERROR_CHARS = 4_000
MAX_TRACEBACK_CHARS = 32_000
MAX_CELL_CHARS = 16_000


def bounded(text: str | None, limit: int) -> str:
    """``text`` cut to about ``limit`` characters (head and tail kept, the cut said)."""
    text = text or ""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 3 // 4], text[-(limit // 4):]
    return (f"{head}\n... [{len(text) - len(head) - len(tail):,} characters cut; the full text "
            f"is in the task's executed notebook: nbflow logs] ...\n{tail}")


class Phases:
    """Where a task's time went on its worker, in ms by step (the ``phases`` of its completion
    event: a small dict with a fixed set of keys, absent in events of older workers).
    ``mark(name)`` adds the time since the previous mark to ``name``."""

    def __init__(self, t0: float | None = None):
        self.ms: dict[str, float] = {}
        self._t = time.monotonic() if t0 is None else t0

    def mark(self, name: str) -> None:
        t = time.monotonic()
        self.ms[name] = self.ms.get(name, 0.0) + (t - self._t) * 1000
        self._t = t

    def add(self, parts: dict, total_name: str) -> None:
        """Replace the time since the last mark by ``parts`` (a split of it, ms) and put what
        they miss under ``total_name``."""
        t = time.monotonic()
        total = (t - self._t) * 1000
        for k, v in parts.items():
            self.ms[k] = self.ms.get(k, 0.0) + v
        self.ms[total_name] = self.ms.get(total_name, 0.0) + max(0.0, total - sum(parts.values()))
        self._t = t

    def since_last(self) -> float:
        return (time.monotonic() - self._t) * 1000

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.ms.items()}


class Execution:
    async def workflow(self, wf_hash: str) -> Workflow:
        wf = self._defs.get(wf_hash)
        if wf is None:
            wf = Workflow.stored((await self.defs_kv.get(wf_hash)).value, wf_hash)
            self._defs[wf_hash] = wf
        return wf

    def task_notebook(self, wf: Workflow, wf_hash: str, node: str):
        from nbflow.compiler.tasknb import task_notebook

        k = (wf_hash, node)
        if k not in self._nbs:              # the definition was checked against wf_hash
            self._nbs[k] = task_notebook(wf, node, version=wf_hash)
        return self._nbs[k]

    async def _execute(self, task: TaskMessage, workdir: str, cancel: threading.Event,
                       leases: contextlib.AsyncExitStack, phases: Phases | None = None):
        """Run ``task``; its completion event. ``phases`` (optional) gets the time by step."""
        taken: list = []          # the copy of the bundle it ran in: back when it ends
        try:
            return await self._execute_task(task, workdir, cancel, leases,
                                            phases if phases is not None else Phases(), taken)
        finally:
            for unpacked, folder, state in taken:
                self._give_folder(unpacked, folder, state)

    async def _execute_task(self, task: TaskMessage, workdir: str, cancel: threading.Event,
                            leases: contextlib.AsyncExitStack, ph: Phases, taken: list):
        from nbflow.worker.runner import run_task

        run, key, attempt, node_id = task.run, task.key, task.attempt, task.node
        # a NATS hiccup reading the definition propagates (Transient: the task is nakked and
        # runs later); only a definition that is missing or cannot be built fails the attempt
        try:
            wf = await self.workflow(task.wf)
        except NotFound:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"cannot build the task notebook for {node_id!r}: its workflow "
                              f"definition {task.wf} is not in {self.L.defs_bucket}")
        try:
            unpacked = (await leases.enter_async_context(self.bundles.using(wf.bundle))
                        if wf.bundle else None)
        except BundleError as e:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"{type(e).__name__}: {e}")
        try:
            # other notebooks a task runs (BPMN imports) are found in the bundle, not on the
            # submitter's disk
            here = wf if unpacked is None else bundles.located(wf, unpacked)
            nb = self.task_notebook(here, task.wf, node_id)
        except Exception as e:  # noqa: BLE001 - a definition we cannot build is a failed attempt
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"cannot build the task notebook for {node_id!r}: {e}")
        node = wf.node(node_id)
        ph.mark("prep")
        io = await self._task_io(task, node, workdir)
        ph.mark("inputs")
        try:
            cwd = await self._task_cwd(wf, workdir, unpacked, shared=True)
            folder_ok = {"unchanged": False}
            if unpacked:
                taken.append((unpacked, cwd, folder_ok))
        except BundleError as e:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=f"{type(e).__name__}: {e}")
        env_key = (task.wf, node_id)
        if env_key not in self._env_checks:       # the first check scans installed packages
            self._env_checks[env_key] = await asyncio.get_running_loop().run_in_executor(
                None, environment.check, wf, node_id, cwd)
        missing, warnings = self._env_checks[env_key]
        if missing:
            return make("TaskFailed", run, key=key, attempt=attempt, reason="config",
                        error=environment.missing_error(missing, node_id, self.name, wf))
        nb = environment.with_warnings(nb, warnings)
        loop = asyncio.get_running_loop()
        ph.mark("folder")
        res = await loop.run_in_executor(None, lambda: run_task(
            nb, params=task.params, io=io, cwd=cwd, timeout=task.timeout,
            cancel=cancel, engine=self.engine, isolation=task.isolation, scope=run))
        ph.add(res.phases, "run_other")
        if unpacked and cwd:
            written, unchanged = await loop.run_in_executor(None, bundles.folder_state, unpacked,
                                                            cwd)
            # the copy serves the next task only if this one ended normally and left it intact
            folder_ok["unchanged"] = unchanged and res.status in ("succeeded", "skipped")
            if written and res.notebook_path and os.path.exists(res.notebook_path):
                # relative writes land in the task's private copy of the bundle and vanish
                log.info("task %s of run %s wrote %d file(s) relative to its folder: %s", key,
                         run, len(written), ", ".join(written[:10]))
                await loop.run_in_executor(None, bundles.note_writes, res.notebook_path,
                                           written)
        ph.mark("writes_check")
        ev = await self._result_event(task, node, res)
        ph.mark("uploads")
        return ev

    async def _task_io(self, task: TaskMessage, node, workdir: str) -> dict[str, Any]:
        """The task's inputs fetched into ``workdir/in`` and its ``__nbflow__`` io spec."""
        inputs: dict[str, Any] = {}
        os.makedirs(os.path.join(workdir, "in"), exist_ok=True)
        for name, ref in task.inputs.items():
            if isinstance(ref, list):
                files = []
                for i, r in enumerate(ref):
                    if r is None:
                        files.append(None)
                        continue
                    rel = f"in/{name}.{i}.pkl"
                    await self.art.get_file(r, os.path.join(workdir, rel))
                    files.append(rel)
                inputs[name] = files
            else:
                rel = f"in/{name}.pkl"
                await self.art.get_file(ref, os.path.join(workdir, rel))
                inputs[name] = rel
        return {"task": task.node, "key": task.key, "run": task.run, "dir": workdir,
                "inputs": inputs, "map": task.map, "signal": task.signal,
                "outputs": node.outputs}

    async def _result_event(self, task: TaskMessage, node, res):
        """Store a finished attempt's executed notebook and outputs (uploaded at once) and
        return its completion event: TaskSucceeded, TaskSkipped or TaskFailed (bounded text;
        an output over MAX_OUTPUT_BYTES fails it, saying which and how to fix)."""
        run, key, attempt = task.run, task.key, task.attempt
        nb_key = ""
        uploads = []                    # the executed notebook and the outputs, at once
        if res.notebook_path and os.path.exists(res.notebook_path):
            nb_key = notebook_key(run, key, attempt, task.delivery)
            uploads.append(self.art.put_file(nb_key, res.notebook_path))
        if res.status == "succeeded":
            outputs, lens = {}, {}
            meta_path = os.path.join(res.outputs_dir or "", "_meta.json")
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    lens = json.load(f).get("lens", {})
            too_big = [(n, os.path.getsize(p)) for n in node.outputs
                       if os.path.exists(p := os.path.join(res.outputs_dir or "", f"{n}.pkl"))
                       and os.path.getsize(p) > MAX_OUTPUT_BYTES]
            if too_big:
                await _all(uploads)
                name, size = too_big[0]
                return make("TaskFailed", run, key=key, attempt=attempt, reason="too_big",
                            error=f"OutputTooLarge: output {name!r} of task {node.id!r} is "
                                  f"{size / 2**20:.0f} MB, over the limit of "
                                  f"{MAX_OUTPUT_BYTES / 2**20:.0f} MB (NBFLOW_MAX_OUTPUT_MB); "
                                  f"write big data to files or a database and pass its path",
                            notebook=nb_key, duration=res.duration)
            for name in node.outputs:
                p = os.path.join(res.outputs_dir or "", f"{name}.pkl")
                if os.path.exists(p):
                    ok = output_key(run, key, attempt, name, task.delivery)
                    uploads.append(self.art.put_file(ok, p))
                    outputs[name] = ok
            await _all(uploads)
            return make("TaskSucceeded", run, key=key, attempt=attempt, outputs=outputs,
                        lens=lens, notebook=nb_key, exec_s=res.exec_s, duration=res.duration)
        await _all(uploads)
        if res.status == "skipped":
            return make("TaskSkipped", run, key=key, attempt=attempt, reason=res.reason or "when",
                        notebook=nb_key)
        reason = res.reason or "error"
        if "cannot be pickled" in res.error:
            reason = "unpicklable"
        return make("TaskFailed", run, key=key, attempt=attempt,
                    error=bounded(res.error or "failed", MAX_ERROR_CHARS),
                    traceback=bounded(res.traceback, MAX_TRACEBACK_CHARS),
                    cell=bounded(res.cell, MAX_CELL_CHARS), notebook=nb_key, reason=reason,
                    duration=res.duration)

    @property
    def task_folders(self) -> bundles.TaskFolders:
        tf = getattr(self, "_task_folders", None)
        if tf is None:
            tf = self._task_folders = bundles.TaskFolders()
        return tf

    def _give_folder(self, unpacked: str, folder: str, state: dict) -> None:
        """A task's copy of its bundle back (when its bundle lease ends): kept for the next
        task if unchanged, else removed off the critical path."""
        drop = self.task_folders.give(unpacked, folder, state["unchanged"])
        if drop:
            asyncio.get_running_loop().run_in_executor(None, _remove, drop)

    def drop_task_folders(self) -> None:
        """Remove the copies kept for later tasks (the worker stops)."""
        _remove(self.task_folders.clear())

    async def _task_cwd(self, wf: Workflow, workdir: str, unpacked: str | None,
                        shared: bool = False) -> str | None:
        """The task's cwd: a private copy of the run's bundle (``unpacked``): in ``workdir``
        (removed with it), or with ``shared`` one a previous task left unchanged, else a new
        one (bundles.TaskFolders: the caller gives it back); without a bundle the notebook's
        folder in place (a shared filesystem); None (its work dir) for a workflow without one."""
        if unpacked:
            free = self.task_folders.take_free(unpacked) if shared else None
            if free is not None:
                return free
            take = (self.task_folders.take if shared
                    else lambda u: bundles.task_folder(u, workdir))
            return await asyncio.get_running_loop().run_in_executor(None, take, unpacked)
        if not wf.source:
            return None
        if not os.path.isfile(wf.source):
            raise BundleError(
                f"the notebook {wf.source} is not on worker {self.name}'s filesystem: the run "
                f"was submitted without a bundle (--no-bundle / NBFLOW_BUNDLE=0), which needs "
                f"the notebook's folder on a filesystem the workers share; submit with bundles "
                f"(the default) instead")
        return os.path.dirname(wf.source)


def _remove(dirs: list[str]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


async def _all(uploads: list) -> None:
    """Await every upload (all of them, even when one fails: no write left running behind the
    task's result); the first failure is raised."""
    if not uploads:
        return
    results = await asyncio.gather(*uploads, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
