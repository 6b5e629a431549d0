"""The notebook's folder travels with the run: a worker whose filesystem lacks that folder still
imports the module next to the notebook and reads relative data files (from the bundle), an edit
to the module reaches the next run, and a task importing a module the worker lacks fails at once
naming both."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from nbhelpers import write_notebook
from support import finish, stop_process, success_counts

from nbflow.compiler import bundle as packing
from nbflow.stack import Supervisor


# --- packing (pure) ------------------------------------------------------------------------

def _bundles_in(cache) -> list[str]:
    """What a bundle cache holds, without its CACHEDIR.TAG and its (empty) lock files' dir."""
    return sorted(n for n in os.listdir(cache) if n not in ("CACHEDIR.TAG", ".locks"))


def _tree(root, files: dict[str, str | bytes]):
    for rel, body in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
    return root


def test_identical_folders_hash_identically_whatever_their_mtimes(tmp_path):
    files = {"nb.ipynb": "{}", "util.py": "X = 1\n", "data/a.csv": "a,b\n1,2\n"}
    a = _tree(tmp_path / "a", files)
    b = _tree(tmp_path / "b", files)
    os.utime(b / "util.py", (1, 1))
    pa, pb = packing.pack(str(a)), packing.pack(str(b))
    assert pa.hash == pb.hash and pa.data == pb.data
    assert pa.files == ["data/a.csv", "nb.ipynb", "util.py"]
    (b / "util.py").write_text("X = 2\n")
    assert packing.pack(str(b)).hash != pa.hash


def test_defaults_and_nbflowignore(tmp_path):
    root = _tree(tmp_path / "p", {
        "nb.ipynb": "{}", "util.py": "", ".git/HEAD": "ref", "__pycache__/util.pyc": "x",
        ".ipynb_checkpoints/nb-checkpoint.ipynb": "{}", "node_modules/x/index.js": "",
        "venv/pyvenv.cfg": "home = /usr", "venv/lib/site.py": "", "stray.pyc": "",
        "data/raw/big.parquet": "x", "data/raw/keep.parquet": "x", "data/small.csv": "",
        "logs/run.log": "", "sub/logs/other.log": "", "out/a.txt": "", "docs/out/b.txt": "",
        "notes.tmp": "", "deep/er/notes.tmp": "",
        "cache/CACHEDIR.TAG": "Signature: 8a477f597d28d172789f06886806bc55", "cache/b/x.py": "",
    })
    (root / ".nbflowignore").write_text(
        "# comment\n*.tmp\ndata/raw/*\n!data/raw/keep.parquet\nlogs/\n/out/\n**/er/**\n")
    got = packing.pack(str(root)).files
    assert got == [".nbflowignore", "data/raw/keep.parquet", "data/small.csv", "docs/out/b.txt",
                   "nb.ipynb", "util.py"]


def test_big_files_are_left_out_with_a_warning_and_the_total_limit_is_an_error(tmp_path,
                                                                                monkeypatch):
    root = _tree(tmp_path / "p", {"nb.ipynb": "{}", "data/huge.bin": b"x" * 3 * 2**20,
                                  "data/mid.bin": b"y" * 2**19})
    monkeypatch.setenv("NBFLOW_BUNDLE_MAX_FILE_MB", "1")
    b = packing.pack(str(root))
    assert b.files == ["data/mid.bin", "nb.ipynb"]
    msg = packing.big_files_warning(str(root), b)
    assert "data/huge.bin (3.0 MB)" in msg and "NBFLOW_BUNDLE_MAX_FILE_MB" in msg
    monkeypatch.setenv("NBFLOW_BUNDLE_MAX_MB", "0.25")
    with pytest.raises(packing.BundleError) as e:
        packing.pack(str(root))
    text = str(e.value)
    assert "data/mid.bin" in text and ".nbflowignore" in text and "NBFLOW_BUNDLE_MAX_MB" in text
    assert "--no-bundle" in text


def test_imported_modules_tolerates_magics():
    code = "%load_ext nbflow\nimport os, numpy.linalg as la\nfrom salesutil import load\n" \
           "from . import rel\n!pip list\n"
    assert packing.imported_modules(code) == {"os", "numpy", "salesutil"}
    assert packing.third_party({"os", "numpy", "nbflow", "salesutil"}) == {"numpy", "salesutil"}


# --- end to end: a worker that cannot see the notebook's folder -----------------------------

NS = "bundles"


def _project(root, effects, version: str):
    """An analyst's folder: a notebook, a module next to it, a data file read relatively."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "salesutil.py").write_text(
        f"VERSION = {version!r}\n"
        "def load(path):\n"
        "    with open(path) as f:\n"
        "        return [int(x) for x in f.read().split()]\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "sales.txt").write_text("1 2 3 4\n")
    return write_notebook(root / "report.ipynb", [
        "import os\nfrom salesutil import load, VERSION",
        f"%%task extract\nsales = load('data/sales.txt')\n"
        f"seen_folder = os.path.exists({str(root / 'salesutil.py')!r})\n"
        f"open({str(effects)!r}, 'a').write('extract ' + VERSION + chr(10))",
        f"%%task total\nresult = (VERSION, sum(sales), seen_folder)\n"
        f"open({str(effects)!r}, 'a').write('total %s %s %s' % result + chr(10))\n"
        f"open('scratch.txt', 'w').write('written relative to the cwd')",
    ])


@pytest.fixture(scope="module")
def hidden_worker(nats_server, tmp_path_factory):
    """An engine, and a worker in its own mount namespace where the project folder is an empty
    tmpfs (as on another host), with its own bundle cache."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    tmp_path = tmp_path_factory.mktemp("hidden")
    proj = tmp_path / "proj"
    proj.mkdir()
    cache = tmp_path / "cache"
    log = tmp_path / "stack.log"
    sup = Supervisor(nats_server.url, workers=0, namespace=NS, log_file=log).start()
    env = {**os.environ, "NBFLOW_NAMESPACE": NS, "NBFLOW_BUNDLE_CACHE": str(cache),
           "PYTHONUNBUFFERED": "1"}
    cmd = (f"mount -t tmpfs none {proj} && cd / && exec {sys.executable} -m nbflow worker "
           f"--nats {nats_server.url} --name hidden-worker")
    with open(log, "ab") as out:
        worker = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    yield proj, cache, log, nats_server.url
    stop_process(worker, 15)
    sup.stop()


def test_a_worker_without_the_notebooks_folder_runs_it_from_the_bundle(hidden_worker, tmp_path):
    from nbflow.client import SyncClient

    hidden, cache, log, url = hidden_worker
    proj = hidden / "report"
    effects = tmp_path / "effects.txt"
    nb = _project(proj, effects, "v1")
    with SyncClient(url, namespace=NS) as c:
        run1 = c.submit(str(nb))
        st = finish(c, run1)
        assert st.state == "succeeded", (st.to_dict(), log.read_text()[-3000:])
        assert success_counts(c, run1) == {"extract": 1, "total": 1}
        # the worker is blind to the folder (False), yet imported the module and read the data
        assert effects.read_text().splitlines() == ["extract v1", "total v1 10 False"]
        h1 = c.workflow(st.wf).bundle
        assert h1 and _bundles_in(cache) == [h1]
        # the task's relative write went to its own copy, not into the shared unpacked bundle
        assert not (cache / h1 / "scratch.txt").exists()

        run2 = c.submit(str(nb))                      # same folder: same bundle, no new unpack
        assert finish(c, run2).state == "succeeded"
        assert c.workflow(c.status(run2).wf).bundle == h1
        assert _bundles_in(cache) == [h1]

        (proj / "salesutil.py").write_text((proj / "salesutil.py").read_text()
                                           .replace("'v1'", "'v2'"))
        run3 = c.submit(str(nb))
        st3 = finish(c, run3)
        assert st3.state == "succeeded"
        h3 = c.workflow(st3.wf).bundle
        assert h3 != h1
        assert _bundles_in(cache) == sorted([h1, h3])
        assert effects.read_text().splitlines() == ["extract v1", "total v1 10 False"] * 2 + \
            ["extract v2", "total v2 10 False"]


def test_without_a_bundle_a_missing_folder_is_a_clear_error(hidden_worker, tmp_path):
    from nbflow.client import SyncClient

    hidden, cache, log, url = hidden_worker
    effects = tmp_path / "effects.txt"
    nb = _project(hidden / "shared_fs", effects, "v1")
    with SyncClient(url, namespace=NS) as c:
        run = c.submit(str(nb), bundle=False)
        st = finish(c, run)
        assert st.state == "failed"
        err = st.tasks["extract"].error
        assert "is not on worker hidden-worker's filesystem" in err and "--no-bundle" in err, err
        assert st.tasks["extract"].attempt == 1            # a config error: not retried
        assert not effects.exists()


def test_a_module_the_worker_lacks_fails_at_once_naming_it_and_the_worker(hidden_worker,
                                                                          tmp_path):
    from nbflow.client import SyncClient

    hidden, cache, log, url = hidden_worker
    effects = tmp_path / "effects.txt"
    nb = write_notebook(hidden / "needs" / "needs.ipynb", [
        "import os",
        f"%%task a\nimport nbflow_no_such_module_xyz\nopen({str(effects)!r}, 'a').write('a')",
        "%%task b\nimport papermill\nv = papermill.__version__",
    ])
    with SyncClient(url, namespace=NS) as c:
        run = c.submit(str(nb))
        st = finish(c, run)
        err = st.tasks["a"].error
        assert err.startswith("ModuleNotFoundError") and "nbflow_no_such_module_xyz" in err
        assert "hidden-worker" in err and st.tasks["a"].attempt == 1
        assert st.tasks["b"].state == "succeeded"
        assert not effects.exists()
        wf = c.workflow(st.wf)
        import papermill
        assert wf.requires.get("papermill") == papermill.__version__
        assert wf.requires.get("nbflow_no_such_module_xyz") == ""



def test_a_module_version_other_than_the_submitters_is_a_warning_in_the_tasks_log(client,
                                                                                   tmp_path):
    import dataclasses

    import papermill

    from nbflow.compiler import compile_file

    nb = write_notebook(tmp_path / "versions.ipynb", [
        "import papermill",
        "%%task show\nv = papermill.__version__\nprint('running', v)",
    ])
    wf = compile_file(str(nb))
    # as if submitted from a machine with another papermill
    wf = dataclasses.replace(wf, requires={"papermill": "0.0.1"})
    run = client.submit(wf)
    st = finish(client, run)
    assert st.state == "succeeded"
    log = client.logs(run, "show")
    assert (f"nbflow: warning: module 'papermill' is {papermill.__version__} on this worker but "
            f"0.0.1 where the run was submitted") in log, log
    assert "running" in log
    # the same versions: no warning
    run2 = client.submit(str(nb))
    assert finish(client, run2).state == "succeeded"
    assert "nbflow: warning" not in client.logs(run2, "show")


# --- the worker's cache ----------------------------------------------------------------------

class _Store:
    """The two object-store calls the cache makes, over a dict (the bundle bytes)."""

    def __init__(self, blobs):
        self.blobs, self.gets = blobs, 0

    async def exists(self, name):
        return name in self.blobs

    async def get_file(self, name, path):
        import asyncio

        self.gets += 1
        await asyncio.sleep(0.05)                # both racers are mid-download together
        with open(path, "wb") as f:
            f.write(self.blobs[name])


def test_racing_unpacks_end_with_one_complete_bundle_and_old_leftovers_are_swept(tmp_path):
    import asyncio

    from nbflow.worker.bundles import BundleCache

    b = packing.pack(str(_tree(tmp_path / "p", {"m.py": "X = 1\n", "d/x.txt": "hi"})))
    store = _Store({b.key: b.data})
    root = tmp_path / "cache"
    # two worker processes of one host share the cache dir: two caches, racing on one hash
    a, c = BundleCache(store, str(root)), BundleCache(store, str(root))

    async def race():
        return await asyncio.gather(a.get(b.hash), c.get(b.hash), a.get(b.hash))
    paths = asyncio.run(race())
    assert len(set(paths)) == 1 and (root / b.hash / "d" / "x.txt").read_text() == "hi"
    assert a.unpacked + c.unpacked == 1                  # the loser's rename found it there
    assert store.gets == 2                               # one per process, not per task
    assert _bundles_in(root) == [b.hash]          # no temp dir left behind
    # a worker killed mid-unpack leaves only a dot-dir; a corrupt blob is refused
    (root / f".{b.hash}.killed").mkdir()
    old = time.time() - 2 * 86400
    os.utime(root / f".{b.hash}.killed", (old, old))
    a.sweep()
    assert _bundles_in(root) == [b.hash]
    bad = _Store({packing.bundle_key("f" * 32): b.data})
    with pytest.raises(packing.BundleError, match="corrupt"):
        asyncio.run(BundleCache(bad, str(root)).get("f" * 32))
    assert _bundles_in(root) == [b.hash]


def test_notebooks_a_task_runs_are_found_in_the_bundle(tmp_path):
    from nbflow.compiler.tasknb import task_notebook
    from nbflow.core.ir import Node, Workflow
    from nbflow.worker.bundles import located

    proj = tmp_path / "proj"
    write_notebook(proj / "etl.ipynb", ["%%task load\nrows = [1, 2]"])
    wf = Workflow("flow", nodes=[Node("start", "start"), Node("end", "end"), Node(
        "other", "task", notebook=str(proj / "etl.ipynb"), notebook_task="load")],
        source=str(proj / "flow.bpmn"))
    b = packing.pack(str(proj))
    unpacked = tmp_path / "cache" / b.hash          # as a worker unpacks it; proj is elsewhere
    import zipfile
    import io
    zipfile.ZipFile(io.BytesIO(b.data)).extractall(unpacked)
    shutil.rmtree(proj)
    nb = task_notebook(located(wf, str(unpacked)), "other")
    assert "rows = [1, 2]" in nb.cells[-2].source


def test_a_bundle_already_in_the_store_is_not_uploaded_again(tmp_path):
    import asyncio

    from nbflow.worker.bundles import upload

    class Art:
        def __init__(self):
            self.objects, self.puts, self.touched = {}, 0, []

        async def touch(self, name):             # renews its grace period against gc
            self.touched.append(name)
            return name in self.objects

        async def put_bytes(self, name, data):
            self.puts += 1
            self.objects[name] = data

    art = Art()
    one = packing.pack(str(_tree(tmp_path / "a", {"m.py": "X = 1\n"})))
    same = packing.pack(str(_tree(tmp_path / "b", {"m.py": "X = 1\n"})))   # another folder
    assert asyncio.run(upload(art, one)) is True
    assert asyncio.run(upload(art, same)) is False
    assert art.puts == 1 and list(art.objects) == [one.key]
    assert art.touched == [one.key, one.key]       # the reuse renewed it


def test_the_cache_is_bounded_and_never_evicts_a_bundle_in_use(tmp_path, monkeypatch):
    import asyncio

    from nbflow.worker.bundles import BundleCache

    big = os.urandom(300 * 1024)
    packs = [packing.pack(str(_tree(tmp_path / f"p{i}", {"m.py": f"X = {i}\n", "blob": big})))
             for i in range(3)]
    store = _Store({b.key: b.data for b in packs})
    root = tmp_path / "cache"
    monkeypatch.setenv("NBFLOW_BUNDLE_CACHE_MB", "0.5")     # room for one bundle
    worker, other = BundleCache(store, str(root)), BundleCache(store, str(root))

    async def scenario():
        # another worker process of the host runs a task with bundle 0 ...
        async with other.using(packs[0].hash):
            for b in packs[1:]:                  # ... while this one runs tasks with 1, then 2
                async with worker.using(b.hash) as path:
                    assert (root / b.hash / "m.py").exists() and path == str(root / b.hash)
            # 0 is in use elsewhere, 2 was used last: 1 (least recently used) went
            assert _bundles_in(root) == sorted([packs[0].hash, packs[2].hash])
            # over the limit still: 0 is in use, 2 no longer is, so 2 goes
            assert worker.trim() == [packs[2].hash]
            assert _bundles_in(root) == [packs[0].hash]
        # released: a task of bundle 1 brings it back and evicts 0
        async with worker.using(packs[1].hash):
            assert _bundles_in(root) == [packs[1].hash]
    asyncio.run(scenario())
    assert worker.evicted == 3 and store.gets == 4


def test_relative_writes_are_named_in_the_tasks_log_with_where_to_write_instead(client, tmp_path):
    proj = tmp_path / "writes"
    proj.mkdir()
    (proj / "data.txt").write_text("1 2 3\n")
    (proj / "util.py").write_text("def total(p):\n    return sum(map(int, open(p).read().split()))\n")
    nb = write_notebook(proj / "w.ipynb", [
        "from util import total",
        "%%task reads\nn = total('data.txt')",        # reads only (and imports: __pycache__)
        "%%task writes\nimport os\nos.makedirs('out', exist_ok=True)\n"
        "open('out/result.csv', 'w').write(str(n))\nopen('data.txt', 'a').write('4\\n')\nm = n",
        "%%task after\nprint(m, open('data.txt').read().split())",
    ])
    run = client.submit(str(nb))
    st = finish(client, run)
    assert st.state == "succeeded"
    log = client.logs(run, "writes")
    assert ("nbflow: warning: this task wrote 2 file(s) relative to its folder: data.txt, "
            "out/result.csv.") in log, log
    assert "absolute path" in log
    assert "nbflow: warning" not in client.logs(run, "reads")
    # the next task saw the bundle's folder, not the discarded changes
    assert "6 ['1', '2', '3']" in client.logs(run, "after")
    assert (proj / "data.txt").read_text() == "1 2 3\n" and not (proj / "out").exists()


def test_a_task_folder_is_reused_only_while_it_is_still_the_bundle(tmp_path):
    """A task's copy of the bundle goes to the next task only if nothing in it was written,
    removed or made (caches of imports aside): relative writes never reach another task."""
    from nbflow.worker.bundles import TaskFolders, folder_state

    bundle = tmp_path / "bundle"
    (bundle / "data").mkdir(parents=True)
    (bundle / "data" / "x.txt").write_text("1\n")
    (bundle / "util.py").write_text("X = 1\n")
    folders = TaskFolders()
    seen = []

    def task(act):
        f = folders.take(str(bundle))
        seen.append(f)
        act(f)
        written, unchanged = folder_state(str(bundle), f)
        for d in folders.give(str(bundle), f, unchanged):
            shutil.rmtree(d)
        return written, unchanged

    def cache(f):                            # an import's cache is not a change
        os.makedirs(os.path.join(f, "__pycache__"))
        open(os.path.join(f, "__pycache__", "util.pyc"), "w").close()

    assert task(lambda f: open(os.path.join(f, "data", "x.txt")).read()) == ([], True)
    assert task(cache) == ([], True)
    assert seen[0] == seen[1]                 # the same copy, not a new one
    assert task(lambda f: open(os.path.join(f, "data", "x.txt"), "a").write("2")) == (
        ["data/x.txt"], False)
    assert not os.path.exists(seen[2])        # changed: removed, never handed out again
    assert task(lambda f: os.remove(os.path.join(f, "util.py"))) == ([], False)
    assert task(lambda f: os.makedirs(os.path.join(f, "empty"))) == ([], False)
    f = folders.take(str(bundle))
    assert f not in seen[2:] and open(os.path.join(f, "data", "x.txt")).read() == "1\n"
    assert sorted(os.listdir(f)) == ["data", "util.py"]
    for d in folders.give(str(bundle), f, True) + folders.clear():
        shutil.rmtree(d)
    assert not os.path.exists(f)
