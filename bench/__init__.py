"""nbflow benchmarks: ``python -m bench [--quick|--tiny] [--json] [--only NAME[,NAME]]``.

Every figure is measured against its baseline in the same process run, so the ratios hold on a
noisy machine. Each benchmark starts its own nats-server (temp store, free port) and its own
engine/worker processes in a unique namespace, and stops them all, errors and Ctrl-C included.
Goals are targets printed beside the figures, not tests.
"""
from __future__ import annotations

import operator

# name -> "module:function"; run in this order
BENCHES = {
    "engine_chain": "bench.engine_bench:engine_chain",
    "engine_fanout": "bench.engine_bench:engine_fanout",
    "scaling": "bench.engine_bench:scaling",
    "task_overhead": "bench.notebook_bench:task_overhead",
    "fanout_map": "bench.notebook_bench:fanout_map",
    "pipeline21": "bench.pipeline_bench:pipeline21",
    "map_memory": "bench.pipeline_bench:map_memory",
    "peers": "bench.pipeline_bench:peers",
    "pipeline10": "bench.notebook_bench:pipeline10",
    "memory": "bench.engine_bench:memory",
    "console_load": "bench.console_bench:console_load",
    "autoscale": "bench.scale_bench:autoscale",
}

# what `--quick` runs without --only: the benches behind the headline figures (FIGURES)
QUICK = ["engine_chain", "engine_fanout", "scaling", "task_overhead", "fanout_map", "pipeline21",
         "map_memory"]

# the headline figures (issue #14's table), first in the JSON line, in this order
FIGURES = ["chain_flatness", "engine_chain_ratio", "engine_chain_1000_ratio",
           "engine_fanout_ratio", "task_overhead_ms_p50", "task_overhead_ms_p99",
           "fanout_map_efficiency", "pipeline21_vs_papermill_once", "first_task_s_warm",
           "first_task_s_cold", "warm_runs_p90_over_median", "map10k_s", "map200_peak_rss_mb"]

# figure -> (comparison, target)
GOALS = {
    "chain_flatness": ("<=", 1.3),
    "engine_chain_ratio": (">=", 0.6),
    "engine_chain_1000_ratio": (">=", 0.6),
    "engine_fanout_ratio": (">=", 0.8),
    "task_overhead_ms_p50": ("<=", 30.0),
    "task_overhead_ms_p99": ("<=", 50.0),
    "fanout_map_efficiency": (">=", 0.8),
    "pipeline21_vs_papermill_once": ("<=", 1.0),
    "first_task_s_warm": ("<=", 0.5),
    "first_task_s_cold": ("<=", 3.0),
    "warm_runs_p90_over_median": ("<=", 1.2),
    "map10k_s": ("<=", 30.0),
    "map200_peak_rss_mb": ("<=", 1536.0),
    "pipeline10_vs_floor": ("<=", 2.0),
    "pipeline10_speedup_vs_papermill": (">=", 10.0),
    "engine_rss_growth_pct": ("<=", 10.0),
    "console_page_ms_p95_worst": ("<=", 300.0),
}

_OPS = {">=": operator.ge, "<=": operator.le}


def goal_met(figure: str, value) -> bool | None:
    g = GOALS.get(figure)
    if g is None or value is None:
        return None
    return bool(_OPS[g[0]](value, g[1]))


def load(name: str):
    import importlib

    mod, fn = BENCHES[name].split(":")
    return getattr(importlib.import_module(mod), fn)
