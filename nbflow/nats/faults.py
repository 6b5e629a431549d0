"""Fault injection at the NATS boundary, for tests and developers.

``NBFLOW_FAULTS`` (read by every process, so engine and worker subprocesses obey it too) is a
comma-separated list of ``[role/]op:nth:mode[:times]``:

    op     a boundary call kind: kv.get kv.put kv.keys obj.get obj.put obj.info
           stream.get stream.admin publish  (``*`` matches any)
    role   optional: only calls made by engine / worker / client / scheduler
    nth    the first matching call that fails (1 = the first)
    mode   transient  raise Transient at once (as a timeout / no responders would)
           hang       sleep NBFLOW_FAULT_HANG_S (default 3 s), then raise Transient (a timeout)
           permanent  raise a permanent NatsError
    times  how many consecutive matching calls fail from the nth on (default 1)

Example: ``NBFLOW_FAULTS="worker/kv.get:1:transient,publish:5:hang"``. Each injected fault is
logged (logger ``nbflow.faults``) so a test can tell it happened. Nothing is injected when the
variable is unset; the check is then one boolean test per call.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from nbflow.errors import NatsError, Transient

log = logging.getLogger("nbflow.faults")

MODES = ("transient", "hang", "permanent")


@dataclass
class Fault:
    op: str
    nth: int
    mode: str
    times: int = 1
    role: str = ""
    seen: int = 0
    fired: int = 0

    def matches(self, op: str, role: str) -> bool:
        return (self.op in ("*", op)) and (not self.role or self.role == role)


def parse(spec: str) -> list[Fault]:
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        bits = part.split(":")
        if len(bits) not in (3, 4) or bits[2] not in MODES:
            raise ValueError(f"NBFLOW_FAULTS entry {part!r}: expected [role/]op:nth:mode[:times] "
                             f"with mode one of {', '.join(MODES)}")
        role, _, op = bits[0].rpartition("/")
        try:
            nth, times = int(bits[1]), int(bits[3]) if len(bits) == 4 else 1
        except ValueError:
            raise ValueError(f"NBFLOW_FAULTS entry {part!r}: nth and times must be integers") \
                from None
        out.append(Fault(op=op, nth=nth, mode=bits[2], times=times, role=role))
    return out


_faults: list[Fault] = []
ACTIVE = False


def configure(spec: str | None = None) -> list[Fault]:
    """(Re)read the fault spec (default: NBFLOW_FAULTS); returns the active faults."""
    global _faults, ACTIVE
    _faults = parse(os.environ.get("NBFLOW_FAULTS", "") if spec is None else spec)
    ACTIVE = bool(_faults)
    return _faults


def injected() -> int:
    """How many faults this process has injected so far."""
    return sum(f.fired for f in _faults)


async def maybe_fail(op: str, role: str, what: str = "") -> None:
    """Raise (or hang, then raise) when a configured fault matches this call."""
    for f in _faults:
        if not f.matches(op, role):
            continue
        f.seen += 1
        if not (f.nth <= f.seen < f.nth + f.times):
            continue
        f.fired += 1
        log.warning("injected fault: %s %s/%s call #%d (%s)", f.mode, role or "-", op, f.seen,
                    what)
        if f.mode == "hang":
            await asyncio.sleep(float(os.environ.get("NBFLOW_FAULT_HANG_S", "3")))
            raise Transient(f"nats: timeout (injected hang on {op} {what})", op=op, what=what)
        if f.mode == "transient":
            raise Transient(f"nats: no responders (injected on {op} {what})", op=op, what=what)
        raise NatsError(f"injected permanent failure on {op} {what}", op=op, what=what)


configure()
