"""Who may connect and what each principal may do, as nats-server itself enforces it.

Roles (the same in the embedded stack and in the cluster template, docs/nats-roles.conf):

- ``engine``   everything nbflow does in its namespace: history, tasks, snapshots, timers,
               schedules, approvals; it answers the decide service.
- ``worker``   pulls tasks, publishes its tasks' result events to history (only the kinds
               TaskStarted/TaskSucceeded/TaskFailed/TaskSkipped: the history subject carries
               the event kind), writes artifacts and its heartbeat; cannot write definitions,
               run snapshots, approvals or signals, nor publish any other event kind.
- ``author``   submits runs (definitions, the notebook folder's bundle, RunStarted), retries,
               reads everything in its namespace, sends signals and cancels through the
               decide service.
- ``approver`` decides approvals (and sends signals) through the decide service; reads.
- ``viewer``   reads only.
- ``delegate`` decides on behalf of users it authenticated itself (the runs console, which
               records the signed-in Jupyter user): may publish ``decide.*.approve`` (and
               ``.signal``, ``.cancel``).

Only the engine publishes the other event kinds (RunFinished, TimerFired, ApprovalDecided,
SignalSent, CancelRequested), under message ids keyed with a secret in an engine-only bucket,
so no other role can occupy a genuine event's id (JetStream deduplicates per stream).

Decisions (approvals, signals, cancels) are requests on ``<root>.decide.<user>.…``; a user may
publish only under its own name, so the engine takes the decider from the subject, never the payload.

Credentials of the embedded stack are per-user passwords in ``credentials.json`` in the data
dir (dir 0700, file 0600). The server config holds the same passwords in clear text (0600 too):
nats-server also accepts bcrypt hashes, but the clients' file must hold the clear text anyway,
so a hash would protect nothing here and would need the ``bcrypt`` package. NKeys were not
chosen for the same reason (and ``nkeys`` is not a dependency).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from nbflow.core.events import AUTHOR_EVENTS, WORKER_EVENTS
from nbflow.nats.layout import Layout

ROLES = ("engine", "worker", "author", "approver", "viewer", "delegate")
CREDENTIALS_FILE = "credentials.json"
STACK_FILE = "stack.json"
_USER_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def default_data_dir() -> Path:
    """NBFLOW_HOME, else $XDG_DATA_HOME/nbflow, else ~/.local/share/nbflow (not created)."""
    if os.environ.get("NBFLOW_HOME"):
        p = Path(os.environ["NBFLOW_HOME"])
    else:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
        p = Path(base) / "nbflow"
    return p.expanduser().resolve()


def check_user_name(name: str) -> str:
    """A NATS user name usable as one subject token (it appears in decide subjects)."""
    if not name or not set(name) <= _USER_OK or len(name) > 64:
        raise ValueError(f"user name {name!r} is invalid: use up to 64 letters, digits, '_' or "
                         f"'-' (it becomes a NATS subject token)")
    return name


# --- the credentials file ----------------------------------------------------------------------

def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600, never world-readable in between)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_credentials(data: Path) -> dict | None:
    try:
        return json.loads((Path(data) / CREDENTIALS_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_credentials(data: Path, owner: str) -> dict:
    """The stack's users (generated on first start): one per service role, and the owner, who
    has author + approver (the person who started the stack) + delegate (their console)."""
    creds = load_credentials(data)
    if creds and creds.get("users"):
        return creds
    owner = owner if owner not in ROLES else f"{owner}-owner"
    users = {r: {"password": secrets.token_urlsafe(24), "roles": [r]}
             for r in ("engine", "worker", "viewer")}
    users[check_user_name(owner)] = {"password": secrets.token_urlsafe(24),   # + the console
                                     "roles": ["author", "approver", "delegate"]}
    creds = {"v": 1, "owner": owner, "users": users}
    _write_private(Path(data) / CREDENTIALS_FILE, json.dumps(creds, indent=1))
    return creds


def add_user(data: Path, name: str, roles: list[str]) -> str:
    """Add (or replace) a user of the embedded stack; returns its new password."""
    check_user_name(name)
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"unknown role {', '.join(bad) or '(none)'}: roles are "
                         f"{', '.join(ROLES)}")
    creds = load_credentials(data)
    if not creds:
        raise ValueError(f"no credentials in {data}: start the stack once (`nbflow up`)")
    pw = secrets.token_urlsafe(24)
    creds["users"][name] = {"password": pw, "roles": list(roles)}
    _write_private(Path(data) / CREDENTIALS_FILE, json.dumps(creds, indent=1))
    return pw


def _same_server(url: str, stack_url: str) -> bool:
    def hp(u):
        p = urlparse(u if "://" in u else f"nats://{u}")
        return (p.hostname or "").lower(), p.port or 4222
    try:
        a = [hp(u) for u in url.split(",") if u.strip()]
        return len(a) == 1 and a[0] == hp(stack_url)
    except ValueError:
        return False


def local_roles(url: str, user: str) -> list[str]:
    """The roles of ``user`` when ``url`` is this machine's embedded stack (for messages)."""
    found = _local_entry(url, user)
    return list(found[1].get("roles", [])) if found else []


def local_credentials(url: str, user: str | None = None) -> tuple[str, str] | None:
    """(user, password) for ``url`` when it is this machine's embedded stack and this OS user
    can read its credentials; ``user`` picks a user of the stack (default: the owner; the
    stack's own processes set NBFLOW_NATS_USER=engine / worker)."""
    found = _local_entry(url, user)
    return (found[0], found[1]["password"]) if found else None


def local_stack(url: str) -> tuple[Path, dict] | None:
    """(data dir, stack.json) when ``url`` is this machine's embedded stack and this OS user
    can read its credentials (its owner), else None."""
    path = os.environ.get("NBFLOW_STACK_CREDENTIALS")
    data = Path(path).parent if path else default_data_dir()
    try:
        info = json.loads((data / STACK_FILE).read_text())
        if not _same_server(url, info["url"]) or not load_credentials(data):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data, info


def _local_entry(url: str, user: str | None) -> tuple[str, dict] | None:
    path = os.environ.get("NBFLOW_STACK_CREDENTIALS")
    data = Path(path).parent if path else default_data_dir()
    try:
        stack_url = json.loads((data / STACK_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _same_server(url, stack_url):
        return None
    creds = load_credentials(data)
    if not creds:
        return None
    name = user or creds.get("owner")
    entry = creds.get("users", {}).get(name)
    if not entry:
        return None
    return name, entry


# --- permissions -------------------------------------------------------------------------------

def _streams(L: Layout) -> dict[str, str]:
    return {"history": L.history_stream, "tasks": L.tasks_stream, "timers": L.timers_stream,
            "deadletter": L.deadletter_stream, "triggers": L.triggers_stream,
            "runs": f"KV_{L.runs_bucket}", "defs": f"KV_{L.defs_bucket}",
            "approvals": f"KV_{L.approvals_bucket}", "signals": f"KV_{L.signals_bucket}",
            "workers": f"KV_{L.workers_bucket}", "schedules": f"KV_{L.schedules_bucket}",
            "fps": f"KV_{L.fps_bucket}",
            "artifacts": f"OBJ_{L.artifacts_store}"}


def role_permissions(role: str, L: Layout, user: str) -> tuple[list[str], list[str]]:
    """(publish allow, subscribe allow) subjects of one role in one namespace."""
    S = _streams(L)
    if role == "engine":
        return [">"], [">"]
    inbox = f"_INBOX_{user}.>"
    pub: list[str] = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]   # names: object gets look up
    sub: list[str] = [inbox]
    # reading: stream info, message gets, direct gets, ordered (ephemeral) consumers
    pub += [f"$JS.API.STREAM.INFO.{s}" for s in S.values()]
    # workers never see approval records (their tokens)
    readable = [s for k, s in S.items() if not (role == "worker" and k == "approvals")]
    for s in readable:
        pub += [f"$JS.API.STREAM.MSG.GET.{s}",
                f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>",
                f"$JS.API.CONSUMER.CREATE.{s}", f"$JS.API.CONSUMER.CREATE.{s}.>",
                f"$JS.API.CONSUMER.INFO.{s}.>", f"$JS.API.CONSUMER.DELETE.{s}.>",
                f"$JS.FC.{s}.>"]
    if role == "approver":
        pub += [L.decide_subject(user, "approve"), L.decide_subject(user, "signal")]
    if role == "author":
        pub += [L.decide_subject(user, "signal"), L.decide_subject(user, "cancel")]
    if role == "delegate":
        pub += [L.decide_subject("*", what) for what in ("approve", "signal", "cancel")]
    if role == "author":
        # definitions, and the notebook folder's bundle in the object store (so authors, like
        # workers, can write artifacts: see the pickle trust model in the README)
        pub += [L.history_subject("*", k) for k in AUTHOR_EVENTS]
        pub += [f"$KV.{L.defs_bucket}.>", f"$O.{L.artifacts_store}.>"]
    if role == "worker":
        t = S["tasks"]
        pub += [L.history_subject("*", k) for k in WORKER_EVENTS]
        pub += [L.dead_letter_subject(),
                f"$JS.API.CONSUMER.DURABLE.CREATE.{t}.>", f"$JS.API.CONSUMER.MSG.NEXT.{t}.>",
                f"$JS.ACK.{t}.>", f"$KV.{L.workers_bucket}.>",
                f"$O.{L.artifacts_store}.>", f"$JS.API.STREAM.PURGE.{S['artifacts']}"]
        sub += [L.cancel_subject("*")]
    return pub, sub


def user_permissions(roles: list[str], layouts: list[Layout], user: str) -> dict:
    pub: list[str] = []
    sub: list[str] = []
    for L in layouts:
        for r in roles:
            p, s = role_permissions(r, L, user)
            pub += [x for x in p if x not in pub]
            sub += [x for x in s if x not in sub]
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}}


def authorization_conf(creds: dict, layouts: list[Layout]) -> str:
    """The nats-server ``authorization`` block for the stack's users."""
    lines = ["authorization {", "  users = ["]
    for name, u in creds["users"].items():
        perms = user_permissions(u["roles"], layouts, name)
        lines.append(f"    {{ user: {json.dumps(name)}, password: {json.dumps(u['password'])},"
                     f" permissions: {json.dumps(perms)} }}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


TEMPLATE_USERS = {"engine": ["engine"], "worker": ["worker"], "alice": ["author"],
                  "bob": ["approver"], "viewer": ["viewer"]}
SERVICE_USERS = {"engine": ["engine"], "worker": ["worker"], "viewer": ["viewer"]}


def password_variable(user: str) -> str:
    """The environment variable of nats-server that holds ``user``'s password in the template."""
    return f"NBFLOW_{check_user_name(user).upper().replace('-', '_')}_PASSWORD"


def template_conf(namespaces: str | list[str] = "", users: dict[str, list[str]] | None = None,
                  ) -> str:
    """docs/nats-roles.conf and deploy/nats/roles.conf: the roles for your own server or
    cluster, for every namespace in ``namespaces``; passwords come from environment variables
    of nats-server (``NBFLOW_<USER>_PASSWORD``). ``users``: name -> roles (default: the
    service users and one example person per human role). `nbflow user conf` prints it."""
    nss = [namespaces] if isinstance(namespaces, str) else list(namespaces) or [""]
    layouts = [Layout(ns) for ns in nss]
    users = users or TEMPLATE_USERS
    for name, roles in users.items():
        check_user_name(name)
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise ValueError(f"user {name}: unknown role {', '.join(bad) or '(none)'}: roles "
                             f"are {', '.join(ROLES)}")
    shown = ", ".join(repr(ns) if ns else "the default namespace" for ns in nss)
    head = ("# nbflow roles for your own nats-server / cluster (generated by\n"
            "# `nbflow user conf`, nbflow.nats.auth.template_conf; `include` it from your\n"
            f"# server config). Namespaces: {shown}.\n"
            "# Passwords come from environment variables of the nats-server process\n"
            "# (NBFLOW_<USER>_PASSWORD, e.g. an EnvironmentFile of its systemd unit).\n"
            "# Add a person: `nbflow user conf --user ann=author --user bob=approver ...`\n"
            "# regenerates this file (the decide subject carries the user name, so an\n"
            "# approver can only decide as themself). Clients connect with\n"
            "# NBFLOW_NATS_USER / NBFLOW_NATS_PASSWORD (the inbox _INBOX_<user> follows).\n")
    lines = [head + "authorization {", "  users = ["]
    for name, roles in users.items():
        perms = user_permissions(roles, layouts, name)
        lines.append(f"    # {name}: {', '.join(roles)}")
        lines.append(f"    {{ user: {json.dumps(name)}, password: ${password_variable(name)}, "
                     f"permissions: {{")
        for kind in ("publish", "subscribe"):
            subs = ", ".join(json.dumps(x) for x in perms[kind]["allow"])
            lines.append(f"        {kind}: {{ allow: [{subs}] }}")
        lines.append("    } }")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


__all__ = ["ROLES", "ensure_credentials", "load_credentials", "local_credentials", "add_user",
           "authorization_conf", "role_permissions", "user_permissions", "template_conf",
           "password_variable",
           "inbox_prefix", "default_data_dir", "check_user_name"]
