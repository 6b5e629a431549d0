"""The worker's presence: the heartbeat record `nbflow workers` shows, put in the workers KV
every PRESENCE_S seconds (the KV's TTL drops a worker that is gone). A mixin of
:class:`nbflow.worker.worker.Worker`."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time

from nbflow.errors import NatsError

PRESENCE_S = float(os.environ.get("NBFLOW_PRESENCE_S", "5"))   # heartbeat (the KV's TTL is 30 s)


class Presence:
    def presence(self) -> dict:
        """What `nbflow workers` shows: the heartbeat record."""
        from nbflow.worker.autoscale import tree_rss_mb
        from nbflow.worker.kernels import registry as kernels

        d = {"name": self.name, "host": socket.gethostname(), "queue": self.queue,
             "concurrency": self.scaler.capacity if self.scaler else self.concurrency,
             "pid": os.getpid(), "done": self.done, "in_flight": len(self._running),
             "kernels": kernels.live_kernels(), "kernels_ready": kernels.ready_kernels(),
             "rss_mb": round(tree_rss_mb(), 1), "started": self.started_at, "ts": time.time()}
        if self.scale:
            d.update(min_kernels=self.scale["min_kernels"], max_kernels=self.scale["max_kernels"])
        return d

    async def _presence(self) -> None:
        while True:
            try:
                await self.workers_kv.put(self.name.replace(".", "_"),
                                          json.dumps(self.presence()).encode())
            except NatsError:   # best effort: the next beat retries
                pass
            await asyncio.sleep(PRESENCE_S)
