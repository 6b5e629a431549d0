"""Dead letters: a message the engine cannot or may not apply is recorded on the dead-letter
subject (deduplicated by content) and never retried. A mixin of
:class:`nbflow.engine.engine.Engine`."""
from __future__ import annotations

import hashlib
import json
import logging
import time

from nbflow.nats.layout import MSG_ID

log = logging.getLogger("nbflow.engine")


class DeadLetters:
    async def dead_letter(self, msg, why: str) -> None:
        await self._dead_letter_raw(msg.subject, msg.data, why)
        try:
            await msg.term()
        except Exception:  # noqa: BLE001
            await msg.ack()

    async def _dead_letter_raw(self, where: str, data: bytes, why: str) -> None:
        self.dead_letters += 1
        log.warning("dead letter on %s: %s", where, why)
        record = {"where": where, "why": why, "data": data[:65536].decode("utf-8", "replace"),
                  "ts": time.time()}
        # a dead letter that cannot be recorded must not be dropped: the caller's message stays
        # unacked (the exception propagates) and is handled again later
        mid = "dl." + hashlib.sha256(where.encode() + b"\0" + data).hexdigest()[:32]
        await self.streams.publish(self.L.dead_letter_subject(), json.dumps(record).encode(),
                                   headers={MSG_ID: mid})
