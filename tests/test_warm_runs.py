"""Warm runs stay warm without crossing: with the default isolation (``run``) back-to-back runs on
real workers find kernels started ahead for them, and nothing one run's task leaves in its kernel
(a global, a module attribute) is visible to another run's task."""
from __future__ import annotations

from support import finish
from nbhelpers import write_notebook


def test_nothing_a_run_leaves_in_its_kernel_reaches_the_next_runs(client, tmp_path):
    nb = write_notebook(tmp_path / "leak.ipynb", [
        "%%task probe\nimport os, sys\n"
        "seen = [getattr(sys, '_nbflow_leak', None), 'leaked_global' in globals()]\n"
        "sys._nbflow_leak = 'set by an earlier run'\nleaked_global = 1\npid = os.getpid()",
        "%%task after\nimport os, sys\n"
        "seen_after = [getattr(sys, '_nbflow_leak', None), 'leaked_global' in globals()]\n"
        "pid_after = os.getpid()\nn = len(seen) + pid",
        "%%task report\nn2 = len(seen_after) + pid_after",     # outputs are what a task reads
    ])
    pids = []
    for _ in range(6):
        run = client.submit(str(nb), {})
        assert finish(client, run).state == "succeeded"
        assert client.load_output(run, "probe", "seen") == [None, False]
        pids.append({client.load_output(run, "probe", "pid"),
                     client.load_output(run, "after", "pid_after")})
        # within a run a kernel may serve both tasks (modules stay, globals are reset)
        after = client.load_output(run, "after", "seen_after")
        assert after[1] is False
        assert after[0] in (None, "set by an earlier run")
        if after[0] is not None:            # it is this run's own kernel, never another run's
            assert client.load_output(run, "probe", "pid") == \
                client.load_output(run, "after", "pid_after")
    for i, a in enumerate(pids):            # no kernel served two runs
        for b in pids[i + 1:]:
            assert not a & b
