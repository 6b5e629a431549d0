"""The notebook's folder as a content-addressed bundle: what travels with a run to other hosts.

``pack(folder)`` walks the folder (honouring ``.nbflowignore`` and the defaults below), and
returns a deterministic zip — entries sorted, fixed timestamps, only the executable bit kept —
and its hash: sha256 over each file's path, mode and content, so identical folders hash
identically whatever the compressor. Pure: reads files, writes nothing.

``.nbflowignore`` speaks the common subset of gitignore: ``#`` comments, globs (``*``, ``?``,
``[abc]``), ``**`` across folders, a leading ``/`` or an inner ``/`` anchors to the folder, a
trailing ``/`` matches folders only, ``!`` re-includes (not below an excluded folder, as in git).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import os
import re
import stat
import sys
import zipfile
from dataclasses import dataclass, field

from nbflow.core.ir import Workflow
from nbflow.errors import BundleError  # noqa: F401 - raised here and by worker/bundles.py

IGNORE_FILE = ".nbflowignore"
# folders never bundled: version control, caches, checkpoints, dependencies
DEFAULT_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints", "node_modules",
                     ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".nox"}
DEFAULT_SKIP_FILES = ("*.pyc", "*.pyo", ".DS_Store")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def max_file_bytes() -> int:
    return int(float(os.environ.get("NBFLOW_BUNDLE_MAX_FILE_MB", "10")) * 2**20)


def max_total_bytes() -> int:
    return int(float(os.environ.get("NBFLOW_BUNDLE_MAX_MB", "100")) * 2**20)


def max_files() -> int:
    return int(os.environ.get("NBFLOW_BUNDLE_MAX_FILES", "5000"))


@dataclass
class Bundle:
    hash: str                                   # content hash (hex, 32 chars)
    data: bytes                                 # the zip
    files: list[str] = field(default_factory=list)          # bundled paths, sorted
    skipped_big: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes) over the limit
    size: int = 0                               # total bytes of the bundled files

    @property
    def key(self) -> str:
        return bundle_key(self.hash)


def bundle_key(h: str) -> str:
    """Its name in the artifacts object store."""
    return f"bundles/{h}.zip"


# --- .nbflowignore ---------------------------------------------------------------------------

@dataclass
class _Rule:
    regex: re.Pattern
    negate: bool
    dir_only: bool


def _glob_to_regex(pat: str, anchored: bool) -> re.Pattern:
    out, i = [], 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("/**", i) and i + 3 == len(pat):
            out.append("/.*")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pat.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pat[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        elif c == "\\" and i + 1 < len(pat):
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(f"^{prefix}{''.join(out)}$")


def parse_ignore(text: str) -> list[_Rule]:
    rules = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        rules.append(_Rule(_glob_to_regex(line.lstrip("/"), anchored), negate, dir_only))
    return rules


def ignored(rel: str, is_dir: bool, rules: list[_Rule]) -> bool:
    """Whether path ``rel`` (relative, '/'-separated) is excluded: the last matching rule wins."""
    out = False
    for r in rules:
        if r.dir_only and not is_dir:
            continue
        if r.regex.match(rel):
            out = not r.negate
    return out


# --- packing ---------------------------------------------------------------------------------

def _is_venv(path: str) -> bool:
    """A virtualenv, or a cache dir tagged per the Cache Directory Tagging spec (CACHEDIR.TAG:
    nbflow's own bundle cache carries one, so a cache inside a notebook's folder never travels)."""
    return os.path.isfile(os.path.join(path, "pyvenv.cfg")) or \
        os.path.isfile(os.path.join(path, "CACHEDIR.TAG"))


def walk(folder: str, skip: tuple[str, ...] = ()
         ) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
    """([(relative path, absolute path, size)], [(skipped big file, size)]), sorted.
    ``skip``: relative paths to leave out (the submitted notebook: its code is in the
    definition, and editing a cell must not change the bundle)."""
    folder = os.path.abspath(folder)
    rules = parse_ignore("\n".join(DEFAULT_SKIP_FILES))
    try:
        with open(os.path.join(folder, IGNORE_FILE), encoding="utf-8") as f:
            rules += parse_ignore(f.read())
    except FileNotFoundError:
        pass
    limit, many = max_file_bytes(), max_files()
    files: list[tuple[str, str, int]] = []
    big: list[tuple[str, int]] = []
    for root, dirs, names in os.walk(folder):
        rel_root = os.path.relpath(root, folder).replace(os.sep, "/")
        rel_root = "" if rel_root == "." else rel_root + "/"
        keep = []
        for d in sorted(dirs):
            p = os.path.join(root, d)
            if d in DEFAULT_SKIP_DIRS or os.path.islink(p) or _is_venv(p) or \
                    ignored(rel_root + d, True, rules):
                continue
            keep.append(d)
        dirs[:] = keep
        for n in sorted(names):
            rel = rel_root + n
            p = os.path.join(root, n)
            if rel in skip or ignored(rel, False, rules):
                continue
            try:
                st = os.stat(p)
            except OSError:
                continue                # a dangling link
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > limit:
                big.append((rel, st.st_size))
                continue
            files.append((rel, p, st.st_size))
            if len(files) > many:
                raise BundleError(
                    f"the notebook's folder {folder} has more than {many} files to bundle "
                    f"(NBFLOW_BUNDLE_MAX_FILES); keep the notebook in a folder of its own, list "
                    f"what tasks do not need in {os.path.join(folder, IGNORE_FILE)}, or submit "
                    f"with --no-bundle (NBFLOW_BUNDLE=0) if the workers share this filesystem")
    files.sort()
    big.sort()
    return files, big


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def pack(folder: str, skip: tuple[str, ...] = ()) -> Bundle:
    """Bundle ``folder`` (see the module doc) without the relative paths in ``skip``.
    Raises BundleError over the total limit."""
    folder = os.path.abspath(folder)
    files, big = walk(folder, skip)
    total = sum(s for _, _, s in files)
    if total > max_total_bytes():
        largest = ", ".join(f"{r} ({_mb(s)})" for r, _, s in
                            sorted(files, key=lambda f: -f[2])[:5])
        raise BundleError(
            f"the notebook's folder {folder} holds {_mb(total)} to bundle, over the limit of "
            f"{_mb(max_total_bytes())} (NBFLOW_BUNDLE_MAX_MB); the largest files: {largest}. "
            f"List data the tasks do not need in {os.path.join(folder, IGNORE_FILE)} "
            f"(gitignore syntax), raise NBFLOW_BUNDLE_MAX_MB, or submit with --no-bundle "
            f"(NBFLOW_BUNDLE=0) if the workers share this filesystem")
    h = hashlib.sha256()
    buf = io.BytesIO()
    packed: list[str] = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for rel, p, _ in files:
            try:
                with open(p, "rb") as f:
                    data = f.read()
                mode = os.stat(p).st_mode
            except FileNotFoundError:
                continue                # deleted since the walk (a log rotated, a temp file)
            except OSError as e:
                raise BundleError(f"cannot read {p} to bundle it: {e.strerror}; list it in "
                                  f"{os.path.join(folder, IGNORE_FILE)}") from None
            x = 0o755 if mode & 0o111 else 0o644
            h.update(rel.encode() + b"\0" + oct(x).encode() + b"\0" +
                     hashlib.sha256(data).digest())
            info = zipfile.ZipInfo(rel, ZIP_TIME)
            info.external_attr = (stat.S_IFREG | x) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            packed.append(rel)
    return Bundle(h.hexdigest()[:32], buf.getvalue(), packed, big, total)


def content_hash_of(zf: zipfile.ZipFile) -> str:
    """The bundle hash of an opened zip (to verify a download)."""
    h = hashlib.sha256()
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        if info.is_dir():
            continue
        x = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
        h.update(info.filename.encode() + b"\0" + oct(x).encode() + b"\0" +
                 hashlib.sha256(zf.read(info)).digest())
    return h.hexdigest()[:32]


def big_files_warning(folder: str, bundle: Bundle) -> str:
    if not bundle.skipped_big:
        return ""
    names = ", ".join(f"{r} ({_mb(s)})" for r, s in bundle.skipped_big[:10])
    more = f" and {len(bundle.skipped_big) - 10} more" if len(bundle.skipped_big) > 10 else ""
    return (f"left out of the bundle of {folder} (over {_mb(max_file_bytes())} each, "
            f"NBFLOW_BUNDLE_MAX_FILE_MB): {names}{more}; tasks on other hosts will not find them "
            f"at relative paths — read them from shared storage, or raise the limit")


# --- the modules a notebook imports ---------------------------------------------------------

def _parse_lenient(code: str):
    try:
        return ast.parse(code)
    except SyntaxError:
        pass
    if code.lstrip().startswith("%%"):
        return None
    lines = ["" if ln.lstrip().startswith(("%", "!")) else ln for ln in code.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


@functools.lru_cache(maxsize=4096)
def imported_modules(code: str) -> frozenset[str]:
    """Top-level names of the absolute imports in ``code`` (IPython magics tolerated). Cached:
    every submit asks again for each cell of its workflow."""
    tree = _parse_lenient(code)
    if tree is None:
        return frozenset()
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out.update(a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            out.add(n.module.split(".")[0])
    return frozenset(out)


def third_party(mods: set[str]) -> set[str]:
    """Without the standard library and nbflow itself."""
    return {m for m in mods if m not in sys.stdlib_module_names and m != "nbflow"
            and not m.startswith("_")}


def workflow_modules(wf: Workflow, node_id: str | None = None) -> set[str]:
    """The third-party modules the workflow's setup cells (and one task's code, or all) import."""
    codes = list(wf.setup) + [wf.params_source]
    for n in wf.tasks:
        if node_id is None or n.id == node_id:
            codes += [n.code, n.when or ""]
    mods: set[str] = set()
    for c in codes:
        mods |= imported_modules(c or "")
    return third_party(mods)


def local_module(folder: str, mod: str) -> bool:
    """Whether ``mod`` is importable from ``folder`` itself (a module or package next to it)."""
    if os.path.isfile(os.path.join(folder, mod + ".py")) or \
            os.path.isdir(os.path.join(folder, mod)):
        return True
    try:
        return any(n.startswith(mod + ".") and n.endswith((".so", ".pyd"))
                   for n in os.listdir(folder))
    except OSError:
        return False


_versions: dict[str, str] = {}
_dists: dict[str, list[str]] | None = None


def module_versions(mods: set[str]) -> dict[str, str]:
    """{module: installed distribution version, or "" when not from a distribution}. Cached per
    process: scanning every installed distribution takes about a second."""
    global _dists
    from importlib import metadata

    todo = [m for m in mods if m not in _versions]
    if todo and _dists is None:
        try:
            _dists = metadata.packages_distributions()
        except Exception:  # noqa: BLE001 - broken metadata must not stop a submit
            _dists = {}
    for m in todo:
        version = ""
        for d in (_dists or {}).get(m, []):
            try:
                version = metadata.version(d)
                break
            except Exception:  # noqa: BLE001
                continue
        _versions[m] = version
    return {m: _versions[m] for m in sorted(mods)}
