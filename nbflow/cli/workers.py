"""`nbflow workers`: the live workers, from their heartbeats (hooked into cli.main)."""
from __future__ import annotations

import time

import click

from nbflow.cli.common import _call, _listing, nats_options


@click.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@nats_options
def workers(as_json, nats_url, namespace):
    """List live workers: queue, kernels (alive, and how many are ready for a task now), tasks
    in flight, memory (RSS of worker + kernels)."""
    now = time.time()

    def line(w) -> str:
        k = str(w.get("kernels", "?"))
        if "kernels_ready" in w:
            k = f"{w['kernels_ready']}/{k}"
        if "max_kernels" in w:
            k += f" ({w['min_kernels']}-{w['max_kernels']})"
        tasks = f"{w.get('in_flight', '?')}/{w.get('concurrency', '?')}"
        mem = f"{w['rss_mb']:.0f} MB" if "rss_mb" in w else "?"
        return (f"{w.get('name', '?'):<28} {w.get('queue', '?'):<12} {k:>9} {tasks:>7} "
                f"{w.get('done', 0):>6} {mem:>9}  {now - w.get('ts', now):.0f}s ago")
    _listing(_call(nats_url, namespace, lambda c: c.workers()), as_json, line=line,
             empty="no live workers (start one with `nbflow worker`, or `nbflow up`)",
             header=f"{'worker':<28} {'queue':<12} {'kernels':>9} {'tasks':>7} {'done':>6} "
                    f"{'memory':>9}  seen")
