"""The connection: where NATS is (:func:`resolve_url`), connecting with the user's
credentials, who the user is (:meth:`Session.principal`) and the requests to the engine's decide
service. Starts no process (the faces start the embedded stack before connecting)."""
from __future__ import annotations

import asyncio
import json
import os
import time

from nbflow.errors import NbflowError, Transient
from nbflow.nats import infra
from nbflow.nats.layout import Layout, default_namespace
from nbflow.runs import Runs, whoami


def resolve_url(url: str | None = None) -> str:
    """``url``, else NBFLOW_NATS_URL, else a running embedded stack. The client starts no
    process: the faces (``nbflow ...``, ``%flow``) start the stack on demand before connecting
    (:func:`nbflow.stack.nats_url`)."""
    url = url or os.environ.get("NBFLOW_NATS_URL")
    if url:
        return url
    from nbflow.stack import running_url

    url = running_url()
    if url is None:
        raise NbflowError("no NATS server to connect to: pass a URL, set NBFLOW_NATS_URL, or "
                          "start the embedded stack with `nbflow up` (the CLI and %flow start "
                          "it for you)")
    return url


def _served_by_the_local_stack(url: str, namespace: str) -> None:
    """On this machine's embedded stack, a namespace it does not serve yet (``--namespace``)
    is served from now on: its users' permissions, streams, an engine and workers. (Only the
    stack's owner can ask; the stack starts the processes, not the client.)"""
    from nbflow.nats import auth

    found = auth.local_stack(url)
    if found is None:
        return
    d, info = found
    if namespace in (info.get("namespaces") or [info.get("namespace") or ""]):
        return
    try:
        Layout(namespace)
    except ValueError as e:
        raise NbflowError(str(e)) from None
    from nbflow.errors import StackError
    from nbflow.stack import serve_namespace

    try:
        serve_namespace(d, namespace)
    except StackError as e:
        raise NbflowError(str(e)) from None



def _subject_token(name: str) -> str:
    """A user name as one NATS subject token (what the decide subjects carry)."""
    out = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in name)
    return out[:64] or "unknown"



class Session(Runs):
    """A connection to one namespace: the base the reading, steering and output calls build on
    (definitions and starting runs come from :class:`~nbflow.runs.Runs`)."""

    @classmethod
    async def connect(cls, url: str | None = None, namespace: str | None = None,
                      reconnect: bool = False, **conn) -> "Session":
        """``reconnect``: ride out server restarts and leader moves (long-lived clients such as
        widgets); a one-shot CLI command fails fast instead."""
        url = resolve_url(url)
        _served_by_the_local_stack(url, default_namespace() if namespace is None else namespace)
        opts = infra.ConnectOptions.from_env(url, **conn)
        nc = await infra.connect(opts, name="nbflow-client", reconnect=reconnect)
        try:
            c = cls(nc, Layout(default_namespace() if namespace is None else namespace))
        except ValueError as e:
            await nc.close()
            raise NbflowError(str(e)) from None
        c.auth_user = opts.user or ""
        try:
            await infra.guarded(nc, infra.ensure(c.js, c.L))
        except Transient as e:
            await nc.close()
            raise Transient(f"NATS at {infra.redact(url)} did not answer while checking "
                            f"nbflow's streams ({e}); retry later") from None
        except Exception as e:  # noqa: BLE001 - permissions: surface clearly
            await nc.close()
            raise NbflowError(f"NATS at {infra.redact(url)} refused nbflow's streams: {e}") from None
        return c

    auth_user = ""
    delegate = False      # a host that authenticates its users itself (the runs console)

    def principal(self, by: str | None = None) -> str:
        """Who decides, as the decide service will record it: the authenticated NATS user
        (``--as`` may not claim anyone else); on a server without users, the declared name."""
        claimed = _subject_token(by) if by else ""
        if self.delegate and claimed:
            return claimed      # nats-server decides whether this user may delegate
        if self.auth_user:
            if claimed and claimed != _subject_token(self.auth_user):
                raise NbflowError(
                    f"you are connected as NATS user {self.auth_user!r}: decisions are recorded "
                    f"under that user, and --as {by!r} cannot claim another identity")
            return _subject_token(self.auth_user)
        return claimed or _subject_token(whoami())

    async def _decide(self, what: str, by: str | None, body: dict) -> dict:
        """A request to the engine's decide service on ``decide.<user>.<what>``."""
        import nats.errors

        who = self.principal(by)
        deadline = time.monotonic() + 30       # an engine starting or restarting: wait for it
        while True:
            try:
                msg = await infra.guarded(self.nc, self.nc.request(
                    self.L.decide_subject(who, what), json.dumps(body).encode(), timeout=15))
                break
            except infra.PermissionDenied as e:
                raise NbflowError(f"{e}: this user may not {what} as {who!r}") from None
            except nats.errors.NoRespondersError:
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                raise NbflowError(f"no nbflow engine is running for namespace "
                                  f"{self.L.namespace or '(default)'} to record the {what}; "
                                  f"start one (`nbflow up` or `nbflow engine`)") from None
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                raise NbflowError(f"the engine did not answer the {what} request within 15 s; "
                                  f"try again") from None
        return json.loads(msg.data)

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
