"""A run's products: the executed notebook of a task, its logs (every attempt) and its
output variables."""
from __future__ import annotations

from typing import Any

from nbflow.client.reading import Reading
from nbflow.core.events import Event
from nbflow.core.state import RunState
from nbflow.errors import NbflowError


class Outputs(Reading):
    """Executed notebooks, logs and output values, from the artifacts store."""

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
