"""``python -m bench [--quick|--tiny] [--json] [--only NAME[,NAME]]``: run, print a table, and with
``--json`` one JSON object with every figure as the very last line of stdout."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import sys
import time
import traceback

from bench import BENCHES, FIGURES, GOALS, QUICK, goal_met, load
from bench.harness import _kill_all
from bench.notebook_bench import PHASES as _PHASES

# (figure, label, value key, baseline key, ratio key, goal key) per benchmark; the goal key's
# target is printed and checked; ratio = value / baseline unless the ratio key says otherwise
ROWS = {
    "engine_chain": [
        ("steps/s, 1 run x N-step chain", "engine_chain_steps_per_s",
         "engine_chain_raw_steps_per_s", "engine_chain_ratio", "engine_chain_ratio"),
        ("ms per step", "engine_chain_ms_per_step", "engine_chain_raw_ms_per_step", None, None),
    ],
    "engine_fanout": [
        ("steps/s, runs x parallel steps", "engine_fanout_steps_per_s",
         "engine_fanout_raw_steps_per_s", "engine_fanout_ratio", "engine_fanout_ratio"),
    ],
    "scaling": [
        ("chain ms/step at the largest / smallest chain", "chain_flatness", None, None,
         "chain_flatness"),
        ("chain of 1,000: floor ms/step / nbflow ms/step", "engine_chain_1000_ratio", None, None,
         "engine_chain_1000_ratio"),
        ("s, --map 10,000 with no-op workers", "map10k_s", None, None, "map10k_s"),
    ] + [(f"chain {n}: ms/step vs floor", f"scaling_chain_{n}_ms_per_step",
          f"scaling_chain_{n}_raw_ms_per_step", f"scaling_chain_{n}_ratio", None)
         for n in (5, 10, 20, 100, 1000)]
      + [(f"map {n}: ms/task vs floor", f"scaling_map_{n}_ms_per_task",
          f"scaling_map_{n}_raw_ms_per_task", f"scaling_map_{n}_ratio", None)
         for n in (10, 50, 100, 1000, 10000)],
    "pipeline21": [
        ("s warm run-only (median) vs papermill whole notebook once", "pipeline21_s",
         "pipeline21_papermill_once_s", "pipeline21_vs_papermill_once",
         "pipeline21_vs_papermill_once"),
        ("s, cells alone in a started kernel (floor)", "pipeline21_cells_s", None, None, None),
        ("s `nbflow run` -> first task started, warm stack", "first_task_s_warm", None, None,
         "first_task_s_warm"),
        ("s `nbflow run` -> first task started, no stack running", "first_task_s_cold", None,
         None, "first_task_s_cold"),
        ("back-to-back warm runs: p90 / median", "warm_runs_p90_over_median", None, None,
         "warm_runs_p90_over_median"),
    ],
    "map_memory": [
        ("peak RSS MB, --map 200 on one worker (worker + kernels)", "map200_peak_rss_mb", None,
         None, "map200_peak_rss_mb"),
    ],
    "peers": [
        ("s nbflow warm run-only", "peers_nbflow_warm_s", None, None, None),
        ("s nbflow `run` cold (stack start included)", "peers_nbflow_cold_s", None, None, None),
        ("s papermill, whole notebook once (new kernel)", "peers_papermill_once_s", None, None,
         None),
        ("s papermill, one notebook per task", "peers_papermill_per_task_s", None, None, None),
        ("s ploomber build", "peers_ploomber_s", None, None, None),
        ("s prefect + papermill", "peers_prefect_s", None, None, None),
    ],
    "task_overhead": [
        ("overhead/task p50 ms (default: run isolation)", "task_overhead_ms_p50", None, None,
         "task_overhead_ms_p50"),
        ("overhead/task p99 ms (default: run isolation)", "task_overhead_ms_p99", None, None, None),
        ("overhead/task p50 ms (--isolation reuse)", "task_overhead_reuse_ms_p50", None, None,
         None),
        ("overhead/task p99 ms (--isolation reuse)", "task_overhead_reuse_ms_p99", None, None,
         None),
        ("pooled kernel RSS MB", "kernel_rss_mb", None, None, None),
        ("CPU ms per task: worker process (baseline: its kernels)", "task_overhead_worker_cpu_ms",
         "task_overhead_kernel_cpu_ms", None, None),
        ("split: sum of the phases' means vs mean overhead, ms", "task_overhead_phases_mean_sum_ms",
         "task_overhead_ms_mean", None, None),
    ] + [(f"  {label}, ms p50 (baseline: mean)", f"task_overhead_phase_{name}_ms_p50",
          f"task_overhead_phase_{name}_ms_mean", None, None) for name, label in _PHASES],
    "pipeline10": [
        ("s end to end vs 1 kernel (floor)", "pipeline10_s", "pipeline10_floor_s",
         "pipeline10_vs_floor", "pipeline10_vs_floor"),
        ("s end to end vs papermill per task", "pipeline10_s", "pipeline10_papermill_s",
         "pipeline10_speedup_vs_papermill", "pipeline10_speedup_vs_papermill"),
        ("s (reuse) vs 1 kernel (floor)", "pipeline10_reuse_s", "pipeline10_floor_s",
         "pipeline10_reuse_vs_floor", None),
        ("s (reuse) vs papermill per task", "pipeline10_reuse_s", "pipeline10_papermill_s",
         "pipeline10_reuse_speedup_vs_papermill", None),
        ("s ploomber build", "pipeline10_ploomber_s", None, None, None),
    ],
    "fanout_map": [
        ("s, --map 200 x 20 ms, 2 workers", "fanout_map_s", "fanout_map_ideal_s",
         "fanout_map_efficiency", "fanout_map_efficiency"),
        ("s, same with --isolation reuse", "fanout_map_reuse_s", "fanout_map_ideal_s",
         "fanout_map_reuse_efficiency", None),
        ("s, same without map chunks (NBFLOW_CHUNK_MAX=1)", "fanout_map_unchunked_s",
         "fanout_map_ideal_s", "fanout_map_unchunked_efficiency", None),
    ],
    "memory": [
        ("engine RSS MB after N runs vs before", "engine_rss_after_mb", "engine_rss_before_mb",
         "engine_rss_growth_pct", "engine_rss_growth_pct"),
        ("no-op runs/s (1 task each)", "memory_runs_per_s", None, None, None),
    ],
    "console_load": [
        ("runs in the history the console indexes", "console_runs", None, None, None),
        ("s to index them (console ready)", "console_index_s", None, None, None),
        ("page load ms p95, the worst page", "console_page_ms_p95_worst", None, None,
         "console_page_ms_p95_worst"),
    ],
    "autoscale": [
        ("s, --map 200 x 100 ms, 1 worker: kernels 1->8 vs fixed 8 slots", "autoscale_elastic_s",
         "autoscale_fixed_s", "autoscale_time_ratio", None),
        ("peak RSS MB, worker + kernels: scaling vs fixed", "autoscale_elastic_peak_mb",
         "autoscale_fixed_peak_mb", "autoscale_peak_mb_ratio", None),
        ("idle RSS MB, worker + kernels: scaling vs fixed", "autoscale_elastic_idle_mb",
         "autoscale_fixed_idle_mb", None, None),
        ("peak kernels: scaling vs fixed", "autoscale_elastic_peak_kernels",
         "autoscale_fixed_peak_kernels", None, None),
    ],
}

DEFINITIONS = [
    "raw floor (engine_*): per step publish a task msg, pull it, publish a result event, pull "
    "the event, ack both, on the same JetStream streams; fanout floor batches like the engine",
    "task overhead: per task of a chain, (its TaskSucceeded ts - predecessor's TaskSucceeded ts "
    "or RunStarted ts) - exec_s (the task cell's own time, from papermill cell metadata); "
    "one worker, after a 2-task run, once its heartbeat says all its kernels are ready; CPU: "
    "the worker and the kernels that were ready (a spare started during the run is not counted)",
    "task overhead split: the worker's steps from the phases (ms) in each completion event; "
    "cells excludes the task cell; between = the rest of the gap (engine, dispatch, fetch); the "
    "phases' means sum to the mean overhead",
    "pipeline10 floor: the notebook with %%task lines stripped, papermill in one new kernel "
    "(kernel start included; the cells alone take pipeline10_floor_cells_s); nbflow: one worker, "
    "after a 2-task run, once its heartbeat says all its kernels are ready (a stack at rest)",
    "fanout_map efficiency: ideal (items x 20 ms / 2 workers) / measured (submit -> final), "
    "after a 4-instance run, once the workers' kernels are all ready",
    "scaling: no-op workers; chain floor = raw_chain of the same length, map floor = raw_fanout "
    "of one run as wide as the map; ratio = floor time / nbflow time (1.0: no engine cost)",
    "pipeline21: chain of 10, fan-out of 10, join; trivial cells; the embedded stack (`nbflow up`,"
    " defaults, credentials); warm = runs after a first one; papermill once = the notebook with "
    "%%task lines stripped in ONE NEW kernel (kernel start included); cells = the same cells' own "
    "time in an already-started kernel",
    "first task: wall clock from launching `nbflow run --no-wait` to the first TaskStarted's ts",
    "memory: engine child process VmRSS after a warm-up vs after N one-task no-op runs",
    "autoscale: one worker, --min-kernels 1 --max-kernels 8 (starting from 1 warm kernel) vs "
    "--concurrency 8 (9 warm kernels); time = submit -> final; RSS sampled every 250 ms",
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def table(results: dict, ran: list[str], size: str) -> str:
    head = ("benchmark", "figure", "value", "baseline", "ratio", "goal", "met?")
    rows = [head]
    for name in ran:
        for label, vk, bk, rk, gk in ROWS.get(name, []):     # (all its figures: --json)
            if vk not in results and (rk is None or rk not in results):
                continue
            goal = ""
            met = ""
            if gk:
                op, target = GOALS[gk]
                goal = f"{op} {target:g}"
                ok = goal_met(gk, results.get(gk))
                met = "-" if ok is None else ("yes" if ok else "NO")
            rows.append((name, label, _fmt(results.get(vk)), _fmt(results.get(bk)) if bk else "",
                         _fmt(results.get(rk)) if rk else "", goal, met))
    for name in ran:
        if f"{name}_error" in results:
            rows.append((name, "ERROR", results[f"{name}_error"][:60], "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"nbflow benchmarks ({size}) — {platform.python_version()}, {os.cpu_count()} CPUs"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"note: {results[k]}" for k in sorted(results) if k.endswith("_note")]
    return "\n".join(lines + [""] + [f"* {d}" for d in DEFINITIONS] + notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", default="", help=f"comma-separated: {','.join(BENCHES)}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller sizes (< 3 min on 2 cores)")
    g.add_argument("--tiny", action="store_true", help="smoke-test sizes (the harness only)")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    p.add_argument("--no-auth", action="store_true",
                   help="servers without credentials (default: with, as the embedded stack)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING)
    size = "tiny" if a.tiny else "quick" if a.quick else "full"
    names = [n.strip() for n in a.only.split(",") if n.strip()] or \
        (list(QUICK) if size == "quick" else list(BENCHES))
    if a.no_auth:
        os.environ["NBFLOW_BENCH_AUTH"] = "0"
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}")

    def _term(*_):
        _kill_all()
        sys.exit(143)
    signal.signal(signal.SIGTERM, _term)

    results: dict = {"size": size, "cpus": os.cpu_count(), "python": platform.python_version(),
                     "auth": not a.no_auth, "loadavg_start": round(os.getloadavg()[0], 1)}
    t_all = time.perf_counter()
    failed = False
    try:
        for name in names:
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                results.update(asyncio.run(load(name)(size)))
            except Exception as e:  # noqa: BLE001 - one failing bench must not hide the others
                failed = True
                results[f"{name}_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            results[f"{name}_bench_s"] = round(time.perf_counter() - t0, 1)
            print(f"[bench] {name} done in {results[f'{name}_bench_s']} s", file=sys.stderr,
                  flush=True)
    except KeyboardInterrupt:
        _kill_all()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _kill_all()
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    results["loadavg_end"] = round(os.getloadavg()[0], 1)
    results["goals"] = {k: {"op": op, "target": t, "value": results.get(k),
                            "met": goal_met(k, results.get(k))}
                        for k, (op, t) in GOALS.items() if k in results}
    print(table(results, names, size))
    if a.json:       # the headline figures first, in the order (null: not measured)
        line = {k: results.get(k) for k in FIGURES}
        line.update((k, v) for k, v in results.items() if k not in line)
        print(json.dumps(line, separators=(",", ":"), default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
