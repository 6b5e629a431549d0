"""The engine's run snapshots: a cache of folded run states (LRU), the KV snapshot read, and the
snapshot writes — at once (compare-and-set) or behind, once a busy run's snapshot has lagged
NBFLOW_SNAPSHOT_EVERY seconds. A mixin of :class:`nbflow.engine.engine.Engine` (it uses the
engine's ``runs_kv``, ``snapshots``, ``behind`` and ``write_s``)."""
from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict

from nbflow.core.state import RunState
from nbflow.engine.crash import _crash_point
from nbflow.errors import Conflict, NotFound

log = logging.getLogger("nbflow.engine")

# A busy run's snapshot is written once it has lagged this long (history has what it lacks).
SNAPSHOT_EVERY_S = float(os.environ.get("NBFLOW_SNAPSHOT_EVERY", "0.25"))


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, k, v):
        self[k] = v
        self.move_to_end(k)
        while len(self) > self.size:
            self.popitem(last=False)


class Snapshots:
    def _due(self, run: str) -> float:
        """When a lagging snapshot is written: SNAPSHOT_EVERY_S after it started to lag, or ten
        times what its last write took if that is longer — a big run's snapshot (O(run size) to
        encode and send) then costs at most ~10 % of the engine's time however big it grows."""
        return self.behind[run] + max(SNAPSHOT_EVERY_S, 10 * self.write_s.get(run, 0.0))

    async def _write_behind(self, idle: bool = False) -> None:
        """Write the lagging snapshots that are due (all of them with ``idle``). Between
        batches, so never concurrently with a batch of the same run."""
        now = time.monotonic()
        for run in list(self.behind):
            if not idle and now < self._due(run):
                continue
            cached = self.snapshots.get(run)
            if cached is None:               # evicted: the next event catches the run up
                self.behind.pop(run, None)
                self.write_s.pop(run, None)
                continue
            st, rev = cached
            try:
                new_rev = await self._write_snapshot(st, rev)
            except Conflict:                 # another engine wrote a later fold: reload later
                self.snapshots.pop(run, None)
                self.behind.pop(run, None)
                continue
            except Exception as e:  # noqa: BLE001 - transient: try again on the next round
                log.warning("run %s: snapshot write failed (%s); will retry", run, e)
                continue
            self.snapshots.put(run, (st, new_rev))
            self.behind.pop(run, None)

    async def _write_snapshot(self, st: RunState, rev: int) -> int:
        _crash_point("before_snapshot")
        t0 = time.monotonic()
        value = json.dumps(st.to_dict(compact=True), separators=(",", ":")).encode()
        self.snapshot_writes += 1
        try:
            if rev:
                return await self.runs_kv.update(st.run, value, last=rev)
            return await self.runs_kv.create(st.run, value)
        finally:
            if st.is_final:
                self.write_s.pop(st.run, None)
            else:
                self.write_s[st.run] = time.monotonic() - t0

    async def load_snapshot(self, run: str) -> tuple[RunState | None, int]:
        cached = self.snapshots.get(run)
        if cached:
            return cached
        try:
            e = await self.runs_kv.get(run)
        except NotFound:
            return None, 0
        return RunState.from_dict(json.loads(e.value)), e.revision
