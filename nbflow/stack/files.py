"""The stack's data dir and its private files (the credentials, the config, the logs)."""
from __future__ import annotations

import os
from pathlib import Path

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"
LOG_FILE = "stack.log"
STORE_LOCK = "store.lock"         # held by the nats-server that has the store open


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The stack's data dir, created private (0700): it holds the credentials and the logs."""
    from nbflow.nats.auth import default_data_dir

    p = Path(path).expanduser().resolve() if path else default_data_dir()
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if p.stat().st_uid == os.getuid() and p.stat().st_mode & 0o077:
            p.chmod(0o700)
    except OSError:
        pass
    return p


def open_private(path: Path, mode: str = "ab"):
    """A log or state file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC),
                 0o600)
    return os.fdopen(fd, mode)
