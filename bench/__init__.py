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
    "task_overhead": "bench.notebook_bench:task_overhead",
    "pipeline10": "bench.notebook_bench:pipeline10",
    "fanout_map": "bench.notebook_bench:fanout_map",
    "memory": "bench.engine_bench:memory",
    "console_load": "bench.console_bench:console_load",
    "autoscale": "bench.scale_bench:autoscale",
}

# figure -> (comparison, target)
GOALS = {
    "engine_chain_ratio": (">=", 0.6),
    "engine_fanout_ratio": (">=", 0.6),
    "task_overhead_ms_p50": ("<=", 30.0),
    "pipeline10_vs_floor": ("<=", 2.0),
    "pipeline10_speedup_vs_papermill": (">=", 10.0),
    "fanout_map_efficiency": (">=", 0.8),
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
