"""The warm kernel pool, plugged into papermill as the engine ``nbflow``.

A task is a small notebook, so what costs is not the code but the machinery around it. Measured on
a 2-CPU box (python3 kernel, ipykernel 7.4, nbclient 0.11, papermill 2.7; see the report of
issue "Performance"):

=====================================================  ==========
kernel start -> ready                                  ~0.55 s
one execute round trip in a warm kernel (``x=1``)      ~2.5-3.5 ms
papermill default engine (nbclient), trivial task      ~0.88 s p50
  = kernel start ~0.55 s + a new client's ``wait_for_ready`` (0.2 s of iopub quiet) + graceful
  shutdown (~0.05 s; ~1 in 30 stalls ~3 s) + papermill/nbformat bookkeeping (~10 ms)
this engine, ``reuse``, back-to-back tasks             ~33 ms p50
this engine, ``fresh``, a warm kernel waiting          ~38 ms p50
this engine, ``fresh``, back-to-back on a 2-kernel pool ~0.3 s p50 (bound by kernel starts)
=====================================================  ==========

(20 trivial 6-cell task notebooks through ``runner.run_task``, quiet 2-CPU box.) What is left
per task: ~7 kernel round trips (prelude + 6 cells, ~18 ms, the kernel's own per-request cost)
and papermill's parameterize/validate/write (~10 ms). Kernel-side tweaks that measured well:
``gc.freeze()`` after start plus an in-memory IPython history: the ``reset`` between reused tasks
(a full ``gc.collect`` and history-db writes) went from ~50 ms to ~1 ms, and concurrent kernels no
longer share one ``history.sqlite``.
Pipelining all cells' execute requests saved <3 ms for 6 cells and IPC transport nothing: not
done.

So the engine never starts a kernel or a client on the critical path: a :class:`KernelPool`
starts kernels (manager + started, ready blocking client) ahead of demand in background threads,
and :class:`WarmEngine` runs the cells itself with ``kc.execute`` and iopub collection (the same
bookkeeping as nbclient: ``output_from_msg``, ``clear_output(wait)``, display ids), calling the
papermill ``nb_man`` hooks so the executed notebook looks as papermill writes it.

Isolation
---------
``run`` (default): a kernel serves the tasks of one run: consecutive tasks of a run reuse it
    (the user namespace is reset between them, as below), and it never serves another run — a
    kernel left over from another run is retired and a never-used spare is taken instead. This is
    how a notebook behaves in Jupyter (one kernel for all its cells), as fast as ``reuse`` within a
    pipeline (~33 ms per task instead of a ~0.55 s kernel start on a saturated pool), and correct
    across runs: a local module edited between two runs is imported afresh.
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

Each task runs with ``os.chdir(cwd)`` and ``sys.path[0] = cwd`` set in the kernel first, so
relative paths and local imports behave as in Jupyter (where the kernel starts in the notebook's
folder).

Timeouts and cancellation: the engine owns the kernel, so :class:`RunControl` (passed by the
runner as the engine kwarg ``nbflow_control``) carries a monotonic deadline and a cancel event; the
cell loop polls in short slices, and on either it SIGKILLs the kernel, records an error output in
the running cell and stops, and papermill raises ``PapermillExecutionError`` as for any cell error.

Configuration: :func:`configure` or env vars ``NBFLOW_POOL_SIZE`` (default 2 = one worker slot +
one spare), ``NBFLOW_ISOLATION`` (``run``/``fresh``/``reuse``), ``NBFLOW_KERNEL`` (``python3``).
"""
from __future__ import annotations

import sys


def __getattr__(name):  # PEP 562
    # Importing this module first imports papermill, whose engine registry loads entry points,
    # i.e. this very module, half-initialised: give it a placeholder; the real class is
    # registered at the bottom of this file.
    if name == "WarmEngine":
        return None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


import atexit  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import nbformat  # noqa: E402
import zmq  # noqa: E402
from jupyter_client import KernelManager  # noqa: E402
from papermill.engines import Engine, papermill_engines  # noqa: E402

log = logging.getLogger("nbflow.worker.kernels.pool")

ISOLATIONS = ("run", "fresh", "reuse")
REUSING = ("run", "reuse")    # isolations whose kernels are reset and kept after a task
POLL_SLICE = 0.1          # seconds between deadline/cancel/liveness checks while a cell is quiet


class KernelStartError(RuntimeError):
    """The pool could not start a kernel (bad kernel name, broken environment): a worker bug."""


# --------------------------------------------------------------------------------------------
# the run's control block: what the runner tells the engine, and what the engine tells back


@dataclass
class RunControl:
    """Passed as the papermill engine kwarg ``nbflow_control``; the engine fills the lower half."""
    deadline: float | None = None          # time.monotonic() when the attempt must be over
    timeout: float | None = None           # the --timeout in seconds (for the message only)
    cancel: threading.Event | None = None  # set -> the kernel is killed, the task cancelled
    isolation: str | None = None
    scope: str | None = None               # "run" isolation: kernels never cross runs           # None -> the pool's default
    cwd: str | None = None                 # the kernel's cwd and sys.path[0] (else the process's)
    # filled by the engine
    reason: str = ""                       # "timeout" | "cancelled" | "died" | ""
    message: str = ""                      # one line, e.g. "TimeoutError: task exceeded ..."
    kernel_id: str = ""
    kernel_pid: int = 0
    kernel_ready_at: float = 0.0           # time.time() when the kernel became ready
    kernel_uses: int = 0                   # tasks this kernel ran before this one

    def interrupted(self) -> str:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        return ""


def human_seconds(s: float) -> str:
    """600 -> '10m', 90 -> '1m30s', 3600 -> '1h', 2.5 -> '2.5s'."""
    if s < 60:
        return f"{s:g}s"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v)


def interruption_message(reason: str, timeout: float | None) -> tuple[str, str]:
    """(ename, evalue) recorded in the cell for a kill by the worker."""
    if reason == "timeout":
        t = timeout or 0
        return "TimeoutError", f"task exceeded its --timeout of {human_seconds(t)} ({t:g} s)"
    return "CancelledError", "task cancelled: its kernel was stopped"


# --------------------------------------------------------------------------------------------
# one kernel


_PRELUDE = ("(lambda os, sys, cwd, prev: (os.chdir(cwd), sys.path.__setitem__(0, cwd) "
            "if sys.path and sys.path[0] == prev else sys.path.insert(0, cwd)))"
            "(__import__('os'), __import__('sys'), {cwd!r}, {prev!r})")
# at warm-up: remember the pristine sys.path and environment (sys.modules outlives resets)
_WARM = ("import gc as __g, os as __o, sys as __s, types as __t\n"
         "__m = __t.ModuleType('_nbflow_pool')\n__m.path = list(__s.path)\n"
         "__m.environ = dict(__o.environ)\n__s.modules['_nbflow_pool'] = __m\n"
         "__g.collect()\n__g.freeze()\ndel __g, __o, __s, __t, __m")
# between reused tasks: globals, In/Out and counts go; sys.path, env vars and cwd come back
_RESET = ("get_ipython().reset(new_session=True)\n"
          "(lambda os, sys, m: (sys.path.__setitem__(slice(None), m.path), os.environ.clear(), "
          "os.environ.update(m.environ), os.chdir({home!r})))"
          "(__import__('os'), __import__('sys'), __import__('sys').modules['_nbflow_pool'])")


@dataclass(eq=False)
class PooledKernel:
    """A started kernel with a started, ready blocking client. One task at a time."""
    km: KernelManager
    kc: Any                                # BlockingKernelClient
    home: str                              # the dir it was started in (its initial sys.path[0])
    ready_at: float                        # time.time()
    language_info: dict = field(default_factory=dict)
    uses: int = 0
    setup_hash: str | None = None
    scope: str | None = None               # "run" isolation: the run this kernel serves
    path0: str = ""                        # what sys.path[0] is now (we set it)
    dead: bool = False

    @property
    def id(self) -> str:
        return self.km.kernel_id or ""

    @property
    def pid(self) -> int:
        p = getattr(self.km.provisioner, "process", None)
        return p.pid if p is not None else 0

    def alive(self) -> bool:
        if self.dead:
            return False
        p = getattr(self.km.provisioner, "process", None)
        if p is None or p.poll() is not None:
            self.dead = True
        return not self.dead

    def kill(self) -> None:
        """SIGKILL the kernel process now (safe from any thread); it is never used again."""
        self.dead = True
        p = getattr(self.km.provisioner, "process", None)
        if p is not None and p.poll() is None:
            try:
                # jupyter_client starts kernels in their own session: take their children too
                if os.name == "posix" and os.getpgid(p.pid) == p.pid != os.getpgid(0):
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
            except OSError:
                try:
                    p.kill()
                except OSError:
                    pass

    def run_quiet(self, code: str, timeout: float = 30.0) -> dict:
        """Run control code silently (no history, no execution count); return the reply content."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                                 stop_on_error=False)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.alive():
                self.dead = True
                raise RuntimeError(f"kernel {self.id} did not answer control code")
            try:
                msg = self.kc.shell_channel.get_msg(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def enter(self, cwd: str) -> None:
        """Point the kernel at the task's folder, as Jupyter starts a kernel in the notebook's."""
        reply = self.run_quiet(_PRELUDE.format(cwd=cwd, prev=self.path0))
        if reply.get("status") != "ok":
            raise RuntimeError(f"cannot enter {cwd!r} in kernel: {reply.get('evalue')}")
        self.path0 = cwd

    def recycle(self) -> None:
        """Clear the user namespace and go home, for the next task in ``reuse`` isolation."""
        reply = self.run_quiet(_RESET.format(home=self.home))
        if reply.get("status") != "ok":
            raise RuntimeError(f"reset failed: {reply.get('ename')}: {reply.get('evalue')}")
        self.path0 = self.home

    def close(self) -> None:
        """Shut down (graceful, then kill). Slow at times (~3 s): call off the critical path."""
        try:
            self.kc.stop_channels()
        except Exception:
            pass
        try:
            if self.dead:
                self.km.shutdown_kernel(now=True)
            else:
                self.km.shutdown_kernel(now=False)
        except Exception as e:  # noqa: BLE001 - best effort; make sure the process is gone
            log.debug("kernel %s shutdown: %s", self.id, e)
            self.kill()
            try:
                self.km.cleanup_resources()
            except Exception:
                pass


# --------------------------------------------------------------------------------------------
# the pool


class KernelPool:
    """Kernels started ahead of demand. ``acquire`` never starts a kernel itself when one is warm;
    ``release`` never waits for a shutdown."""

    def __init__(self, size: int = 2, isolation: str = "run", kernel_name: str = "python3",
                 start_timeout: float = 60.0, shutdown_wait: float = 2.0):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
        self.size = max(1, int(size))
        self.isolation = isolation
        self.kernel_name = kernel_name
        self.start_timeout = start_timeout
        self.shutdown_wait = shutdown_wait
        self._ctx = zmq.Context()
        self._home = tempfile.mkdtemp(prefix="nbflow-kernels-")
        self._cond = threading.Condition()
        self._idle: list[PooledKernel] = []
        self._busy: set[PooledKernel] = set()
        self._recycling = 0                 # reuse kernels being reset in the background
        self._recycling_scopes: list = []   # their runs ("run" isolation)
        self._starting = 0
        self._start_error: BaseException | None = None
        self._closed = False
        self._threads: set[threading.Thread] = set()
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
        for _ in range(self.size - have):
            self._starting += 1
            self._spawn(self._start_one)

    def _start_kernel(self) -> PooledKernel:
        # unix sockets in the pool's private (0700) dir: no loopback TCP ports to other users
        ipc = os.path.join(self._home, f"k-{uuid.uuid4().hex[:12]}") if os.name == "posix" else ""
        km = KernelManager(kernel_name=self.kernel_name, context=self._ctx,
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
            # startup objects live forever: freezing them makes every later gc pass (and the
            # reset between reused tasks, which collects) scan only the task's own objects
            k.run_quiet(_WARM)
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
        if close_now:
            k.kill()
            k.close()

    def _recycle(self, k: PooledKernel) -> None:
        try:
            k.recycle()
            ok = k.alive()
        except Exception as e:  # noqa: BLE001
            log.warning("nbflow: kernel %s could not be reset, discarding it: %s", k.id, e)
            ok = False
        with self._cond:
            self._recycling -= 1
            self._recycling_scopes.remove(k.scope)
            if ok and not self._closed:
                self._idle.append(k)
            self._cond.notify_all()
            self._fill()
        if not ok:
            k.kill()
            k.close()

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
                scope: str | None = None) -> PooledKernel:
        """A warm kernel, entered into ``cwd``. Waits for one if none is idle; returns None when
        ``control`` says the task was cancelled or timed out while waiting."""
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
        if cwd:
            try:
                k.enter(cwd)
            except Exception:
                self.release(k, reuse=False)
                raise
        return k

    def release(self, k: PooledKernel, reuse: bool | None = None) -> None:
        """Give a kernel back: recycled (``reuse``) or discarded, both in the background."""
        if reuse is None:
            reuse = self.isolation in REUSING
        k.uses += 1
        with self._cond:
            self._busy.discard(k)
            keep = reuse and not self._closed and k.alive()
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


# process-global pools, one per kernel name and isolation

_config: dict[str, Any] = {}
_pools: dict[tuple[str, str], KernelPool] = {}
_pools_lock = threading.Lock()
_atexit = False


def _defaults() -> dict:
    return {
        "size": int(_config.get("size") or os.environ.get("NBFLOW_POOL_SIZE") or 2),
        "isolation": _config.get("isolation") or os.environ.get("NBFLOW_ISOLATION") or "run",
        "kernel_name": _config.get("kernel_name") or os.environ.get("NBFLOW_KERNEL") or "python3",
    }


def configure(size: int | None = None, isolation: str | None = None,
              kernel_name: str | None = None, concurrency: int | None = None) -> dict:
    """Set the process-global pool's shape (``concurrency`` slots -> size = slots + 1 spare).
    Existing pools whose shape changed are shut down; new ones start lazily on first use."""
    if isolation is not None and isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
    if concurrency is not None and size is None:
        size = concurrency + 1
    for k, v in (("size", size), ("isolation", isolation), ("kernel_name", kernel_name)):
        if v is not None:
            _config[k] = v
    d = _defaults()
    with _pools_lock:
        stale = [key for key, p in _pools.items() if p.size != d["size"]]
        old = [_pools.pop(key) for key in stale]
    for p in old:
        p.shutdown()
    return d


def get_pool(kernel_name: str | None = None, isolation: str | None = None) -> KernelPool:
    """The process-global pool for a kernel name and isolation (started on first use)."""
    global _atexit
    d = _defaults()
    key = (kernel_name or d["kernel_name"], isolation or d["isolation"])
    with _pools_lock:
        p = _pools.get(key)
        if p is None or p._closed:
            p = _pools[key] = KernelPool(size=d["size"], isolation=key[1], kernel_name=key[0])
            if not _atexit:
                atexit.register(shutdown_pool)
                _atexit = True
        return p


def live_kernels() -> int:
    """Kernels of every process-global pool (none are started by asking)."""
    with _pools_lock:
        ps = list(_pools.values())
    return sum(p.kernels for p in ps if not p._closed)


def shutdown_pool() -> None:
    """Stop every pooled kernel of this process."""
    with _pools_lock:
        ps = list(_pools.values())
        _pools.clear()
    for p in ps:
        p.shutdown()


# --------------------------------------------------------------------------------------------
# running cells


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


def _error_output(ename: str, evalue: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue,
                                  traceback=[f"{ename}: {evalue}"])


class _CellRun:
    """Output bookkeeping for one notebook, as nbclient does it."""

    def __init__(self, nb):
        self.nb = nb
        self.display_ids: dict[str, dict[int, list[int]]] = {}
        self.clear_next = False

    def handle(self, msg: dict, cell, index: int) -> None:
        mtype = msg["msg_type"]
        content = msg["content"]
        transient = content.get("transient")
        display_id = transient.get("display_id") if transient else None
        if display_id and mtype in ("execute_result", "display_data", "update_display_data"):
            self._update_display(display_id, msg)
        if "execution_count" in content:
            cell["execution_count"] = content["execution_count"]
        if mtype == "clear_output":
            if content.get("wait"):
                self.clear_next = True
            else:
                cell.outputs[:] = []
                self._forget(index)
            return
        if mtype in ("status", "execute_input", "update_display_data") or mtype.startswith("comm"):
            return
        try:
            out = nbformat.v4.output_from_msg(msg)
        except ValueError:
            return
        if self.clear_next:
            cell.outputs[:] = []
            self._forget(index)
            self.clear_next = False
        if display_id:
            self.display_ids.setdefault(display_id, {}).setdefault(index, []).append(
                len(cell.outputs))
        cell.outputs.append(out)

    def _forget(self, index: int) -> None:
        for m in self.display_ids.values():
            if index in m:
                m[index] = []

    def _update_display(self, display_id: str, msg: dict) -> None:
        if display_id not in self.display_ids:
            return
        if msg["header"]["msg_type"] == "update_display_data":
            msg["header"]["msg_type"] = "display_data"
        try:
            out = nbformat.v4.output_from_msg(msg)
        except ValueError:
            return
        for ci, idxs in self.display_ids[display_id].items():
            outs = self.nb.cells[ci].outputs
            for oi in idxs:
                outs[oi]["data"] = out["data"]
                outs[oi]["metadata"] = out["metadata"]


def run_cell(k: PooledKernel, cell, index: int, run: _CellRun, control: RunControl) -> bool:
    """Execute one code cell in ``k``; record its outputs. True when it succeeded. On a deadline,
    a cancel or a dead kernel: kill it, record an error output, fill ``control`` and return False."""
    cell.outputs = []
    msg_id = k.kc.execute(cell.source, store_history=True, allow_stdin=False, stop_on_error=False)
    iopub, shell = k.kc.iopub_channel, k.kc.shell_channel
    failed = False
    idle = False
    while not idle:
        why = control.interrupted()
        if why:
            return _interrupt(k, cell, control, why)
        wait = POLL_SLICE
        if control.deadline is not None:
            wait = max(0.0, min(wait, control.deadline - time.monotonic()))
        try:
            msg = iopub.get_msg(timeout=wait)
        except queue.Empty:
            if not k.alive():
                return _interrupt(k, cell, control, "died")
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue                   # late output of control code
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
        elif msg["msg_type"] == "error":
            failed = True
        run.handle(msg, cell, index)
    while True:                        # the reply precedes idle: it is there (or nearly)
        try:
            reply = shell.get_msg(timeout=POLL_SLICE)
        except queue.Empty:
            if not k.alive():
                return _interrupt(k, cell, control, "died")
            why = control.interrupted()
            if why:
                return _interrupt(k, cell, control, why)
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    content = reply["content"]
    if content.get("execution_count"):
        cell["execution_count"] = content["execution_count"]
    if content.get("status") == "error" and not failed:
        cell.outputs.append(_error_output(content.get("ename", "Error"), content.get("evalue", "")))
        failed = True
    return not failed


def _interrupt(k: PooledKernel, cell, control: RunControl, why: str) -> bool:
    k.kill()
    if why == "died":
        ename, evalue = "DeadKernelError", "the kernel died while executing this cell"
    else:
        ename, evalue = interruption_message(why, control.timeout)
    control.reason = why
    control.message = f"{ename}: {evalue}"
    cell.outputs.append(_error_output(ename, evalue))
    return False


class WarmEngine(Engine):
    """papermill engine ``nbflow``: runs the notebook in a pooled, already-started kernel.

    Extra engine kwargs (papermill forwards unknown ``execute_notebook`` kwargs here):
    ``nbflow_control`` (:class:`RunControl`: deadline, cancel, isolation; filled with the kernel
    used and why it was stopped) and ``nbflow_pool`` (a :class:`KernelPool` instead of the
    process-global one)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, nbflow_control: RunControl | None = None,
                                 nbflow_pool: KernelPool | None = None, **kwargs):
        control = nbflow_control or RunControl()
        pool = nbflow_pool or get_pool(kernel_name, control.isolation)
        nb = nb_man.nb
        # papermill's own cwd= chdirs the whole process (racy with concurrent tasks): the runner
        # passes the folder in control.cwd instead and only the kernel changes directory
        k = pool.acquire(setup_hash=setup_hash(nb), cwd=control.cwd or os.getcwd(), control=control,
                         scope=control.scope)
        if k is None:                                   # cancelled/timed out waiting for a kernel
            cls._stop_before_start(nb_man, control)
            return nb
        control.kernel_id, control.kernel_pid = k.id, k.pid
        control.kernel_ready_at, control.kernel_uses = k.ready_at, k.uses
        reuse = pool.isolation in REUSING
        try:
            run = _CellRun(nb)
            for index, cell in enumerate(nb.cells):
                nb_man.cell_start(cell, index)          # every cell, as papermill's client does
                ok = True
                try:
                    if cell.cell_type == "code" and cell.source.strip():
                        ok = run_cell(k, cell, index, run, control)
                    if not ok:
                        nb_man.cell_exception(cell, cell_index=index)
                finally:
                    nb_man.cell_complete(cell, cell_index=index)
                if not ok:
                    break
            if k.language_info:
                nb.metadata["language_info"] = k.language_info
        finally:
            pool.release(k, reuse=reuse and not k.dead)
        return nb

    @classmethod
    def _stop_before_start(cls, nb_man, control: RunControl) -> None:
        why = control.interrupted()
        ename, evalue = interruption_message(why, control.timeout)
        control.reason, control.message = why, f"{ename}: {evalue}"
        cell = next((c for c in nb_man.nb.cells if c.cell_type == "code"), None)
        if cell is not None:
            index = nb_man.nb.cells.index(cell)
            nb_man.cell_start(cell, index)
            cell.outputs = [_error_output(ename, evalue)]
            nb_man.cell_exception(cell, cell_index=index)
            nb_man.cell_complete(cell, cell_index=index)


papermill_engines.register("nbflow", WarmEngine)
