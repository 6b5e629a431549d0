"""The 21-task notebook pipeline of issue #14 (a chain of 10, a fan-out of 10, a join; trivial
cells) on the embedded stack as a user gets it (`nbflow run`, `nbflow up` defaults, with its
credentials), against papermill running the same cells in one new kernel; the time to the first
task; back-to-back warm runs; peak memory of a 200-instance map on one worker; and the peers.

``python -m bench --only pipeline21,map_memory,peers``
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nbformat.v4 import new_code_cell

from bench.harness import Env, percentile
from bench.notebook_bench import _connected, _papermill_floor, _papermill_tasks, map_notebook, \
    write_nb

CHAIN, FAN = 10, 10


def pipeline21_notebook(path: str) -> str:
    """c00 -> ... -> c09 -> (f00 .. f09) -> join: 21 tasks, each a line of arithmetic."""
    cells = [new_code_cell("%load_ext nbflow"), new_code_cell("%%task c00\na00 = 0")]
    for i in range(1, CHAIN):
        cells.append(new_code_cell(f"%%task c{i:02d}\na{i:02d} = a{i - 1:02d} + 1"))
    for i in range(FAN):
        cells.append(new_code_cell(f"%%task f{i:02d}\nb{i:02d} = a{CHAIN - 1:02d} + {i}"))
    cells.append(new_code_cell("%%task join\ntotal = " +
                               " + ".join(f"b{i:02d}" for i in range(FAN))))
    return write_nb(path, cells)


# --- the embedded stack, as a user starts it ----------------------------------------------------

def _user_env(home: Path) -> dict[str, str]:
    """A user's environment with its own NBFLOW_HOME and nothing pointing elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NBFLOW_NATS", "NBFLOW_STACK", "NBFLOW_NAMESPACE"))}
    env["NBFLOW_HOME"] = str(home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _nbflow(args: list[str], env: dict[str, str], cwd: str, timeout: float = 300.0) -> str:
    p = subprocess.run([sys.executable, "-m", "nbflow", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"nbflow {' '.join(args)} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout)[-1500:]}")
    return p.stdout


@contextlib.contextmanager
def _home_env(home: Path):
    """This process as the stack's owner (the client finds the credentials in NBFLOW_HOME)."""
    saved = {k: os.environ.get(k) for k in ("NBFLOW_HOME", "NBFLOW_NATS_URL", "NBFLOW_NAMESPACE",
                                            "NBFLOW_NATS_USER", "NBFLOW_NATS_PASSWORD",
                                            "NBFLOW_STACK_CREDENTIALS")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ["NBFLOW_HOME"] = str(home)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _first_task(c, run: str, launched: float) -> tuple[float, float]:
    """Seconds from launching `nbflow run` to the run's first TaskStarted and to its end (event
    timestamps are wall clock, taken on this machine)."""
    st = await c.wait(run, timeout=600)
    if st.state != "succeeded":
        raise RuntimeError(f"run {run} {st.state}: {st.error}")
    starts = [ev.ts for ev in await c.history(run) if ev.type == "TaskStarted"]
    return min(starts) - launched, st.finished - launched


async def _nbflow_pipeline(path: str, runs: int) -> dict:
    """Cold `nbflow run` (starts the stack), a warm one, then ``runs`` back-to-back runs."""
    from nbflow.client import Client
    from nbflow.compiler import compile_notebook

    d = Path(tempfile.mkdtemp(prefix="nbflow-bench-p21-"))
    home = d / "home"
    env = _user_env(home)
    cwd = str(Path(path).parent)
    out: dict = {}
    try:
        with _home_env(home):
            t_cold = time.time()
            cold_run = _nbflow(["run", "--no-wait", path], env, cwd).strip().splitlines()[-1]
            url = json.loads((home / "stack.json").read_text())["url"]
            c = await Client.connect(url)
            try:
                first, total = await _first_task(c, cold_run, t_cold)
                out["first_task_s_cold"], out["pipeline21_cold_s"] = round(first, 3), \
                    round(total, 3)
                t_warm = time.time()
                warm_run = _nbflow(["run", "--no-wait", path], env, cwd).strip().splitlines()[-1]
                first, total = await _first_task(c, warm_run, t_warm)
                out["first_task_s_warm"], out["pipeline21_warm_cli_s"] = round(first, 3), \
                    round(total, 3)
                wf = compile_notebook(path)
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    run = await c.submit(wf, {})
                    st = await c.wait(run, timeout=600)
                    times.append(time.perf_counter() - t0)
                    if st.state != "succeeded":
                        raise RuntimeError(f"run {run} {st.state}: {st.error}")
            finally:
                await c.close()
    finally:
        try:
            _nbflow(["down", "--data", str(home)], env, cwd, timeout=60)
        except Exception as e:  # noqa: BLE001 - reported, the temp dir goes anyway
            print(f"[pipeline21] nbflow down: {e}", file=sys.stderr)
        shutil.rmtree(d, ignore_errors=True)
    med = statistics.median(times)
    out.update({
        "pipeline21_runs": runs,
        "pipeline21_s": round(med, 3),
        "pipeline21_min_s": round(min(times), 3),
        "pipeline21_max_s": round(max(times), 3),
        "warm_runs_p90_over_median": round(percentile(times, 90) / med, 3),
    })
    return out


async def pipeline21(size: str = "full") -> dict:
    runs = {"tiny": 3, "quick": 8, "full": 20}[size]
    d = tempfile.mkdtemp(prefix="nbflow-bench-p21nb-")
    try:
        path = pipeline21_notebook(os.path.join(d, "pipeline21.ipynb"))
        loop = asyncio.get_running_loop()
        once_s, cells_s = await loop.run_in_executor(None, _papermill_floor, path, d)
        out = await _nbflow_pipeline(path, runs)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out.update({
        "pipeline21_tasks": CHAIN + FAN + 1,
        "pipeline21_papermill_once_s": round(once_s, 3),
        "pipeline21_cells_s": round(cells_s, 4),
        "pipeline21_vs_papermill_once": round(out["pipeline21_s"] / once_s, 3),
        "pipeline21_loadavg_1m": round(os.getloadavg()[0], 1),
        "pipeline21_note": "the embedded stack always has credentials (--no-auth does not apply)",
    })
    return out


# --- memory of a wide map on one worker ----------------------------------------------------------

async def map_memory(size: str = "full") -> dict:
    """A --map of 200 short instances on ONE worker with its default shape (`nbflow worker`,
    no options): peak RSS of the worker and its kernels, sampled every 250 ms."""
    from bench.scale_bench import _sampled, _tree

    items = {"tiny": 10, "quick": 200, "full": 200}[size]
    with Env("mapmem") as env:
        path = map_notebook(str(env.dir / "map.ipynb"), items, 0.01)
        env.engine()
        p = env.spawn("worker0", ["-m", "nbflow", "worker", "--nats", env.url, "--namespace",
                                  env.ns])
        c, watch = await _connected(env, 1)
        try:
            await asyncio.sleep(1.0)            # the worker's start-up kernels, if any
            idle_mb, idle_k = _tree(p.pid)
            dt, peak_mb, peak_k = await _sampled(env, c, watch, path, p.pid)
        finally:
            await watch.stop()
            await c.close()
    return {"map200_items": items, "map200_s": round(dt, 3),
            "map200_peak_rss_mb": round(peak_mb, 1), "map200_idle_rss_mb": round(idle_mb, 1),
            "map200_peak_kernels": peak_k, "map200_idle_kernels": idle_k}


# --- the peers ----------------------------------------------------------------------------------

def _ploomber21(workdir: str) -> float:
    """``ploomber build --force`` of the same 21-task DAG (python scripts with upstream)."""
    d = os.path.join(workdir, "ploomber")
    os.makedirs(d, exist_ok=True)
    tasks = []

    def script(name: str, ups: list[str], expr: str) -> None:
        up = repr(ups) if ups else "None"
        load = "".join(f"v_{u} = pickle.load(open(upstream[{u!r}]['data'], 'rb'))\n" for u in ups)
        body = (f"# %% tags=['parameters']\nupstream = {up}\nproduct = None\n\n# %%\n"
                f"import pickle\n{load}x = {expr}\n"
                "pickle.dump(x, open(product['data'], 'wb'))\n")
        Path(d, f"{name}.py").write_text(body)
        tasks.append(f"  - source: {name}.py\n    product:\n      nb: out/{name}.ipynb\n"
                     f"      data: out/{name}.pkl\n")
    script("c00", [], "0")
    for i in range(1, CHAIN):
        script(f"c{i:02d}", [f"c{i - 1:02d}"], f"v_c{i - 1:02d} + 1")
    last = f"c{CHAIN - 1:02d}"
    for i in range(FAN):
        script(f"f{i:02d}", [last], f"v_{last} + {i}")
    script("join", [f"f{i:02d}" for i in range(FAN)], " + ".join(f"v_f{i:02d}" for i in range(FAN)))
    Path(d, "pipeline.yaml").write_text("tasks:\n" + "".join(tasks))
    exe = shutil.which("ploomber") or os.path.join(os.path.dirname(sys.executable), "ploomber")
    t0 = time.perf_counter()
    subprocess.run([exe, "build", "--force"], cwd=d, check=True, capture_output=True)
    return time.perf_counter() - t0


def _prefect21(path: str, workdir: str) -> float:
    """A Prefect 3 flow running each task notebook with papermill, in dependency order (the
    fan-out concurrently), as a Prefect user would wire papermill in."""
    import papermill
    from prefect import flow, task

    from nbflow.compiler import compile_notebook
    from nbflow.compiler.tasknb import task_notebook
    import nbformat

    wf = compile_notebook(path)
    d = os.path.join(workdir, "prefect")
    os.makedirs(d, exist_ok=True)
    nbs = {}
    for node in wf.tasks:
        p = os.path.join(d, f"{node.id}.ipynb")
        nbformat.write(task_notebook(wf, node.id), p)
        nbs[node.id] = (p, {"task": node.id, "key": node.id, "run": "prefect", "dir": d,
                            "inputs": {n: f"out/{n}.pkl" for n in node.inputs}, "map": None,
                            "signal": None, "outputs": node.outputs})

    @task
    def run_nb(name: str, *_upstream):
        p, io = nbs[name]
        papermill.execute_notebook(p, p.replace(".ipynb", ".out.ipynb"),
                                   parameters={"__nbflow__": io}, progress_bar=False,
                                   log_output=False, kernel_name="python3", cwd=d)
        return name

    @flow
    def pipeline():
        prev = None
        for i in range(CHAIN):
            prev = run_nb.submit(f"c{i:02d}", *([prev] if prev else [])).result()
        fans = [run_nb.submit(f"f{i:02d}", prev) for i in range(FAN)]
        run_nb.submit("join", *[f.result() for f in fans]).result()

    t0 = time.perf_counter()
    pipeline()
    return time.perf_counter() - t0


async def peers(size: str = "full") -> dict:
    """The 21-task pipeline: nbflow warm / cold, papermill whole notebook once, papermill one
    notebook per task, Ploomber, Prefect + papermill (the last two when installed)."""
    runs = {"tiny": 2, "quick": 3, "full": 5}[size]
    out: dict = {}
    d = tempfile.mkdtemp(prefix="nbflow-bench-peers-")
    loop = asyncio.get_running_loop()
    try:
        path = pipeline21_notebook(os.path.join(d, "pipeline21.ipynb"))
        t0 = time.perf_counter()
        nb = await _nbflow_pipeline(path, runs)
        out["peers_nbflow_warm_s"] = nb["pipeline21_s"]
        out["peers_nbflow_cold_s"] = nb["pipeline21_cold_s"]
        out["peers_papermill_once_s"] = round(
            (await loop.run_in_executor(None, _papermill_floor, path, d))[0], 3)
        out["peers_papermill_per_task_s"] = round(
            await loop.run_in_executor(None, _papermill_tasks, path, d), 3)
        try:
            import ploomber  # noqa: F401
            out["peers_ploomber_s"] = round(await loop.run_in_executor(None, _ploomber21, d), 3)
        except ImportError:
            out["peers_ploomber_note"] = "ploomber not installed (pip install ploomber): skipped"
        except Exception as e:  # noqa: BLE001 - a failing peer is a note, not a crash
            out["peers_ploomber_note"] = f"ploomber failed: {e}"
        try:
            import prefect  # noqa: F401
            out["peers_prefect_s"] = round(
                await loop.run_in_executor(None, _prefect21, path, d), 3)
        except ImportError:
            out["peers_prefect_note"] = "prefect not installed (pip install prefect): skipped"
        except Exception as e:  # noqa: BLE001
            out["peers_prefect_note"] = f"prefect failed: {e}"
        out["peers_bench_wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out["peers_loadavg_1m"] = round(os.getloadavg()[0], 1)
    return out
