"""The wheel maps every top-level folder 1:1 under ``effexport`` and ships every sub-package, and
nothing else.

The wheel is built from a clean copy of the source files (the files git tracks plus new files it does
not ignore) in a temporary directory, never in the checkout: a stale ``build/lib`` or ``*.egg-info``
left there by an earlier build would otherwise be packed as well and hide a module setup.py misses.
"""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = ("exporter", "passes", "custom_ops", "samples")
TIMEOUT_S = 600


class Wheel(set):
    """The wheel's file names, plus its entry_points.txt text."""

    def __init__(self, names, entry_points):
        super().__init__(names)
        self.entry_points = entry_points


def _source_files() -> list[str]:
    """Paths (relative to the repository) of the files a clean clone of the working tree has."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True, timeout=60).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for rel in _source_files():
        os.makedirs(os.path.dirname(src / rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, cwd=str(out), timeout=TIMEOUT_S)
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    with zipfile.ZipFile(out / wheel) as zf:
        names = set(zf.namelist())
        (entry,) = [n for n in names if n.endswith("entry_points.txt")]
        return Wheel(names, zf.read(entry).decode())


def _source_modules() -> set[str]:
    """Every module of a source package (a folder with ``__init__.py`` under a top-level folder),
    at its installed path; ``exporter/_root`` is the namespace root (``effexport/__init__.py``,
    ``effexport/runtime.py``)."""
    files = [f for f in _source_files() if f.split("/")[0] in TOP_LEVEL]
    packages = {os.path.dirname(f) for f in files if os.path.basename(f) == "__init__.py"}
    root = "exporter/_root/"
    return {"effexport/" + (f[len(root):] if f.startswith(root) else f)
            for f in files if f.endswith(".py") and os.path.dirname(f) in packages}


def test_wheel_holds_exactly_the_source_modules(wheel_names):
    """Every module of every package, and no other file outside the metadata (no stale or
    duplicated module, no test, no bare top-level package)."""
    expected = _source_modules()
    assert len(expected) > 50, f"only {len(expected)} source modules found"
    shipped = {n for n in wheel_names if ".dist-info/" not in n}
    assert not sorted(expected - shipped), f"modules missing from the wheel: {sorted(expected - shipped)}"
    assert not sorted(shipped - expected), f"files in the wheel that are no source module: {sorted(shipped - expected)}"


def test_wheel_package_set(wheel_names):
    """The packages the wheel installs are ``effexport`` plus one per source package, dotted."""
    shipped = {os.path.dirname(n).replace("/", ".") for n in wheel_names if n.endswith("/__init__.py")}
    expected = {"effexport"} | {"effexport." + os.path.dirname(f).replace("/", ".")
                                for f in _source_files() if f.split("/")[0] in TOP_LEVEL
                                and f.endswith("/__init__.py") and not f.startswith("exporter/_root/")}
    assert shipped == expected


def test_namespace_root_and_no_bare_packages(wheel_names):
    assert "effexport/__init__.py" in wheel_names
    bare = sorted(n for n in wheel_names if n.split("/")[0] in TOP_LEVEL + ("tests",))
    assert not bare, f"bare top-level packages in the wheel: {bare[:5]}"
    assert not any(n.startswith("effexport/tests/") for n in wheel_names)
    assert not any("/_root/" in n for n in wheel_names), "exporter/_root must ship as effexport/__init__.py only"


def test_console_script_declared(wheel_names):
    lines = [l.replace(" ", "") for l in wheel_names.entry_points.splitlines()]
    assert "effexport=effexport.exporter.cli:entry_point" in lines
