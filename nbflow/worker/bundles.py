"""Bundles (the notebook's folder) in the object store, and the worker's cache of them.

The client packs the folder (:mod:`nbflow.compiler.bundle`) and :func:`upload` stores it once
under its content hash. A worker unpacks each bundle once into ``<cache>/<hash>``: into a temp
dir first, verified against the hash, then renamed into place — a kill mid-unpack leaves only a
dot-dir that the next start sweeps, and two processes racing on one hash both end with the same
complete copy (the loser's rename fails and it uses the winner's). Each task then gets its own
copy (:func:`task_folder`) as its cwd, so relative writes land in the task's work dir and never
change what the next task or run sees.

Bounds: the cache holds at most NBFLOW_BUNDLE_CACHE_MB (1024) of unpacked bundles; the least
recently used are evicted first, never one a task of any worker process on the host is using (a
task holds a shared ``flock`` on ``<cache>/.locks/<hash>`` from unpacking to its end; eviction
takes it exclusively without waiting). In the object store, `nbflow gc` removes bundles that no
kept run, pending submit or schedule names (:func:`orphan_bundles`), once they are older than a
grace period, so a folder being submitted right now is safe.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import zipfile

from nbflow.compiler.bundle import Bundle, bundle_key, content_hash_of
from nbflow.errors import BundleError

log = logging.getLogger("nbflow.worker.bundles")

STALE_TMP_S = 3600          # a temp unpack dir older than this is a leftover of a killed worker
LOCKS = ".locks"            # <cache>/.locks/<hash>: flock'ed (shared) while a task uses it
PREFIX = "bundles/"


def grace_s() -> float:
    """How long an unreferenced bundle stays in the object store after it was last uploaded or
    reused (a submit uploads the bundle before it records the run that names it)."""
    return float(os.environ.get("NBFLOW_BUNDLE_GRACE_S", "3600"))


def cache_max_bytes() -> int:
    return int(float(os.environ.get("NBFLOW_BUNDLE_CACHE_MB", "1024")) * 2**20)


def enabled(flag: bool | None = None) -> bool:
    """Whether submits bundle the notebook's folder: ``flag`` if given, else NBFLOW_BUNDLE."""
    if flag is not None:
        return flag
    return os.environ.get("NBFLOW_BUNDLE", "1").strip().lower() not in ("0", "false", "no", "off")


async def upload(art, bundle: Bundle) -> bool:
    """Store the bundle unless the store has it already (then renew its grace period against
    `nbflow gc`: this submit is about to name it). True when it was uploaded."""
    if await art.touch(bundle.key):
        return False
    await art.put_bytes(bundle.key, bundle.data)
    return True


def hash_of(name: str) -> str | None:
    """The bundle hash an artifact name stands for, or None for a task artifact."""
    if name.startswith(PREFIX) and name.endswith(".zip"):
        return name[len(PREFIX):-len(".zip")]
    return None


async def orphan_bundles(art, wanted: set[str], now: float | None = None,
                         grace: float | None = None) -> list:
    """Infos of the bundles in the object store that no hash in ``wanted`` names and that were
    last uploaded or reused longer than the grace period ago (what `nbflow gc` removes)."""
    now = now or time.time()
    grace = grace_s() if grace is None else grace
    out = []
    for info in await art.list():
        h = hash_of(info.name)
        if h is None or h in wanted:
            continue
        t = await art.stored_at(info.name)
        if t is None or t > now - grace:
            continue
        out.append(info)
    return out


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
        self.evicted = 0
        self.in_use: dict[str, int] = {}     # hash -> tasks of this process using it
        self._sizes: dict[str, int] = {}     # hash -> bytes unpacked

    def _lockfile(self, h: str) -> int:
        d = os.path.join(self.root, LOCKS)
        os.makedirs(d, exist_ok=True)
        return os.open(os.path.join(d, h), os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.asynccontextmanager
    async def using(self, h: str):
        """``async with cache.using(h) as path``: bundle ``h`` unpacked, and kept (never evicted,
        by this process or another on the host) until the block ends."""
        os.makedirs(self.root, exist_ok=True)
        fd = self._lockfile(h)
        try:
            # an evictor holds the lock only while it removes the dir: wait it out
            try:                      # at once when nobody evicts it (no thread hop per task)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                await asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd,
                                                                 fcntl.LOCK_SH)
            self.in_use[h] = self.in_use.get(h, 0) + 1
            try:
                before = self.unpacked
                path = await self.get(h)
                if self.unpacked != before:         # the cache grew: keep it bounded
                    await asyncio.get_running_loop().run_in_executor(None, self.trim)
                yield path
            finally:
                self.in_use[h] -= 1
                if not self.in_use[h]:
                    del self.in_use[h]
        finally:
            os.close(fd)              # releases the lock

    def _evict(self, h: str) -> bool:
        """Remove unpacked bundle ``h`` unless a task (of any process) is using it."""
        if h in self.in_use:
            return False
        fd = self._lockfile(h)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False          # in use
            gone = os.path.join(self.root, f".{h}.evict.{secrets.token_hex(3)}")
            try:
                os.rename(os.path.join(self.root, h), gone)   # atomic: never half a bundle
            except OSError:
                return False
            shutil.rmtree(gone, ignore_errors=True)
            self.evicted += 1
            return True
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[float, int, str]]:
        """(last used, bytes, hash) of each unpacked bundle, least recently used first."""
        out = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for n in names:
            p = os.path.join(self.root, n)
            if n.startswith(".") or not os.path.isdir(p):
                continue
            try:
                used = os.stat(p).st_mtime
            except OSError:
                continue
            if n not in self._sizes:              # a bundle's content never changes
                self._sizes[n] = _du(p)
            out.append((used, self._sizes[n], n))
        return sorted(out)

    def trim(self, max_bytes: int | None = None) -> list[str]:
        """Evict least recently used bundles (not in use) until the cache is under
        ``max_bytes`` (NBFLOW_BUNDLE_CACHE_MB). Returns the hashes evicted."""
        limit = cache_max_bytes() if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(b for _, b, _ in entries)
        out = []
        for _, size, h in entries:
            if total <= limit:
                break
            if self._evict(h):
                total -= size
                out.append(h)
        return out

    def sweep(self) -> None:
        """Remove temp dirs left by a worker killed mid-unpack, bundles no task of this host
        used for NBFLOW_BUNDLE_CACHE_DAYS (7), and trim the cache to its size limit."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        now = time.time()
        unused = float(os.environ.get("NBFLOW_BUNDLE_CACHE_DAYS", "7")) * 86400
        for n in names:
            p = os.path.join(self.root, n)
            if n == LOCKS or not os.path.isdir(p):
                continue
            try:
                age = now - os.stat(p).st_mtime
            except OSError:
                continue
            if n.startswith("."):
                if age > STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            elif age > unused:
                self._evict(n)
        self.trim()

    async def get(self, h: str) -> str:
        """The path of bundle ``h`` unpacked (downloading it first if needed). A task uses
        :meth:`using` instead, which also keeps the bundle from eviction while it runs."""
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


def _du(path: str) -> int:
    n = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                n += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return n


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


_NOT_WRITES = {"__pycache__", ".ipynb_checkpoints"}    # made by imports and Jupyter, not the task


def written_files(bundle_dir: str, folder: str) -> list[str]:
    """Files in a task's private copy of its bundle (``folder``) that the task created or
    changed (relative paths, sorted): they vanish with the task's work dir."""
    out = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if x not in _NOT_WRITES]
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, folder)
            try:
                st = os.lstat(p)
                orig = os.lstat(os.path.join(bundle_dir, rel))
            except FileNotFoundError:
                out.append(rel)                      # created
                continue
            except OSError:
                continue
            if st.st_size != orig.st_size or st.st_mtime_ns != orig.st_mtime_ns:
                out.append(rel)                      # changed (the copy kept the mtimes)
    return sorted(out)


def _tree(root: str) -> tuple[set[str], set[str]]:
    """(files, dirs) under ``root``, relative, without caches of imports and Jupyter."""
    files, dirs = set(), set()
    for d, sub, names in os.walk(root):
        sub[:] = [x for x in sub if x not in _NOT_WRITES]
        rel = os.path.relpath(d, root)
        dirs.update(os.path.normpath(os.path.join(rel, x)) for x in sub)
        files.update(os.path.normpath(os.path.join(rel, x)) for x in names)
    return files, dirs


_TREES: dict[str, tuple[set[str], set[str]]] = {}     # unpacked bundles never change


def folder_state(bundle_dir: str, folder: str) -> tuple[list[str], bool]:
    """What a task did to its copy of the bundle (``folder``): the files it created or changed
    (as :func:`written_files`), and whether the copy is still the bundle exactly (nothing
    written, removed or made, caches of imports aside) — then the next task may use it."""
    written = written_files(bundle_dir, folder)
    if written:
        return written, False
    if bundle_dir not in _TREES:
        if len(_TREES) > 64:
            _TREES.clear()
        _TREES[bundle_dir] = _tree(bundle_dir)
    return written, _tree(folder) == _TREES[bundle_dir]


class TaskFolders:
    """Private copies of unpacked bundles, one task at a time each, reused while unchanged: a
    task gets a copy no other task is using, and when it ends the copy goes back for the next
    task only if :func:`folder_state` finds it is still the bundle exactly; else it is removed.
    So relative writes never reach another task, and a task that only reads does not pay a copy
    (nor its kernel a change of directory). Copies live in work dirs named after the worker's
    pid (:mod:`nbflow.worker.workdirs`): swept with them if the worker dies."""

    def __init__(self, keep: int = 4):
        self.keep = keep                          # bundles whose free copies are kept
        self.free: dict[str, list[str]] = {}      # bundle dir -> free copies, oldest bundle first
        self._lock = threading.Lock()

    def take_free(self, bundle_dir: str) -> str | None:
        """A free copy of the bundle, or None (then :meth:`take` makes one)."""
        with self._lock:
            copies = self.free.get(bundle_dir)
            return copies.pop() if copies else None

    def take(self, bundle_dir: str) -> str:
        free = self.take_free(bundle_dir)
        if free is not None:
            return free
        from nbflow.worker import workdirs

        dest = os.path.join(workdirs.make("folder", os.path.basename(bundle_dir)[:16]), "folder")
        shutil.copytree(bundle_dir, dest, symlinks=False)
        return dest

    def give(self, bundle_dir: str, folder: str, unchanged: bool) -> list[str]:
        """Give a copy back; the dirs to remove (the caller removes them off the critical path)."""
        if not unchanged or not os.path.isdir(bundle_dir):
            return [os.path.dirname(folder)]
        with self._lock:
            copies = self.free.pop(bundle_dir, [])
            copies.append(folder)
            self.free[bundle_dir] = copies        # the newest bundle last
            drop = []
            while len(self.free) > self.keep:
                old = next(iter(self.free))
                drop += [os.path.dirname(f) for f in self.free.pop(old)]
        return drop

    def clear(self) -> list[str]:
        with self._lock:
            drop = [os.path.dirname(f) for fs in self.free.values() for f in fs]
            self.free.clear()
        return drop


def writes_warning(files: list[str], shown: int = 10) -> str:
    names = ", ".join(files[:shown]) + (f" and {len(files) - shown} more"
                                        if len(files) > shown else "")
    return (f"nbflow: warning: this task wrote {len(files)} file(s) relative to its folder: "
            f"{names}. The task runs in a private copy of the notebook's folder that is "
            f"discarded when it ends, so they are gone now; write files you want to keep to an "
            f"absolute path (a shared disk or bucket), or pass the data on as an output "
            f"variable\n")


def note_writes(notebook_path: str, files: list[str]) -> None:
    """Say in the executed notebook (the task's log) which files the task wrote that vanish."""
    import nbformat

    nb = nbformat.read(notebook_path, as_version=4)
    cell = nbformat.v4.new_code_cell(
        source="# nbflow: files this task wrote relative to its folder",
        metadata={"tags": ["nbflow-writes"]})
    cell.id = "nbflow-writes"
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr",
                                           text=writes_warning(files))]
    nb.cells.append(cell)
    nbformat.write(nb, notebook_path)


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
