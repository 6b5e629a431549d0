"""The warm kernel pool: kernels started ahead of demand, handed out one task at a time.

Where the time of a task goes, and why a pool: docs/kernels.md (measured figures).
The papermill engine that uses the pool is :mod:`nbflow.worker.kernels.papermill`; it runs a
task's cells in one execute (:mod:`nbflow.worker.kernels.onecall`), or one execute per cell
(:mod:`nbflow.worker.kernels.cellrun`) where that cannot be equivalent.

Isolation
---------
``run`` (default): a kernel serves the tasks of one run: consecutive tasks of a run reuse it
    (the user namespace is reset between them, as below), and it never serves another run — a
    kernel left over from another run is retired and a never-used spare is taken instead. This is
    how a notebook behaves in Jupyter (one kernel for all its cells), as fast as ``reuse`` within a
    pipeline (~33 ms per task instead of a ~0.55 s kernel start on a saturated pool), and correct
    across runs: a local module edited between two runs is imported afresh.
    Warm runs stay warm: once a newer run has taken the never-used spare, the idle kernel of an
    older run (none of whose kernels is busy) is retired and a fresh spare started in the
    background, so the next run finds one ready instead of paying a kernel start on its critical
    path. If a run whose kernel was retired that way comes back (runs interleave on this worker),
    retiring ahead is paused for a minute: kernels are then only retired on demand, as before.
``fresh``: a kernel runs one task, then is shut down in a background thread and the
    pool refills in the background. Same semantics as a papermill run (nothing leaks between
    tasks: modules, globals, env, threads). While a warm kernel is waiting a task costs ~38 ms;
    back-to-back tasks on a saturated pool are bounded by the kernel start rate (~0.55 s/kernel/
    CPU), which is why the pool holds one spare kernel per worker slot plus one.
``reuse``: the same kernel runs consecutive tasks, of any run. Between tasks the user namespace
    is cleared (``InteractiveShell.reset(new_session=True)``: globals, In/Out, execution count)
    and cwd, ``sys.path`` and ``os.environ`` are restored to the kernel's pristine ones, but
    imported modules, their state and threads are shared. Opt in per task (``--isolation``) or
    with ``NBFLOW_ISOLATION``. A kernel that is killed (timeout/cancel) or died is never handed
    out again. ``setup_hash`` gives affinity only: a task prefers an idle kernel that last ran the
    same setup cells (its imports are warm in ``sys.modules``); setup cells always run again,
    because skipping them would be wrong when a task mutates what setup made.

When the reset happens: a kernel released by a task that ran through the one-execute path
(:mod:`nbflow.worker.kernels.onecall`) goes back idle *dirty*, and the next task resets it at the
start of its own single execute (so a chain's next task does not wait for a reset request);
one still idle after ``idle_reset_s`` (``NBFLOW_IDLE_RESET_S``, 1 s) is reset in the
background, so its last task's objects are not held while it idles. A caller that runs cells one
execute each gets it reset by ``acquire`` (``prepare``).

Each task runs with ``os.chdir(cwd)`` and ``sys.path[0] = cwd`` set in the kernel first, so
relative paths and local imports behave as in Jupyter (where the kernel starts in the notebook's
folder).

One kernel (its control code, kill, shutdown) is :mod:`nbflow.worker.kernels.kernel`. The
process-global pools: :mod:`nbflow.worker.kernels.registry` — :func:`configure` or env vars
``NBFLOW_POOL_SIZE`` (default 2 = one worker slot + one spare), ``NBFLOW_ISOLATION``
(``run``/``fresh``/``reuse``), ``NBFLOW_KERNEL`` (``python3``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid

import zmq
from jupyter_client import KernelManager

from nbflow.errors import KernelStartError
from nbflow.worker.kernels.cellrun import POLL_SLICE, RunControl
from nbflow.worker.kernels.kernel import PooledKernel

log = logging.getLogger("nbflow.worker.kernels.pool")
_IPC_PATH_MAX = 100      # sun_path is 108 bytes; jupyter_client appends "-<n>" to the name

ISOLATIONS = ("run", "fresh", "reuse")
# a kernel released dirty (its reset left to the next task's one execute) and still idle after
# this long is reset in the background (a chain's next task comes within milliseconds)
IDLE_RESET_S = float(os.environ.get("NBFLOW_IDLE_RESET_S", "1.0"))
REUSING = ("run", "reuse")    # isolations whose kernels are reset and kept after a task


class KernelPool:
    """Kernels started ahead of demand. ``acquire`` never starts a kernel itself when one is warm;
    ``release`` never waits for a shutdown."""

    def __init__(self, size: int = 2, isolation: str = "run", kernel_name: str = "python3",
                 start_timeout: float = 60.0, shutdown_wait: float = 2.0,
                 idle_reset_s: float | None = None):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
        self.size = max(1, int(size))
        self.isolation = isolation
        self.kernel_name = kernel_name
        self.start_timeout = start_timeout
        self.shutdown_wait = shutdown_wait
        self.idle_reset_s = IDLE_RESET_S if idle_reset_s is None else idle_reset_s
        self._ctx = zmq.Context()
        # everything a kernel leaves on disk (ipc sockets, connection files) lives here: removed
        # at shutdown, and by workdirs.clean_stale once this process is gone (its pid is named)
        self._home = tempfile.mkdtemp(prefix=f"nbflow-kernels-{os.getpid()}-")
        self._tcp_noted = False
        self._cond = threading.Condition()
        self._idle: list[PooledKernel] = []
        self._busy: set[PooledKernel] = set()
        self._recycling = 0                 # reuse kernels being reset in the background
        self._recycling_scopes: list = []   # their runs ("run" isolation)
        self._starting = 0
        self._start_error: BaseException | None = None
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._newest_scope: str | None = None   # "run": the run that acquired most recently
        self._retired: dict[str, None] = {}     # runs whose idle kernel was retired ahead
        self._ahead_off_until = 0.0             # monotonic: retiring ahead paused until then
        self.retired_ahead = 0                  # kernels retired ahead (for tests)
        self.started = 0                    # kernels started over the pool's life (for tests)
        with self._cond:
            self._fill()

    # -- background work

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=self._tracked, args=(target, *args), daemon=True,
                             name=f"nbflow-pool-{target.__name__}")
        self._threads.add(t)
        t.start()

    def _tracked(self, target, *args) -> None:
        try:
            target(*args)
        finally:
            self._threads.discard(threading.current_thread())

    def _fill(self, urgent: bool = False) -> None:
        """Start kernels until the target is met (called with the lock held). In ``fresh``
        isolation an acquire (``urgent``) only starts one when no spare is left: a start burns
        ~0.5 s of CPU, better spent after the task, on release."""
        if self._closed or self._start_error is not None:
            return
        if self.isolation == "fresh":
            have = len(self._idle) + self._starting
            if urgent and have:
                return
        else:
            have = len(self._idle) + len(self._busy) + self._recycling + self._starting
        want = self.size - have
        if self.started == 0 and not urgent:
            # a new pool: its first kernel starts alone and the others once it is ready — a
            # cold start waits for the first, and kernels starting together on few cores
            # each take as long as all of them
            if self._starting:
                return
            want = min(1, want)
        for _ in range(want):
            self._starting += 1
            self._spawn(self._start_one)

    def _start_kernel(self) -> PooledKernel:
        # unix sockets in the pool's private (0700) dir: no loopback TCP ports to other users
        ipc = os.path.join(self._home, f"k-{uuid.uuid4().hex[:12]}") if os.name == "posix" else ""
        if len(ipc.encode()) > _IPC_PATH_MAX:
            # a unix socket path holds ~107 bytes: under a long TMPDIR use loopback TCP (the
            # connection file, 0600 in the pool's 0700 dir, holds the key every message needs)
            if not self._tcp_noted:
                self._tcp_noted = True
                log.warning("nbflow: the temp dir %s is too long a path for kernel sockets; "
                            "kernels listen on 127.0.0.1 instead", self._home)
            ipc = ""
        km = KernelManager(kernel_name=self.kernel_name, context=self._ctx,
                           connection_file=os.path.join(self._home,
                                                        f"kernel-{uuid.uuid4().hex[:12]}.json"),
                           **({"transport": "ipc", "ip": ipc} if ipc else {}))
        km.shutdown_wait_time = self.shutdown_wait
        # in-memory history: concurrent kernels do not contend for one history.sqlite
        km.start_kernel(cwd=self._home, extra_arguments=["--HistoryManager.hist_file=:memory:"])
        kc = km.client()
        try:
            kc.start_channels(hb=False)     # liveness comes from the process, not heartbeats
            kc.wait_for_ready(timeout=self.start_timeout)
            k = PooledKernel(km=km, kc=kc, home=self._home, ready_at=time.time(), path0=self._home)
            info = kc.kernel_info(reply=True, timeout=self.start_timeout)
            k.language_info = info["content"].get("language_info", {})
            k.warm_up()
            self.started += 1
            return k
        except BaseException:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise

    def _start_one(self) -> None:
        try:
            k = self._start_kernel()
        except BaseException as e:  # noqa: BLE001 - reported to the next acquire
            log.error("nbflow: kernel %r failed to start: %s", self.kernel_name, e)
            with self._cond:
                self._starting -= 1
                self._start_error = e
                self._cond.notify_all()
            return
        with self._cond:
            self._starting -= 1
            if self._closed:
                close_now = True
            else:
                close_now = False
                self._idle.append(k)
                self._cond.notify_all()
                self._fill()                # a new pool's other kernels start after its first
        if close_now:
            k.kill()
            k.close()

    def _recycle(self, k: PooledKernel) -> None:
        try:
            k.recycle()
            k.dirty = False
            ok = k.alive()
        except Exception as e:  # noqa: BLE001
            log.warning("nbflow: kernel %s could not be reset, discarding it: %s", k.id, e)
            ok = False
        with self._cond:
            self._recycling -= 1
            self._recycling_scopes.remove(k.scope)
            back = ok and not self._closed
            if back:
                self._idle.append(k)
            self._cond.notify_all()
            self._fill()
            self._keep_spare()
        if not back:        # (also when the pool shut down meanwhile: no kernel left running)
            k.kill()
            k.close()

    def _idle_reset(self, k: PooledKernel, released: int) -> None:
        """A kernel left dirty that no task took within ``idle_reset_s`` is reset in the background
        after all: what its last task holds (memory, open files) is not kept while it idles."""
        with self._cond:
            if (self._closed or not k.dirty or k.released != released
                    or k not in self._idle):
                return
            self._idle.remove(k)
            self._recycling += 1
            self._recycling_scopes.append(k.scope)
        self._recycle(k)

    def _keep_spare(self) -> None:
        """``run`` isolation, called with the lock held: when no never-used kernel is idle or
        starting, retire the least recently used idle kernel of an older run that holds no busy
        kernel, and start a fresh one in its place (in the background), so that the next run does
        not wait for a kernel start. Nothing crosses runs: the retired kernel is shut down."""
        if (self.isolation != "run" or self._closed or self._start_error is not None
                or self._starting or time.monotonic() < self._ahead_off_until
                or any(k.scope is None for k in self._idle)):
            return
        active = {k.scope for k in self._busy} | set(self._recycling_scopes)
        active.add(self._newest_scope)
        old = next((k for k in self._idle if k.scope not in active), None)
        if old is None:
            return
        self._idle.remove(old)
        self._retired[old.scope] = None
        while len(self._retired) > 256:
            self._retired.pop(next(iter(self._retired)))
        self.retired_ahead += 1
        self._spawn(old.close)
        self._fill()

    # -- API

    def _pick(self, scope: str | None, setup_hash: str | None) -> PooledKernel | None:
        """The idle kernel to hand out, or None to wait (called with the lock held)."""
        if self.isolation != "run":
            return next((k for k in self._idle if setup_hash and k.setup_hash == setup_hash),
                        self._idle[0])
        # a kernel serves one run: the same run's first, then a never-used one; a kernel of
        # another run is retired (its modules must not leak into this run)
        mine = [k for k in self._idle if k.scope == scope]
        if mine:
            return mine[0]
        if scope in self._recycling_scopes:
            return None                        # its own kernel is being reset: ~ms
        unused = [k for k in self._idle if k.scope is None]
        if unused:
            return unused[0]
        self._spawn(self._idle.pop(0).close)
        self._fill()
        return None

    def acquire(self, setup_hash: str | None = None, cwd: str | None = None,
                timeout: float | None = None, control: RunControl | None = None,
                scope: str | None = None, prepare: bool = True) -> PooledKernel:
        """A warm kernel, entered into ``cwd``. Waits for one if none is idle; returns None when
        ``control`` says the task was cancelled or timed out while waiting.

        ``prepare=False``: the caller resets the kernel if it is ``dirty`` and enters ``cwd``
        itself, in its first execute (:mod:`nbflow.kernelside`); the kernel comes as it is."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("kernel pool is shut down")
                k = self._pick(scope, setup_hash) if self._idle else None
                if k is not None:
                    self._idle.remove(k)
                    if not k.alive():          # died while idle: drop it and look again
                        self._spawn(k.close)
                        self._fill()
                        continue
                    self._busy.add(k)
                    self._fill(urgent=True)
                    if self.isolation == "run":
                        if scope in self._retired:   # runs interleave here: retire on demand only
                            del self._retired[scope]
                            self._ahead_off_until = time.monotonic() + 60.0
                        self._newest_scope = scope
                        k.scope = scope
                        self._keep_spare()
                    break
                if self._start_error is not None and self._starting == 0:
                    e, self._start_error = self._start_error, None
                    raise KernelStartError(f"kernel {self.kernel_name!r} failed to start: {e}") from e
                if control is not None and control.interrupted():
                    return None
                if end is not None and time.monotonic() >= end:
                    raise TimeoutError("no kernel became ready in time")
                self._fill()
                self._cond.wait(POLL_SLICE if control is not None or self._idle else 1.0)
        k.setup_hash = setup_hash
        k.scope = scope
        if prepare:
            self.prepare(k, cwd)
        return k

    def prepare(self, k: PooledKernel, cwd: str | None) -> None:
        """Reset an acquired kernel the last task left ``dirty`` and enter ``cwd`` (one execute
        each, when needed). On failure the kernel is discarded and the error raised."""
        try:
            if k.dirty:
                k.recycle()
                k.dirty = False
            if cwd:
                k.enter(cwd)
        except Exception:
            self.release(k, reuse=False)
            raise

    def release(self, k: PooledKernel, reuse: bool | None = None, defer: bool = False) -> None:
        """Give a kernel back: recycled (``reuse``) or discarded, both in the background.
        ``defer``: keep it idle as it is, marked ``dirty``: whoever acquires it next resets it
        first (in its own first execute, or ``acquire`` does) — a chain's next task does not
        wait for a separate reset round trip."""
        if reuse is None:
            reuse = self.isolation in REUSING
        k.uses += 1
        with self._cond:
            self._busy.discard(k)
            keep = reuse and not self._closed and k.alive()
            if keep and defer:
                k.dirty = True
                k.released += 1
                self._idle.append(k)
                self._cond.notify_all()
                self._fill()
                self._keep_spare()
                t = threading.Timer(self.idle_reset_s, self._idle_reset, (k, k.released))
                t.daemon = True
                t.start()
                return
            if keep:
                self._recycling += 1
                self._recycling_scopes.append(k.scope)
            self._fill()
        if keep:
            self._spawn(self._recycle, k)
        else:
            self._spawn(k.close)

    def resize(self, size: int) -> None:
        """Grow (kernels start in the background) or shrink (idle kernels over ``size`` are
        closed; busy ones when a later resize finds them idle) to ``size`` kernels."""
        drop = []
        with self._cond:
            self.size = max(1, int(size))
            over = (len(self._idle) + len(self._busy) + self._recycling + self._starting
                    - self.size)
            while over > 0 and self._idle:
                drop.append(self._idle.pop())
                over -= 1
            self._fill()
        for k in drop:
            self._spawn(k.close)

    @property
    def kernels(self) -> int:
        """Kernels alive or starting (idle, busy, being reset)."""
        with self._cond:
            return len(self._idle) + len(self._busy) + self._recycling + self._starting

    def stats(self) -> dict:
        with self._cond:
            return {"idle": len(self._idle), "busy": len(self._busy), "starting": self._starting,
                    "recycling": self._recycling, "started": self.started,
                    "size": self.size, "isolation": self.isolation}

    def wait_ready(self, n: int | None = None, timeout: float = 60.0) -> None:
        """Block until ``n`` (default: the pool size) kernels are idle (for benchmarks and tests)."""
        n = self.size if n is None else n
        end = time.monotonic() + timeout
        with self._cond:
            while len(self._idle) < n:
                if self._start_error is not None and self._starting == 0:
                    raise KernelStartError(str(self._start_error))
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{n} kernels not ready after {timeout} s")
                self._cond.wait(min(left, 1.0))

    def shutdown(self, wait: float = 10.0) -> None:
        """Stop every kernel (idle and busy) and wait for background work, up to ``wait`` s."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            ks = self._idle + list(self._busy)
            self._idle, self._busy = [], set()
            self._cond.notify_all()
        for k in ks:
            k.kill()
            k.close()
        end = time.monotonic() + wait
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))
        if not any(t.is_alive() for t in self._threads):
            self._ctx.destroy(linger=0)
        shutil.rmtree(self._home, ignore_errors=True)   # ipc socket files of killed kernels


def setup_hash(nb) -> str | None:
    """Hash of the code cells before the ``parameters`` cell (the task's setup), or None."""
    h = hashlib.sha256()
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            return h.hexdigest()[:16]
        if cell.cell_type == "code":
            h.update(cell.source.encode() + b"\0")
    return None
