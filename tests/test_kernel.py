"""The "Python 3 (nbflow)" kernelspec, installed into a temp prefix and started with
jupyter_client: %%task works with no %load_ext, and in that real ipykernel a RunView updates
live from the kernel's own loop while other cells run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

pytest.importorskip("jupyter_client")

from runall import execute  # noqa: E402 - the one kernel execute helper of the tests


def run_cell(kc, code: str, timeout: float = 60) -> dict:
    """Execute; return {'ok', 'stdout', 'error', 'data', 'problem'} from the kernel's replies."""
    out = execute(kc, code, timeout=timeout)
    out["problem"] = out["error"] + out["stderr"]   # UsageError is printed, not raised
    return out


def poll_cell(kc, code: str, timeout: float = 60) -> str:
    """Run ``code`` (which prints a truthy marker when the condition holds) until it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = run_cell(kc, code)
        assert not r["error"], r["error"]
        if r["stdout"].strip() not in ("", "False", "None"):
            return r["stdout"].strip()
        time.sleep(0.1)
    raise AssertionError(f"kernel condition never held: {code}")


@pytest.fixture(scope="module")
def kernel_prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("kprefix")
    res = subprocess.run([sys.executable, "-m", "nbflow.kernelspec", "install", "--prefix",
                          str(prefix)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return prefix


def test_install_writes_this_python(kernel_prefix):
    spec = json.loads((kernel_prefix / "share/jupyter/kernels/nbflow/kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (nbflow)"
    assert spec["argv"][0] == sys.executable
    assert "--ext=nbflow" in spec["argv"]


def test_install_refuses_prefix_with_user(tmp_path):
    from click.testing import CliRunner

    from nbflow.kernelspec import kernel

    r = CliRunner().invoke(kernel, ["install", "--user", "--prefix", str(tmp_path)])
    assert r.exit_code != 0 and "cannot be combined" in r.output


@pytest.fixture(scope="module")
def kc(kernel_prefix, nats_server, stack, tmp_path_factory):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager(kernel_dirs=[str(kernel_prefix / "share/jupyter/kernels")])
    assert "nbflow" in ksm.find_kernel_specs()
    km = KernelManager(kernel_name="nbflow", kernel_spec_manager=ksm)
    cwd = tmp_path_factory.mktemp("kcwd")
    env = {**os.environ, "NBFLOW_NATS_URL": nats_server.url, "NBFLOW_NAMESPACE": "itest",
           "NBFLOW_USER": "kernel-user"}
    km.start_kernel(env=env, cwd=str(cwd))
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    client.cwd = cwd
    yield client
    client.stop_channels()
    km.shutdown_kernel(now=True)


def test_task_cell_runs_without_load_ext(kc):
    r = run_cell(kc, "%%task extract\nsales = [1, 2, 3]\nprint('ran', sum(sales))")
    assert r["ok"] and not r["error"], r
    assert "ran 6" in r["stdout"]
    r = run_cell(kc, "from nbflow.magics.core import registered_tasks\n"
                     "print(sorted(registered_tasks(get_ipython())))")
    assert "['extract']" in r["stdout"]


def test_flow_run_view_updates_live_in_the_kernel(kc):
    nb = kc.cwd / "live.ipynb"
    nbformat.write(new_notebook(cells=[
        new_code_cell("%%task prepare\nreport = 'draft'"),
        new_code_cell('%%task publish --approval "Ship?"\nprint("shipped", report)'),
        new_code_cell("%flow run"),
    ]), nb)
    r = run_cell(kc, f"%flow run {nb}")
    assert r["ok"], r
    # displayed once, as a widget
    views = [d for d in r["data"] if "application/vnd.jupyter.widget-view+json" in d]
    assert len(views) == 1
    # other cells run while the view updates from the kernel's loop
    poll_cell(kc, "from nbflow.widgets import last_view\nv = last_view()\n"
                  "print(bool(v.model.approvals) and v.model.approvals[0]['state'] == 'pending')")
    r = run_cell(kc, "print(v.user, v.run)")
    assert r["stdout"].startswith("kernel-user ")
    run = r["stdout"].split()[1]
    r = run_cell(kc, f"%flow approve {run} publish --comment 'lgtm'")
    assert "publish: approved by kernel-user" in r["stdout"], r
    r = run_cell(kc, f"%flow approve {run} publish")
    assert "already approved by kernel-user" in r["problem"]
    assert poll_cell(kc, "print(v.model.run_state == 'succeeded' and "
                         "'approved by kernel-user' in v.approvals_box.children[0].children[0].value)")
    r = run_cell(kc, "print(v.progress.value, v.progress.max)")
    assert r["stdout"].strip() == "2 2"


def test_flow_commands_report_user_errors_in_one_line(kc):
    r = run_cell(kc, "%flow watch nosuchrun")
    assert "UsageError" in r["problem"] and "no run 'nosuchrun'" in r["problem"]
    r = run_cell(kc, "%flow run")
    assert "can't tell which notebook" in r["problem"]
