"""Bundles (the notebook's folder) in the object store, and the worker's cache of them.

The client packs the folder (:mod:`nbflow.compiler.bundle`) and :func:`upload` stores it once
under its content hash. A worker unpacks each bundle once into ``<cache>/<hash>``: into a temp
dir first, verified against the hash, then renamed into place — a kill mid-unpack leaves only a
dot-dir that the next start sweeps, and two processes racing on one hash both end with the same
complete copy (the loser's rename fails and it uses the winner's). Each task then gets its own
copy (:func:`task_folder`) as its cwd, so relative writes land in the task's work dir and never
change what the next task or run sees.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import zipfile

from nbflow.compiler.bundle import Bundle, bundle_key, content_hash_of
from nbflow.errors import BundleError

log = logging.getLogger("nbflow.worker.bundles")

STALE_TMP_S = 3600          # a temp unpack dir older than this is a leftover of a killed worker


def enabled(flag: bool | None = None) -> bool:
    """Whether submits bundle the notebook's folder: ``flag`` if given, else NBFLOW_BUNDLE."""
    if flag is not None:
        return flag
    return os.environ.get("NBFLOW_BUNDLE", "1").strip().lower() not in ("0", "false", "no", "off")


async def upload(art, bundle: Bundle) -> bool:
    """Store the bundle unless the store has it already. True when it was uploaded."""
    if await art.exists(bundle.key):
        return False
    await art.put_bytes(bundle.key, bundle.data)
    return True


def default_root() -> str:
    if os.environ.get("NBFLOW_BUNDLE_CACHE"):
        return os.environ["NBFLOW_BUNDLE_CACHE"]
    if os.environ.get("NBFLOW_HOME"):                # the embedded stack's data dir
        return os.path.join(os.environ["NBFLOW_HOME"], "bundles")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nbflow", "bundles")


def _extract(zpath: str, into: str, want: str) -> None:
    with zipfile.ZipFile(zpath) as z:
        got = content_hash_of(z)
        if got != want:
            raise BundleError(f"bundle {want} is corrupt in the object store (its content "
                              f"hashes to {got})")
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or "\\" in name:
                raise BundleError(f"bundle {want} holds an unsafe path {name!r}")
            target = os.path.join(into, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(target, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)


class BundleCache:
    """``<root>/<hash>``: each bundle unpacked once per host, shared by all tasks."""

    def __init__(self, art, root: str | None = None):
        self.art = art
        self.root = root or default_root()
        self._locks: dict[str, asyncio.Lock] = {}
        self.unpacked = 0           # how many bundles this process unpacked (tests count it)

    def sweep(self) -> None:
        """Remove temp dirs left by a worker killed mid-unpack, and bundles no task of this
        host used for NBFLOW_BUNDLE_CACHE_DAYS (7)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        now = time.time()
        unused = float(os.environ.get("NBFLOW_BUNDLE_CACHE_DAYS", "7")) * 86400
        for n in names:
            p = os.path.join(self.root, n)
            try:
                age = now - os.stat(p).st_mtime
                if age > (STALE_TMP_S if n.startswith(".") else unused):
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    async def get(self, h: str) -> str:
        """The path of bundle ``h`` unpacked (downloading it first if needed)."""
        dest = os.path.join(self.root, h)
        if os.path.isdir(dest):
            _touch(dest)
            return dest
        lock = self._locks.setdefault(h, asyncio.Lock())
        async with lock:
            if os.path.isdir(dest):
                return dest
            os.makedirs(self.root, exist_ok=True)
            _tag(self.root)
            tmp = tempfile.mkdtemp(prefix=f".{h}.", dir=self.root)
            try:
                zpath = os.path.join(tmp, "bundle.zip")
                if not await self.art.exists(bundle_key(h)):
                    raise BundleError(f"the run's bundle {h} is not in the object store "
                                      f"(deleted?); resubmit the notebook")
                await self.art.get_file(bundle_key(h), zpath)
                files = os.path.join(tmp, "files")
                os.makedirs(files)
                await asyncio.get_running_loop().run_in_executor(None, _extract, zpath, files, h)
                try:
                    os.rename(files, dest)
                    self.unpacked += 1
                except OSError:
                    if not os.path.isdir(dest):      # not a lost race: a real error
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _tag(root: str) -> None:
    """Mark the cache as one (CACHEDIR.TAG): backups skip it, and so does bundling."""
    p = os.path.join(root, "CACHEDIR.TAG")
    if not os.path.exists(p):
        try:
            with open(p, "w") as f:
                f.write("Signature: 8a477f597d28d172789f06886806bc55\n"
                        "# nbflow's cache of unpacked notebook bundles\n")
        except OSError:
            pass


def _touch(path: str) -> None:
    """Mark a bundle used now (sweep() keeps what was used lately)."""
    try:
        os.utime(path)
    except OSError:
        pass


def task_folder(bundle_dir: str, workdir: str) -> str:
    """A private copy of the unpacked bundle inside the task's work dir: the task's cwd."""
    dest = os.path.join(workdir, "folder")
    shutil.copytree(bundle_dir, dest, symlinks=False)
    return dest


def located(wf, unpacked: str):
    """``wf`` as seen from its unpacked bundle: its source, and the other notebooks its tasks
    run (BPMN imports name them by absolute path on the submitter's disk), inside ``unpacked``."""
    import dataclasses

    if not wf.source:
        return wf
    folder = os.path.dirname(wf.source)
    nodes = []
    for n in wf.nodes:
        if n.notebook and os.path.isabs(n.notebook) and \
                os.path.commonpath([os.path.abspath(n.notebook), folder]) == folder:
            n = dataclasses.replace(n, notebook=os.path.relpath(n.notebook, folder))
        nodes.append(n)
    return dataclasses.replace(wf, nodes=nodes,
                               source=os.path.join(unpacked, os.path.basename(wf.source)))
