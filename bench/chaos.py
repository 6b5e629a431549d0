"""Chaos soak: a real stack (own nats-server, two engines, workers) runs many runs of a mixed
notebook while processes are SIGKILLed at random; at the end every run must have succeeded with
each task's success recorded once, replay must equal the snapshot, every artifact named by
history must exist and the dead-letter stream must hold nothing unexplained.

    python -m bench.chaos --runs 200 --kills 120 [--seed N] [--json]
    python -m bench.chaos --runs 20 --load      # idle, then beside one CPU hog per core

With ``--json`` the last stdout line is one JSON object (runs, kills, runs_lost,
duplicate_completions, recovery_s_p50, recovery_s_p99, ...). ``tests/chaos`` runs the same code at
CI size.

What is killed (``SIGKILL``, chosen with a seeded RNG; the seed is printed):

* a worker, together with its kernels (the machine it ran on is gone); the Supervisor restarts it
  and JetStream redelivers its task once the ack wait (3 s here) expires;
* an engine (one of two sharing the durable history consumer); the Supervisor restarts it;
* the nats-server; restarted by the driver after a random pause on the same store dir and port.

Recovery time of a kill = time from the kill until the next history event of any run it
affected (worker: runs with a task in flight on it; engine / nats-server: runs not finished).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat

from bench.harness import descendants
from nbflow.client import Client
from nbflow.errors import AlreadyDecided, NbflowError
from nbflow.nats import infra
from nbflow.core.events import decode
from nbflow.nats.layout import MSG_ID, Layout
from nbflow.core.state import RunState, apply
from nbflow.stack import NatsServer, Supervisor

FAST = {"NBFLOW_TASK_ACK_WAIT": "3", "NBFLOW_ENGINE_ACK_WAIT": "3"}
# Kernels are reused between tasks (~15 ms a task instead of a kernel start each): the chaos is
# about the engine, NATS and redelivery, not kernel isolation; --isolation fresh tests both.
ISOLATION = "reuse"
NAMESPACE = "chaos"
KINDS = ("worker", "engine", "nats")

# chain (extract -> square (--map) -> total), a task that fails once per run (marker file) and is
# retried, and an approval the driver grants through the client; publish joins everything.
CELLS = [
    "import pathlib",
    "%%task extract\ndata = list(range(n))",
    "%%task square --map x in data\nsq = x * x",
    "%%task total\ns = sum(sq)",
    "%%task flaky --retries 2\n"
    "marker = pathlib.Path(marker_dir) / f'{tag}.flaky'\n"
    "if not marker.exists():\n"
    "    marker.write_text('failed once')\n"
    "    raise RuntimeError(f'planned failure for {tag}')\n"
    "f = 1",
    '%%task publish --approval "Publish?"\nreport = (s, f)',
]
PARAMS = "n = 3\nmarker_dir = '/tmp'\ntag = 'x'"


def write_mixed_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    p = nbformat.v4.new_code_cell(PARAMS)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p] + [nbformat.v4.new_code_cell(c) for c in CELLS]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def expected_keys(n: int) -> set[str]:
    return {"extract", "total", "flaky", "publish"} | {f"square#{i}" for i in range(n)}


@dataclass
class Kill:
    t: float
    kind: str
    pid: int
    down_s: float = 0.0
    affected: int = 0
    recovery_s: float | None = None


@dataclass
class Report:
    seed: int
    runs: int = 0
    tasks: int = 0
    kills: list[Kill] = field(default_factory=list)
    runs_lost: list[str] = field(default_factory=list)
    duplicate_completions: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_tasks: dict[str, list[str]] = field(default_factory=dict)
    replay_mismatch: list[str] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    unexplained_dead_letters: list[dict] = field(default_factory=list)
    approval_repairs: int = 0
    restarts: int = 0
    wall_s: float = 0.0
    failed_once: int = 0

    @property
    def ok(self) -> bool:
        return not (self.runs_lost or self.duplicate_completions or self.missing_tasks or
                    self.replay_mismatch or self.missing_artifacts or
                    self.unexplained_dead_letters)

    def recoveries(self, kind: str | None = None) -> list[float]:
        return sorted(k.recovery_s for k in self.kills
                      if k.recovery_s is not None and (kind is None or k.kind == kind))

    def figures(self) -> dict[str, Any]:
        rec = self.recoveries()
        by_kind = Counter(k.kind for k in self.kills)
        return {
            "seed": self.seed, "runs": self.runs, "tasks": self.tasks,
            "kills": len(self.kills), "kills_by_kind": {k: by_kind.get(k, 0) for k in KINDS},
            "runs_lost": len(self.runs_lost),
            "duplicate_completions": sum(c - 1 for d in self.duplicate_completions.values()
                                         for c in d.values()),
            "replay_mismatches": len(self.replay_mismatch),
            "missing_artifacts": len(self.missing_artifacts),
            "dead_letters": len(self.dead_letters),
            "unexplained_dead_letters": len(self.unexplained_dead_letters),
            "recovery_s_p50": _pct(rec, 50), "recovery_s_p99": _pct(rec, 99),
            "recovery_s_max": round(rec[-1], 3) if rec else None,
            "recovery_s_p50_by_kind": {k: _pct(self.recoveries(k), 50) for k in KINDS},
            "recovery_s_p99_by_kind": {k: _pct(self.recoveries(k), 99) for k in KINDS},
            "kills_measured": len(rec),
            "approval_repairs": self.approval_repairs, "failed_once": self.failed_once,
            "process_restarts": self.restarts, "wall_s": round(self.wall_s, 1),
            "ok": self.ok,
        }

    def problems(self) -> str:
        out = []
        for name in ("runs_lost", "duplicate_completions", "missing_tasks", "replay_mismatch",
                     "missing_artifacts", "unexplained_dead_letters"):
            v = getattr(self, name)
            if v:
                out.append(f"{name}: {json.dumps(v, default=str)[:2000]}")
        return "\n".join(out)


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return round(xs[i], 3)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


class Chaos:
    def __init__(self, runs: int, kills: int, seed: int, workdir: Path, workers: int = 3,
                 engines: int = 2, width: int = 3, gap: tuple[float, float] = (1.5, 4.0),
                 nats_down: tuple[float, float] = (0.2, 1.5), submit_every: float | None = None,
                 timeout: float = 600.0, echo: Callable[[str], None] = print,
                 isolation: str = ISOLATION):
        self.n_runs, self.n_kills, self.seed = runs, kills, seed
        self.rng = random.Random(seed)
        self.dir = workdir
        self.n_workers, self.n_engines, self.width = workers, engines, width
        self.gap, self.nats_down = gap, nats_down
        # spread the submissions over the time the kills take, so every kill lands on live runs
        self.submit_every = submit_every if submit_every is not None else max(
            0.25, 0.9 * kills * (gap[0] + gap[1]) / 2 / max(1, runs))
        self.timeout = timeout
        self.echo = echo
        self.isolation = isolation
        self.L = Layout(NAMESPACE)
        self.report = Report(seed)
        self.run_ids: list[str] = []
        self.final: dict[str, str] = {}
        self.server: NatsServer | None = None
        self.sup: Supervisor | None = None
        self._nats_up = asyncio.Event()

    # --- setup / teardown ---------------------------------------------------------------------
    def _start_server(self, port: int = 0) -> NatsServer:
        return NatsServer(self.dir / "nats", port=port, sync_interval="1s").start()

    async def run(self) -> Report:
        t0 = time.monotonic()
        # the notebook in a folder of its own: its folder is bundled with every run, and the
        # store, the logs and the markers must not be part of it
        nb = write_mixed_notebook(self.dir / "project" / "mixed.ipynb")
        (self.dir / "markers").mkdir(exist_ok=True)
        self.server = self._start_server()
        self._nats_up.set()
        self.sup = Supervisor(self.server.url, workers=self.n_workers, engines=self.n_engines,
                              namespace=NAMESPACE,
                              env={**FAST, "NBFLOW_ISOLATION": self.isolation},
                              log_file=self.dir / "stack.log").start().supervise()
        nc = await infra.connect(self.server.url, name="nbflow-chaos", reconnect=True)
        try:
            from nbflow.compiler import compile_file

            self.c = Client(nc, self.L)
            await infra.ensure(self.c.js, self.L)
            self.wf = compile_file(str(nb))
            done = asyncio.Event()
            submitter = asyncio.create_task(self._submit_all())
            approver = asyncio.create_task(self._approve_loop(done))
            chaos = asyncio.create_task(self._kill_loop(done))
            try:
                await asyncio.wait_for(self._until_all_final(submitter, approver),
                                       self.timeout)
            except asyncio.TimeoutError:
                self.echo(f"chaos: timed out after {self.timeout:.0f}s with "
                          f"{self.n_runs - len(self.final)} run(s) unfinished")
            done.set()
            await submitter
            await chaos
            await approver
            self.report.restarts = self.sup.restarts
            await self._verify()
        finally:
            await nc.close()
            self.sup.stop()
            self.server.stop()
        self.report.wall_s = time.monotonic() - t0
        return self.report

    # --- the load -----------------------------------------------------------------------------
    async def _submit_all(self) -> None:
        for i in range(self.n_runs):
            params = {"n": self.width, "marker_dir": str(self.dir / "markers"), "tag": f"r{i}"}
            run_id = f"chaos{i:04d}"
            while True:   # the server may be down: the msg id makes a re-submit a no-op
                try:
                    await self._call(self.c.submit(self.wf, params, run_id=run_id, by="chaos"))
                    break
                except Exception:  # noqa: BLE001 - nats-server killed: try again
                    await asyncio.sleep(0.2)
            self.run_ids.append(run_id)
            await asyncio.sleep(self.submit_every)

    async def _call(self, coro, timeout: float = 10.0):
        return await asyncio.wait_for(coro, timeout)

    async def _snapshot(self, run: str) -> RunState | None:
        kv = await self.c.kv(self.L.runs_bucket)
        try:
            e = await kv.get(run)
        except Exception:  # noqa: BLE001 - not yet written, or server down
            return None
        return RunState.from_dict(json.loads(e.value))

    async def _approve_loop(self, done: asyncio.Event) -> None:
        """Approve each run's publish task as it comes up (as a person would, via the client)."""
        stuck_since: dict[str, float] = {}
        while not done.is_set():
            for run in list(self.run_ids):
                if run in self.final:
                    continue
                try:
                    st = await self._call(self._snapshot(run), 5)
                except Exception:  # noqa: BLE001
                    st = None
                if st is None:
                    continue
                if st.is_final:
                    self.final[run] = st.state
                    continue
                ns = st.nodes.get("publish")
                if ns is None or ns.state != "awaiting_approval":
                    continue
                try:
                    await self._call(self.c.approve(run, "publish", True, by="chaos-approver",
                                                    comment="chaos"), 15)
                except AlreadyDecided as e:
                    # decided in KV, but the decision may not have reached history (the client
                    # was cut off between its KV CAS and its publish): give the engine a
                    # moment, then re-publish the decision under its msg id (idempotent)
                    first = stuck_since.setdefault(run, time.monotonic())
                    if time.monotonic() - first > 5:
                        await self._repair_approval(run, e.decision)
                        stuck_since.pop(run, None)
                except NbflowError:
                    pass            # e.g. snapshot behind history: try again next round
                except Exception:  # noqa: BLE001 - server down / timeouts
                    pass
            await asyncio.sleep(0.2)

    async def _repair_approval(self, run: str, decision: dict) -> None:
        from nbflow.core.events import make

        evs = await self.c.history(run)
        if any(e.type == "ApprovalDecided" for e in evs):
            return
        self.report.approval_repairs += 1
        ev = make("ApprovalDecided", run, node="publish",
                  approved=decision.get("state") == "approved", by=decision.get("by", "?"),
                  comment=decision.get("comment") or None)
        try:
            await self._call(self.c.js.publish(self.L.history_subject(run, ev.type), ev.encode(),
                                               headers={MSG_ID: f"approval.{run}.publish"}))
        except Exception:  # noqa: BLE001
            pass

    async def _until_all_final(self, submitter: asyncio.Task, approver: asyncio.Task) -> None:
        t_report = time.monotonic() + 15
        while not (submitter.done() and len(self.final) >= self.n_runs):
            if approver.done():
                approver.result()                # it died: raise its error here
            if time.monotonic() > t_report:
                t_report += 15
                self.echo(f"chaos: {len(self.final)}/{self.n_runs} runs final, "
                          f"{len(self.report.kills)} kills so far")
            await asyncio.sleep(0.2)

    # --- the chaos ----------------------------------------------------------------------------
    async def _kill_loop(self, done: asyncio.Event) -> None:
        kinds = list(KINDS)
        self.rng.shuffle(kinds)              # every kind at least once, then at random
        while len(self.report.kills) < self.n_kills and not done.is_set():
            await asyncio.sleep(self.rng.uniform(*self.gap))
            if done.is_set() or len(self.final) >= self.n_runs:
                break
            i = len(self.report.kills)
            kind = kinds[i] if i < len(kinds) else self.rng.choices(KINDS, (5, 3, 2))[0]
            k = await self._kill(kind)
            if k:
                self.report.kills.append(k)
                self.echo(f"chaos: kill #{len(self.report.kills)} {k.kind} pid {k.pid}"
                          + (f" (down {k.down_s:.2f}s)" if k.kind == "nats" else ""))

    async def _kill(self, kind: str) -> Kill | None:
        if kind == "nats":
            pid = self.server.proc.pid
            t = time.time()
            self.server.kill()
            down = self.rng.uniform(*self.nats_down)
            await asyncio.sleep(down)
            port = self.server.port
            self.server = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self._start_server(port))
            return Kill(t, kind, pid, down)
        pids = sorted(self.sup.pids(kind))
        if not pids:
            return None                      # all of that kind are restarting right now
        pid = self.rng.choice(pids)
        victims = [pid] + (descendants(pid) if kind == "worker" else [])
        t = time.time()
        for p in victims:                    # the worker's machine dies: its kernels with it
            _sigkill(p)
        return Kill(t, kind, pid)

    # --- the verdict --------------------------------------------------------------------------
    async def _verify(self) -> None:
        r = self.report
        r.runs = len(self.run_ids)
        histories: dict[str, list] = {}
        obs = await self.c.js.object_store(self.L.artifacts_store)
        want = expected_keys(self.width)
        for run in self.run_ids:
            evs = await self.c.history(run)
            histories[run] = evs
            st = await self._settled_snapshot(run, evs)
            if st is None or st.state != "succeeded":
                r.runs_lost.append(f"{run}: {st.state if st else 'no snapshot'}")
            counts = Counter(e["key"] for e in evs if e.type == "TaskSucceeded")
            r.tasks += len(counts)
            dup = {k: c for k, c in counts.items() if c > 1}
            if dup:
                r.duplicate_completions[run] = dup
            missing = sorted(want - set(counts))
            if missing:
                r.missing_tasks[run] = missing
            if any(e.type == "TaskFailed" and e["key"] == "flaky" for e in evs):
                r.failed_once += 1
            replayed = None
            for ev in evs:
                replayed, _ = apply(replayed, ev, self.wf)
            if st is None or replayed is None or replayed.to_dict() != st.to_dict():
                r.replay_mismatch.append(f"{run}: {_diff(replayed, st)}")
            for e in evs:
                if e.type != "TaskSucceeded":
                    continue
                refs = list((e.get("outputs") or {}).values())
                if e.get("notebook"):
                    refs.append(e["notebook"])
                for ref in refs:
                    try:
                        await obs.get_info(ref)
                    except Exception:  # noqa: BLE001 - not found
                        r.missing_artifacts.append(f"{run}/{e['key']}: {ref}")
        r.dead_letters = await self._dead_letters()
        r.unexplained_dead_letters = [d for d in r.dead_letters if not _explained(d)]
        self._recoveries(histories)

    async def _settled_snapshot(self, run: str, evs: list, timeout: float = 30.0):
        """The snapshot once the engine has applied the whole history (it lags by a moment)."""
        last = max((e.seq or 0) for e in evs) if evs else 0
        deadline = time.monotonic() + timeout
        while True:
            st = await self._snapshot(run)
            if (st is not None and st.seq >= last) or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.1)

    async def _dead_letters(self) -> list[dict]:
        out = []
        try:
            info = await self.c.js.stream_info(self.L.deadletter_stream)
        except Exception:  # noqa: BLE001
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                m = await self.c.js.get_msg(self.L.deadletter_stream, seq)
                out.append(json.loads(m.data))
            except Exception:  # noqa: BLE001 - deleted
                continue
        return out

    def _recoveries(self, histories: dict[str, list]) -> None:
        finished: dict[str, float] = {}
        started: dict[str, float] = {}
        for run, evs in histories.items():
            if evs:
                started[run] = evs[0].ts
            st = None
            for ev in evs:
                st, _ = apply(st, ev, self.wf)
            if st is not None and st.finished:
                finished[run] = st.finished
        for k in self.report.kills:
            if k.kind == "worker":
                affected = _in_flight_on(histories, f"-{k.pid}", k.t)
            else:
                affected = {r for r in histories
                            if started.get(r, 1e18) <= k.t < finished.get(r, 1e18)}
            k.affected = len(affected)
            nxt = [e.ts for r in affected for e in histories[r] if e.ts > k.t]
            if nxt:
                k.recovery_s = min(nxt) - k.t


def _in_flight_on(histories: dict[str, list], suffix: str, t: float) -> set[str]:
    """Runs with a task that a worker (name ending in ``suffix``) had started and not finished
    at time ``t``."""
    out = set()
    for run, evs in histories.items():
        open_: set[tuple] = set()
        for e in evs:
            if e.ts > t:
                break
            if e.type == "TaskStarted" and str(e.get("worker", "")).endswith(suffix):
                open_.add((e["key"], e["attempt"]))
            elif e.type in ("TaskSucceeded", "TaskFailed", "TaskSkipped"):
                open_.discard((e["key"], e["attempt"]))
        if open_:
            out.add(run)
    return out


# Dead letters the chaos can legitimately cause; anything else is a failure. (None so far: a
# kill never produces a malformed message, so the stream must stay empty.)
EXPLAINED: tuple[str, ...] = ()


def _explained(d: dict) -> bool:
    return any(pat in str(d.get("why", "")) for pat in EXPLAINED)


def run_chaos(runs: int = 30, kills: int = 20, seed: int | None = None, *, workers: int = 3,
              engines: int = 2, timeout: float = 600.0, keep: bool = False,
              echo: Callable[[str], None] = print, **kw) -> Report:
    seed = random.SystemRandom().randrange(2 ** 32) if seed is None else seed
    echo(f"chaos: seed {seed} (reproduce with --seed {seed}); {runs} runs, up to {kills} kills, "
         f"{workers} workers, {engines} engines")
    workdir = Path(tempfile.mkdtemp(prefix="nbflow-chaos-"))
    try:
        rep = asyncio.run(Chaos(runs, kills, seed, workdir, workers, engines, timeout=timeout,
                                echo=echo, **kw).run())
    finally:
        if keep:
            echo(f"chaos: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rep


def _diff(a, b, limit: int = 6) -> str:
    """Where a replayed state and a snapshot differ (for the report)."""
    if a is None or b is None:
        return f"replayed={a is not None} snapshot={b is not None}"
    out = []

    def walk(x, y, path):
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{path}.{k}")
        elif x != y:
            out.append(f"{path}: replay={x!r} snapshot={y!r}")
    walk(a.to_dict(), b.to_dict(), "")
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--kills", type=int, default=None, help="default: 2/3 of --runs")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--isolation", choices=("reuse", "fresh"), default=ISOLATION,
                    help="worker kernel isolation (default: reuse, fast)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds (default: scales)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, store)")
    ap.add_argument("--json", action="store_true", help="last stdout line: the figures as JSON")
    ap.add_argument("--load", nargs="?", type=int, const=-1, default=None, metavar="HOGS",
                    help="run twice: idle, then beside HOGS busy-looping processes (default: one "
                         "per CPU); report recovery p50/p99 of both")
    a = ap.parse_args(argv)
    if a.load is not None:
        return _idle_and_loaded(a)
    kills = a.kills if a.kills is not None else max(3, a.runs * 2 // 3)
    timeout = a.timeout or 120 + 6 * a.runs
    echo = (lambda m: print(m, file=sys.stderr)) if a.json else print
    rep = run_chaos(a.runs, kills, a.seed, workers=a.workers, engines=a.engines,
                    timeout=timeout, keep=a.keep, echo=echo, isolation=a.isolation)
    fig = rep.figures()
    if a.json:
        print(json.dumps(fig))
    else:
        for k, v in fig.items():
            print(f"{k:>28}: {v}")
    if not rep.ok:
        print(rep.problems(), file=sys.stderr)
    return 0 if rep.ok else 1


def cpu_hogs(n: int) -> list:
    """``n`` processes that spin a CPU each (the --load of a busy machine)."""
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _idle_and_loaded(a) -> int:
    """--load: the same chaos idle, then beside CPU hogs; one line of figures per phase."""
    hogs_n = a.load if a.load and a.load > 0 else (os.cpu_count() or 1)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2 ** 32)
    base = ["--runs", str(a.runs), "--workers", str(a.workers), "--engines", str(a.engines),
            "--isolation", a.isolation, "--seed", str(seed)]
    if a.kills is not None:
        base += ["--kills", str(a.kills)]
    if a.timeout:
        base += ["--timeout", str(a.timeout)]
    out: dict[str, Any] = {}
    code = 0
    for phase in ("idle", "loaded"):
        hogs = cpu_hogs(hogs_n) if phase == "loaded" else []
        try:
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code |= main(base + ["--json"])
            fig = json.loads(buf.getvalue().strip().splitlines()[-1])
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        fig["load_hogs"] = len(hogs)
        out[phase] = fig
        print(f"{phase:>6} ({len(hogs)} CPU hogs): recovery p50 {fig['recovery_s_p50']} s, "
              f"p99 {fig['recovery_s_p99']} s; engine kills p50 "
              f"{fig['recovery_s_p50_by_kind']['engine']} s, p99 "
              f"{fig['recovery_s_p99_by_kind']['engine']} s; runs lost {fig['runs_lost']}, "
              f"duplicates {fig['duplicate_completions']}, ok {fig['ok']}", flush=True)
    if a.json:
        print(json.dumps(out))
    return code


if __name__ == "__main__":
    sys.exit(main())
