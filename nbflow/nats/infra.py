"""Connecting to NATS and creating nbflow's streams, buckets and object store (idempotent).

Durability we promise (written down, as the README says): streams are file-backed; with the
embedded single server, data survives a crash of any process (nats-server included) because
JetStream writes every message to its files before acknowledging it; a power loss can lose the
last ``sync_interval`` of writes (the embedded stack syncs every second). For more, run a
3-node cluster and pass ``--replicas 3``: then a message is acknowledged once a quorum has it.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass

import nats
from nats.errors import NoServersError
from nats.js.api import (ConsumerConfig, DiscardPolicy, KeyValueConfig, ObjectStoreConfig,
                         RetentionPolicy, StorageType, StreamConfig)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from nbflow.errors import ConnectError, Permission
from nbflow.nats import auth, calls
from nbflow.nats.layout import DUPLICATE_WINDOW_S, Layout

STREAM_NAME_IN_USE = 10058      # JSStreamNameExistErr: exists with another configuration


class PermissionDenied(Permission, PermissionError):
    """nats-server refused a publish or subscription of this NATS user (its permissions)."""

    def __init__(self, user: str, action: str, subject: str, roles: list[str] | None = None):
        self.user, self.action, self.subject, self.roles = user, action, subject, roles or []
        who = f"NATS user {user!r}" if user else "this NATS connection"
        if self.roles:
            who += f" (role {', '.join(self.roles)})"
        # nats-py lowercases the server's message: the subject is shown as the server sent it
        super().__init__(f"permission denied: {who} may not {action} {subject!r} "
                         f"(its role does not allow it; see the README's Security section)",
                         op=action, what=subject)


async def pull_tasks(js, layout: Layout, queue: str, ack_wait: float):
    """A worker's pull subscription on its queue's durable consumer (one per queue, shared)."""
    durable = layout.worker_consumer(queue)
    subject = layout.task_subject(queue)
    return await js.pull_subscribe(subject, durable=durable, stream=layout.tasks_stream,
                                   config=consumer_config(durable, subject, ack_wait, 10_000))


def redact(url: str) -> str:
    """A URL safe to print: user:password and tokens replaced by ***, with or without a
    scheme (``bob:pw@host:4222``)."""
    out = []
    for part in url.split(","):
        part = part.strip()
        if "@" in part:
            scheme, sep, rest = part.rpartition("://")
            host = rest.rpartition("@")[2]
            part = f"{scheme}{sep}***@{host}"
        out.append(part)
    return ",".join(out)


_DENIED_RE = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s']+)",
                        re.IGNORECASE)


class _Denials:
    """Permission violations the server reported on one connection (it reports them
    asynchronously: a denied request would otherwise just time out)."""

    def __init__(self, user: str, roles: list[str] | None = None):
        self.user, self.roles = user, roles or []
        self.waiters: set[asyncio.Future] = set()
        self.last: tuple[float, str, str] | None = None

    def record(self, text: str) -> bool:
        m = _DENIED_RE.search(text)
        if not m:
            return False
        action = "publish to" if m.group(1).lower() == "publish" else "subscribe to"
        self.last = (time.monotonic(), action, m.group(2))
        # the boundary turns the timeout of the refused request into this error
        calls.note_denial(m.group(2), functools.partial(PermissionDenied, self.user, action,
                                                        m.group(2), self.roles))
        for f in list(self.waiters):
            if not f.done():
                f.set_result((action, m.group(2)))
        return True


async def guarded(nc, aw):
    """Await ``aw``; when the server reports a permission violation meanwhile, cancel it and
    raise PermissionDenied naming the user and the subject (instead of a timeout)."""
    d: _Denials | None = getattr(nc, "_nbflow_denials", None)
    if d is None:
        return await aw
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    d.waiters.add(fut)
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task, fut}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # cancelled (Ctrl-C): pass it on to ``aw``, which may handle it — `nbflow run` then
        # detaches and returns its exit code — rather than leave it running on a closing client
        task.cancel()
        return await task
    finally:
        d.waiters.discard(fut)
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled on purpose
        pass
    action, subject = fut.result()
    raise PermissionDenied(d.user, action, subject, d.roles)


@dataclass
class ConnectOptions:
    url: str
    creds: str | None = None          # NATS .creds file (JWT + NKey seed)
    nkey: str | None = None           # NKey seed file
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    domain: str | None = None         # JetStream domain (a leaf node's clients: the hub's)

    @classmethod
    def from_env(cls, url: str | None = None, **overrides) -> "ConnectOptions":
        env = os.environ
        o = cls(
            url=url or env.get("NBFLOW_NATS_URL", ""),
            creds=env.get("NBFLOW_NATS_CREDS"), nkey=env.get("NBFLOW_NATS_NKEY"),
            token=env.get("NBFLOW_NATS_TOKEN"), user=env.get("NBFLOW_NATS_USER"),
            password=env.get("NBFLOW_NATS_PASSWORD"), tls_ca=env.get("NBFLOW_NATS_CA"),
            tls_cert=env.get("NBFLOW_NATS_CERT"), tls_key=env.get("NBFLOW_NATS_KEY"),
            domain=env.get("NBFLOW_JS_DOMAIN") or None,
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(o, k, v)
        if o.url and not (o.creds or o.nkey or o.token or o.password or "@" in o.url):
            found = auth.local_credentials(o.url, o.user)   # this machine's embedded stack
            if found:
                o.user, o.password = found
        return o


async def connect(opts: ConnectOptions | str, *, name: str = "nbflow", timeout: float = 3.0,
                  reconnect: bool = True) -> nats.NATS:
    """Connect, or raise ConnectError with one clear sentence (never hang for long)."""
    if isinstance(opts, str):
        opts = ConnectOptions.from_env(opts)
    # nats-py treats max_reconnect_attempts=0 as "retry the first connect forever": a short
    # client asks for 1 (two tries, then a clear error); services reconnect forever.
    kw: dict = {"name": name, "connect_timeout": timeout, "allow_reconnect": True,
                "max_reconnect_attempts": -1 if reconnect else 1, "reconnect_time_wait": 0.5}
    _check_credential_files(opts)
    if opts.creds:
        kw["user_credentials"] = opts.creds
    if opts.nkey:
        kw["nkeys_seed"] = opts.nkey
    if opts.token:
        kw["token"] = opts.token
    if opts.user:
        kw["user"], kw["password"] = opts.user, opts.password or ""
        try:     # replies to this user only: roles may subscribe to their own inbox alone
            kw["inbox_prefix"] = auth.inbox_prefix(auth.check_user_name(opts.user))
        except ValueError:
            pass
    if opts.tls_ca or opts.tls_cert:
        try:
            ctx = ssl.create_default_context(cafile=opts.tls_ca)
            if opts.tls_cert:
                ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(f"cannot load the TLS files (NBFLOW_NATS_CA/CERT/KEY): "
                               f"{e.strerror or e}") from None
        kw["tls"] = ctx
    _check_urls(opts.url)
    errors: list[str] = []

    denials = _Denials(opts.user or "", auth.local_roles(opts.url, opts.user) if opts.user else [])

    async def _err(e):            # nats-py logs connection errors through this callback
        if denials.record(str(e)):
            logging.getLogger("nbflow").debug("NATS: %s", e)
            return
        errors.append(str(e) or type(e).__name__)

    kw["error_cb"] = _err
    servers = [s.strip() for s in opts.url.split(",") if s.strip()]
    try:
        nc = await asyncio.wait_for(nats.connect(servers, **kw), timeout=timeout * 2 + 1)
    except (NoServersError, OSError, asyncio.TimeoutError, nats.errors.Error) as e:
        # the server's -ERR (e.g. 'Authorization Violation') may be followed by a reset: say
        # the reason, not the symptom
        refused = [x for x in errors if "authorization" in x.lower() or "tls" in x.lower()
                   or "certificate" in x.lower()]
        why = refused[-1] if refused else errors[-1] if errors else (str(e) or type(e).__name__)
        raise ConnectError(
            f"cannot reach NATS at {redact(opts.url)}: {why}. Is nats-server running there? "
            f"(leave --nats and NBFLOW_NATS_URL unset to use the embedded stack)") from None
    if opts.domain:
        # a site's leaf node without JetStream reaches the hub's as $JS.<domain>.API: every
        # nc.jetstream() of this connection speaks to that domain
        nc.jetstream = functools.partial(nc.jetstream, domain=opts.domain)
    nc._nbflow_denials = denials
    return nc


def _check_urls(url: str) -> None:
    """A bad port or host is one sentence naming it (nats-py says 'invalid connect url')."""
    from urllib.parse import urlsplit

    for part in (p.strip() for p in url.split(",")):
        if not part:
            continue
        shown = redact(part)
        try:
            u = urlsplit(part if "://" in part else f"nats://{part}")
            port = u.port
        except ValueError:
            raise ConnectError(f"NATS URL {shown!r}: the port must be a number from 1 to "
                               f"65535 (IPv6 hosts go in brackets: nats://[::1]:4222)") from None
        if port == 0:
            raise ConnectError(f"NATS URL {shown!r}: the port must be a number from 1 to 65535")
        if not u.hostname:
            raise ConnectError(f"NATS URL {shown!r} names no host (e.g. nats://127.0.0.1:4222)")


def _check_credential_files(opts: ConnectOptions) -> None:
    """Missing files and a missing `nkeys` package are one clear sentence, not a traceback
    (and never echo a secret: only paths and variable names)."""
    for what, path in (("NBFLOW_NATS_CREDS", opts.creds), ("NBFLOW_NATS_NKEY", opts.nkey),
                       ("NBFLOW_NATS_CA", opts.tls_ca), ("NBFLOW_NATS_CERT", opts.tls_cert),
                       ("NBFLOW_NATS_KEY", opts.tls_key)):
        if path and not os.path.isfile(path):
            raise ConnectError(f"{what}: no such file {path!r}")
    if opts.creds or opts.nkey:
        import importlib.util

        if importlib.util.find_spec("nkeys") is None:
            raise ConnectError("NKey and .creds authentication need the 'nkeys' package: "
                               "pip install nkeys")


# --- infrastructure ----------------------------------------------------------------------------

async def ensure(js, layout: Layout, replicas: int | None = None, look_first: bool = True) -> None:
    """Create every stream, bucket and store nbflow needs (no-op when they exist).

    ``replicas``: for what is created (default 1); existing streams keep theirs unless more are
    asked for — a worker or client connecting never lowers a cluster's replication.
    ``look_first``: leave existing streams alone (clients and workers may lack the right to
    create or update them); the engine passes False so that config changes are applied.
    Errors are nbflow's (Transient when NATS does not answer, Permission, ...)."""
    from nbflow.nats.calls import call

    await call("stream.admin", "ensure", "", _ensure, js, layout, replicas, look_first)


async def _ensure(js, layout: Layout, replicas: int | None = None,
                  look_first: bool = True) -> None:
    L = layout
    want = replicas or 1

    async def stream(cfg: StreamConfig):
        if look_first and not replicas:
            try:                  # exists: nothing to do (roles without create rights pass here)
                await js.stream_info(cfg.name)
                return
            except NotFoundError:
                pass
        try:
            await js.add_stream(cfg)
        except BadRequestError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            have = (await js.stream_info(cfg.name)).config.num_replicas or 1
            cfg.num_replicas = max(have, replicas or 0)
            await js.update_stream(cfg)

    await stream(StreamConfig(
        name=L.history_stream, subjects=[L.history_wildcard], storage=StorageType.FILE,
        num_replicas=want, duplicate_window=DUPLICATE_WINDOW_S, allow_direct=True,
        description="nbflow run histories: every state change of every run"))
    await stream(StreamConfig(
        name=L.tasks_stream, subjects=[L.tasks_wildcard], storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE, num_replicas=want,
        duplicate_window=DUPLICATE_WINDOW_S, description="nbflow tasks waiting for a worker"))
    await stream(StreamConfig(
        name=L.timers_stream, subjects=[L.timers_wildcard], storage=StorageType.FILE,
        num_replicas=want, allow_msg_schedules=True, allow_msg_ttl=True,
        duplicate_window=DUPLICATE_WINDOW_S, allow_rollup_hdrs=True,
        description="nbflow durable timers: retries, sleeps, approval timeouts, schedules"))

    await stream(StreamConfig(
        name=L.deadletter_stream, subjects=[L.dead_letter_subject()], storage=StorageType.FILE,
        num_replicas=want, max_age=float(os.environ.get("NBFLOW_DEADLETTER_DAYS", "90")) * 86400,
        description="nbflow messages that could not be handled, with why (kept "
                    "NBFLOW_DEADLETTER_DAYS, default 90 days)"))

    async def raise_replicas(name: str) -> None:
        # a bucket or store a worker created first (at 1 replica) gets what the engine asks
        if replicas:
            cfg = (await js.stream_info(name)).config
            if (cfg.num_replicas or 1) < replicas:
                cfg.num_replicas = replicas
                await js.update_stream(cfg)

    async def kv(bucket: str, history: int = 1, ttl: float | None = None, desc: str = ""):
        try:
            await js.key_value(bucket)
        except NotFoundError:    # BucketNotFoundError
            await js.create_key_value(KeyValueConfig(
                bucket=bucket, history=history, ttl=ttl, replicas=want,
                storage=StorageType.FILE, description=desc))
            return
        await raise_replicas(f"KV_{bucket}")

    await kv(L.runs_bucket, desc="nbflow run snapshots (derived from history; CAS on revision)")
    await kv(L.defs_bucket, desc="nbflow workflow definitions by content hash (immutable)")
    await kv(L.approvals_bucket, history=5, desc="nbflow pending approvals and their decisions")
    await kv(L.signals_bucket, history=5, desc="nbflow signals sent to runs")
    await kv(L.workers_bucket, ttl=30, desc="nbflow workers seen (TTL heartbeats)")
    await kv(L.schedules_bucket, history=20, desc="nbflow schedules and triggers (with history)")
    await kv(L.fps_bucket, desc="nbflow task fingerprint -> outputs of its latest success")
    try:
        await js.object_store(L.artifacts_store)
        found = True
    except NotFoundError:
        found = False
    if found:
        await raise_replicas(f"OBJ_{L.artifacts_store}")
    else:
        await js.create_object_store(L.artifacts_store, config=ObjectStoreConfig(
            replicas=want, storage=StorageType.FILE,
            description="nbflow task outputs and executed notebooks"))


class Puller:
    """One outstanding pull request on a JetStream pull subscription, topped up before it runs
    out (as nats.go's ``Consume`` does), instead of nats-py's ``fetch(n > 1)``, which sends a
    ``no_wait`` probe and then, when nothing was waiting, a second, lingering request: two
    round trips (and two JSON requests) per call of an idle consumer. Messages published while
    the caller handles a batch are already here for its next call.

    The request asks for ``batch`` messages, expires after ``expires`` s and has the server
    send an idle heartbeat every ``heartbeat`` s: a request lost to a reconnect or a server
    restart (no heartbeat for 3 heartbeats) or that ran out (a 408 says how many it had left)
    is replaced. Messages wait here at most as long as the caller takes to come back (ack
    wait still applies, as with fetch). Uses nats-py's pull subscription internals (its
    next-message subject, inbox and queue); ``sub.fetch`` is used where they are missing.
    One caller at a time."""

    def __init__(self, sub, batch: int = 256, expires: float = 30.0, heartbeat: float = 5.0):
        self.sub, self.batch = sub, max(1, int(batch))
        self.expires, self.heartbeat = expires, heartbeat
        self.requests = 0                 # pull requests sent (for tests and benchmarks)
        self._left = 0                    # messages the outstanding requests may still deliver
        self._until = 0.0                 # monotonic: when the newest request expires
        self._seen = 0.0                  # monotonic: last word from the server on them
        self._reconnects = -1
        inner = getattr(sub, "_sub", None)
        self._ok = all(hasattr(sub, a) for a in ("_nms", "_deliver", "_nc")) and \
            inner is not None and hasattr(inner, "_pending_queue")

    async def _top_up(self) -> None:
        now = time.monotonic()
        reconnects = self.sub._nc.stats.get("reconnects", 0)
        if (now >= self._until - min(1.0, self.expires / 4) or reconnects != self._reconnects
                or now - self._seen > 3 * self.heartbeat):
            self._left = 0                # ran out, or lost with a server: ask afresh
        if self._left > self.batch // 2:
            return
        n = self.batch - self._left
        req = {"batch": n, "expires": int(self.expires * 1e9),
               "idle_heartbeat": int(self.heartbeat * 1e9)}
        import json

        await self.sub._nc.publish(self.sub._nms, json.dumps(req).encode(), self.sub._deliver)
        self.requests += 1
        self._left += n
        self._until = self._seen = now
        self._until += self.expires
        self._reconnects = reconnects

    def _take(self, msg, out: list) -> None:
        """File one message from the inbox: a task for the caller, or word on the requests."""
        from nats.js.api import Header, StatusCode

        status = msg.headers.get(Header.STATUS) if msg.headers else None
        self._seen = time.monotonic()
        if not status:
            self._left = max(0, self._left - 1)
            out.append(msg)
        elif status == StatusCode.CONTROL_MESSAGE:       # idle heartbeat: the request lives
            pass
        else:                   # 408 expired / 409 ended: what that request had left is void
            try:
                gone = int(msg.headers.get("Nats-Pending-Messages", ""))
            except ValueError:
                gone = self._left
            self._left = max(0, self._left - gone)
            if status not in (StatusCode.REQUEST_TIMEOUT, StatusCode.CONFLICT):
                self._left = 0
                raise APIError.from_msg(msg)

    async def fetch(self, n: int, timeout: float) -> list:
        """Up to ``n`` messages: those already here, else the first to come within ``timeout``
        s plus any that came with it. Raises asyncio.TimeoutError when none came."""
        if not self._ok:
            return await self.sub.fetch(n, timeout=timeout)
        await self._top_up()
        inner = self.sub._sub
        queue = inner._pending_queue
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            if not queue.empty():
                msg = queue.get_nowait()
                inner._pending_size -= len(msg.data)
            elif out:
                break
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                msg = await inner.next_msg(timeout=left)   # nats' TimeoutError is asyncio's
            self._take(msg, out)
            if not out and self._left == 0:
                await self._top_up()                      # the request ended: ask again
        return out


async def ack_all(msgs: list) -> None:
    """Ack each message (a handled batch whose acks were deferred to the next write). A failed
    ack (a reconnect) is left to redelivery: the engine skips a redelivered event by sequence,
    a completion is deduplicated by its message id."""
    for m in msgs:
        try:
            await m.ack()
        except Exception:  # noqa: BLE001 - redelivered, then skipped or deduplicated
            pass


async def fetch(sub, n: int, stop: asyncio.Event, timeout: float = 1.0, what: str = "fetch"):
    """Pull up to ``n`` messages (from a :class:`Puller` or a pull subscription); [] on a quiet
    timeout or while NATS reconnects (services keep serving through a server restart)."""
    try:
        return await sub.fetch(n, timeout=timeout)
    except asyncio.TimeoutError:
        return []
    except Exception as e:  # noqa: BLE001 - reconnects, server restarts: keep serving
        if not stop.is_set():
            logging.getLogger("nbflow").warning("%s failed (%s); retrying", what, e)
            await asyncio.sleep(0.5)
        return []


async def run_service(nc, service, ready: asyncio.Event | None = None,
                      stop_on_signals: bool = False) -> None:
    """Serve a started engine/worker until its run() returns; then stop it and drain the
    connection (what `nbflow engine` and `nbflow worker` do around their service)."""
    if stop_on_signals:
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, service.stop)
            except (NotImplementedError, RuntimeError):
                pass
    if ready:
        ready.set()
    try:
        await service.run()
    finally:
        service.stop()
        await nc.drain()


def consumer_config(durable: str, subject: str, ack_wait: float, max_ack_pending: int,
                    max_deliver: int = -1) -> ConsumerConfig:
    return ConsumerConfig(durable_name=durable, filter_subject=subject, ack_wait=ack_wait,
                          max_ack_pending=max_ack_pending, max_deliver=max_deliver)


__all__ = ["ConnectError", "PermissionDenied", "guarded", "ConnectOptions", "connect", "ensure", "redact", "consumer_config",
           "DiscardPolicy", "Puller", "fetch"]
