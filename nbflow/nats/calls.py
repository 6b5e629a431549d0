"""The one place where nats-py's exceptions become nbflow's (:mod:`nbflow.errors`).

Every KV, object-store, stream-get and publish call goes through :func:`call`, which injects
configured faults (:mod:`nbflow.nats.faults`) and translates errors by TYPE and server error
code, never by text. :func:`retry` re-runs a call on :class:`~nbflow.errors.Transient` errors
with bounded backoff.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import nats.errors as ne
import nats.js.errors as je

from nbflow.errors import (Conflict, NatsError, NotFound, Permission, StoreFull, TooLarge,
                           Transient)
from nbflow.nats import faults

log = logging.getLogger("nbflow.nats")

# JetStream API error codes (nats-server errors.json) that carry a meaning we act on
CONFLICT_CODES = {10071, 10164}                  # wrong last sequence (KV CAS)
FULL_CODES = {10002, 10023, 10028, 10047, 10077, 10053}  # account/storage/memory limits, store
TOO_LARGE_CODES = {10054}                         # message size exceeds maximum allowed
NOT_FOUND_CODES = {10037, 10043, 10059, 10014}     # no message, sequence, stream, consumer
TRANSIENT_CODES = {10004, 10008, 10009, 10118, 10194, 10163, 10167, 10158}  # cluster/leader/offline

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError, ne.TimeoutError, ne.NoRespondersError, je.NoStreamResponseError,
    ne.ConnectionClosedError, ne.ConnectionReconnectingError, ne.StaleConnectionError,
    ne.OutboundBufferLimitError, ne.ConnectionDrainingError, ne.NoServersError,
    je.TooManyStalledMsgsError, ConnectionError)

# how a full store is explained to the user (CLI and widget show this text)
FULL_HINT = ("JetStream storage is full ({limit}); free space with `nbflow gc` (and shorter "
             "retention: NBFLOW_RETENTION_DAYS), or raise the limit: the stream's or bucket's "
             "max_bytes, or max_file_store in the jetstream block of the nats-server config")


def translate(e: BaseException, op: str = "", what: str = "") -> NatsError | None:
    """The nbflow error for a nats-py exception, or None when ``e`` is not a NATS error."""
    if isinstance(e, NatsError):
        return e
    kw = {"op": op, "what": what, "cause": e}
    where = f"{op} {what}".strip()
    if isinstance(e, je.NoKeysError):
        return NotFound(f"{where}: no keys", **kw)
    if isinstance(e, je.KeyWrongLastSequenceError):
        return Conflict(f"{where}: someone else wrote first (wrong last sequence)", **kw)
    if isinstance(e, ne.MaxPayloadError):
        return TooLarge(f"{where}: the message is over the server's max payload", **kw)
    if isinstance(e, je.APIError):
        code = getattr(e, "err_code", None) or 0      # KV subclasses may not set it
        desc = getattr(e, "description", None) or ""
        if code in CONFLICT_CODES:
            return Conflict(f"{where}: someone else wrote first ({desc})", **kw)
        if code in FULL_CODES:
            return StoreFull(f"{where}: " + FULL_HINT.format(limit=desc or "insufficient "
                                                             "resources"), **kw)
        if code in TOO_LARGE_CODES:
            return TooLarge(f"{where}: {desc}", **kw)
        if code in TRANSIENT_CODES:
            return Transient(f"{where}: {desc} (retry later)", **kw)
        if isinstance(e, je.NotFoundError) or code in NOT_FOUND_CODES:
            return NotFound(f"{where}: not found", **kw)
        if isinstance(e, je.ServiceUnavailableError):     # 503 without a code: no responders
            return Transient(f"{where}: JetStream temporarily unavailable", **kw)
        return NatsError(f"{where}: {e}", **kw)
    if isinstance(e, ne.AuthorizationError):
        return Permission(f"{where}: permission denied", **kw)
    if isinstance(e, _TRANSIENT_TYPES):
        return Transient(f"{where}: {type(e).__name__} (retry later)", **kw)
    if isinstance(e, ne.Error):
        return NatsError(f"{where}: {e}", **kw)
    return None


# --- permission refusals ------------------------------------------------------------------
# nats-server refuses a publish or subscription the user's permissions do not allow with an
# asynchronous -ERR on the connection (nats-py hands it to the connection's error callback:
# :func:`nbflow.nats.infra.connect` records it here), and the request it belonged to simply
# times out. A timeout of a call whose bucket/stream/subject the server refused during the call
# is that refusal: permanent, never retried.
DENIAL_KEEP_S = 300.0
_denials: list[tuple[float, str, Callable[[], NatsError]]] = []   # (monotonic, subject, error)


def note_denial(subject: str, error: Callable[[], NatsError]) -> None:
    """Record that the server refused ``subject``; ``error()`` builds the Permission error that
    names the user, role and subject (:class:`nbflow.nats.infra.PermissionDenied`)."""
    now = time.monotonic()
    _denials[:] = [d for d in _denials if d[0] > now - DENIAL_KEEP_S][-99:]
    _denials.append((now, subject, error))


def _names(what: str) -> set[str]:
    """The bucket / stream / subject a call's ``what`` ("bucket/key", "stream#seq", subject)."""
    head = what.split("/", 1)[0].split("#", 1)[0]
    return {n for n in (what, head) if n}


def _relates(subject: str, what: str) -> bool:
    subject = subject.lower()                 # nats-py lowercases the server's -ERR line
    tokens = set(subject.split("."))
    for n in _names(what.lower()):
        if subject == n or n in tokens or f"kv_{n}" in tokens or f"obj_{n}" in tokens \
                or subject.startswith(n + "."):
            return True
    return False


def refused_since(t0: float, what: str) -> NatsError | None:
    """The Permission error for a refusal of ``what``'s subject recorded since ``t0``."""
    for t, subject, error in reversed(_denials):
        if t >= t0 and _relates(subject, what):
            return error()
    return None


async def call(op: str, what: str, role: str, fn: Callable[..., Awaitable[Any]], *a, **kw) -> Any:
    """``await fn(*a, **kw)`` with fault injection and error translation."""
    if faults.ACTIVE:
        await faults.maybe_fail(op, role, what)
    t0 = time.monotonic()
    try:
        return await fn(*a, **kw)
    except NatsError:
        raise
    except Exception as e:  # noqa: BLE001 - translated once, here
        t = translate(e, op, what)
        if t is None:
            raise
        if isinstance(t, Transient) and _denials:
            refused = refused_since(t0, what)     # the timeout of a refused request
            if refused is not None:
                raise refused from e
        raise t from e


async def retry(fn: Callable[[], Awaitable[Any]], *, attempts: int = 5, delay: float = 0.2,
                max_delay: float = 2.0, budget: float | None = None, what: str = "") -> Any:
    """Run ``fn()``; on Transient, retry with exponential backoff up to ``attempts`` times (and
    ``budget`` seconds when given), then re-raise the last Transient."""
    deadline = time.monotonic() + budget if budget else None
    n = 0
    while True:
        try:
            return await fn()
        except Transient as e:
            n += 1
            if n >= attempts or (deadline and time.monotonic() + delay > deadline):
                raise
            log.info("%s: %s; retrying in %.1fs", what or e.op, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


class Retrying:
    """A retry policy carried by a boundary object: 0 attempts = no retry (services nak)."""

    def __init__(self, attempts: int = 0, delay: float = 0.2, max_delay: float = 2.0,
                 budget: float | None = None):
        self.attempts, self.delay, self.max_delay, self.budget = attempts, delay, max_delay, budget

    async def run(self, fn: Callable[[], Awaitable[Any]], what: str = "") -> Any:
        if self.attempts <= 1:
            return await fn()
        return await retry(fn, attempts=self.attempts, delay=self.delay,
                           max_delay=self.max_delay, budget=self.budget, what=what)


NO_RETRY = Retrying(0)
CLIENT_RETRY = Retrying(6, 0.2, 2.0, budget=15.0)
