"""Notebook tasks through the full stack (engine + real papermill workers with the warm kernel
pool), against running the same code without nbflow."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from bench.harness import Env, RunWatch, descendants, cmdline, percentile, rss_kb, wait_consumer


# --- notebooks ---------------------------------------------------------------------------------

def write_nb(path: str, cells: list) -> str:
    nbformat.write(new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}),
        path)
    return path


def linear_notebook(path: str, n: int) -> str:
    """n tasks, each using the previous one's value: t0 -> t1 -> ... (data flows through)."""
    cells = [new_code_cell("%load_ext nbflow"), new_code_cell("%%task t000\nx000 = 0")]
    for i in range(1, n):
        cells.append(new_code_cell(f"%%task t{i:03d}\nx{i:03d} = x{i - 1:03d} + 1"))
    return write_nb(path, cells)


def ordered_notebook(path: str, n: int) -> str:
    """n trivial tasks in a chain made by --after only (no data): pure per-task overhead."""
    cells = [new_code_cell("%load_ext nbflow"), new_code_cell("%%task t000\npass")]
    for i in range(1, n):
        cells.append(new_code_cell(f"%%task t{i:03d} --after t{i - 1:03d}\npass"))
    return write_nb(path, cells)


def map_notebook(path: str, items: int, sleep: float) -> str:
    cells = [new_code_cell(f"items = {list(range(items))!r}", metadata={"tags": ["parameters"]}),
             new_code_cell(f"%%task work --map i in items\nimport time\ntime.sleep({sleep})")]
    return write_nb(path, cells)


def stripped(path: str, out: str) -> str:
    """The notebook without %%task lines and %load_ext: what one kernel runs top to bottom."""
    nb = nbformat.read(path, as_version=4)
    cells = []
    for c in nb.cells:
        src = c.source
        if src.startswith("%load_ext"):
            continue
        if src.startswith("%%task"):
            src = src.split("\n", 1)[1] if "\n" in src else ""
        cells.append(new_code_cell(src, metadata=dict(c.metadata)))
    return write_nb(out, cells)


# --- the stack ---------------------------------------------------------------------------------

async def _stack(env: Env, workers: int = 1, isolation: str | None = None,
                 extra: dict | None = None) -> None:
    """The engine (once per Env) and ``workers`` fresh worker processes (``extra``: more of
    their environment)."""
    if "engine" not in env.procs:
        env.engine()
    wenv = {**({"NBFLOW_ISOLATION": isolation} if isolation else {}), **(extra or {})} or None
    for i in range(workers):
        env.worker(f"worker{i}", concurrency=1, env=wenv)


def _stop_workers(env: Env) -> None:
    for name in [n for n in env.procs if n.startswith("worker")]:
        env.stop(name)


async def _run(env: Env, c, watch: RunWatch, path: str, params: dict | None = None,
               timeout: float = 600.0) -> tuple[float, dict]:
    from nbflow.compiler import compile_notebook

    wf = compile_notebook(path)
    await c.put_workflow(wf)
    t0 = time.perf_counter()
    run = await c.submit(wf, params or {})
    snap = (await watch.wait([run], timeout, env))[run]
    dt = watch.final_at[run] - t0
    if snap["state"] != "succeeded":
        err = snap.get("error") or {}
        raise RuntimeError(f"run {run} {snap['state']}: {err.get('error', '')}\n"
                           f"{env.log_tail('worker0')}")
    return dt, snap


async def _at_rest(c, env: Env, workers: int = 1, timeout: float = 60.0) -> None:
    """Until every worker's heartbeat says all its kernels are ready (none starting, busy or
    being reset): the stack at rest, as between an analyst's runs. Workers beat every
    NBFLOW_PRESENCE_S (the benches that wait set it to 0.5 s)."""
    end = time.monotonic() + timeout
    seen_after = time.time()
    while time.monotonic() < end:
        ws = [w for w in await c.workers() if w.get("ts", 0) > seen_after]
        if len(ws) >= workers and all(w.get("kernels_ready", 0) >= w.get("kernels", 1) > 0
                                      for w in ws):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the workers' kernels were not all ready after {timeout:g} s\n"
                       f"{env.log_tail('worker0')}")


async def _connected(env: Env, workers: int):
    c = await env.connect()
    await wait_consumer(c.js, env.L.history_stream, env.L.engine_consumer, env)
    await wait_consumer(c.js, env.L.tasks_stream, env.L.worker_consumer("default"), env)
    watch = await env.watch()
    return c, watch


def chain_overheads(snap: dict) -> tuple[list[float], list[float]]:
    """Per task of a chain: wall = its completion minus its predecessor's completion (the run's
    start for the first), overhead = wall - exec_s (the task cell's own time). Seconds."""
    tasks = sorted(snap["tasks"].values(), key=lambda t: t["finished"])
    prev = snap["started"]
    walls, over = [], []
    for t in tasks:
        wall = t["finished"] - prev
        walls.append(wall)
        over.append(wall - (t.get("exec_s") or 0.0))
        prev = t["finished"]
    return walls, over


# The split of a task's overhead, in order: the worker's steps (the ``phases`` of its completion
# event: nbflow.worker.execute.Phases, nbflow.worker.runner.phase_split) and what lies between
# two tasks of the chain. Means add up to the mean overhead exactly (see overhead_split).
PHASES = [
    ("between", "between tasks: engine, dispatch, worker fetch"),
    ("prev_tail", "previous task's result publish + acks + cleanup"),
    ("accept", "decode the task message"),
    ("started", "TaskStarted publish (+ ack in older workers)"),
    ("prep", "definition, bundle, task notebook, work dir"),
    ("inputs", "input fetch"),
    ("folder", "task folder + environment check"),
    ("nb_write", "task notebook written for papermill"),
    ("parameterize", "papermill reads + parameterizes"),
    ("kernel", "warm kernel acquired"),
    ("cells", "the one execute (reset, enter, cells; task cell excluded)"),
    ("release", "kernel handed back (reset deferred to the next task)"),
    ("nb_save", "executed notebook written"),
    ("run_other", "rest of the run (executor hop)"),
    ("writes_check", "relative-writes check"),
    ("upload_nb", "executed notebook upload (older workers)"),
    ("upload_outputs", "outputs upload (older workers)"),
    ("uploads", "executed notebook + outputs uploads, at once"),
    ("result", "completion event built"),
    ("other", "phases this bench does not name"),
]


def overhead_split(snap: dict, events: list) -> dict[str, list[float]]:
    """Per task of a chain (ms): each phase of PHASES, from the tasks' completion events.
    ``cells`` excludes the task cell's own time (exec_s), ``between`` is what the worker did not
    measure: the gap since the predecessor's completion minus the worker's phases (and the
    previous task's tail, measured by the same worker). Per task the parts sum to its overhead."""
    done = {ev.data["key"]: ev for ev in events
            if ev.type in ("TaskSucceeded", "TaskFailed", "TaskSkipped")}
    tasks = sorted(snap["tasks"].values(), key=lambda t: t["finished"])
    prev = snap["started"]
    out: dict[str, list[float]] = {name: [] for name, _ in PHASES}
    for t in tasks:
        ev = done.get(t["key"])
        wall_ms = (t["finished"] - prev) * 1000
        prev = t["finished"]
        if ev is None or not isinstance(ev.data.get("phases"), dict):
            continue                       # an older worker: no split
        ph = {k: float(v) for k, v in ev.data["phases"].items()}
        exec_ms = (t.get("exec_s") or 0.0) * 1000
        ph["cells"] = ph.get("cells", 0.0) - exec_ms
        ph["prev_tail"] = float(ev.data.get("phases_prev_tail") or 0.0)
        named = dict(PHASES)
        ph["other"] = sum(v for k, v in ph.items() if k not in named)   # still counted
        ph["between"] = wall_ms - exec_ms - sum(v for k, v in ph.items() if k in named
                                                and k != "between")
        for name, _ in PHASES:
            out[name].append(ph.get(name, 0.0))
    return out


def split_figures(split: dict[str, list[float]], prefix: str = "task_overhead") -> dict:
    out = {}
    means = 0.0
    for name, xs in split.items():
        if not xs:
            continue
        out[f"{prefix}_phase_{name}_ms_p50"] = round(percentile(xs, 50), 2)
        mean = sum(xs) / len(xs)
        out[f"{prefix}_phase_{name}_ms_mean"] = round(mean, 2)
        means += mean
    if means:
        out[f"{prefix}_phases_mean_sum_ms"] = round(means, 2)
    return out


# --- benchmarks --------------------------------------------------------------------------------

def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` used so far (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return total


async def _overhead_once(env: Env, n: int, isolation: str | None) -> dict:
    await _stack(env, 1, isolation, {"NBFLOW_PRESENCE_S": "0.5"})
    c, watch = await _connected(env, 1)
    try:
        path = ordered_notebook(str(env.dir / f"overhead{n}.ipynb"), n)
        await _run(env, c, watch, ordered_notebook(str(env.dir / "warm.ipynb"), 2))
        await _at_rest(c, env)         # warm: a run before, and the worker's kernels ready
        # CPU time per task of the worker and of the kernels that were ready for the run (a
        # spare started during it is not task work): a figure load on a shared machine barely
        # moves, unlike wall times
        wpid = env.procs["worker0"].pid
        kpids = [p for p in descendants(wpid) if "ipykernel" in cmdline(p)]
        cpu0 = cpu_s([wpid]), {p: cpu_s([p]) for p in kpids}
        dt, snap = await _run(env, c, watch, path)
        await _at_rest(c, env)         # the last kernel reset done
        kcpu = sum(max(0.0, cpu_s([p]) - before) for p, before in cpu0[1].items()
                   if os.path.exists(f"/proc/{p}"))
        cpu = ((cpu_s([wpid]) - cpu0[0]) / n * 1000, kcpu / n * 1000)
        kernels = [p for p in descendants(env.procs["worker0"].pid)
                   if "ipykernel" in cmdline(p)]
        krss = [rss_kb(p) for p in kernels]
        split = overhead_split(snap, await c.history(snap["run"]))
    finally:
        await c.close()
        _stop_workers(env)
    walls, over = chain_overheads(snap)
    execs = [t.get("exec_s") or 0.0 for t in snap["tasks"].values()]
    return {"n": n, "wall_s": dt, "p50": 1000 * percentile(over, 50),
            "p99": 1000 * percentile(over, 99), "exec_ms_mean": 1000 * sum(execs) / len(execs),
            "mean": 1000 * sum(over) / len(over), "split": split, "cpu": cpu,
            "kernel_rss_mb": (max(krss) / 1024) if krss else None, "kernels": len(kernels)}


async def task_overhead(size: str = "full") -> dict:
    """A chain of trivial tasks (``pass``, ordered by --after) on 1 worker: default isolation
    (``run``: one warm kernel per run, reset between tasks) and ``reuse`` isolation."""
    n_fresh, n_reuse = {"tiny": (3, 3), "quick": (30, 100), "full": (100, 100)}[size]
    with Env("overhead") as env:
        fresh = await _overhead_once(env, n_fresh, None)
        reuse = await _overhead_once(env, n_reuse, "reuse")
    return {
        "task_overhead_tasks": n_fresh,
        "task_overhead_ms_p50": round(fresh["p50"], 1),
        "task_overhead_ms_p99": round(fresh["p99"], 1),
        "task_overhead_ms_mean": round(fresh["mean"], 2),
        "task_overhead_worker_cpu_ms": round(fresh["cpu"][0], 2),
        "task_overhead_kernel_cpu_ms": round(fresh["cpu"][1], 2),
        **split_figures(fresh["split"]),
        "task_overhead_exec_ms_mean": round(fresh["exec_ms_mean"], 2),
        "task_overhead_reuse_tasks": n_reuse,
        "task_overhead_reuse_ms_p50": round(reuse["p50"], 1),
        "task_overhead_reuse_ms_p99": round(reuse["p99"], 1),
        "kernel_rss_mb": round(fresh["kernel_rss_mb"], 1) if fresh["kernel_rss_mb"] else None,
        "kernel_pool_kernels": fresh["kernels"],
    }


def _papermill_floor(path: str, workdir: str) -> tuple[float, float]:
    """The whole notebook, %%task lines stripped, in one new kernel (papermill's own engine).
    Returns (wall incl. kernel start, sum of the cells' own durations)."""
    import papermill

    src = stripped(path, os.path.join(workdir, "whole.ipynb"))
    t0 = time.perf_counter()
    nb = papermill.execute_notebook(src, os.path.join(workdir, "whole.out.ipynb"),
                                    progress_bar=False, log_output=False, kernel_name="python3")
    wall = time.perf_counter() - t0
    cells = sum(float(c.metadata.get("papermill", {}).get("duration") or 0) for c in nb.cells)
    return wall, cells


def _papermill_tasks(path: str, workdir: str) -> float:
    """The per-task notebooks nbflow's workers run, one after another with plain papermill
    (a new kernel each), values handed over as the same pickle files."""
    import papermill

    from nbflow.compiler import compile_notebook
    from nbflow.compiler.tasknb import task_notebook

    wf = compile_notebook(path)
    order = [n for n in wf.nodes if n.kind == "task"]
    d = os.path.join(workdir, "pm")
    os.makedirs(d, exist_ok=True)
    nbs = []
    for node in order:
        p = os.path.join(d, f"{node.id}.ipynb")
        nbformat.write(task_notebook(wf, node.id), p)
        io = {"task": node.id, "key": node.id, "run": "papermill", "dir": d,
              "inputs": {name: f"out/{name}.pkl" for name in node.inputs},
              "map": None, "signal": None, "outputs": node.outputs}
        nbs.append((p, io))
    t0 = time.perf_counter()
    for p, io in nbs:
        papermill.execute_notebook(p, p.replace(".ipynb", ".out.ipynb"),
                                   parameters={"__nbflow__": io}, progress_bar=False,
                                   log_output=False, kernel_name="python3", cwd=d)
    return time.perf_counter() - t0


def _ploomber(n: int, workdir: str) -> float | None:
    """``ploomber build`` of the same linear pipeline (scripts with upstream), if installed."""
    try:
        import ploomber  # noqa: F401
    except ImportError:
        return None
    import subprocess
    import sys

    d = os.path.join(workdir, "ploomber")
    os.makedirs(d, exist_ok=True)
    tasks = []
    for i in range(n):
        up = f"upstream = ['t{i - 1:03d}']" if i else "upstream = None"
        body = (f"# %% tags=['parameters']\n{up}\nproduct = None\n\n# %%\nimport pickle\n"
                + (f"x = pickle.load(open(upstream['t{i - 1:03d}']['data'], 'rb')) + 1\n" if i
                   else "x = 0\n")
                + "pickle.dump(x, open(product['data'], 'wb'))\n")
        with open(os.path.join(d, f"t{i:03d}.py"), "w") as f:
            f.write(body)
        tasks.append(f"  - source: t{i:03d}.py\n    product:\n      nb: out/t{i:03d}.ipynb\n"
                     f"      data: out/t{i:03d}.pkl\n")
    with open(os.path.join(d, "pipeline.yaml"), "w") as f:
        f.write("tasks:\n" + "".join(tasks))
    t0 = time.perf_counter()
    # `ploomber build` (the console script; `python -m ploomber.cli.cli` is gone in 0.23)
    exe = shutil.which("ploomber") or os.path.join(os.path.dirname(sys.executable), "ploomber")
    subprocess.run([exe, "build", "--force"], cwd=d, check=True, capture_output=True)
    return time.perf_counter() - t0


async def pipeline10(size: str = "full") -> dict:
    n = {"tiny": 3, "quick": 10, "full": 10}[size]
    with Env("pipeline") as env:
        path = linear_notebook(str(env.dir / "pipeline.ipynb"), n)
        loop = asyncio.get_running_loop()
        floor_s, cells_s = await loop.run_in_executor(None, _papermill_floor, path, str(env.dir))
        pm_s = await loop.run_in_executor(None, _papermill_tasks, path, str(env.dir))
        try:
            pl_s = await loop.run_in_executor(None, _ploomber, n, str(env.dir))
            pl_note = "" if pl_s is not None else "ploomber not installed (pip install ploomber)"
        except Exception as e:  # noqa: BLE001 - a baseline that fails is a note, not a crash
            pl_s, pl_note = None, f"ploomber failed: {e}"
        res = {}
        for label, iso in (("", None), ("_reuse", "reuse")):
            await _stack(env, 1, iso, {"NBFLOW_PRESENCE_S": "0.5"})
            c, watch = await _connected(env, 1)
            try:
                await _run(env, c, watch, linear_notebook(str(env.dir / "warm.ipynb"), 2))
                await _at_rest(c, env)   # warm: a run before, and the worker's kernels ready
                nb_s, _ = await _run(env, c, watch, path)
            finally:
                await c.close()
                _stop_workers(env)
            res[label] = nb_s
    out = {
        "pipeline10_tasks": n,
        "pipeline10_s": round(res[""], 3),
        "pipeline10_reuse_s": round(res["_reuse"], 3),
        "pipeline10_floor_s": round(floor_s, 3),
        "pipeline10_floor_cells_s": round(cells_s, 4),
        "pipeline10_papermill_s": round(pm_s, 3),
        "pipeline10_vs_floor": round(res[""] / floor_s, 2),
        "pipeline10_reuse_vs_floor": round(res["_reuse"] / floor_s, 2),
        "pipeline10_speedup_vs_papermill": round(pm_s / res[""], 2),
        "pipeline10_reuse_speedup_vs_papermill": round(pm_s / res["_reuse"], 2),
        "pipeline10_ploomber_s": round(pl_s, 3) if pl_s is not None else None,
    }
    if pl_note:
        out["pipeline10_ploomber_note"] = pl_note
    return out


async def fanout_map(size: str = "full") -> dict:
    items, sleep = {"tiny": (4, 0.02), "quick": (200, 0.02), "full": (200, 0.02)}[size]
    workers = 2
    res = {}
    with Env("fanoutmap") as env:
        path = map_notebook(str(env.dir / "map.ipynb"), items, sleep)
        # the default (run isolation, map chunks) is the figure; full adds reuse, and the
        # same without chunks (one instance per task run: NBFLOW_CHUNK_MAX=1)
        for label, iso, extra in (("", None, None), ("_reuse", "reuse", None),
                                  ("_unchunked", None, {"NBFLOW_CHUNK_MAX": "1"})):
            if size == "quick" and label:
                continue
            await _stack(env, workers, iso, {"NBFLOW_PRESENCE_S": "0.5", **(extra or {})})
            c, watch = await _connected(env, workers)
            try:
                await _run(env, c, watch, map_notebook(str(env.dir / "warm.ipynb"), 4, 0.0))
                await _at_rest(c, env, workers)   # warm: a run before, all kernels ready
                res[label], _ = await _run(env, c, watch, path)
            finally:
                await c.close()
                _stop_workers(env)
    ideal = items * sleep / workers
    out = {"fanout_map_items": items, "fanout_map_ideal_s": round(ideal, 3)}
    out["fanout_map_s"] = round(res[""], 3)
    out["fanout_map_efficiency"] = round(ideal / res[""], 3)
    for label in ("_reuse", "_unchunked"):
        if label in res:
            out[f"fanout_map{label}_s"] = round(res[label], 3)
            out[f"fanout_map{label}_efficiency"] = round(ideal / res[label], 3)
    return out
