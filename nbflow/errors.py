"""The one exception hierarchy: every error nbflow raises for a user to read is an NbflowError.

Each class keeps the builtin base it had before (``ValueError``, ``ConnectionError``,
``RuntimeError``) so ``except ValueError`` around older call sites still works. This module
imports nothing: every layer, the pure core included, may raise these.

NATS errors (raised by the boundary, :mod:`nbflow.nats`): every nats-py / server error is
translated there ONCE into one of these, so nothing above it looks at error text or nats-py types.

    NotFound    the key, message, object, stream or bucket does not exist
    Conflict    a compare-and-set lost (wrong last sequence): someone else wrote first
    Permission  this NATS user may not do that
    TooLarge    the message is over the server's max payload (or a stream's max message size)
    StoreFull   a stream, bucket or the server's JetStream storage is full
    Transient   timeout, no responders, disconnected, leader election: retry later
"""
from __future__ import annotations

from typing import Any


class NbflowError(Exception):
    """An error meant for the user (unknown run, task not awaiting approval, ...)."""


# --- definitions: what the user wrote cannot work ----------------------------------------------

class WorkflowError(NbflowError, ValueError):
    """A workflow that cannot be compiled or run, with a message meant for the user."""


class ScheduleError(NbflowError, ValueError):
    """A schedule or trigger definition that cannot work: the message says why."""


class BundleError(WorkflowError):
    """The notebook's folder cannot be bundled (too big, too many files, unreadable)."""


class UserError(NbflowError):
    """Bad command-line input: printed as one line, no traceback; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# --- runs --------------------------------------------------------------------------------------

class AlreadyDecided(NbflowError):
    """The approval was decided already; ``decision`` says by whom and how."""

    def __init__(self, message: str, decision: dict[str, Any]):
        super().__init__(message)
        self.decision = decision


class OutputError(NbflowError):
    """A task's output value that cannot be saved (e.g. it does not pickle)."""


# --- infrastructure ----------------------------------------------------------------------------

class ConnectError(NbflowError, ConnectionError):
    """NATS cannot be reached: the message says where and what to check."""


class StackError(NbflowError, RuntimeError):
    """The embedded stack (nats-server, engine, workers) cannot start or be found."""


class BadMessage(NbflowError, ValueError):
    """A message on an nbflow subject that is not a valid event or task."""


class KernelStartError(NbflowError, RuntimeError):
    """The pool could not start a kernel (bad kernel name, broken environment): a worker bug."""


class DotMissing(NbflowError, RuntimeError):
    """graphviz's ``dot`` executable is not on PATH. ``.dot`` holds the DOT text we would have drawn."""

    def __init__(self, message: str, dot: str = ""):
        super().__init__(message)
        self.dot = dot


# --- NATS: what the boundary (nbflow.nats) raises ---------------------------------------------

class NatsError(NbflowError):
    """A NATS call failed; ``op`` names the call (e.g. ``kv.get``), ``what`` its target."""

    def __init__(self, message: str = "", *, op: str = "", what: str = "",
                 cause: BaseException | None = None):
        super().__init__(message or type(self).__name__)
        self.op, self.what, self.cause = op, what, cause


class NotFound(NatsError):
    """The key / message / object / stream / bucket does not exist."""


class Conflict(NatsError):
    """Compare-and-set lost: the revision or last sequence was not the expected one."""


class Permission(NatsError):
    """This NATS user is not allowed to do that."""


class TooLarge(NatsError):
    """The message exceeds the server's max payload or the stream's max message size."""


class StoreFull(NatsError):
    """A stream / bucket reached its byte limit, or JetStream storage is exhausted."""


class Transient(NatsError):
    """Timeout, no responders, disconnected, leader election: the same call may succeed later."""
