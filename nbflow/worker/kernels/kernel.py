"""One warm kernel of the pool: a started kernel with a ready client, the control code that
points it at a task's folder and resets it between tasks, and its shutdown."""
from __future__ import annotations

import logging
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client import KernelManager

log = logging.getLogger("nbflow.worker.kernels.kernel")

_PRELUDE = ("(lambda os, sys, cwd, prev: (os.chdir(cwd), sys.path.__setitem__(0, cwd) "
            "if sys.path and sys.path[0] == prev else sys.path.insert(0, cwd)))"
            "(__import__('os'), __import__('sys'), {cwd!r}, {prev!r})")
# at warm-up: remember the pristine sys.path and environment (sys.modules outlives resets)
_WARM = ("import gc as __g, os as __o, sys as __s, types as __t\n"
         "__m = __t.ModuleType('_nbflow_pool')\n__m.path = list(__s.path)\n"
         "__m.environ = dict(__o.environ)\n"
         "exec(" + repr(
             "def back(cwd, home):\n"          # re-enter the last task's folder after a reset
             "    import os, sys\n"
             "    try:\n"
             "        os.chdir(cwd)\n"
             "    except OSError:\n"
             "        return\n"
             "    if sys.path and sys.path[0] == home:\n"
             "        sys.path[0] = cwd\n"
             "    else:\n"
             "        sys.path.insert(0, cwd)\n") + ", __m.__dict__)\n"
         "__s.modules['_nbflow_pool'] = __m\n"
         "__g.collect()\n__g.freeze()\ndel __g, __o, __s, __t, __m")
# between reused tasks: globals, In/Out and counts go; sys.path, env vars and cwd come back.
# Home first: the task's folder may already be gone, and IPython's reset needs a cwd. Then back
# into the task's folder when it is still there: the next task in the same folder (a copy of the
# bundle that stayed unchanged, see bundles.TaskFolders) needs no change of directory.
_RESET = ("__import__('os').chdir({home!r})\n"
          "get_ipython().reset(new_session=True)\n"
          "(lambda os, sys, m: (sys.path.__setitem__(slice(None), m.path), os.environ.clear(), "
          "os.environ.update(m.environ), os.chdir({home!r}), m.back({back!r}, {home!r})))"
          "(__import__('os'), __import__('sys'), __import__('sys').modules['_nbflow_pool'])")
_CWD = {"cwd": "__import__('os').getcwd()"}


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
    entered: int = 0                       # tasks that found it pointed at their folder
    # the last task's namespace is still there: the next task resets it first (in its own one
    # execute, see nbflow.kernelside; or ``recycle`` when the pool hands it out to a caller
    # that runs cells one execute each)
    dirty: bool = False
    driver: bool = False                   # nbflow.kernelside is installed in the kernel
    released: int = 0                      # times released dirty (the idle reset's check)

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

    def run_quiet(self, code: str, timeout: float = 30.0,
                  user_expressions: dict | None = None) -> dict:
        """Run control code silently (no history, no execution count); return the reply content."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                                 stop_on_error=False, user_expressions=user_expressions)
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

    def warm_up(self) -> None:
        """Remember the pristine sys.path and environment (for ``recycle``) and freeze the
        startup objects: they live forever, and frozen, every later gc pass (and the reset
        between reused tasks, which collects) scans only the task's own objects."""
        self.run_quiet(_WARM)
        if self.language_info.get("name", "python") == "python":
            reply = self.run_quiet(_driver_code())
            self.driver = reply.get("status") == "ok"

    def enter(self, cwd: str) -> None:
        """Point the kernel at the task's folder, as Jupyter starts a kernel in the notebook's.
        Nothing to do when it is there already (reset back into the same folder)."""
        if cwd == self.path0 and cwd != self.home:
            self.entered += 1
            return
        reply = self.run_quiet(_PRELUDE.format(cwd=cwd, prev=self.path0))
        if reply.get("status") != "ok":
            raise RuntimeError(f"cannot enter {cwd!r} in kernel: {reply.get('evalue')}")
        self.path0 = cwd

    def recycle(self) -> None:
        """Clear the user namespace for the next task (``run``/``reuse`` isolation) and go back
        into the last task's folder if it is still there (else home), in one round trip. (The
        one-execute path does the same at the start of the next task's request instead:
        nbflow.kernelside._reset.)"""
        back = self.path0
        reply = self.run_quiet(_RESET.format(home=self.home, back=back), user_expressions=_CWD)
        if reply.get("status") != "ok":
            raise RuntimeError(f"reset failed: {reply.get('ename')}: {reply.get('evalue')}")
        self.path0 = back if _expression(reply, "cwd") == back else self.home

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


def _driver_code() -> str:
    """Install nbflow.kernelside's functions in the kernel's ``_nbflow_pool`` module (from its
    source: the kernel's environment need not be able to import nbflow)."""
    global _DRIVER
    if _DRIVER is None:
        import nbflow.kernelside as ks

        with open(ks.__file__, encoding="utf-8") as f:
            src = f.read()
        _DRIVER = ("exec(" + repr(src) + ", __import__('sys').modules['_nbflow_pool'].__dict__)")
    return _DRIVER


_DRIVER: str | None = None


def _expression(reply: dict, name: str):
    """The value of user expression ``name`` in an execute reply (a Python literal), or None."""
    import ast

    out = (reply.get("user_expressions") or {}).get(name) or {}
    if out.get("status") != "ok":
        return None
    try:
        return ast.literal_eval(out.get("data", {}).get("text/plain", ""))
    except (ValueError, SyntaxError):
        return None
