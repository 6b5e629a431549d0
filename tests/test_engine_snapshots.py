"""The engine writes a run's snapshot per batch, not per event (#14): history is the truth, the
KV snapshot its fold written behind while workers are busy. Counted on the runs bucket itself
(its revision is the number of writes in a namespace of one run), not read from our own logs."""
from __future__ import annotations

import pytest

from nbhelpers import write_notebook
from support import check_replay, wait_for

from nbflow.client import SyncClient
from nbflow.stack import Supervisor


@pytest.fixture
def lazy_stack(nats_server, tmp_path):
    # written behind at most every 60 s: within this test only the writes the engine must make
    # (a new run, a run that waits on nobody but a person, a run that ended) happen
    sup = Supervisor(nats_server.url, workers=1, namespace="snapwrites",
                     log_file=tmp_path / "stack.log",
                     engine_env={"NBFLOW_SNAPSHOT_EVERY": "60"}).start()
    yield sup
    sup.stop()


def test_a_chain_writes_its_snapshot_a_few_times_not_once_per_event(lazy_stack, nats_server,
                                                                    tmp_path):
    n = 8
    cells = ["%%task t0\nv0 = 0"] + [f"%%task t{i}\nv{i} = v{i - 1} + 1" for i in range(1, n)]
    nb = write_notebook(tmp_path / "chain.ipynb", cells)
    with SyncClient(nats_server.url, namespace="snapwrites") as c:
        run = c.submit(str(nb), {})
        # while the run is busy, status is current although the snapshot is behind
        wait_for(lambda: c.status(run).tasks.get("t2") is not None, what="t2 dispatched")
        st = c.wait(run, timeout=180)
        assert st.state == "succeeded"
        check_replay(c, run)                 # the final snapshot is there and equals replay
        events = len(c.history(run))
        assert events >= 2 * n + 2           # RunStarted, Started+Succeeded per task, Finished

        async def revision():
            kv = await c.aclient.kv(c.aclient.L.runs_bucket)
            return (await kv.get(run)).revision
        writes = c._call(revision())
        # created once, written when it ended and after its RunFinished: not 2n+2 times
        assert writes <= 4, f"{writes} snapshot writes for {events} events"
