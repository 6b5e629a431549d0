"""Where the engine's time goes per step: ``python -m bench.profile_engine [--steps 200]
[--runs 0] [--width 20] [--top 25]``.

The engine runs in-process, in its own thread and event loop, under cProfile (only that thread
is profiled); the noop worker is a child process; the client submits from the main thread.
Besides the profile, the wall time the engine spends awaiting each NATS round trip is timed by
wrapping its JetStream/KV calls (the wrappers live here; engine.py is untouched).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import threading
import time
from collections import defaultdict

from bench.engine_bench import _nbflow_runs, chain_workflow, fanout_workflow, map_workflow
from bench.harness import Env


class Timings:
    def __init__(self):
        self.n: dict[str, int] = defaultdict(int)
        self.s: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        async def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                self.n[label] += 1
                self.s[label] += time.perf_counter() - t0
        setattr(obj, name, timed)

    def sync(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.n[label] += 1
                self.s[label] += time.perf_counter() - t0
        timed.__wrapped__ = fn
        setattr(obj, name, timed)

    def report(self, steps: int) -> str:
        lines = [f"{'call':34} {'count':>7} {'total ms':>10} {'ms/step':>8}"]
        for k in sorted(self.s, key=self.s.get, reverse=True):
            lines.append(f"{k:34} {self.n[k]:7d} {1000 * self.s[k]:10.1f} "
                         f"{1000 * self.s[k] / steps:8.3f}")
        return "\n".join(lines)


_restore: list = []


def instrument(eng, t: Timings, engine_cls=None) -> None:
    import nbflow.engine.engine as em

    t.wrap(eng.js, "get_msg", "js.get_msg (_events_between)")
    t.wrap(eng.js, "publish_async", "js.publish_async (enqueue)")
    t.wrap(eng.runs_kv, "update", "runs_kv.update (snapshot CAS)")
    t.wrap(eng.runs_kv, "create", "runs_kv.create")
    t.wrap(eng, "execute", "Engine.execute (dispatch + await acks)")
    t.wrap(eng, "_events_between", "Engine._events_between")
    t.wrap(eng, "load_snapshot", "Engine.load_snapshot")
    t.wrap(eng, "_fetch", "Engine._fetch (history pull)")
    t.wrap(eng, "_handle_run_batch", "Engine._handle_run_batch")
    t.wrap(eng, "_write_snapshot", "Engine._write_snapshot (to_dict + json + KV CAS)")
    t.sync(em, "fold", "state.fold")
    t.sync(em, "decode", "events.decode")
    orig = em.RunState.to_dict
    _restore.append(lambda: (setattr(em, "fold", em.__dict__["fold"].__wrapped__),
                             setattr(em, "decode", em.__dict__["decode"].__wrapped__),
                             setattr(em.RunState, "to_dict", orig)))
    t.n["RunState.to_dict"] = 0

    def to_dict(self, *args, **kwargs):   # forwards compact= (dropping it made every event fail)
        t0 = time.perf_counter()
        try:
            return orig(self, *args, **kwargs)
        finally:
            t.n["RunState.to_dict"] += 1
            t.s["RunState.to_dict"] += time.perf_counter() - t0
    em.RunState.to_dict = to_dict


def fast_to_dict(self) -> dict:
    """What ``RunState.to_dict`` gives (same JSON bytes), built shallowly: ``asdict`` recurses
    and deep-copies every field of every node and task on every event."""
    d = {k: v for k, v in self.__dict__.items() if k[0] != "_"}
    d["nodes"] = {k: dict(v.__dict__) for k, v in self.nodes.items()}
    d["tasks"] = {k: dict(v.__dict__) for k, v in self.tasks.items()}
    return d


def profile(steps: int = 200, runs: int = 0, width: int = 20, top: int = 25, map_n: int = 0,
            engine_cls=None, quiet: bool = False, cprofile: bool = True,
            fast_snapshot: bool = False) -> dict:
    """Profile one chain of ``steps`` (or ``runs`` fan-out runs of ``width``). Returns figures
    and the report text."""
    from nbflow.engine.engine import Engine

    engine_cls = engine_cls or Engine
    if fast_snapshot:
        from nbflow.core.state import RunState
        orig = RunState.to_dict
        RunState.to_dict = fast_to_dict
        _restore.append(lambda: setattr(RunState, "to_dict", orig))
    out: dict = {}
    with Env("profile") as env:
        env.noop_worker(concurrency=64)
        started = threading.Event()
        stop_loop: list = []
        prof = cProfile.Profile()
        t = Timings()
        err: list = []

        def engine_thread():
            async def main():
                nc = await env.raw_connect()       # the engine user (servers have credentials)
                eng = engine_cls(nc, env.L)
                await eng.start()
                instrument(eng, t)
                loop = asyncio.get_running_loop()
                stop_loop.append((loop, eng))
                started.set()
                try:
                    await eng.run()
                finally:
                    await nc.close()
            try:
                asyncio.run(main())
            except Exception as e:  # noqa: BLE001
                err.append(e)
                started.set()

        th = threading.Thread(target=engine_thread, daemon=True)
        th.start()
        started.wait(30)
        if err:
            raise err[0]

        async def drive():
            wf = map_workflow(map_n) if map_n else \
                fanout_workflow(width) if runs else chain_workflow(steps)
            await _nbflow_runs(env, chain_workflow(3, "warmup"), 1)
            t.n.clear()
            t.s.clear()
            loop, _ = stop_loop[0]
            if cprofile:
                loop.call_soon_threadsafe(prof.enable)
            await asyncio.sleep(0.05)
            dt, _ = await _nbflow_runs(env, wf, runs or 1)
            loop.call_soon_threadsafe(prof.disable)
            await asyncio.sleep(0.05)
            return dt

        dt = asyncio.run(drive())
        loop, eng = stop_loop[0]
        loop.call_soon_threadsafe(eng.stop)
        th.join(10)
        while _restore:
            _restore.pop()()
    n = map_n or (runs * width if runs else steps)
    s, s2 = io.StringIO(), io.StringIO()
    if cprofile:
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
        pstats.Stats(prof, stream=s2).sort_stats("cumulative").print_stats(top)
    if not cprofile:
        prof.enable()                     # an empty profile, so the report code stays uniform
        prof.disable()
    out.update(steps=n, wall_s=dt, ms_per_step=1000 * dt / n, timings=t.report(n),
               tottime=s.getvalue(), cumulative=s2.getvalue())
    if not quiet:
        print(f"{n} steps in {dt:.3f} s = {1000 * dt / n:.2f} ms/step "
              f"({'fanout %d x %d' % (runs, width) if runs else 'chain'})\n")
        print(out["timings"])
        print("\n--- cProfile, engine thread, by tottime ---")
        print(out["tottime"])
        print("\n--- by cumulative ---")
        print(out["cumulative"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_engine")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--runs", type=int, default=0, help="fan-out runs instead of a chain")
    p.add_argument("--map", type=int, default=0, help="one --map of this many instances")
    p.add_argument("--width", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-cprofile", action="store_true", help="timings only (less overhead)")
    p.add_argument("--fast-snapshot", action="store_true",
                   help="experiment: RunState.to_dict built shallowly instead of asdict")
    a = p.parse_args()
    profile(a.steps, a.runs, a.width, a.top, map_n=a.map, cprofile=not a.no_cprofile,
            fast_snapshot=a.fast_snapshot)


if __name__ == "__main__":
    main()
